"""LLaVA-OneVision through transformers 5.x: the reference backend.

Uses the model's own vision tower, projector and bilinear pooling
(``model.model.get_video_features``) and runs ``model.model.language_model`` plus ``lm_head``
over embeddings with a ``DynamicCache`` and explicit ``position_ids``. Nothing here patches the
model.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, DynamicCache, LlavaOnevisionForConditionalGeneration

from mukv.backends.base import Logits, TextModelSpec
from mukv.backends.positions import FrameLayout, RopePositions
from mukv.backends.prompts import PromptTemplate
from mukv.backends.registry import register_backend, resolve_device, resolve_dtype, resolve_model_dir
from mukv.backends.transformers_api import check_cache_grew
from mukv.compress.attention import attention_hook, capture_attention, use_hooked_attention
from mukv.config import BackendConfig
from mukv.errors import ModelLoadError
from mukv.video.preprocess import PREPROCESSOR_FILES, FramePreprocessor, as_frames

log = logging.getLogger(__name__)


def video_tokens_per_frame(image_size: int, patch_size: int) -> int:
    """Visual tokens per video frame: ``get_video_features`` pools the grid x grid patch
    features bilinearly to ``ceil(grid / 2) ** 2`` (196 at 384 px / patch 14, 16 at 112 px)."""
    grid = image_size // patch_size
    return math.ceil(grid / 2) ** 2


@register_backend("llava_onevision")
class LlavaOnevisionBackend:
    """A loaded LLaVA-OneVision checkpoint (see :class:`mukv.backends.base.Backend`).

    One visual unit is one frame: the vision tower's patch grid pooled 2x2 (bilinear) to a square
    grid of ``ceil(grid / 2) ** 2`` tokens; positions are 1-D RoPE (Qwen2).
    """

    def __init__(
        self,
        model: LlavaOnevisionForConditionalGeneration,
        tokenizer,
        preprocessor: FramePreprocessor,
        *,
        model_id: str,
        prompts: PromptTemplate | None = None,
        vision_batch_frames: int = 16,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.model_id = model_id
        self.prompts = prompts or PromptTemplate()
        self.vision_batch_frames = vision_batch_frames
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._lm = model.model.language_model
        self._embed = self._lm.get_input_embeddings()
        config = model.config
        text = config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rope = getattr(text, "rope_parameters", None) or {}
        self.text = TextModelSpec(
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=head_dim,
            hidden_size=text.hidden_size,
            max_positions=text.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
        )
        self.layout = FrameLayout.square(
            video_tokens_per_frame(config.vision_config.image_size, config.vision_config.patch_size)
        )
        rotary = self._lm.rotary_emb
        self.positions = RopePositions(
            rotary.inv_freq, attention_scaling=float(getattr(rotary, "attention_scaling", 1.0))
        )
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._system_lock = threading.Lock()
        # Configured once, here: scoring and retrieval hooks then never change the model's config.
        use_hooked_attention(model)
        self._system: tuple[list[tuple[torch.Tensor, torch.Tensor]], int] | None = None

    @classmethod
    def from_pretrained(
        cls, config: BackendConfig | None = None, *, directory: Path | None = None, **overrides
    ) -> LlavaOnevisionBackend:
        """Load from a hub id or a local directory (``BackendConfig.model``; ``directory`` if the
        caller has resolved it already).

        Raises :class:`ModelLoadError` for unknown ids, missing files and unsupported
        architectures, and ``ValueError`` for invalid device/dtype values.
        """
        config = config or BackendConfig(**overrides)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        directory = directory or resolve_model_dir(config.model)
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"model {config.model!r}: {directory} has no config.json")
        try:
            model_config = AutoConfig.from_pretrained(directory)
        except Exception as exc:
            raise ModelLoadError(f"model {config.model!r}: unreadable config.json in {directory}: {exc}") from exc
        if model_config.model_type != "llava_onevision":
            raise ModelLoadError(
                f"model {config.model!r}: {cls.__name__} loads llava_onevision checkpoints, not "
                f"{model_config.model_type!r} (load_backend picks the backend by model_type)"
            )
        try:
            model = LlavaOnevisionForConditionalGeneration.from_pretrained(
                directory, dtype=dtype, attn_implementation=config.attn_implementation
            )
        except Exception as exc:
            raise ModelLoadError(f"model {config.model!r}: could not load weights from {directory}: {exc}") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as exc:
            raise ModelLoadError(
                f"model {config.model!r}: could not load the tokenizer from {directory}: {exc}"
            ) from exc
        preprocessor = FramePreprocessor.from_directory(directory, tower_size=model_config.vision_config.image_size)
        log.debug(
            "preprocessing from %s: %s", [f for f in PREPROCESSOR_FILES if (directory / f).is_file()], preprocessor
        )
        return cls(
            model.to(device),
            tokenizer,
            preprocessor,
            model_id=config.model,
            vision_batch_frames=config.vision_batch_frames,
        )

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame (``layout.tokens``)."""
        return self.layout.tokens

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[T, H, W, 3]`` -> visual tokens ``[T, P, d]`` (P = ``layout.tokens``).

        Frames are encoded independently by the vision tower, so encoding in batches of
        ``vision_batch_frames`` gives the same tokens as one call.
        """
        frames = as_frames(frames)
        chunks = []
        for start in range(0, frames.shape[0], self.vision_batch_frames):
            pixels = self.preprocessor(
                frames[start : start + self.vision_batch_frames], device=self.device, dtype=self.dtype
            )
            chunks.append(self.visual_tokens(pixels.unsqueeze(0))[0])
        return torch.cat(chunks)

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed clips ``[B, T, 3, S, S]`` -> visual tokens ``[B, T, P, d]`` through the model's
        vision tower, projector and pooling. Differentiable (the trainer uses it with gradients);
        :meth:`encode_frames` is the inference entry point."""
        b, t = pixels.shape[:2]
        out = self.model.model.get_video_features(pixel_values_videos=pixels)
        # pooler_output is [B, T*P + 1, d]: the trailing image_newline closes a whole video, it is
        # not part of any frame, so it is dropped here.
        tokens = out.pooler_output[:, :-1]
        p = self.layout.tokens
        if tokens.shape[1] != t * p:
            raise RuntimeError(
                f"vision features have {tokens.shape[1]} tokens for {t} frames; expected {p} per frame from the config"
            )
        return tokens.reshape(b, t, p, -1)

    def tokenize(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids.to(self.device)

    @torch.inference_mode()
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embed(ids.to(self.device))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        cache: DynamicCache,
        position_ids: torch.Tensor,
        logits: Logits = "last",
    ) -> torch.Tensor | None:
        """Language model over ``embeds [B, n, d]`` at ``position_ids [1, n]``; see the protocol."""
        before = cache.get_seq_length()
        if position_ids.ndim != 2 or position_ids.shape != (self.positions.rows, embeds.shape[1]):
            raise ValueError(
                f"position_ids: expected [{self.positions.rows}, {embeds.shape[1]}], got {list(position_ids.shape)}"
            )
        out = self._lm(
            inputs_embeds=embeds.to(device=self.device, dtype=self.dtype),
            cache=cache,
            # 1-D RoPE takes [B, n]: every sequence of a batch sits at the same positions.
            position_ids=position_ids.to(self.device).expand(embeds.shape[0], -1),
            use_cache=True,
        )
        check_cache_grew(cache, before, embeds.shape[1])
        if logits == "none":
            return None
        hidden = out.last_hidden_state if logits == "all" else out.last_hidden_state[:, -1:]
        return self.model.lm_head(hidden).float()

    def capture_attention(self, weights: dict[int, float], query_layer: int | None = None):
        """Context manager recording the named layers' attention (see :mod:`mukv.compress.attention`)."""
        return capture_attention(self.model, weights, query_layer)

    def attention_hook(self, hook):
        """Context manager routing every language-model attention call through ``hook``."""
        return attention_hook(self.model, hook)

    def system_cache(self) -> tuple[DynamicCache, int]:
        """A fresh cache holding the system prompt's KV (computed once, copied per call; thread-safe)."""
        with self._system_lock:
            if self._system is None:
                ids = self.tokenize(self.prompts.system)
                cache = DynamicCache()
                self.forward(self.embed_ids(ids), cache, self.positions.text(0, ids.shape[1], self.device), "none")
                layers = [(layer.keys, layer.values) for layer in cache.layers]
                self._system = (layers, ids.shape[1])
        layers, length = self._system
        return DynamicCache(ddp_cache_data=layers), length


def _eos_ids(model: LlavaOnevisionForConditionalGeneration, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config.text_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(ids)
