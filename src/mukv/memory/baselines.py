"""Baselines without retrieval: ``full`` (plain LLaVA-OneVision over the whole stream) and
``uniform`` (a fixed number of frames sampled uniformly at question time)."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from mukv.memory.base import (
    AnswerContext,
    MemoryMethod,
    MemoryStats,
    Query,
    RetrievedBlock,
    cache_bytes,
    feed,
    prefill_frames,
    unit_sequence,
)
from mukv.memory.registry import register_method

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FullConfig:
    """``prefill_chunk_tokens`` bounds the tokens prefilled per forward call (memory only)."""

    prefill_chunk_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens: must be >= 1, got {self.prefill_chunk_tokens}")


@register_method
class FullMemory(MemoryMethod):
    """Every frame's KV in one contiguous cache on the model's device: ``[init | f0 | f1 | ...]``.

    Each visual token is prefilled once, as frames arrive, attending to everything before it:
    exactly one plain forward over the whole stream. A question at ``t`` uses the cache prefix
    that ends with the last frame at or before ``t``.
    """

    name = "full"
    config_class = FullConfig

    def __init__(self, backend, config: FullConfig | None = None, *, fps: float | None = None) -> None:
        super().__init__(backend, config, fps=fps)
        self._cache, self._init_len = backend.system_cache()
        self._length = self._init_len
        # The stream is one run of units from the end of the system prompt, however it is fed:
        # each ingest continues it, so chunked ingestion places every unit as one call would (a
        # Qwen2.5-VL video's time axis counts units from the run's start).
        self._cursor = self._init_len
        # Where a model writes text around every unit, units differ in length: the cache length and
        # the cursor after each unit, so that a question about an earlier time takes its prefix.
        self._unit_ends: list[tuple[int, int]] = []
        self._warned = False

    def _ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        stamps = self.stamps(self.frames, features.shape[0])
        flat, positions, cursor, units = unit_sequence(
            self.backend, self.positions, features, stamps, self._init_len, first_unit=self.frames, cursor=self._cursor
        )
        feed(self.backend, self._cache, flat, positions, self.config.prefill_chunk_tokens)
        if self.units_have_text:
            self._unit_ends += [
                (self._length + u.offset + u.length(self.backend.tokens_per_frame), u.cursor) for u in units
            ]
        self._cursor = cursor
        self._length = self._cache.get_seq_length()
        if cursor > self.backend.text.max_positions and not self._warned:
            self._warned = True
            log.warning(
                "full: %d cached positions exceed the model's %d trained positions; answers may degrade",
                cursor,
                self.backend.text.max_positions,
            )

    def restore(self, keys_values: Sequence[tuple[torch.Tensor, torch.Tensor]], timestamps: Sequence[float]) -> None:
        """Adopt the visual KV of the next ``len(timestamps)`` frames, per layer ``(keys, values)``
        ``[1, Hkv, U * P, D]`` computed as the scheme places them after the current cache (a saved
        memory, or a benchmark's synthetic state), as if the frames had been ingested."""
        if self.units_have_text:
            raise ValueError("restore: this model writes text around every unit; its frames can only be ingested")
        count = len(timestamps)
        tokens = count * self.backend.tokens_per_frame
        if len(keys_values) != len(self._cache.layers) or any(k.shape[2] != tokens for k, _ in keys_values):
            raise ValueError(f"restore: expected {len(self._cache.layers)} layers of {tokens} tokens each")
        first = self.frames
        self._advance_clock(timestamps)  # validates the timestamps before anything else changes
        self._cursor = self.positions.visual_run(self._init_len, self.backend.layout, count, first_unit=first)[1]
        for layer, (keys, values) in zip(self._cache.layers, keys_values, strict=True):
            layer.update(keys.to(layer.keys), values.to(layer.values))
        self._length = self._cache.get_seq_length()

    def _cursor_after(self, frames: int) -> int:
        """The cursor after the first ``frames`` frames of the run."""
        if frames == 0:
            return self._init_len
        if self.units_have_text:
            return self._unit_ends[frames - 1][1]
        return self.positions.visual_run(self._init_len, self.backend.layout, 1, first_unit=frames - 1)[1]

    def _length_after(self, frames: int) -> int:
        """The cache length after the first ``frames`` frames."""
        if self.units_have_text:
            return self._unit_ends[frames - 1][0] if frames else self._init_len
        return self._init_len + frames * self.backend.tokens_per_frame

    def prepare(self, query: Query) -> AnswerContext:
        frames = self.frames_until(query.time)
        length = self._length_after(frames)
        cursor = self._cursor_after(frames)
        # Views of the stored prefix: the first cache update while answering concatenates into new
        # tensors, so the stored cache is never modified.
        cache = DynamicCache(
            ddp_cache_data=[(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in self._cache.layers]
        )
        pending = self.pending_unit(query.time)
        if pending is not None:
            # The provisional unit continues the run in the answer's own cache only.
            cursor = prefill_frames(
                self.backend,
                cache,
                pending.features[None].to(self.backend.device),
                self._init_len,
                self.config.prefill_chunk_tokens,
                first_unit=frames,
                scheme=self.positions,
                stamps=[self.stamp(frames)],
                cursor=cursor,
            )
            frames += 1
            length = cache.get_seq_length()
        retrieved = ()
        if frames:
            retrieved = (
                RetrievedBlock(
                    granularity="frame",
                    first_frame=0,
                    last_frame=frames - 1,
                    start_time=self.timestamp(0),
                    end_time=self.timestamp(frames - 1),
                    tokens=length - self._init_len,
                ),
            )
        return AnswerContext(cache=cache, next_position=cursor, context_tokens=length, retrieved=retrieved)

    def stats(self) -> MemoryStats:
        total = cache_bytes(self._cache)
        per_token = total // self._length
        visual = self._length - self._init_len
        return MemoryStats(
            frames=self.frames,
            blocks={"init": 1, "frame": self.frames},
            tokens={"init": self._init_len, "frame": visual},
            bytes={"init": per_token * self._init_len, "frame": per_token * visual},
        )


@dataclass(frozen=True, kw_only=True)
class UniformConfig:
    """``num_frames`` frames are sampled uniformly (LLaVA-OneVision's own video setting uses 32)."""

    num_frames: int = 32
    prefill_chunk_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames: must be >= 1, got {self.num_frames}")
        if self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens: must be >= 1, got {self.prefill_chunk_tokens}")


@register_method
class UniformMemory(MemoryMethod):
    """Keeps every frame's visual tokens (not KV) off the accelerator; at question time samples
    ``num_frames`` of the frames seen so far uniformly and prefills them fresh after ``init``."""

    name = "uniform"
    config_class = UniformConfig

    def __init__(self, backend, config: UniformConfig | None = None, *, fps: float | None = None) -> None:
        super().__init__(backend, config, fps=fps)
        self._chunks: list[torch.Tensor] = []
        self._starts: list[int] = []
        self._init_len = backend.system_cache()[1]

    def _ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        self._starts.append(self.frames)
        self._chunks.append(features.detach().to("cpu", copy=True))

    def _frame(self, index: int) -> torch.Tensor:
        if index == self.frames and self._pending_unit is not None:
            return self._pending_unit.features.to("cpu")
        chunk = bisect.bisect_right(self._starts, index) - 1
        return self._chunks[chunk][index - self._starts[chunk]]

    def sample(self, frames: int) -> list[int]:
        """Indices of the frames used for a question that sees the first ``frames`` frames."""
        if frames <= self.config.num_frames:
            return list(range(frames))
        return sorted({int(i) for i in np.linspace(0, frames - 1, self.config.num_frames).round()})

    def prepare(self, query: Query) -> AnswerContext:
        cache, position = self.backend.system_cache()
        # The provisional unit (index ``frames``) is sampled like a stored one.
        seen = self.frames_until(query.time) + (self.pending_unit(query.time) is not None)
        indices = self.sample(seen)
        if indices:
            features = torch.stack([self._frame(i) for i in indices]).to(self.backend.device)
            position = prefill_frames(
                self.backend,
                cache,
                features,
                position,
                self.config.prefill_chunk_tokens,
                scheme=self.positions,
                stamps=[self.stamp(i) for i in indices],
            )
        retrieved = self.frame_blocks(indices)
        length = cache.get_seq_length()
        return AnswerContext(cache=cache, next_position=position, context_tokens=length, retrieved=retrieved)

    def stats(self) -> MemoryStats:
        stored = sum(c.nbytes for c in self._chunks)
        init_len = self._init_len
        init_bytes = init_len * self.backend.text.kv_bytes_per_token(self.backend.dtype)
        return MemoryStats(
            frames=self.frames,
            blocks={"init": 1, "frame": self.frames},
            tokens={"init": init_len, "frame": self.frames * self.backend.tokens_per_frame},
            bytes={"init": init_bytes, "frame": stored},
        )
