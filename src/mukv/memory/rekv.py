"""ReKV (ICLR 2025) and the recent-frames baseline (method.md section 7).

``rekv``: frames are prefilled with sliding-window attention (system prompt + the most recent
``n_local`` tokens); every block of frames keeps its full KV off the accelerator with, per layer,
a representative = mean of its un-rotated keys. A question is first run over ``[init | question]``
while, at each layer, the mean un-rotated question query picks that layer's top ``r`` blocks,
which are inserted (in time order, re-positioned contiguously) before the question: the layer's
query already depends on what lower layers retrieved, as in ReKV. The question tokens of that
pass are then dropped and the engine answers after ``[init | retrieved blocks]``.

Where blocks differ in size (units with text of varying length around them, Qwen3-VL's timestamps),
layers cannot each hold their own choice in one cache, and the layer-shared choice is taken.

``recent``: the last ``num_frames`` frames kept in a rolling sliding-window cache; each frame is
prefilled once, and a question is answered after ``[init | those frames]``.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mukv.errors import StreamError
from mukv.kv.blocks import BlockPayload, BlockRecord, layer_to_device
from mukv.kv.options import StorageOptions
from mukv.kv.window import SlidingWindow
from mukv.memory.base import AnswerContext, MemoryMethod, MemoryStats, PendingUnit, Query
from mukv.memory.blocks import BlockMemory
from mukv.memory.registry import register_method


@dataclass(frozen=True, kw_only=True)
class RekvConfig(StorageOptions):
    """ReKV options: ``n_local`` window tokens, ``retrieve_blocks`` (``r``) per layer,
    ``block_frames`` frames per block, and ``layer_shared`` (one decision for all layers, from
    the sum of every layer's scores, computed without retrieved context)."""

    n_local: int = 15000
    retrieve_blocks: int = 64
    block_frames: int = 1
    layer_shared: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_local", "retrieve_blocks", "block_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def _unrotated_group_query(query: torch.Tensor, positions: torch.Tensor, kv_heads: int, scheme) -> torch.Tensor:
    """Mean over tokens of queries ``[1, H, n, D]`` un-rotated from ``positions [R, n]``, summed
    within each KV group: ``[Hkv * D]``, so that ``score = q . r`` equals the dot product with KV
    heads repeated to ``H``."""
    q = scheme.unrotate(query[0].float(), positions.to(query.device)).mean(dim=1)  # [H, D]
    # Representatives live off the accelerator; the ranking (and its top-k) happens there.
    return q.reshape(kv_heads, -1, q.shape[-1]).sum(dim=1).reshape(-1).cpu()


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where the C library has none."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):
        return None


def _release_free_heap() -> None:
    """Give the pages of the C heap's free chunks back to the system (glibc only; else a no-op).

    Prefilling a frame on CPU allocates and frees many temporaries inside the model (window-sized
    attention inputs, MLP activations); the blocks stored meanwhile land between them, so glibc
    can rarely reuse or return that space and keeps it resident: measured at 0.5B sizes, the
    process grew by several times the bytes that ``stats()`` reports, and kept growing with every
    frame. Trimming returns those pages (a few milliseconds per call).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class _LayerRetrieval:
    """Attention hook of ReKV's retrieval pass: at each layer, choose blocks from the question's
    queries and insert them between the system prompt and the question."""

    memory: RekvMemory
    cache: DynamicCache
    ids: torch.Tensor  # eligible block ids [N], time order
    reps: torch.Tensor  # [N, L, Hkv * D]
    forced: list[int]  # provisional block ids included in every layer
    question_start: int
    chosen: dict[int, list[int]] = field(default_factory=dict)
    # Per layer: the cursor after its placed blocks.
    placed: dict[int, int] = field(default_factory=dict)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        memory = self.memory
        backend = memory.backend
        n = query.shape[2]
        positions = memory.positions.text(self.question_start, n, query.device)
        q = _unrotated_group_query(query, positions, backend.text.num_kv_heads, memory.positions)
        ids = memory.select(self.ids, self.reps[:, layer] @ q, self.forced)
        self.chosen[layer] = ids
        self.placed[layer] = memory.placement(ids)
        k_blocks, v_blocks = memory.layer_blocks(ids, layer, query.device)
        init = memory.init_len
        new_k = torch.cat((key[:, :, :init], k_blocks.to(key.dtype), key[:, :, init:]), dim=2)
        new_v = torch.cat((value[:, :, :init], v_blocks.to(value.dtype), value[:, :, init:]), dim=2)
        self.cache.layers[layer].keys, self.cache.layers[layer].values = new_k, new_v
        total = new_k.shape[2]
        allowed = torch.ones(n, total, dtype=torch.bool, device=query.device).tril(total - n)
        return sdpa_attention_forward(module, query, new_k, new_v, allowed[None, None], **kwargs)


@dataclass
class _QueryCollector:
    """Attention hook recording every layer's queries (for layer-shared retrieval)."""

    queries: dict[int, torch.Tensor] = field(default_factory=dict)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.queries[module.layer_idx] = query.detach()


@register_method
class RekvMemory(BlockMemory):
    """ReKV (see the module docstring)."""

    name = "rekv"
    config_class = RekvConfig

    def __init__(self, backend, config: RekvConfig | None = None, *, fps: float | None = None) -> None:
        super().__init__(backend, config, fps=fps)
        self.window = SlidingWindow(backend, self.config.n_local, self.positions)
        # The open block: frame indices, times, and each frame's (kv, positions) from the window.
        self._open_frames: list[int] = []
        self._open_times: list[float] = []
        self._open_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Provisional blocks that are whole blocks (a provisional unit completed them): retrieved
        # by score like stored ones, where the open block's frames are in every layer's choice.
        self._whole_provisional: set[int] = set()

    @property
    def store_granularity(self) -> str:
        return "frame" if self.config.block_frames == 1 else "block"

    # ------------------------------------------------------------------ encoding

    def _ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        start = self.frames
        for i in range(features.shape[0]):
            # One frame per chunk: each frame's tokens see the system prompt, the window and the
            # frame's own earlier tokens.
            unit = features[i : i + 1].to(self.backend.device)
            kv, positions = self.window.append(unit, [self.stamp(start + i)])
            self._open_frames.append(start + i)
            self._open_times.append(float(timestamps[i]))
            self._open_kv.append((kv, positions))
            if len(self._open_frames) == self.config.block_frames:
                self._store_block(self._open_frames, self._open_times, self._open_kv, provisional=False)
                self._open_frames, self._open_times, self._open_kv = [], [], []
        if self.backend.device.type == "cpu":
            _release_free_heap()

    def _store_open(self, upto: int, pending: PendingUnit | None) -> None:
        count = sum(f < upto for f in self._open_frames)
        frames, times, kvs = self._open_frames[:count], self._open_times[:count], self._open_kv[:count]
        if pending is not None:
            # The unit's KV as the window would compute it, the window left as it is; with the open
            # frames it makes at most one block (an open block holds fewer than block_frames).
            kv, positions = self.window.peek(pending.features[None].to(self.backend.device), [self.stamp(self.frames)])
            frames, times, kvs = [*frames, self.frames], [*times, pending.time], [*kvs, (kv, positions)]
        if frames:
            record = self._store_block(frames, times, kvs, provisional=True)
            if len(frames) == self.config.block_frames:
                self._whole_provisional.add(record.block_id)

    def drop_provisional(self) -> None:
        super().drop_provisional()
        self._whole_provisional = set()

    def _store_block(
        self,
        frames: list[int],
        times: list[float],
        kvs: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        provisional: bool,
    ) -> BlockRecord:
        """Store frames ``frames`` taken at ``times`` as one block of their ``(kv [L, 2, Hkv, P, D],
        positions [R, P])`` per frame."""
        if len(kvs) == 1 and not provisional:
            kv, positions = kvs[0]  # the window's copy, no longer held anywhere else
        else:
            kv = torch.cat([kv for kv, _ in kvs], dim=3)
            positions = torch.cat([p for _, p in kvs], dim=1)
        # Representatives from un-rotated keys, per layer: [L, Hkv * D].
        unrotated = self.positions.unrotate(kv[:, 0], positions)
        representative = unrotated.float().mean(dim=2).reshape(kv.shape[0], -1)
        payload = BlockPayload(kv=kv, positions=positions, kept=torch.arange(kv.shape[3]), scores=torch.empty(0))
        return self.add_block(
            granularity=self.store_granularity,
            first_frame=frames[0],
            last_frame=frames[-1],
            part=0,
            start_time=times[0],
            end_time=times[-1],
            payload=payload,
            representative=representative,
            provisional=provisional,
        )

    # ------------------------------------------------------------------ byte budget

    def _consolidate(self, excess_bytes: int) -> None:
        """Free at least ``excess_bytes`` by thinning the far past: evict, one at a time, the block
        among the oldest half whose removal opens the smallest gap between its neighbours (in
        frames; the oldest on ties), the very first block kept while others remain.

        Blocks keep every token and have no per-token scores, so they are evicted whole, never
        re-pruned (equal sizes also keep per-layer retrieval in one forward pass). On an evenly
        filled store this evicts every other block of the oldest half; repeated, the far past
        keeps a sparser and sparser sample of its moments instead of losing its beginning, as
        evicting the oldest would, and the newest half is never thinned while the oldest half has
        blocks to give."""
        freed = 0
        records = [r for r in self.store.records(self.store_granularity) if not r.provisional]  # time order
        while freed < excess_bytes and records:
            if len(records) <= 2:
                victim = 0
            else:
                # Candidates 1..half-1: block i's removal leaves frames first[i-1]..first[i+1] apart.
                half = max(2, len(records) // 2)
                gaps = [records[i + 1].first_frame - records[i - 1].first_frame for i in range(1, half)]
                victim = 1 + min(range(len(gaps)), key=gaps.__getitem__)
            freed += self._evict(records.pop(victim).block_id)

    # ------------------------------------------------------------------ saving

    def _export_open(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The sliding window (what later frames attend to) and the open block's frames with their
        ``kv [L, 2, Hkv, P, D]`` and ``positions [R, P]``."""
        window, meta = self.window.export_state()
        tensors = {f"window.{name}": t for name, t in window.items()}
        for i, (kv, positions) in enumerate(self._open_kv):
            tensors[f"open.kv.{i}"] = kv.contiguous()
            tensors[f"open.positions.{i}"] = positions.contiguous()
        return tensors, {"window": meta, "frames": list(self._open_frames), "times": list(self._open_times)}

    def _import_open(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        prefix = "window."
        self.window.import_state(
            {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}, meta["window"]
        )
        self._open_frames = [int(f) for f in meta["frames"]]
        self._open_times = [float(t) for t in meta["times"]]
        device = self.backend.device
        self._open_kv = [
            (tensors[f"open.kv.{i}"].to(device), tensors[f"open.positions.{i}"].to(device))
            for i in range(len(self._open_frames))
        ]
        self._whole_provisional = set()

    # ------------------------------------------------------------------ answering

    def select(self, ids: torch.Tensor, scores: torch.Tensor, forced: list[int]) -> list[int]:
        """Top ``r`` block ids by ``scores`` (fp32 dot products), ``forced`` ids always included,
        returned in time order."""
        r = self.config.retrieve_blocks - len(forced)
        mask = ~torch.isin(ids, torch.tensor(forced, dtype=torch.long))
        pool, pool_scores = ids[mask], scores[mask]
        best = pool[torch.topk(pool_scores, min(max(r, 0), pool.shape[0])).indices].tolist() if r > 0 else []
        return sorted(best + forced)  # ids grow with time

    def placed_positions(self, payloads, start: int) -> tuple[torch.Tensor, int]:
        """Retrieved blocks come from one run (the sliding window): placed by the scheme's
        :meth:`~mukv.backends.positions.PositionScheme.place_run` (1-D RoPE: one after another)."""
        return self.positions.place_run([p.positions for p in payloads], start)

    def placement(self, ids: list[int]) -> int:
        """The cursor after blocks ``ids`` placed after the system prompt."""
        return self.placed_positions([self.store.payload(i) for i in ids], self.init_len)[1]

    def layer_blocks(self, ids: list[int], layer: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[1, Hkv, R, D]`` of blocks ``ids`` at ``layer``, keys re-positioned one
        block after another right after the system prompt."""
        if not ids:
            shape = (1, self.backend.text.num_kv_heads, 0, self.backend.text.head_dim)
            empty = torch.empty(shape, device=device, dtype=self.backend.dtype)
            return empty, empty
        payloads = [self.store.payload(i) for i in ids]
        # Quantized payloads are dequantized on ``device``: only their codes cross.
        kv = layer_to_device(payloads, layer, device)  # [2, Hkv, R, D]
        old = torch.cat([p.positions for p in payloads], dim=1)
        new, _ = self.placed_positions(payloads, self.init_len)
        keys = self.positions.shift(kv[0], old, new)
        return keys.unsqueeze(0), kv[1].unsqueeze(0)

    def prepare(self, query: Query) -> AnswerContext:
        self.check_materialized(query.time)
        ids, reps = self.eligible(self.store_granularity, query.time)
        eligible = set(ids.tolist())
        # The open block's frames up to the question time (materialized) are in every layer's choice.
        forced = [i for i in self.provisional_ids if i in eligible and i not in self._whole_provisional]
        if ids.numel() == 0:
            return AnswerContext(cache=self.init_cache(), next_position=self.init_len, context_tokens=self.init_len)
        # Layers choosing on their own need blocks of one size: each layer's cache must hold as many
        # tokens. Where a model writes text of varying length around units (Qwen3-VL's timestamps),
        # sizes differ, and one choice for all layers is taken (as ``layer_shared`` does).
        sizes = {self.store.record(i).tokens for i in ids.tolist() if i not in forced}
        if self.config.layer_shared or len(sizes) > 1:
            chosen = self._retrieve_shared(query, ids, reps, forced)
            cache, _ = self.assemble(chosen, reposition=True)
            per_layer = {layer: chosen for layer in range(self.backend.text.num_layers)}
            placed = [self.placement(chosen)]
        else:
            cache, per_layer, placed = self._retrieve_in_forward(query, ids, reps, forced)
        length = cache.get_seq_length()
        # Layers may retrieve different blocks; the question goes after the furthest placement
        # (with 1-D RoPE every layer's blocks end at the cache length).
        cursor = max(placed)
        union = sorted({i for chosen in per_layer.values() for i in chosen})
        layers = len(per_layer)
        # Score: the share of layers that retrieved the block.
        shares = [(i, sum(i in chosen for chosen in per_layer.values()) / layers) for i in union]
        retrieved = self.retrieved_blocks(shares)
        return AnswerContext(cache=cache, next_position=cursor, context_tokens=length, retrieved=retrieved)

    def _retrieved_tokens(self, ids: torch.Tensor, forced: list[int]) -> int:
        sizes = sorted((self.store.record(i).tokens for i in ids.tolist() if i not in forced), reverse=True)
        r = max(self.config.retrieve_blocks - len(forced), 0)
        return sum(sizes[:r]) + sum(self.store.record(i).tokens for i in forced)

    def _retrieve_in_forward(
        self, query: Query, ids, reps, forced
    ) -> tuple[DynamicCache, dict[int, list[int]], list[int]]:
        cache = self.init_cache()
        # Every layer retrieves the same number of tokens (blocks are equal in size, the
        # provisional one is in every layer), so the question can sit right after them.
        start = self.init_len + self._retrieved_tokens(ids, forced)
        hook = _LayerRetrieval(self, cache, ids, reps, forced, start)
        n = query.ids.shape[1]
        positions = self.positions.text(start, n, self.backend.device)
        with self.backend.attention_hook(hook):
            self.backend.forward(self.backend.embed_ids(query.ids), cache, positions, logits="none")
        cache.crop(-n)  # drop the question: the engine appends it again, with its prompt
        return cache, hook.chosen, list(hook.placed.values())

    def _retrieve_shared(self, query: Query, ids, reps, forced) -> list[int]:
        cache = self.init_cache()
        n = query.ids.shape[1]
        positions = self.positions.text(self.init_len, n, self.backend.device)
        collector = _QueryCollector()
        with self.backend.attention_hook(collector):
            self.backend.forward(self.backend.embed_ids(query.ids), cache, positions, logits="none")
        kv_heads = self.backend.text.num_kv_heads
        scores = sum(
            reps[:, layer] @ _unrotated_group_query(q, positions, kv_heads, self.positions)
            for layer, q in collector.queries.items()
        )
        return self.select(ids, scores, forced)

    def stats(self) -> MemoryStats:
        blocks, tokens, nbytes = self.store.totals()
        blocks["init"] = 1
        tokens["init"] = self.init_len
        # The prompt's KV is held twice: to answer from, and at the head of the window.
        nbytes["init"] = self.init_nbytes() + self.window.init_nbytes
        nbytes["window"] = self.window.nbytes
        nbytes["pending"] = sum(kv.nbytes + positions.nbytes for kv, positions in self._open_kv)
        nbytes["index"] = self.store.index_nbytes()
        return self._block_stats(blocks, tokens, nbytes)


@dataclass(frozen=True, kw_only=True)
class RecentConfig:
    """``num_frames`` most recent frames (recent-frames baseline)."""

    num_frames: int = 16

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames: must be >= 1, got {self.num_frames}")


@register_method
class RecentMemory(MemoryMethod):
    """The last ``num_frames`` frames in a rolling window cache; nothing is prefilled twice.

    A question at an earlier time than the last frame can be answered only while its frames are
    still in the window; otherwise :class:`StreamError` is raised.
    """

    name = "recent"
    config_class = RecentConfig
    answers_past_questions = False

    def __init__(self, backend, config: RecentConfig | None = None, *, fps: float | None = None) -> None:
        super().__init__(backend, config, fps=fps)
        # Units with text differ in length: the window then holds whole units, not a token count.
        units = self.config.num_frames if self.units_have_text else None
        tokens = self.config.num_frames * backend.tokens_per_frame
        self.window = SlidingWindow(backend, tokens, self.positions, max_units=units)

    def _ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        start = self.frames
        for i in range(features.shape[0]):
            self.window.append(features[i : i + 1].to(self.backend.device), [self.stamp(start + i)])

    def _window_frames(self, window: SlidingWindow | None = None, frames: int | None = None) -> range:
        """Global indices of the frames in ``window`` (default: the stored one) after ``frames``
        frames (default: those ingested), oldest first."""
        window = self.window if window is None else window
        frames = self.frames if frames is None else frames
        held = len(window.units) if self.units_have_text else window.length // self.backend.tokens_per_frame
        return range(frames - held, frames)

    def prepare(self, query: Query) -> AnswerContext:
        upto = self.frames_until(query.time)
        window = self.window
        pending = self.pending_unit(query.time)
        if pending is not None:
            # The provisional unit joins a copy of the window (evicting from the copy, as an ingest
            # would); the stored window stays as it is.
            window = window.copy()
            window.append(pending.features[None].to(self.backend.device), [self.stamp(self.frames)])
            upto += 1
        held = self._window_frames(window, upto if pending is not None else None)
        wanted = range(max(0, upto - self.config.num_frames), upto)
        if wanted and (wanted.start < held.start or wanted.stop > held.stop):
            raise StreamError(
                f"recent: frames {wanted.start}-{wanted.stop - 1} for a question at {query.time:.1f}s have left "
                "the rolling window"
            )
        if wanted and wanted.start != held.start:
            raise StreamError("recent: a question before the newest frame needs frames after it in the window")
        p = self.backend.tokens_per_frame
        if self.units_have_text:
            # Whole units with their text; the question continues after the last one wanted.
            tokens = sum(length for length, _ in window.units[: len(wanted)])
            cursor = window.units[len(wanted) - 1][1] if wanted else window.init_len
        else:
            tokens = len(wanted) * p
            # The window's units are one run (moved by evictions): the question continues it.
            _, cursor = self.positions.visual_run(
                window.run_start, self.backend.layout, len(wanted), first_unit=window.run_units - len(held)
            )
        cache = window.prefix(tokens)
        length = window.init_len + tokens
        retrieved = self.frame_blocks(wanted)
        return AnswerContext(
            cache=cache, next_position=cursor if wanted else length, context_tokens=length, retrieved=retrieved
        )

    def stats(self) -> MemoryStats:
        return MemoryStats(
            frames=self.frames,
            blocks={"init": 1, "frame": len(self._window_frames())},
            tokens={"init": self.window.init_len, "frame": self.window.length},
            bytes={"init": self.window.init_nbytes, "frame": self.window.nbytes},
        )
