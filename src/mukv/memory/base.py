"""The interface every memory method implements, and the typed results it returns.

A memory method turns a stream of visual tokens into retrievable state (``ingest``) and, for a
question at time ``t``, assembles the KV cache the answer is generated from (``prepare``). The
engine appends the question after that cache and decodes; it never looks inside a method.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import DynamicCache

from mukv.backends.base import Backend


@dataclass(frozen=True)
class RetrievedBlock:
    """A piece of the stream placed in the answering cache: frames ``first_frame..last_frame``."""

    granularity: str
    first_frame: int
    last_frame: int
    start_time: float
    end_time: float
    tokens: int
    score: float | None = None
    block_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MemoryStats:
    """What a method holds, by granularity (``init`` is the system prompt's KV)."""

    frames: int
    blocks: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(total_bytes=self.total_bytes, total_tokens=self.total_tokens)
        return data


@dataclass(frozen=True)
class Query:
    """A question as memory methods see it: bare text, its token ids ``[1, n]``, and its time."""

    text: str
    ids: torch.Tensor
    time: float


@dataclass
class AnswerContext:
    """An assembled cache to append the question to.

    ``next_position`` is the RoPE position of the first question token. Every built-in method
    uses the cache length, as transformers does by default (so MuKV's ``reference`` order, whose
    blocks keep overlapping baked-in positions, puts the question after the cache length like the
    release does); a method may choose otherwise.
    """

    cache: DynamicCache
    next_position: int
    context_tokens: int
    retrieved: tuple[RetrievedBlock, ...] = ()


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by all keys and values of ``cache``."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def prefill(backend: Backend, cache: DynamicCache, embeds: torch.Tensor, start: int, chunk_tokens: int) -> int:
    """Append ``embeds [1, n, d]`` to ``cache`` at positions ``start..start+n-1``, in chunks of at
    most ``chunk_tokens`` tokens (bounds the attention workspace; results do not depend on it).

    Returns the next free position.
    """
    n = embeds.shape[1]
    for offset in range(0, n, chunk_tokens):
        piece = embeds[:, offset : offset + chunk_tokens]
        positions = torch.arange(start + offset, start + offset + piece.shape[1], device=backend.device).unsqueeze(0)
        backend.forward(piece, cache, positions, logits="none")
    return start + n


class MemoryMethod(ABC):
    """Base of the memory methods; subclasses register with :func:`mukv.memory.register_method`.

    The base keeps the timestamps of ingested frames (strictly increasing, enforced by the
    session) so that every method can tell which frames a question at time ``t`` may use.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    # Whether ``prepare`` can answer at a time before the newest frame (a declared capability).
    answers_past_questions: ClassVar[bool] = True

    def __init__(self, backend: Backend, config: Any = None) -> None:
        self.backend = backend
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ValueError(
                f"config: method {self.name!r} takes {self.config_class.__name__}, got {type(self.config).__name__}"
            )
        self._timestamps: list[float] = []

    @property
    def frames(self) -> int:
        """Frames ingested so far."""
        return len(self._timestamps)

    def frames_until(self, time: float) -> int:
        """How many ingested frames have timestamp <= ``time`` (they are the first ones)."""
        return bisect.bisect_right(self._timestamps, time)

    @property
    def time(self) -> float | None:
        """Timestamp of the newest frame (``None`` before any): the stream's clock."""
        return self._timestamps[-1] if self._timestamps else None

    def timestamp(self, index: int) -> float:
        return self._timestamps[index]

    def frame_blocks(self, indices) -> tuple[RetrievedBlock, ...]:
        """Retrieved-block records for whole frames ``indices`` (methods that use frames as is)."""
        p = self.backend.tokens_per_frame
        return tuple(
            RetrievedBlock(
                granularity="frame",
                first_frame=i,
                last_frame=i,
                start_time=self.timestamp(i),
                end_time=self.timestamp(i),
                tokens=p,
                block_id=i,
            )
            for i in indices
        )

    def ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        """Add frames: visual tokens ``[T, P, d]`` and their timestamps ``[T]`` (seconds)."""
        if features.ndim != 3 or features.shape[0] != len(timestamps):
            raise ValueError(f"features: expected [T, P, d] with T = {len(timestamps)}, got {list(features.shape)}")
        self._ingest(features, timestamps)
        self._timestamps.extend(float(t) for t in timestamps)

    @abstractmethod
    def _ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        """Method-specific part of :meth:`ingest` (``self.frames`` is the first new frame's index)."""

    @abstractmethod
    def prepare(self, query: Query) -> AnswerContext:
        """Assemble the answering cache for ``query`` from frames with timestamp <= ``query.time``.

        Must not modify stored state: the same question asked twice gets the same cache.
        """

    @abstractmethod
    def stats(self) -> MemoryStats:
        """Exact accounting of what is held."""
