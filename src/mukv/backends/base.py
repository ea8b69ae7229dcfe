"""The backend protocol: everything the rest of the package knows about a model family.

A backend turns frames into visual token embeddings, text into token embeddings, and runs the
language model over embeddings with a transformers ``DynamicCache`` and explicit positions. It
owns the frame layout (what one visual unit yields) and the position scheme (where tokens sit,
and how stored keys move): memory methods and the engine only talk to this protocol, never to
model classes, and never build positions themselves.

Where a model places frames in time by the rate they were sampled at (Qwen2.5-VL: a unit of
``temporal_patch_size`` frames spans ``temporal_patch_size / fps`` seconds), that rate belongs to
the stream, not to the backend: one backend serves streams sampled at different rates. So
:attr:`Backend.positions` places text and moves keys, and :meth:`Backend.stream_positions` gives
the scheme one stream's visual tokens are placed by; a memory method holds its stream's scheme.

A new model family is one module in :mod:`mukv.backends` with a class implementing this protocol,
registered for its checkpoints' ``model_type`` with :func:`mukv.backends.registry.register_backend`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from transformers import DynamicCache

from mukv.backends.positions import FrameLayout, PositionScheme
from mukv.backends.prompts import PromptTemplate


@dataclass(frozen=True, kw_only=True)
class TextModelSpec:
    """Shape facts of the language model, read from its config (never hard-coded)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int
    rope_theta: float

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes one token occupies in a K+V cache over all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


Logits = Literal["none", "last", "all"]


@runtime_checkable
class Backend(Protocol):
    """A video LLM seen through the operations memory methods need."""

    model_id: str
    device: torch.device
    dtype: torch.dtype
    prompts: PromptTemplate
    text: TextModelSpec
    layout: FrameLayout
    #: Places text (and a continuation after a cache) and moves stored keys; visual tokens of a
    #: stream are placed by :meth:`stream_positions` (the same as this one for 1-D RoPE).
    positions: PositionScheme
    eos_token_ids: frozenset[int]

    def stream_positions(self, fps: float | None) -> PositionScheme:
        """The position scheme of one stream whose frames are sampled at ``fps`` frames per second:
        :attr:`positions` with the stream's time step where the family has one (otherwise
        :attr:`positions` itself, whatever ``fps``). ``ValueError`` if the family needs the rate and
        ``fps`` is ``None``, or if ``fps`` is not a positive number."""
        ...

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per unit (``layout.tokens``)."""
        ...

    def encode_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[T, H, W, 3]`` -> visual tokens ``[U, P, w]`` on ``device``: one row per
        visual unit (``U = T / layout.frames_per_unit``), ``P = layout.tokens``. ``w`` is the model's
        hidden size ``d``, or a multiple of it where each visual token carries more than its input
        embedding (Qwen3-VL's DeepStack maps, side by side): whatever selects or moves tokens carries
        them unchanged, and :meth:`forward` takes them as they are."""
        ...

    def unit_text(self, time: float) -> tuple[str, str]:
        """The text the model's processor writes before and after a visual unit stamped ``time``
        seconds (the mean time of its frames), ``("", "")`` where it writes none. Qwen3-VL writes
        ``<{time:.1f} seconds><|vision_start|>`` and ``<|vision_end|>``: a unit is then fed with its
        text, and its place in a stream depends on the text lengths before it
        (:func:`mukv.memory.base.unit_sequence`)."""
        ...

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids ``[1, n]`` (long, on ``device``) of ``text``, special tokens parsed."""
        ...

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[1, n]`` -> input embeddings ``[1, n, d]``."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of generated token ids, special tokens removed."""
        ...

    def forward(
        self,
        embeds: torch.Tensor,
        cache: DynamicCache,
        position_ids: torch.Tensor,
        logits: Logits = "last",
    ) -> torch.Tensor | None:
        """Run the language model over ``embeds [B, n, d]`` (or ``[B, n, w]``: visual features as
        :meth:`encode_frames` gives them, text rows zero beyond ``d``) at ``position_ids [R, n]`` (from
        :attr:`positions` or a stream's :meth:`stream_positions`; every sequence of a batch at the
        same positions).

        Appends the new keys/values to ``cache``, and fails loudly if the model did not. Returns
        logits ``[B, 1, V]`` (``"last"``), ``[B, n, V]`` (``"all"``) or ``None``.
        """
        ...

    def system_cache(self) -> tuple[DynamicCache, int]:
        """A fresh cache holding the system prompt's KV, and its length in tokens."""
        ...

    def capture_attention(self, weights: dict[int, float], query_layer: int | None = None) -> AbstractContextManager:
        """Context manager: forwards inside record the attention of layers ``weights`` (see
        :class:`mukv.compress.attention.AttentionCapture`), and ``query_layer``'s queries."""
        ...

    def attention_hook(self, hook) -> AbstractContextManager:
        """Context manager: every language-model attention call inside goes through ``hook``
        (see :class:`mukv.compress.attention.AttentionHook`)."""
        ...
