"""The block-memory base: what every method that stores retrievable KV blocks shares.

A block method (``mukv``, ``rekv``, later ones) decides how frames become blocks, how blocks are
scored and which ones a question retrieves. This base owns the rest:

- the block store (records apart from payloads, one representative matrix per granularity) and
  the system prompt's KV that every answering cache starts with;
- **provisional blocks**: frames of a group that is still open (a partial segment, ReKV's
  partial block), and a provisional unit the session completed for one question
  (:class:`mukv.memory.base.PendingUnit`), are made retrievable by :meth:`materialize`, the explicit
  question-time step the session calls (under its lock) before :meth:`prepare`; they are replaced
  when more frames arrive. :meth:`prepare` itself never changes stored state;
- eligibility by time (a question at ``t`` sees blocks that end at or before ``t``);
- :meth:`assemble`: the chosen payloads gathered into one answering cache with one copy per
  element, in the order given, either keeping the positions their keys were computed at or
  re-positioned one after another by the backend's position scheme (exact re-rotation);
- the byte budget (``memory_budget``, :class:`mukv.kv.options.StorageOptions`): when an ingest or a
  restore leaves the stored blocks holding more bytes than it, the method's consolidation policy
  (:meth:`BlockMemory._consolidate`) re-prunes or evicts blocks until they fit (docs/memory.md).

Payload positions are ``[R, n]``, in the backend's position scheme's shape.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import DynamicCache

from mukv.backends.base import Backend
from mukv.kv.blocks import BlockPayload, BlockRecord, BlockStore
from mukv.kv.cache import GrowingLayer, cache_of
from mukv.kv.disk import DiskTier
from mukv.kv.options import StorageOptions
from mukv.kv.quant import QUANT_BITS, QuantizedKV, key_layout, move_quantized, quantize_kv
from mukv.memory.base import MemoryMethod, MemoryStats, PendingUnit, RetrievedBlock


@dataclass(frozen=True)
class EncodedBlock:
    """A block encoded elsewhere (a saved memory, a synthetic benchmark state), for
    :meth:`BlockMemory.restore`: frames ``first_frame..last_frame`` (part ``part``) taken at
    ``start_time..end_time``, its payload and its retrieval representative."""

    granularity: str
    first_frame: int
    last_frame: int
    part: int
    start_time: float
    end_time: float
    payload: BlockPayload
    representative: torch.Tensor


def can_reprune(payload: BlockPayload) -> bool:
    """Whether :func:`halve_by_score` applies: more than one kept token, and scores for them."""
    return payload.tokens > 1 and payload.scores.numel() > 0


def halve_by_score(payload: BlockPayload) -> BlockPayload:
    """``payload`` re-pruned to the top half (``n // 2``, at least 1) of its ``n`` kept tokens by
    their stored fused scores (``scores[kept]``; ties keep the earlier token), in their original
    order: ``kv [L, 2, Hkv, n', D]``, ``positions [R, n']`` and ``kept [n']`` sliced alike. ``scores``
    stays whole (one per block token, what ``kept`` indexes), so the block can be halved again.
    Read through :meth:`BlockPayload.dense`, so it works whatever form the store keeps."""
    if not can_reprune(payload):
        raise ValueError(f"halve_by_score: needs scores and more than one kept token, got {payload.tokens}")
    keep = max(1, payload.tokens // 2)
    kept_scores = payload.scores[payload.kept].float()
    best = torch.sort(kept_scores, descending=True, stable=True).indices[:keep]
    chosen = best.sort().values
    return BlockPayload(
        kv=payload.dense()[:, :, :, chosen].contiguous(),
        positions=payload.positions[:, chosen].contiguous(),
        kept=payload.kept[chosen].contiguous(),
        scores=payload.scores,
    )


class BlockMemory(MemoryMethod):
    """Base of block-based memory methods (see the module docstring).

    Subclasses implement ``_ingest`` (frames to stored blocks, via :meth:`add_block`),
    :meth:`_store_open` (the open groups' frames before a frame index, and a provisional unit, as
    provisional blocks), ``prepare`` and ``stats``.
    """

    # Tokens of room left after an assembled context for the question and the answer; beyond it
    # the cache doubles once (a copy), so it only needs to cover typical questions and answers.
    answer_room: ClassVar[int] = 256

    def __init__(self, backend: Backend, config: Any = None, *, fps: float | None = None) -> None:
        super().__init__(backend, config, fps=fps)
        self.store = self._block_store()
        cache, self.init_len = backend.system_cache()
        # The system prompt's KV per layer ``[1, Hkv, init, D]``, shared by every answering cache.
        self.init_kv: list[tuple[torch.Tensor, torch.Tensor]] = [(layer.keys, layer.values) for layer in cache.layers]
        self._provisional: list[int] = []
        # (frames, provisional unit) the provisional blocks were built for.
        self._materialized: tuple[int, PendingUnit | None] | None = None
        # What the byte budget consolidated: "repruned.<g>", "evicted.<g>", "freed_bytes.<g>".
        self._consolidated: dict[str, int] = {}

    # ------------------------------------------------------------------ storing

    def add_block(
        self,
        *,
        granularity: str,
        first_frame: int,
        last_frame: int,
        part: int,
        start_time: float,
        end_time: float,
        payload: BlockPayload,
        representative: torch.Tensor,
        provisional: bool = False,
    ) -> BlockRecord:
        """Store a block of frames ``first_frame..last_frame`` taken at ``start_time..end_time``;
        ``representative`` is what retrieval scores it by (``[C]`` or ``[L, C]``)."""
        payload = self._stored_payload(payload)
        record = self.store.add(
            granularity=granularity,
            first_frame=first_frame,
            last_frame=last_frame,
            part=part,
            start_time=start_time,
            end_time=end_time,
            payload=payload,
            representative=representative,
            provisional=provisional,
        )
        if provisional:
            self._provisional.append(record.block_id)
        return record

    def _stored_payload(self, payload: BlockPayload) -> BlockPayload:
        """The form a block's payload is stored in (the storage options: ``kv_dtype`` in groups of
        ``kv_group``); every payload the store receives goes through here, re-pruned and provisional
        ones included (a block that turns from provisional to stored keeps the K/V an answer read).
        Quantized on the device the K/V were computed on, before the store moves them off it. A
        payload already in the configured form is kept as it is (blocks copied from a store)."""
        config = self.config
        if not isinstance(config, StorageOptions):
            return payload
        kv = payload.kv
        if config.kv_dtype == "native":
            return payload if not isinstance(kv, QuantizedKV) else dataclasses.replace(payload, kv=payload.dense())
        bits, group = QUANT_BITS[config.kv_dtype], config.kv_group
        if isinstance(kv, QuantizedKV) and kv.bits == bits and kv.group == group:
            _, _, _, n, dim = kv.shape
            if kv.keys == key_layout(config.kv_keys, n, dim, group):
                return payload
        return dataclasses.replace(payload, kv=quantize_kv(payload.dense(), bits, group, keys=config.kv_keys))

    def ingest(self, features: torch.Tensor, timestamps: np.ndarray, stamps: Sequence[float] | None = None) -> None:
        """Add frames (see :meth:`MemoryMethod.ingest`); provisional blocks are dropped first."""
        self.drop_provisional()
        super().ingest(features, timestamps, stamps)
        self._enforce_budget()

    def restore(self, blocks: Iterable[EncodedBlock], timestamps: Sequence[float]) -> None:
        """Adopt already-encoded ``blocks`` covering the next ``len(timestamps)`` frames, taken at
        ``timestamps`` (continuing the stream's clock), as if they had been ingested: for loading a
        saved memory, and for benchmarks that build hours of stream state without encoding it.

        Only whole groups should be adopted (the method's open groups are not touched); a block
        outside the adopted frames is a ``ValueError`` and nothing is stored.
        """
        blocks = list(blocks)
        first, last = self.frames, self.frames + len(timestamps) - 1
        for block in blocks:
            if not first <= block.first_frame <= block.last_frame <= last:
                raise ValueError(
                    f"restore: block of frames {block.first_frame}-{block.last_frame} is outside the adopted "
                    f"frames {first}-{last}"
                )
        self.drop_provisional()
        self._advance_clock(timestamps)
        for block in blocks:
            self.add_block(
                granularity=block.granularity,
                first_frame=block.first_frame,
                last_frame=block.last_frame,
                part=block.part,
                start_time=block.start_time,
                end_time=block.end_time,
                payload=block.payload,
                representative=block.representative,
            )
        self._enforce_budget()

    # ------------------------------------------------------------------ byte budget

    @property
    def memory_budget(self) -> int | None:
        """The most bytes stored blocks may hold after an ingest (``None``: unbounded)."""
        return getattr(self.config, "memory_budget", None)

    def stored_bytes(self) -> int:
        """Bytes of the stored blocks the budget bounds: payloads and representatives of every
        non-provisional block (``BlockRecord.nbytes``). Provisional blocks are left out: they live
        from a question's :meth:`materialize` to the next ingest, which drops them, and there are
        none when the budget is checked. The system prompt's KV, a sliding window and open groups
        are not counted either: no consolidation can shrink them (they are bounded by the config).

        O(1): the store keeps this sum as blocks are added, re-pruned, moved to disk and removed
        (:attr:`mukv.kv.blocks.BlockStore.stored_nbytes`); the budget reads it after every ingest."""
        return self.store.stored_nbytes

    def _enforce_budget(self) -> None:
        """Run the consolidation policy until the stored blocks fit in :attr:`memory_budget`.

        If the method's policy leaves too many bytes (it should not), the base policy (oldest
        first) finishes, so the budget holds whenever an ingest, a restore or a load returns."""
        budget = self.memory_budget
        if budget is None:
            return
        excess = self.stored_bytes() - budget
        if excess <= 0:
            return
        self._consolidate(excess)
        excess = self.stored_bytes() - budget
        if excess > 0:
            BlockMemory._consolidate(self, excess)

    def _consolidate(self, excess_bytes: int) -> None:
        """Free at least ``excess_bytes`` of stored blocks (the budget's policy). The default, for
        methods without per-token scores: evict whole blocks, oldest first (by first frame, then
        storage order). Subclasses override it with what they know of their blocks."""
        freed = 0
        records = sorted(
            (r for r in self.store.records() if not r.provisional), key=lambda r: (r.first_frame, r.block_id)
        )
        for record in records:
            if freed >= excess_bytes:
                break
            freed += self._evict(record.block_id)

    def _count(self, action: str, granularity: str, value: int = 1) -> None:
        key = f"{action}.{granularity}"
        self._consolidated[key] = self._consolidated.get(key, 0) + value

    def _evict(self, block_id: int) -> int:
        """Remove stored block ``block_id`` (its frames stay on the clock); returns the bytes freed."""
        record = self.store.record(block_id)
        self.store.remove(block_id)
        self._count("evicted", record.granularity)
        self._count("freed_bytes", record.granularity, record.nbytes)
        return record.nbytes

    def _reprune(self, block_id: int) -> int:
        """Halve block ``block_id``'s kept tokens by its stored scores (:func:`halve_by_score`),
        stored through :meth:`_stored_payload`; the representative stays. Returns the bytes freed."""
        record = self.store.record(block_id)
        payload = self._stored_payload(halve_by_score(self.store.payload(block_id)))
        replaced = self.store.replace(block_id, payload)
        freed = record.nbytes - replaced.nbytes
        self._count("repruned", record.granularity)
        self._count("freed_bytes", record.granularity, freed)
        return freed

    def consolidation_counts(self) -> dict[str, int] | None:
        """What the byte budget did so far (blocks re-pruned and evicted, bytes freed, by
        granularity: ``"repruned.patch"``, ``"evicted.frame"``, ``"freed_bytes.segment"``...), for
        :class:`mukv.memory.base.MemoryStats`; ``None`` when unbounded and nothing was consolidated."""
        if self.memory_budget is None and not self._consolidated:
            return None
        return dict(sorted(self._consolidated.items()))

    # ------------------------------------------------------------------ saving

    def saved_blocks(self) -> list[BlockRecord]:
        """Records of the stored blocks a saved memory keeps, in storage order (provisional blocks
        describe open groups at one question and are left out: the open groups are saved instead)."""
        return [r for r in self.store.records() if not r.provisional]

    def adopt_block(self, record: BlockRecord, payload: BlockPayload, representative: torch.Tensor) -> None:
        """Store a saved block under its saved id (in increasing id order, before :meth:`import_state`)."""
        if record.provisional:
            raise ValueError(f"adopt_block: block {record.block_id} is provisional; provisional blocks are not saved")
        self.store.adopt(record, payload, representative)

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The id counter and the method's open groups (:meth:`_export_open`); stored blocks are saved
        from :meth:`saved_blocks`."""
        tensors, meta = self._export_open()
        state: dict[str, Any] = {"next_block_id": self.store.next_id, "open": meta}
        if self._consolidated:
            state["consolidated"] = dict(self._consolidated)
        return tensors, state

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._import_open(tensors, meta["open"])
        # Provisional blocks consumed ids: later blocks get the ids they would have had.
        self.store.next_id = int(meta["next_block_id"])
        self._provisional = []
        self._materialized = None
        self._consolidated = {key: int(value) for key, value in meta.get("consolidated", {}).items()}
        # A memory loaded under a smaller budget than it was saved with fits at once.
        self._enforce_budget()

    def _export_open(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The encoding state of frames not yet in whole stored blocks (open groups, windows):
        tensors and JSON-ready metadata (see :meth:`MemoryMethod.export_state`)."""
        raise NotImplementedError(f"method {self.name!r} cannot be saved")

    def _import_open(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        raise NotImplementedError(f"method {self.name!r} cannot be loaded")

    def drop_provisional(self) -> None:
        """Remove the provisional blocks (they describe open groups as they were)."""
        for block_id in self._provisional:
            self.store.remove(block_id)
        self._provisional = []
        self._materialized = None

    @property
    def provisional_ids(self) -> tuple[int, ...]:
        return tuple(self._provisional)

    def materialize(self, time: float, pending: PendingUnit | None = None) -> None:
        """Make every frame up to ``time`` retrievable: frames of groups that are still open, and
        ``pending`` (see :class:`mukv.memory.base.PendingUnit`), are stored as provisional blocks
        (replaced at the next ingest, or when a question needs another prefix). The session calls
        this, under its lock, before :meth:`prepare`."""
        super().materialize(time, pending)
        key = (self.frames_until(time), self.pending_unit(time))
        if self._materialized is not None and self._materialized[0] == key[0] and self._materialized[1] is key[1]:
            return
        self.drop_provisional()
        self._materialized = key
        self._store_open(*key)

    @abstractmethod
    def _store_open(self, upto: int, pending: PendingUnit | None) -> None:
        """Store the open groups' frames with index < ``upto`` as provisional blocks, followed by
        ``pending`` (unit index :attr:`frames`; given only when ``upto == frames``) as if it had been
        ingested: the groups it completes are stored provisional too, and no encoding state changes."""

    def check_materialized(self, time: float) -> None:
        """Raise ``RuntimeError`` unless :meth:`materialize` was called for ``time``'s frames."""
        if self._materialized is None or self._materialized[0] != self.frames_until(time):
            raise RuntimeError(
                f"{self.name}: call materialize({time}) before prepare (the session does): frames of open "
                "groups would otherwise be missing from the answer"
            )

    # ------------------------------------------------------------------ answering

    def eligible(self, granularity: str, time: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [N], representatives [N, ...])`` of ``granularity``'s blocks ending at or before
        ``time``, in storage (= time) order."""
        ids, reps = self.store.index(granularity)
        if ids.numel() == 0:
            return ids, reps
        mask = self.store.end_times(granularity) <= time
        return ids[mask], reps[mask]

    def retrieved_blocks(self, chosen: Sequence[tuple[int, float | None]]) -> tuple[RetrievedBlock, ...]:
        """Typed records of the chosen ``(block id, score)`` pairs, in the given order."""
        return tuple(RetrievedBlock.from_record(self.store.record(i), score) for i, score in chosen)

    def placed_positions(self, payloads: Sequence[BlockPayload], start: int) -> tuple[torch.Tensor, int]:
        """New positions ``[R, total]`` of ``payloads`` placed one after another from cursor
        ``start`` by the backend's scheme, and the cursor after them."""
        return self.positions.place_blocks([p.positions for p in payloads], start)

    def assemble(self, block_ids: Sequence[int], *, reposition: bool) -> tuple[DynamicCache, int]:
        """``[init | blocks...]`` as a new cache on the model's device, blocks in the given order.

        ``reposition``: blocks are placed one after another right after the system prompt (keys
        re-rotated exactly); otherwise keys keep the positions they were computed at. Returns the
        cache and the number of block tokens. Every element is copied once (on CUDA: through one
        pinned staging buffer and one host-to-device copy), and the cache's layers append in place
        (:class:`mukv.kv.cache.GrowingLayer`), so decoding does not copy the context again at every
        token; nothing stored is modified. Quantized payloads are dequantized on the model's device:
        on CUDA their codes cross in one copy and are dequantized into the cache's buffer; on CPU
        block by block into it.
        """
        payloads = [self.store.payload(i) for i in block_ids]
        device, init = self.backend.device, self.init_len
        total = sum(p.tokens for p in payloads)
        first_k, _ = self.init_kv[0]
        layers, kv_heads, head_dim = len(self.init_kv), first_k.shape[1], first_k.shape[3]
        dtype = first_k.dtype
        # [L, 2, 1, Hkv, init + total + room, D]: each layer's keys/values are views of it, and the
        # answer (question prompt, generated tokens) is written into the room in place.
        capacity = init + total + self.answer_room
        buffer = torch.empty((layers, 2, 1, kv_heads, capacity, head_dim), dtype=dtype, device=device)
        for i, (k, v) in enumerate(self.init_kv):
            buffer[i, 0, :, :, :init] = k
            buffer[i, 1, :, :, :init] = v
        if total:
            blocks = buffer[:, :, 0, :, init : init + total]  # [L, 2, Hkv, total, D]
            cos = sin = None
            if reposition:
                old = torch.cat([p.positions for p in payloads], dim=1)
                new, _ = self.placed_positions(payloads, init)
                cos, sin = self.positions.rotation(old, new)  # once, for every layer
            if device.type == "cuda":
                if any(isinstance(p.kv, QuantizedKV) for p in payloads):
                    # Codes, scales and minimums cross in one copy; dequantized into the buffer.
                    self._dequantize_on_device(payloads, blocks)
                else:
                    # One pinned staging buffer, one host-to-device copy; rotations run on the device.
                    staging = torch.empty(blocks.shape, dtype=dtype, pin_memory=True)
                    self._gather(payloads, staging)
                    blocks.copy_(staging, non_blocking=True)
                if cos is not None:
                    cos, sin = cos.to(device), sin.to(device)
                    for keys in blocks[:, 0]:
                        keys.copy_(self.positions.rotate(keys, cos, sin))
            else:
                # Rotation fused with the copy, block by block: temporaries stay small.
                self._gather(payloads, blocks, cos, sin)
        cache = cache_of([GrowingLayer(buffer[i, 0], buffer[i, 1], init + total) for i in range(layers)])
        return cache, total

    def _gather(
        self,
        payloads: Sequence[BlockPayload],
        out: torch.Tensor,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
    ) -> None:
        """Write the payloads one after another into ``out [L, 2, Hkv, total, D]``, keys rotated
        by ``cos``/``sin`` ``[total, D]`` when given. A quantized payload is dequantized where
        ``out`` is, straight into it, or into one block's temporary when its keys are rotated."""
        offset = 0
        for payload in payloads:
            n = payload.tokens
            piece = slice(offset, offset + n)
            quantized = isinstance(payload.kv, QuantizedKV)
            if cos is None:
                if quantized:
                    payload.kv.dequantize(device=out.device, out=out[:, :, :, piece])
                else:
                    out[:, :, :, piece] = payload.kv
            else:
                kv = payload.dense(device=out.device) if quantized else payload.kv
                self.positions.rotate_into(out[:, 0, :, piece], kv[:, 0], cos[piece], sin[piece])
                out[:, 1, :, piece] = kv[:, 1]
            offset += n

    @staticmethod
    def _dequantize_on_device(payloads: Sequence[BlockPayload], out: torch.Tensor) -> None:
        """Write the payloads one after another into ``out [L, 2, Hkv, total, D]`` on an
        accelerator: quantized ones moved in one copy (:func:`mukv.kv.quant.move_quantized`) and
        dequantized there, native ones (a store may mix forms) copied as they are."""
        moved = iter(move_quantized([p.kv for p in payloads if isinstance(p.kv, QuantizedKV)], out.device))
        offset = 0
        for payload in payloads:
            piece = out[:, :, :, offset : offset + payload.tokens]
            if isinstance(payload.kv, QuantizedKV):
                next(moved).dequantize(out=piece)
            else:
                piece.copy_(payload.kv)
            offset += payload.tokens

    def init_cache(self) -> DynamicCache:
        """A cache holding only the system prompt (views: the first update concatenates)."""
        return DynamicCache(ddp_cache_data=self.init_kv)

    def _block_stats(self, blocks: dict[str, int], tokens: dict[str, int], nbytes: dict[str, int]) -> MemoryStats:
        """:class:`MemoryStats` of these counts, with what every block memory adds: the byte
        budget's consolidation counts and the bytes on the disk tier."""
        return MemoryStats(
            frames=self.frames,
            blocks=blocks,
            tokens=tokens,
            bytes=nbytes,
            consolidated=self.consolidation_counts(),
            disk_bytes=self.store.disk_nbytes,
        )

    def init_nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.init_kv)

    # ------------------------------------------------------------------ placement

    def _block_store(self) -> BlockStore:
        """The store, with the storage options' RAM budget: payloads beyond ``ram_budget`` move to
        memory-mapped files in ``disk_dir`` (a private temporary directory when ``None``, made at
        the first move; ``disk_dir`` alone, without a budget, has no effect)."""
        if not isinstance(self.config, StorageOptions) or self.config.ram_budget is None:
            return BlockStore()
        disk = None if self.config.disk_dir is None else DiskTier(self.config.disk_dir)
        return BlockStore(ram_budget=self.config.ram_budget, disk=disk)

    def close(self) -> None:
        """Remove the disk tier's files (also done when the memory is garbage-collected). The
        memory should not be used afterwards."""
        self.store.close()
