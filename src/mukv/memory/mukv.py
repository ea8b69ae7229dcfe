"""MuKV: multi-grained, compressed KV blocks with semi-hierarchical retrieval (method.md 2-5).

Offline, as frames arrive: every frame gets a frame block and ``P/4``-token patch blocks, every
``F`` frames a segment block; each block's KV is scored (attention of one layer + key frequency),
pruned to its keep ratio, and stored off the accelerator with a representative key vector.
Online, per question: a query vector is ranked against the representatives of the blocks seen
so far, the chosen blocks are copied to the model's device and assembled after the system
prompt, and the question is answered from that cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

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
from mukv.kv.blocks import BlockPayload, BlockRecord
from mukv.memory.base import AnswerContext, MemoryStats, PendingUnit, Query, StageClock, UnitTokens, unit_sequence
from mukv.memory.blocks import BlockMemory, can_reprune
from mukv.memory.granularity import GranularitySpec, mukv_specs, part_indices, patch_token_indices
from mukv.memory.mukv_config import GRANULARITIES, PRESETS, MukvConfig
from mukv.memory.registry import register_method
from mukv.retrieve.ranking import retrieve

__all__ = ["MukvMemory", "patch_token_indices"]

_GROUP_ORDER = {"patch": 0, "frame": 1, "segment": 2}  # reference assembly order
_COARSE_FIRST = {"segment": 0, "frame": 1, "patch": 2}  # temporal order among blocks starting together


@dataclass
class _Scored:
    """A block ready to prune: ``kv [L, 2, Hkv, n, D]``, key ``positions [R, n]``, raw attention ``[n]``."""

    kv: torch.Tensor
    positions: torch.Tensor
    attention: torch.Tensor


@dataclass
class _Group:
    """The frames collected so far for one granularity's next group of blocks."""

    spec: GranularitySpec
    frames: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)  # [P, d] per frame (independent encoding)
    colsums: list[torch.Tensor] = field(default_factory=list)  # per part: attention sums so far (shared)
    # Per part, what each frame's queries added to the sums (shared): prefixes of the group need it.
    history: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.frames) == self.spec.frames

    def prefix(self, count: int) -> _Group:
        """The group as it was after its first ``count`` frames."""
        if count >= len(self.frames):
            return self
        colsums = []
        for added in self.history:
            length = added[count - 1].shape[0]
            colsums.append(sum(torch.nn.functional.pad(a, (0, length - a.shape[0])) for a in added[:count]))
        return _Group(
            self.spec,
            self.frames[:count],
            self.times[:count],
            self.features[:count],
            colsums,
            [added[:count] for added in self.history],
        )


@dataclass
class _Pending:
    """A block to prefill on its own (independent encoding): ``embeds [n, d]`` at ``positions [R, n]``."""

    group: _Group
    part: int
    embeds: torch.Tensor
    positions: torch.Tensor


@register_method
class MukvMemory(BlockMemory):
    """The MuKV memory (see the module docstring); options in :class:`MukvConfig`.

    Every granularity is a :class:`GranularitySpec`; frames are added to each granularity's
    open group, and a group's blocks are encoded, scored, pruned and stored when it completes.
    A group still open at question time (a partial segment) is stored as provisional blocks,
    replaced once more frames arrive: no frame is ever missing from any granularity.

    Byte budget (``memory_budget``; :meth:`_consolidate`, docs/memory.md): when stored blocks
    exceed it, granularities are consolidated finest first, :data:`CONSOLIDATION_ORDER` = patch,
    frame, segment, and a granularity only once every finer one is empty. Within one, sweeps run
    over its blocks oldest first: a block with more than one kept token is re-pruned to the top
    half of them by its stored fused scores, a block at one token is evicted; a sweep stops as
    soon as enough is freed, and the next one starts again from the oldest (a granularity whose
    every block must go is evicted outright, oldest first). The far past is so thinned repeatedly
    (e.g. 4, 2, 1 tokens, then gone) while the recent past keeps its tokens.
    Why this order: a frame's patch blocks are its finest, most local detail, and its frame block
    covers the same tokens; a segment covers its frames, holds most of the retrieved context
    (paper preset: 627 of 664 tokens per segment block), and ``hierarchical`` retrieval reaches
    frame and patch blocks only through their segment, so segments are kept longest. A re-pruned
    block keeps its representative: it summarises the block as encoded (the mean key of its
    kept tokens), which is still what the block is about, and retrieval's index stays as it is.
    """

    #: Granularities in the order the byte budget consolidates them (finest first).
    CONSOLIDATION_ORDER: ClassVar[tuple[str, ...]] = ("patch", "frame", "segment")

    name = "mukv"
    config_class = MukvConfig
    presets = PRESETS

    def __init__(self, backend, config: MukvConfig | None = None, *, fps: float | None = None) -> None:
        super().__init__(backend, config, fps=fps)
        cfg = self.config
        self.specs = tuple(spec for spec in mukv_specs(cfg.segment_frames) if cfg.granularities.get(spec.name))
        self._layers = scored_layers(cfg.attention_layer, backend.text.num_layers)
        self._frequency = FREQUENCY_SCORERS[cfg.frequency]
        self._parts = {
            spec.name: [idx.to(backend.device) for idx in part_indices(backend.layout, spec.parts, cfg.patch_layout)]
            for spec in self.specs
        }
        self._open = {spec.name: _Group(spec) for spec in self.specs}
        # Shared encoding prefills each run of `_unit` frames once; every group must fit in a run.
        self._unit = max(spec.frames for spec in self.specs)
        if any(self._unit % spec.frames for spec in self.specs):
            raise ValueError(f"segment_frames: every granularity's frames must divide {self._unit}")
        # Shared encoding: the current run's cache, its first frame, and its visual tokens'
        # positions [R, tokens so far] and the cursor after them.
        self._shared_cache: DynamicCache | None = None
        self._shared_first = 0
        self._shared_positions: torch.Tensor | None = None
        self._shared_cursor = self.init_len
        # Where each unit of the run lies in its sequence (with its text), in order.
        self._shared_units: list[UnitTokens] = []
        # Set while a provisional unit is encoded: every block stored then is provisional.
        self._encoding_provisional = False

    # ------------------------------------------------------------------ encoding

    def _ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        start = self.frames
        times = [float(t) for t in timestamps]
        features = features.to(self.backend.device)
        if self.config.encode == "independent":
            self._ingest_independent(features, start, times)
            return
        offset = 0
        while offset < features.shape[0]:
            index = start + offset
            take = min(features.shape[0] - offset, self._unit - index % self._unit)
            self._prefill_shared(features[offset : offset + take], index, times[offset : offset + take])
            offset += take

    def _ingest_independent(self, features: torch.Tensor, start: int, times: list[float]) -> None:
        pending: list[_Pending] = []
        for i in range(features.shape[0]):
            for spec in self.specs:
                group = self._open[spec.name]
                group.frames.append(start + i)
                group.times.append(times[i])
                # A copy, so that an open group does not keep the whole ingested batch alive.
                group.features.append(features[i].detach().clone() if spec.frames > 1 else features[i].detach())
                if group.complete:
                    pending.extend(self._pending_blocks(group))
                    self._open[spec.name] = _Group(spec)
        self._encode_pending(pending, provisional=False)

    def _pending_blocks(self, group: _Group) -> list[_Pending]:
        frames = torch.stack(group.features)  # [G, P, w]
        count, p = frames.shape[:2]
        scheme, layout = self.positions, self.backend.layout
        pending = []
        if self.units_have_text:
            # The group's units with their text, fed from the system prompt; each block takes its
            # tokens' columns: a unit's text goes with every block of it, its tokens where they were.
            flat, positions, _, units = unit_sequence(
                self.backend, scheme, frames, [self.stamp(f) for f in group.frames], self.init_len
            )
            for part, idx in enumerate(self._parts[group.spec.name]):
                tokens = torch.cat([unit.indices(idx, p) for unit in units])
                pending.append(_Pending(group, part, flat[tokens], positions[:, tokens]))
            return pending
        for part, idx in enumerate(self._parts[group.spec.name]):
            # The block's tokens within its G units, fed on their own right after the system prompt.
            tokens = (torch.arange(count, device=idx.device)[:, None] * p + idx[None, :]).reshape(-1)
            positions, _ = scheme.block(self.init_len, layout, count, tokens, self.backend.device)
            pending.append(_Pending(group, part, frames[:, idx].reshape(-1, frames.shape[-1]), positions))
        return pending

    def _encode_pending(self, pending: list[_Pending], *, provisional: bool) -> None:
        """Prefill ``pending`` blocks independently, batching blocks at equal positions, and store
        each batch as soon as it is scored (uncompressed KV never outlives its batch)."""
        by_positions: dict[tuple, list[_Pending]] = {}
        for block in pending:
            by_positions.setdefault(tuple(block.positions.flatten().tolist()), []).append(block)
        size = self.config.encode_batch_blocks
        for blocks in by_positions.values():
            for start in range(0, len(blocks), size):
                chunk = blocks[start : start + size]
                scored = self._independent_blocks(torch.stack([b.embeds for b in chunk]), chunk[0].positions)
                for block, result in zip(chunk, scored, strict=True):
                    self._store_group_block(block.group, block.part, result, provisional=provisional)

    def _batched_prefill(self, embeds: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill ``embeds [B, n, d]`` at ``positions [R, n]`` as ``B`` independent blocks after
        the system prompt.

        Returns ``kv [B, L, 2, Hkv, n, D]`` and head-averaged probabilities ``[B, n, init + n]``.
        """
        b = embeds.shape[0]
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in self.init_kv]
        )
        with self.backend.capture_attention(self._layers) as capture:
            self.backend.forward(embeds, cache, positions, logits="none")
        init = self.init_len
        kv = torch.stack(
            [torch.stack((layer.keys[:, :, init:], layer.values[:, :, init:]), 1) for layer in cache.layers], dim=1
        )
        return kv, capture.probs

    def _independent_blocks(self, embeds: torch.Tensor, positions: torch.Tensor) -> list[_Scored]:
        """Encode ``embeds [B, n, d]`` at ``positions [R, n]`` as independent blocks (in batches)
        and score attention."""
        out: list[_Scored] = []
        n = embeds.shape[1]
        rows = torch.arange(n, device=self.backend.device)  # query indices within the block
        cols = rows + self.init_len  # key indices in the block's cache
        for start in range(0, embeds.shape[0], self.config.encode_batch_blocks):
            kv, probs = self._batched_prefill(embeds[start : start + self.config.encode_batch_blocks], positions)
            for b in range(kv.shape[0]):
                attention = attention_importance(
                    probs[b], rows, cols, past=self.init_len, causal_correction=self.config.causal_correction
                )
                out.append(_Scored(kv[b], positions.clone(), attention))
        return out

    def _prefill_shared(self, features: torch.Tensor, first: int, times: list[float]) -> None:
        """Extend the current run's single prefill by ``features [m, P, d]``; every group's
        blocks take their KV from it, and their attention sums grow with each new query row."""
        p = self.backend.tokens_per_frame
        if first % self._unit == 0 or self._shared_cache is None:
            self._shared_cache = self.init_cache()
            self._shared_first = first
            self._shared_positions = None
            self._shared_cursor = self.init_len
            self._shared_units = []
        cache = self._shared_cache
        m = features.shape[0]
        # The run's units continue one sequence from the system prompt, however they arrive.
        flat, positions, self._shared_cursor, units = unit_sequence(
            self.backend,
            self.positions,
            features,
            self.stamps(first, m),
            self.init_len,
            first_unit=first - self._shared_first,
            cursor=self._shared_cursor,
        )
        previous = self._shared_positions
        past = 0 if previous is None else previous.shape[1]  # the run's tokens before these
        self._shared_units = [*self._shared_units, *(replace(u, offset=u.offset + past) for u in units)]
        self._shared_positions = positions if previous is None else torch.cat((previous, positions), dim=1)
        with self.backend.capture_attention(self._layers) as capture:
            self.backend.forward(flat[None], cache, positions, logits="none")
        probs = capture.probs[0]  # [n, past + n]: row r is the query at key index past + r
        for a in range(m):
            frame = first + a
            for spec in self.specs:
                group = self._open[spec.name]
                group.frames.append(frame)
                group.times.append(times[a])
                cols = self._shared_columns(group)
                for part, idx in enumerate(self._parts[spec.name]):
                    added = probs[units[a].indices(idx, p)][:, cols[part]].sum(dim=0)
                    previous = group.colsums[part] if part < len(group.colsums) else added[:0]
                    total = torch.cat((previous, torch.zeros_like(added[previous.shape[0] :]))) + added
                    if part < len(group.colsums):
                        group.colsums[part] = total
                        group.history[part].append(added)
                    else:
                        group.colsums.append(total)
                        group.history.append([added])
                if group.complete:
                    self._store_shared_group(group, provisional=False)
                    self._open[spec.name] = _Group(spec)
        if (first + m) % self._unit == 0:
            self._shared_cache = None
            self._shared_positions = None

    def _shared_columns(self, group: _Group) -> list[torch.Tensor]:
        """Key indices in the shared prefill's cache of each part's tokens so far (with their units' text)."""
        p = self.backend.tokens_per_frame
        units = [self._shared_units[f - self._shared_first] for f in group.frames]
        return [
            self.init_len + torch.cat([unit.indices(idx, p) for unit in units]) for idx in self._parts[group.spec.name]
        ]

    def _store_shared_group(self, group: _Group, *, provisional: bool) -> None:
        assert self._shared_cache is not None
        layers = self._shared_cache.layers
        for part, cols in enumerate(self._shared_columns(group)):
            kv = torch.stack([torch.stack((layer.keys[0][:, cols], layer.values[0][:, cols])) for layer in layers])
            attention = group.colsums[part]
            if self.config.causal_correction:
                # Block tokens are in position order, so key j is seen by the n - j queries from j on.
                attention = attention / torch.arange(attention.shape[0], 0, -1, device=attention.device)
            assert self._shared_positions is not None
            positions = self._shared_positions[:, cols - self.init_len]
            self._store_group_block(group, part, _Scored(kv, positions, attention), provisional=provisional)

    def _store_open(self, upto: int, pending: PendingUnit | None) -> None:
        """Store the open (incomplete) groups' frames before ``upto`` as provisional blocks (a
        partial segment is retrievable like a whole one); a provisional unit is encoded as if it
        had been ingested (its frame block, its patches, the groups it joins or completes), every
        block stored provisional, and the encoding state is then put back as it was."""
        if pending is None:
            self._store_open_groups(upto)
            return
        saved = self._encoding_state()
        self._encoding_provisional = True
        try:
            self._ingest(pending.features[None], np.asarray([pending.time]))
            self._store_open_groups(upto + 1)
        finally:
            self._encoding_provisional = False
            self._restore_encoding(saved)

    def _encoding_state(self) -> tuple:
        """What encoding a unit changes: the open groups (their lists copied) and the shared run
        (its cache's tensors: appending to a ``DynamicCache`` concatenates into new ones)."""
        groups = {
            name: _Group(g.spec, [*g.frames], [*g.times], [*g.features], [*g.colsums], [[*h] for h in g.history])
            for name, g in self._open.items()
        }
        cache = self._shared_cache
        tensors = None if cache is None else [(layer.keys, layer.values) for layer in cache.layers]
        shared = (self._shared_first, self._shared_positions, self._shared_cursor, self._shared_units)
        return groups, cache, tensors, shared

    def _restore_encoding(self, state: tuple) -> None:
        groups, cache, tensors, (first, positions, cursor, units) = state
        self._shared_units = units
        self._open = groups
        if cache is not None:
            for layer, (keys, values) in zip(cache.layers, tensors, strict=True):
                layer.keys, layer.values = keys, values
        self._shared_cache, self._shared_first = cache, first
        self._shared_positions, self._shared_cursor = positions, cursor

    def _store_open_groups(self, upto: int) -> None:
        """The open groups' frames before ``upto`` as provisional blocks."""
        pending: list[_Pending] = []
        for group in self._open.values():
            count = sum(f < upto for f in group.frames)
            if count == 0:
                continue
            part = group.prefix(count)
            if self.config.encode == "independent":
                pending.extend(self._pending_blocks(part))
            else:
                self._store_shared_group(part, provisional=True)
        self._encode_pending(pending, provisional=True)

    def _store_group_block(self, group: _Group, part: int, block: _Scored, *, provisional: bool) -> None:
        self._store(
            group.spec.name,
            block,
            group.frames[0],
            group.frames[-1],
            part,
            group.times[0],
            group.times[-1],
            provisional=provisional or self._encoding_provisional,
        )

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
        payload = BlockPayload(kv=kv, positions=block.positions[:, kept], kept=kept, scores=fused)
        return self.add_block(
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

    # ------------------------------------------------------------------ byte budget

    def _consolidate(self, excess_bytes: int) -> None:
        """Free at least ``excess_bytes``: finest granularity first, sweeps oldest first, halving
        a block's kept tokens by score, evicting it at one token (see the class docstring)."""
        freed = 0
        for granularity in self.CONSOLIDATION_ORDER:
            records = [r for r in self.store.records(granularity) if not r.provisional]  # time order
            if excess_bytes - freed >= sum(r.nbytes for r in records):
                # Every block of it must go: evicted outright, oldest first (halving them down to one
                # token first would free the same bytes in many more steps).
                for record in records:
                    freed += self._evict(record.block_id)
                continue
            while freed < excess_bytes:
                records = [r for r in self.store.records(granularity) if not r.provisional]
                if not records:
                    break
                for record in records:
                    payload = self.store.payload(record.block_id)
                    if can_reprune(payload):
                        freed += self._reprune(record.block_id)
                    else:
                        freed += self._evict(record.block_id)
                    if freed >= excess_bytes:
                        return

    # ------------------------------------------------------------------ saving

    def _export_open(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every granularity's open group (its frames' features ``[P, w]``, attention sums per part
        and what each frame added to them) and the shared encoding's run: its cache ``[1, Hkv, n, D]``
        per layer, its tokens' positions ``[R, n]`` and where each unit lies."""
        tensors: dict[str, torch.Tensor] = {}
        groups = {}
        for name, group in self._open.items():
            for i, feature in enumerate(group.features):
                tensors[f"open.{name}.features.{i}"] = feature.contiguous()
            for part, colsum in enumerate(group.colsums):
                tensors[f"open.{name}.colsums.{part}"] = colsum.contiguous()
                for i, added in enumerate(group.history[part]):
                    tensors[f"open.{name}.history.{part}.{i}"] = added.contiguous()
            groups[name] = {
                "frames": list(group.frames),
                "times": list(group.times),
                "features": len(group.features),
                "parts": len(group.colsums),
                "history": [len(h) for h in group.history],
            }
        shared = None
        if self._shared_cache is not None:
            for i, layer in enumerate(self._shared_cache.layers):
                tensors[f"shared.keys.{i}"] = layer.keys.contiguous()
                tensors[f"shared.values.{i}"] = layer.values.contiguous()
            if self._shared_positions is not None:
                tensors["shared.positions"] = self._shared_positions.contiguous()
            shared = {
                "first": self._shared_first,
                "cursor": self._shared_cursor,
                "units": [[u.offset, u.prefix, u.suffix, u.cursor] for u in self._shared_units],
                "layers": len(self._shared_cache.layers),
            }
        return tensors, {"groups": groups, "shared": shared}

    def _import_open(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        device = self.backend.device
        if set(meta["groups"]) != set(self._open):
            raise ValueError(f"open groups: saved {sorted(meta['groups'])}, this config has {sorted(self._open)}")
        for name, saved in meta["groups"].items():
            self._open[name] = _Group(
                self._open[name].spec,
                [int(f) for f in saved["frames"]],
                [float(t) for t in saved["times"]],
                [tensors[f"open.{name}.features.{i}"].to(device) for i in range(saved["features"])],
                [tensors[f"open.{name}.colsums.{part}"].to(device) for part in range(saved["parts"])],
                [
                    [tensors[f"open.{name}.history.{part}.{i}"].to(device) for i in range(count)]
                    for part, count in enumerate(saved["history"])
                ],
            )
        shared = meta["shared"]
        if shared is None:
            self._shared_cache, self._shared_positions = None, None
            self._shared_first, self._shared_cursor, self._shared_units = 0, self.init_len, []
            return
        layers = [
            (tensors[f"shared.keys.{i}"].to(device), tensors[f"shared.values.{i}"].to(device))
            for i in range(shared["layers"])
        ]
        self._shared_cache = DynamicCache(ddp_cache_data=layers)
        positions = tensors.get("shared.positions")
        self._shared_positions = None if positions is None else positions.to(device)
        self._shared_first = int(shared["first"])
        self._shared_cursor = int(shared["cursor"])
        self._shared_units = [UnitTokens(*(int(v) for v in unit)) for unit in shared["units"]]

    # ------------------------------------------------------------------ answering

    def query_vector(self, ids: torch.Tensor) -> torch.Tensor:
        """The question's retrieval vector ``[Hkv * D]`` (float32), from a prefill of the bare
        question after the system prompt that is then discarded."""
        cache = self.init_cache()
        n = ids.shape[1]
        positions = self.positions.text(self.init_len, n, self.backend.device)
        last = self.backend.text.num_layers - 1
        embeds = self.backend.embed_ids(ids)
        if self.config.query == "last_key":
            self.backend.forward(embeds, cache, positions, logits="none")
            # Representatives live off the accelerator; ranking happens where they are.
            return cache.layers[last].keys[0, :, -1].float().reshape(-1).cpu()
        with self.backend.capture_attention({}, query_layer=last) as capture:
            self.backend.forward(embeds, cache, positions, logits="none")
        queries = capture.queries[0].mean(dim=1)  # [H, D]
        kv_heads = self.backend.text.num_kv_heads
        # Query heads sharing a KV head are averaged, so the vector lives in the keys' space.
        return queries.reshape(kv_heads, -1, queries.shape[-1]).mean(dim=1).reshape(-1).cpu()

    def prepare(self, query: Query) -> AnswerContext:
        self.check_materialized(query.time)
        cfg = self.config
        clock = StageClock(self.backend.device)
        index = {}
        for spec in self.specs:
            ids, reps = self.eligible(spec.name, query.time)
            if ids.numel():
                index[spec.name] = (ids, reps)
        clock.lap("eligible")
        chosen: list[tuple[BlockRecord, float]] = []
        if index:
            vector = self.query_vector(query.ids)
            clock.lap("query")
            result = retrieve(
                vector,
                index,
                {g: cfg.top_k.get(g) for g in GRANULARITIES},
                strategy=cfg.retrieval,
                over_retrieve=cfg.over_retrieve,
                rerank_weight={g: cfg.rerank_weight.get(g) for g in GRANULARITIES},
                rerank_top_n=cfg.rerank_top_n,
                **self._hierarchy(),
            )
            for ranked in result.chosen.values():
                chosen.extend(
                    (self.store.record(i), s) for i, s in zip(ranked.ids.tolist(), ranked.scores.tolist(), strict=True)
                )
            clock.lap("rank")
        if cfg.order == "reference":
            chosen.sort(key=lambda item: (_GROUP_ORDER[item[0].granularity], -item[1]))
        else:
            chosen.sort(key=lambda item: (item[0].first_frame, _COARSE_FIRST[item[0].granularity], item[0].part))
        block_ids = [r.block_id for r, _ in chosen]
        reposition = cfg.order == "temporal"
        cache, tokens = self.assemble(block_ids, reposition=reposition)
        clock.lap("assemble")
        retrieved = self.retrieved_blocks([(r.block_id, score) for r, score in chosen])
        length = self.init_len + tokens
        # ``reference`` puts the question after the cache length, as the release does; ``temporal``
        # after the re-positioned blocks, by the scheme's rule (the cache length with 1-D RoPE).
        cursor = length
        if reposition and block_ids:
            cursor = self.placed_positions([self.store.payload(i) for i in block_ids], self.init_len)[1]
        return AnswerContext(
            cache=cache,
            next_position=cursor,
            context_tokens=length,
            retrieved=retrieved,
            stages=clock.seconds,
        )

    def _hierarchy(self) -> dict:
        """Frame spans for ``hierarchical`` retrieval (not built for the other strategies)."""
        if self.config.retrieval != "hierarchical":
            return {}
        return {
            "segment_frames": {r.block_id: (r.first_frame, r.last_frame) for r in self.store.records("segment")},
            "frame_of": {g: {r.block_id: r.first_frame for r in self.store.records(g)} for g in ("frame", "patch")},
        }

    def stats(self) -> MemoryStats:
        blocks, tokens, nbytes = self.store.totals()
        blocks["init"] = 1
        tokens["init"] = self.init_len
        nbytes["init"] = self.init_nbytes()
        pending = sum(f.nbytes for group in self._open.values() for f in group.features)
        pending += sum(c.nbytes for group in self._open.values() for c in group.colsums)
        if self._shared_cache is not None:
            pending += sum(layer.keys.nbytes + layer.values.nbytes for layer in self._shared_cache.layers)
        if pending:
            nbytes["pending"] = pending
        return self._block_stats(blocks, tokens, nbytes)
