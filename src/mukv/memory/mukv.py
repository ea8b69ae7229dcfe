"""MuKV: multi-grained, compressed KV blocks with semi-hierarchical retrieval (method.md 2-5).

Offline, as frames arrive: every frame gets a frame block and ``P/4``-token patch blocks, every
``F`` frames a segment block; each block's KV is scored (attention of one layer + key frequency),
pruned to its keep ratio, and stored off the accelerator with a representative key vector.
Online, per question: a query vector is ranked against the representatives of the blocks seen
so far, the chosen blocks are copied to the model's device and assembled after the system
prompt, and the question is answered from that cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from mukv.compress.attention import scored_layers
from mukv.compress.scorers import (
    FREQUENCY_SCORERS,
    attention_importance,
    fuse,
    keep_count,
    select_dedup,
    select_tokens,
)
from mukv.kv.blocks import BlockPayload, BlockRecord, BlockStore
from mukv.kv.rope import rerotate
from mukv.memory.base import AnswerContext, MemoryMethod, MemoryStats, Query, RetrievedBlock
from mukv.memory.mukv_config import GRANULARITIES, PRESETS, MukvConfig
from mukv.memory.registry import register_method
from mukv.retrieve.ranking import retrieve

_GROUP_ORDER = {"patch": 0, "frame": 1, "segment": 2}  # reference assembly order
_COARSE_FIRST = {"segment": 0, "frame": 1, "patch": 2}  # temporal order among blocks starting together


def patch_token_indices(tokens_per_frame: int, layout: str) -> list[torch.Tensor]:
    """Token indices of a frame's four patch blocks, ``P/4`` each where ``P`` divides evenly.

    ``raster``: four consecutive runs in row-major order. ``quadrant``: the 2x2 spatial quadrants
    of the square token grid (top-left, top-right, bottom-left, bottom-right), row-major inside.
    """
    if layout == "raster":
        return list(torch.arange(tokens_per_frame).tensor_split(4))
    side = math.isqrt(tokens_per_frame)
    if side * side != tokens_per_frame:
        raise ValueError(f"patch_layout: quadrant needs a square token grid, got {tokens_per_frame} tokens")
    half = (side + 1) // 2
    grid = torch.arange(tokens_per_frame).reshape(side, side)
    return [
        grid[rows, cols].reshape(-1)
        for rows in (slice(0, half), slice(half, side))
        for cols in (slice(0, half), slice(half, side))
    ]


@dataclass
class _Scored:
    """A block ready to store: ``kv [L, 2, Hkv, n, D]`` before pruning, ``positions [n]``."""

    kv: torch.Tensor
    positions: torch.Tensor
    attention: torch.Tensor


@register_method
class MukvMemory(MemoryMethod):
    """The MuKV memory (see the module docstring); options in :class:`MukvConfig`."""

    name = "mukv"
    config_class = MukvConfig
    presets = PRESETS

    def __init__(self, backend, config: MukvConfig | None = None) -> None:
        super().__init__(backend, config)
        cfg = self.config
        self.store = BlockStore(pin_memory=backend.device.type == "cuda")
        cache, self._init_len = backend.system_cache()
        self._init = [(layer.keys, layer.values) for layer in cache.layers]
        self._layers = scored_layers(cfg.attention_layer, backend.text.num_layers)
        self._patches = [p.to(backend.device) for p in patch_token_indices(backend.tokens_per_frame, cfg.patch_layout)]
        self._frequency = FREQUENCY_SCORERS[cfg.frequency]
        # The segment being filled: its frames' indices and times, their visual tokens (independent
        # encoding prefills the segment block from them) or its running prefill (shared encoding).
        self._segment_frames: list[int] = []
        self._segment_times: list[float] = []
        self._segment_features: list[torch.Tensor] = []
        self._segment_cache: DynamicCache | None = None
        self._segment_colsum: torch.Tensor | None = None
        self._provisional: BlockRecord | None = None

    # ------------------------------------------------------------------ encoding

    def _ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        start = self.frames
        times = [float(t) for t in timestamps]
        if self.config.encode == "independent":
            self._encode_frames_independent(features, start, times)
        offset = 0
        f = self.config.segment_frames
        while offset < features.shape[0]:
            index = start + offset
            take = min(features.shape[0] - offset, f - index % f)
            self._extend_segment(features[offset : offset + take], index, times[offset : offset + take])
            self._complete_segments()
            offset += take

    def _extend_segment(self, features: torch.Tensor, first: int, times: list[float]) -> None:
        if self._provisional is not None:
            self.store.remove(self._provisional.block_id)
            self._provisional = None
        self._segment_frames.extend(range(first, first + features.shape[0]))
        self._segment_times.extend(times)
        if self.config.encode == "independent":
            if self.config.granularities.segment:
                self._segment_features.append(features.detach())
        else:
            self._prefill_shared(features, first, times)

    def _complete_segments(self) -> None:
        if len(self._segment_frames) == self.config.segment_frames:
            self._store_segment(provisional=False)
            self._segment_frames, self._segment_times, self._segment_features = [], [], []
            self._segment_cache = None
            self._segment_colsum = None

    def _batched_prefill(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill ``embeds [B, n, d]`` as ``B`` independent blocks after the system prompt.

        Returns ``kv [B, L, 2, Hkv, n, D]`` and head-averaged probabilities ``[B, n, init + n]``.
        """
        b, n = embeds.shape[:2]
        cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in self._init])
        positions = torch.arange(self._init_len, self._init_len + n, device=self.backend.device).expand(b, n)
        with self.backend.capture_attention(self._layers) as capture:
            self.backend.forward(embeds, cache, positions, logits="none")
        kv = torch.stack(
            [
                torch.stack((layer.keys[:, :, self._init_len :], layer.values[:, :, self._init_len :]), 1)
                for layer in cache.layers
            ],
            dim=1,
        )
        return kv, capture.probs

    def _independent_blocks(self, embeds: torch.Tensor) -> list[_Scored]:
        """Encode ``embeds [B, n, d]`` as independent blocks (in batches) and score attention."""
        out: list[_Scored] = []
        n = embeds.shape[1]
        rows = torch.arange(n, device=self.backend.device)
        cols = rows + self._init_len
        positions = cols.clone()
        for start in range(0, embeds.shape[0], self.config.encode_batch_blocks):
            kv, probs = self._batched_prefill(embeds[start : start + self.config.encode_batch_blocks])
            for b in range(kv.shape[0]):
                attention = attention_importance(
                    probs[b], rows, cols, past=self._init_len, causal_correction=self.config.causal_correction
                )
                out.append(_Scored(kv[b], positions, attention))
        return out

    def _encode_frames_independent(self, features: torch.Tensor, start: int, times: list[float]) -> None:
        features = features.to(self.backend.device)
        if self.config.granularities.frame:
            for i, block in enumerate(self._independent_blocks(features)):
                self._store("frame", block, start + i, start + i, 0, times[i], times[i])
        if self.config.granularities.patch:
            patches = torch.stack([features[:, idx] for idx in self._patches], dim=1)  # [T, 4, P/4, d]
            if len({len(idx) for idx in self._patches}) == 1:
                blocks = self._independent_blocks(patches.reshape(-1, patches.shape[2], patches.shape[3]))
            else:  # uneven quarters (P not divisible by 4): one batch per quarter size
                blocks = [
                    b
                    for t in range(features.shape[0])
                    for idx in self._patches
                    for b in self._independent_blocks(features[t : t + 1, idx])
                ]
            for j, block in enumerate(blocks):
                frame = j // len(self._patches)
                self._store(
                    "patch", block, start + frame, start + frame, j % len(self._patches), times[frame], times[frame]
                )

    def _prefill_shared(self, features: torch.Tensor, first: int, times: list[float]) -> None:
        """Extend the segment's single prefill by ``features [m, P, d]``; store their frame and
        patch blocks sliced from it."""
        p = self.backend.tokens_per_frame
        if self._segment_cache is None:
            self._segment_cache = DynamicCache(ddp_cache_data=self._init)
            self._segment_colsum = torch.zeros(0, device=self.backend.device)
        past = self._segment_cache.get_seq_length()
        m = features.shape[0]
        embeds = features.to(self.backend.device).reshape(1, m * p, -1)
        positions = torch.arange(past, past + m * p, device=self.backend.device).unsqueeze(0)
        with self.backend.capture_attention(self._layers) as capture:
            self.backend.forward(embeds, self._segment_cache, positions, logits="none")
        probs = capture.probs[0]  # [m*P, past + m*P]
        assert self._segment_colsum is not None
        colsum = torch.zeros(past + m * p - self._init_len, device=self.backend.device)
        colsum[: self._segment_colsum.shape[0]] = self._segment_colsum
        self._segment_colsum = colsum + probs[:, self._init_len :].sum(dim=0)
        layers = self._segment_cache.layers
        for a in range(m):
            frame = first + a
            rows = torch.arange(a * p, (a + 1) * p, device=self.backend.device)
            pieces = []
            if self.config.granularities.frame:
                pieces.append(("frame", 0, rows))
            if self.config.granularities.patch:
                pieces.extend(("patch", j, rows[idx]) for j, idx in enumerate(self._patches))
            for granularity, part, sub_rows in pieces:
                cols = sub_rows + past
                kv = torch.stack([torch.stack((layer.keys[0][:, cols], layer.values[0][:, cols])) for layer in layers])
                attention = attention_importance(
                    probs, sub_rows, cols, past=past, causal_correction=self.config.causal_correction
                )
                self._store(granularity, _Scored(kv, cols.clone(), attention), frame, frame, part, times[a], times[a])

    def _segment_block(self) -> _Scored:
        """The (possibly partial) current segment as one block."""
        if self.config.encode == "independent":
            features = torch.cat(self._segment_features).to(self.backend.device)
            return self._independent_blocks(features.reshape(1, -1, features.shape[-1]))[0]
        assert self._segment_cache is not None and self._segment_colsum is not None
        n = self._segment_colsum.shape[0]
        cols = torch.arange(self._init_len, self._init_len + n, device=self.backend.device)
        layers = self._segment_cache.layers
        kv = torch.stack([torch.stack((layer.keys[0][:, cols], layer.values[0][:, cols])) for layer in layers])
        attention = self._segment_colsum.clone()
        if self.config.causal_correction:
            attention = attention / torch.arange(n, 0, -1, device=attention.device)
        return _Scored(kv, cols.clone(), attention)

    def _store_segment(self, *, provisional: bool) -> None:
        if not self.config.granularities.segment or not self._segment_frames:
            return
        record = self._store(
            "segment",
            self._segment_block(),
            self._segment_frames[0],
            self._segment_frames[-1],
            0,
            self._segment_times[0],
            self._segment_times[-1],
            provisional=provisional,
        )
        if provisional:
            self._provisional = record

    def _store(
        self,
        granularity: str,
        block: _Scored,
        first: int,
        last: int,
        part: int,
        start_time: float,
        end_time: float,
        *,
        provisional: bool = False,
    ) -> BlockRecord:
        """Score frequency, fuse, prune, and store one block."""
        cfg = self.config
        last_keys = block.kv[-1, 0]  # [Hkv, n, D], last layer
        frequency = self._frequency(last_keys.float().mean(dim=0))
        fused = fuse(block.attention, frequency, cfg.alpha.get(granularity))
        n = fused.shape[0]
        keep = keep_count(n, cfg.keep_ratio.get(granularity))
        if cfg.dedup and keep < n:
            flat = last_keys.permute(1, 0, 2).reshape(n, -1)
            kept = select_dedup(fused, flat, keep, threshold=cfg.dedup_threshold, candidates=cfg.dedup_candidates)
        else:
            kept = select_tokens(fused, keep)
        kv = block.kv[:, :, :, kept].contiguous()
        representative = kv[-1, 0].float().mean(dim=1).reshape(-1)  # [Hkv * D]
        payload = BlockPayload(kv=kv, positions=block.positions[kept], kept=kept, scores=fused)
        return self.store.add(
            granularity=granularity,
            first_frame=first,
            last_frame=last,
            part=part,
            start_time=start_time,
            end_time=end_time,
            payload=payload,
            representative=representative,
            provisional=provisional,
        )

    # ------------------------------------------------------------------ answering

    def query_vector(self, ids: torch.Tensor) -> torch.Tensor:
        """The question's retrieval vector ``[Hkv * D]`` (float32), from a prefill of the bare
        question after the system prompt that is then discarded."""
        cache = DynamicCache(ddp_cache_data=self._init)
        n = ids.shape[1]
        positions = torch.arange(self._init_len, self._init_len + n, device=self.backend.device).unsqueeze(0)
        last = self.backend.text.num_layers - 1
        embeds = self.backend.embed_ids(ids)
        if self.config.query == "last_key":
            self.backend.forward(embeds, cache, positions, logits="none")
            return cache.layers[last].keys[0, :, -1].float().reshape(-1)
        with self.backend.capture_attention({}, query_layer=last) as capture:
            self.backend.forward(embeds, cache, positions, logits="none")
        queries = capture.queries[0].mean(dim=1)  # [H, D]
        kv_heads = self.backend.text.num_kv_heads
        # Query heads sharing a KV head are averaged, so the vector lives in the keys' space.
        return queries.reshape(kv_heads, -1, queries.shape[-1]).mean(dim=1).reshape(-1)

    def _eligible_index(self, time: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        index = {}
        for g in GRANULARITIES:
            if not self.config.granularities.get(g):
                continue
            ids, reps = self.store.index(g)
            if ids.numel() == 0:
                continue
            end_times = torch.tensor([self.store.record(i).end_time for i in ids.tolist()])
            mask = end_times <= time
            index[g] = (ids[mask], reps[mask])
        return index

    def prepare(self, query: Query) -> AnswerContext:
        if self._segment_frames and self._provisional is None and self.frames_until(query.time) == self.frames:
            self._store_segment(provisional=True)
        cfg = self.config
        index = self._eligible_index(query.time)
        chosen: list[tuple[BlockRecord, float]] = []
        if any(ids.numel() for ids, _ in index.values()):
            result = retrieve(
                self.query_vector(query.ids),
                index,
                {g: cfg.top_k.get(g) for g in GRANULARITIES},
                strategy=cfg.retrieval,
                over_retrieve=cfg.over_retrieve,
                rerank_weight={g: cfg.rerank_weight.get(g) for g in GRANULARITIES},
                rerank_top_n=cfg.rerank_top_n,
                segment_frames={r.block_id: (r.first_frame, r.last_frame) for r in self.store.records("segment")},
                frame_of={g: {r.block_id: r.first_frame for r in self.store.records(g)} for g in ("frame", "patch")},
            )
            for ranked in result.chosen.values():
                chosen.extend(
                    (self.store.record(i), s) for i, s in zip(ranked.ids.tolist(), ranked.scores.tolist(), strict=True)
                )
        if cfg.order == "reference":
            chosen.sort(key=lambda item: (_GROUP_ORDER[item[0].granularity], -item[1]))
        else:
            chosen.sort(key=lambda item: (item[0].first_frame, _COARSE_FIRST[item[0].granularity], item[0].part))
        cache, tokens = self._assemble([record for record, _ in chosen])
        retrieved = tuple(
            RetrievedBlock(
                granularity=r.granularity,
                first_frame=r.first_frame,
                last_frame=r.last_frame,
                start_time=r.start_time,
                end_time=r.end_time,
                tokens=r.tokens,
                score=score,
                block_id=r.block_id,
            )
            for r, score in chosen
        )
        length = self._init_len + tokens
        return AnswerContext(cache=cache, next_position=length, context_tokens=length, retrieved=retrieved)

    def _assemble(self, records: list[BlockRecord]) -> tuple[DynamicCache, int]:
        """``[init | blocks...]`` as a cache on the model's device: one host-to-device copy of all
        chosen payloads, then (``temporal``) exact re-rotation to contiguous positions."""
        if not records:
            return DynamicCache(ddp_cache_data=self._init), 0
        payloads = [self.store.payload(r.block_id) for r in records]
        host = torch.cat([p.kv for p in payloads], dim=3)  # [L, 2, Hkv, total, D]
        if self.store.pin_memory:
            host = host.pin_memory()
        kv = host.to(self.backend.device, non_blocking=True)
        total = kv.shape[3]
        if self.config.order == "temporal":
            old = torch.cat([p.positions for p in payloads]).to(self.backend.device)
            new = torch.arange(self._init_len, self._init_len + total, device=self.backend.device)
            kv[:, 0] = rerotate(kv[:, 0], new - old, self.backend.rope_inv_freq)
        layers = [
            (torch.cat((k, kv[i, 0].unsqueeze(0)), dim=2), torch.cat((v, kv[i, 1].unsqueeze(0)), dim=2))
            for i, (k, v) in enumerate(self._init)
        ]
        return DynamicCache(ddp_cache_data=layers), total

    def stats(self) -> MemoryStats:
        blocks: dict[str, int] = {}
        tokens: dict[str, int] = {}
        nbytes: dict[str, int] = {}
        for record in self.store.records():
            g = record.granularity
            blocks[g] = blocks.get(g, 0) + 1
            tokens[g] = tokens.get(g, 0) + record.tokens
            nbytes[g] = nbytes.get(g, 0) + record.nbytes
        blocks["init"] = 1
        tokens["init"] = self._init_len
        nbytes["init"] = sum(k.nbytes + v.nbytes for k, v in self._init)
        pending = sum(f.nbytes for f in self._segment_features)
        if self._segment_cache is not None:
            pending += sum(layer.keys.nbytes + layer.values.nbytes for layer in self._segment_cache.layers)
        if pending:
            nbytes["pending"] = pending
        return MemoryStats(frames=self.frames, blocks=blocks, tokens=tokens, bytes=nbytes)
