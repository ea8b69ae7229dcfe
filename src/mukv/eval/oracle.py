"""The oracle reference of the accuracy study: a memory that always holds the evidence.

:class:`OracleMemory` answers from ``budget_frames`` frames: the evidence frames of the question,
known from the synthetic stream's ground truth (:class:`mukv.video.streams.StreamQuestion`), plus
filler frames spread evenly over the rest of the stream seen so far. Its cache is built the way
the retrieval-based methods build theirs: every frame is one block encoded on its own after the
system prompt (as MuKV's ``encode=independent`` frame blocks are), stored whole (no pruning), and
the chosen blocks are assembled in time order, re-positioned one after another
(:meth:`mukv.memory.blocks.BlockMemory.assemble` with ``reposition=True``, as MuKV's
``order=temporal`` and ReKV do). Its retrieval recall is 1.0 by construction: whatever it answers
shows what the model reads from a cache holding the evidence at the study's budget, apart from
what a method finds.

It is **not a user-facing method** and is not registered (``mukv methods`` does not list it, and
``mukv eval --method`` cannot name it): it needs the answer's evidence, which no real stream
comes with. The study creates one per stream with that stream's ground truth and hands it to a
:class:`mukv.engine.StreamSession` (which accepts a method instance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from transformers import DynamicCache

from mukv.backends.base import Backend
from mukv.kv.blocks import BlockPayload
from mukv.memory.base import AnswerContext, MemoryStats, PendingUnit, Query, unit_sequence
from mukv.memory.blocks import BlockMemory
from mukv.video.streams import SyntheticStream


@dataclass(frozen=True, kw_only=True)
class OracleConfig:
    """``budget_frames`` frames in the answering cache (evidence first, then fillers);
    ``encode_batch_frames`` frames encoded per forward call (speed only: each is independent)."""

    budget_frames: int = 42
    encode_batch_frames: int = 32

    def __post_init__(self) -> None:
        # An order question's evidence is two frames.
        if self.budget_frames < 2:
            raise ValueError(f"budget_frames: must be >= 2, got {self.budget_frames}")
        if self.encode_batch_frames < 1:
            raise ValueError(f"encode_batch_frames: must be >= 1, got {self.encode_batch_frames}")


def filler_frames(candidates: Sequence[int], count: int) -> list[int]:
    """``count`` of ``candidates`` (frame indices in time order) spread evenly over them, first
    included: ``candidates[i * n // count]``, distinct for ``count <= n``."""
    n = len(candidates)
    count = min(count, n)
    return [candidates[i * n // count] for i in range(count)] if count > 0 else []


class OracleMemory(BlockMemory):
    """Evidence frames plus evenly spread fillers, independently encoded and re-positioned (see the
    module docstring). ``evidence`` maps a question's text to its evidence frames
    ``(first_frame, last_frame)``; a question without an entry is a ``KeyError``."""

    name: ClassVar[str] = "oracle"
    config_class: ClassVar[type] = OracleConfig

    def __init__(
        self,
        backend: Backend,
        config: OracleConfig | None = None,
        *,
        fps: float | None = None,
        evidence: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        if backend.layout.frames_per_unit != 1:
            # Evidence is counted in video frames, the memory in units: on a model that merges frames
            # (Qwen-VL pairs) the two would disagree, and the budget would count pairs.
            raise ValueError(
                f"oracle: the synthetic streams' evidence is per frame; {backend.model_id} merges "
                f"{backend.layout.frames_per_unit} frames per unit"
            )
        super().__init__(backend, config, fps=fps)
        self.evidence: dict[str, tuple[int, int]] = dict(evidence or {})
        # Block id of every stored frame, by frame index.
        self._block_of: list[int] = []

    @classmethod
    def for_stream(
        cls, backend: Backend, stream: SyntheticStream, config: OracleConfig | None = None, *, fps: float | None = None
    ) -> OracleMemory:
        """An oracle for ``stream``, with every one of its questions' evidence frames."""
        evidence = {q.question: (q.first_frame, q.last_frame) for q in stream.questions}
        return cls(backend, config, fps=fps, evidence=evidence)

    # ------------------------------------------------------------------ encoding

    def _encode(self, features: torch.Tensor, first: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(kv [L, 2, Hkv, n, D], positions [R, n])`` of units ``first ..`` (``features [U, P, w]``),
        each fed on its own right after the system prompt."""
        out = []
        batch = self.config.encode_batch_frames
        for start in range(0, features.shape[0], batch):
            chunk = features[start : start + batch]
            embeds, positions = [], []
            for i in range(chunk.shape[0]):
                flat, pos, _, _ = unit_sequence(
                    self.backend, self.positions, chunk[i : i + 1], [self.stamp(first + start + i)], self.init_len
                )
                embeds.append(flat)
                positions.append(pos)
            if all(torch.equal(p, positions[0]) for p in positions) and all(e.shape == embeds[0].shape for e in embeds):
                groups = [(torch.stack(embeds), positions[0], list(range(len(embeds))))]
            else:
                # Units with text of varying length around them (timestamps): one at a time.
                groups = [(e[None], p, [i]) for i, (e, p) in enumerate(zip(embeds, positions, strict=True))]
            results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for stacked, pos, members in groups:
                b = stacked.shape[0]
                cache = DynamicCache(
                    ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in self.init_kv]
                )
                self.backend.forward(stacked, cache, pos, logits="none")
                init = self.init_len
                kv = torch.stack(
                    [torch.stack((layer.keys[:, :, init:], layer.values[:, :, init:]), 1) for layer in cache.layers],
                    dim=1,
                )  # [b, L, 2, Hkv, n, D]
                for j, member in enumerate(members):
                    # A copy off the accelerator: the batch's tensors are not kept alive by one block.
                    results[member] = (kv[j].to("cpu", copy=True), pos.to("cpu", copy=True))
            out.extend(results[i] for i in range(chunk.shape[0]))
        return out

    def _store_frame(
        self, frame: int, time: float, kv: torch.Tensor, positions: torch.Tensor, *, provisional: bool = False
    ) -> int:
        """Store frame ``frame`` taken at ``time`` as one whole block; returns its id."""
        payload = BlockPayload(kv=kv, positions=positions, kept=torch.arange(kv.shape[3]), scores=torch.empty(0))
        record = self.add_block(
            granularity="frame",
            first_frame=frame,
            last_frame=frame,
            part=0,
            start_time=time,
            end_time=time,
            payload=payload,
            # Never ranked; the store indexes every block by one.
            representative=kv[-1, 0].float().mean(dim=1).reshape(-1),
            provisional=provisional,
        )
        return record.block_id

    def _ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        start = self.frames
        # The clock advances after ``_ingest``: the new frames' times come from ``timestamps``.
        for i, (kv, positions) in enumerate(self._encode(features.to(self.backend.device), start)):
            self._block_of.append(self._store_frame(start + i, float(timestamps[i]), kv, positions))

    def _store_open(self, upto: int, pending: PendingUnit | None) -> None:
        # Every ingested frame is a stored block already; only a provisional unit needs one.
        if pending is not None:
            ((kv, positions),) = self._encode(pending.features[None].to(self.backend.device), self.frames)
            self._store_frame(self.frames, pending.time, kv, positions, provisional=True)

    # ------------------------------------------------------------------ answering

    def choose(self, query: Query) -> tuple[list[int], list[int]]:
        """``(evidence, fillers)``: frame indices of the answering cache for ``query`` (the
        evidence frames, then ``budget_frames - len(evidence)`` fillers spread over the other
        frames up to ``query.time``), each in time order."""
        if query.text not in self.evidence:
            raise KeyError(f"oracle: no evidence known for the question {query.text!r}")
        first, last = self.evidence[query.text]
        seen = self.frames_until(query.time) + (self.pending_unit(query.time) is not None)
        if not 0 <= first <= last < seen:
            raise ValueError(
                f"oracle: evidence frames {first}-{last} of {query.text!r} are not all seen by {query.time:.1f}s "
                f"({seen} frames)"
            )
        evidence = list(range(first, last + 1))
        if len(evidence) > self.config.budget_frames:
            budget = self.config.budget_frames
            raise ValueError(f"oracle: {len(evidence)} evidence frames exceed budget_frames={budget}")
        others = [f for f in range(seen) if not first <= f <= last]
        return evidence, filler_frames(others, self.config.budget_frames - len(evidence))

    def _block_id(self, frame: int) -> int:
        if frame < len(self._block_of):
            return self._block_of[frame]
        # The provisional unit (frame index ``frames``).
        return next(i for i in self.provisional_ids if self.store.record(i).first_frame == frame)

    def prepare(self, query: Query) -> AnswerContext:
        self.check_materialized(query.time)
        evidence, fillers = self.choose(query)
        frames = sorted(evidence + fillers)
        block_ids = [self._block_id(f) for f in frames]
        cache, tokens = self.assemble(block_ids, reposition=True)
        cursor = self.placed_positions([self.store.payload(i) for i in block_ids], self.init_len)[1]
        # Score 1.0 marks an evidence block, 0.0 a filler.
        chosen = [(i, 1.0 if f in evidence else 0.0) for i, f in zip(block_ids, frames, strict=True)]
        return AnswerContext(
            cache=cache,
            next_position=cursor,
            context_tokens=self.init_len + tokens,
            retrieved=self.retrieved_blocks(chosen),
        )

    def stats(self) -> MemoryStats:
        blocks, tokens, nbytes = self.store.totals()
        blocks["init"] = 1
        tokens["init"] = self.init_len
        nbytes["init"] = self.init_nbytes()
        nbytes["index"] = self.store.index_nbytes()
        return MemoryStats(frames=self.frames, blocks=blocks, tokens=tokens, bytes=nbytes)
