"""Block metadata apart from payload tensors.

A :class:`BlockRecord` is small, immutable bookkeeping (ids, frame span, times, bytes).
Payloads (the kept K/V of every layer) live in a :class:`BlockStore` addressed by id, in CPU
memory. Assembling a cache gathers the chosen payloads into one pinned staging buffer and copies
it to the accelerator asynchronously (:func:`to_device`): pinning every block instead would round
each allocation up to a power of two (up to +74% for a 196-token ReKV frame). Quantized payloads
(:mod:`mukv.kv.quant`) cross to the accelerator as codes and are dequantized there
(:func:`layer_to_device`, :meth:`mukv.memory.blocks.BlockMemory.assemble`).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mukv.kv.disk import DiskTier
from mukv.kv.quant import QuantizedKV, move_quantized


@dataclass(frozen=True)
class BlockRecord:
    """One retrievable block: ``frames first_frame..last_frame`` (part ``part`` of a frame for
    patch blocks), ``tokens`` kept tokens whose keys were rotated with ``positions``."""

    block_id: int
    granularity: str
    first_frame: int
    last_frame: int
    part: int
    start_time: float
    end_time: float
    tokens: int
    nbytes: int
    location: str
    provisional: bool = False


@dataclass(frozen=True)
class BlockPayload:
    """Tensors of one block.

    ``kv``: ``[L, 2, Hkv, n, D]`` kept keys (index 0) and values (index 1) of every layer, as
    computed (a tensor) or quantized (:class:`mukv.kv.quant.QuantizedKV`, which has the dense
    ``shape``; read it through :meth:`dense`);
    ``positions``: ``[R, n]`` positions the keys carry, in the backend's position scheme's shape;
    ``kept``: ``[n]`` indices of the kept tokens within the block; ``scores``: ``[n_block]`` fused
    importance of every block token.
    """

    kv: torch.Tensor | QuantizedKV
    positions: torch.Tensor
    kept: torch.Tensor
    scores: torch.Tensor

    @property
    def form(self) -> str:
        """How ``kv`` is held: ``"native"`` (as computed), ``"int8"`` or ``"int4"``."""
        return self.kv.form if isinstance(self.kv, QuantizedKV) else "native"

    @property
    def nbytes(self) -> int:
        """Bytes held (a quantized ``kv`` counts its codes, scales and minimums)."""
        return sum(t.nbytes for t in (self.kv, self.positions, self.kept, self.scores))

    @property
    def tokens(self) -> int:
        """Kept tokens ``n``."""
        return int(self.kv.shape[3])

    def dense(self, layer: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """The kept K/V as a plain tensor: ``[L, 2, Hkv, n, D]``, or ``[2, Hkv, n, D]`` of one
        ``layer``, on ``device`` (default: where the payload is). Every reader of stored K/V goes
        through here, whatever form the store keeps: a quantized payload is dequantized on
        ``device`` (its codes moved there first), a native one is returned as it is (a view, no
        copy, when already on ``device``)."""
        if isinstance(self.kv, QuantizedKV):
            return self.kv.dequantize(layer, device)
        kv = self.kv if layer is None else self.kv[layer]
        return kv if device is None else kv.to(device)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockPayload:
        """A copy whose every tensor is ``fn(tensor)``: K/V (each tensor of a quantized form, through
        its own ``map_tensors``), then ``positions``, ``kept``, ``scores``, always in that order.
        What moves a payload whole (the disk tier) goes through here, whatever form ``kv`` has."""
        kv = self.kv.map_tensors(fn) if isinstance(self.kv, QuantizedKV) else fn(self.kv)
        return dataclasses.replace(
            self, kv=kv, positions=fn(self.positions), kept=fn(self.kept), scores=fn(self.scores)
        )


def to_device(parts: list[torch.Tensor], *, dim: int, device: torch.device) -> torch.Tensor:
    """Concatenate CPU tensors along ``dim`` onto ``device`` with one copy.

    For CUDA the parts are gathered into a pinned staging buffer and copied asynchronously; the
    host allocator keeps the buffer alive until the copy has finished.
    """
    if device.type != "cuda":
        return torch.cat(parts, dim=dim).to(device)
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    staging = torch.empty(shape, dtype=parts[0].dtype, pin_memory=True)
    torch.cat(parts, dim=dim, out=staging)
    return staging.to(device, non_blocking=True)


def layer_to_device(payloads: list[BlockPayload], layer: int, device: torch.device) -> torch.Tensor:
    """Layer ``layer`` of ``payloads`` one after another on ``device``: ``[2, Hkv, R, D]``.

    Native payloads go through :func:`to_device` (one copy); quantized ones cross as codes, scales
    and minimums (one copy to CUDA, :func:`mukv.kv.quant.move_quantized`) and are dequantized on
    ``device``.
    """
    if not any(isinstance(p.kv, QuantizedKV) for p in payloads):
        return to_device([p.kv[layer] for p in payloads], dim=2, device=device)
    quantized = [p.kv for p in payloads if isinstance(p.kv, QuantizedKV)]
    moved = iter(move_quantized(quantized, device, layer=layer))
    parts = []
    for payload in payloads:
        quantized = isinstance(payload.kv, QuantizedKV)
        parts.append(next(moved).dequantize(0, device) if quantized else payload.kv[layer].to(device))
    return torch.cat(parts, dim=2)


class _Index:
    """Per-granularity ids, representatives and end times in buffers that grow by doubling, so
    that adding a block is amortised O(1) and a question reads views, never a rebuild.

    Removal is lazy, so that evicting blocks one at a time (the byte budget, over a long stream)
    costs amortised O(1) each instead of shifting every buffer each time: a removed block's slot
    is only marked dead (dead slots at the end are freed at once). :meth:`compact` moves the live
    slots down, in order, with one gather per buffer; readers call it first
    (:meth:`BlockStore.index`), so a question after evictions pays one gather for all of them, and
    :meth:`append` calls it when the buffers are full and at least half their slots are dead
    (otherwise they double, so such a compaction is paid for by as many removals as it moves
    slots). The buffers may so hold up to twice the slots that removing in place would need; they
    never shrink either way.
    """

    def __init__(self) -> None:
        # Slots in use, dead ones included; live slots keep the order their blocks were added in.
        self.count = 0
        self.dead = 0
        self.ids = torch.empty(0, dtype=torch.long)
        self.end_times = torch.empty(0, dtype=torch.float64)
        self.alive = torch.empty(0, dtype=torch.bool)
        self.reps: torch.Tensor | None = None
        # Live block id -> its slot: a removal or a representative look-up without scanning ids.
        self.slots: dict[int, int] = {}

    @property
    def live(self) -> int:
        """Blocks held (slots in use that are not dead)."""
        return self.count - self.dead

    def append(self, block_id: int, end_time: float, representative: torch.Tensor) -> None:
        if self.reps is None:
            self.reps = torch.empty((0, *representative.shape), dtype=torch.float32)
        if self.count == self.ids.shape[0]:
            if self.dead and 2 * self.dead >= self.count:
                self.compact()
            else:
                capacity = max(16, 2 * self.count)
                room = capacity - self.count
                self.ids = torch.cat((self.ids, torch.empty(room, dtype=torch.long)))
                self.end_times = torch.cat((self.end_times, torch.empty(room, dtype=torch.float64)))
                self.alive = torch.cat((self.alive, torch.empty(room, dtype=torch.bool)))
                self.reps = torch.cat((self.reps, torch.empty((room, *representative.shape), dtype=torch.float32)))
        self.ids[self.count] = block_id
        self.end_times[self.count] = end_time
        self.alive[self.count] = True
        self.reps[self.count] = representative
        self.slots[block_id] = self.count
        self.count += 1

    def remove(self, block_id: int) -> None:
        """Mark ``block_id``'s slot dead (O(1)); the buffers are compacted later."""
        self.alive[self.slots.pop(block_id)] = False
        self.dead += 1
        # Dead slots at the end are free at once, nothing to move: the provisional blocks a question
        # added last are dropped at the next ingest, and the next question's read must not compact
        # the whole index for them. (Removing every block frees every slot.)
        while self.count and not bool(self.alive[self.count - 1]):
            self.count -= 1
            self.dead -= 1

    def compact(self) -> None:
        """Move the live slots down to ``0..live-1``, in order (a no-op without dead slots)."""
        if not self.dead:
            return
        keep = self.alive[: self.count].nonzero().squeeze(1)
        n = keep.numel()
        assert self.reps is not None
        for name in ("ids", "end_times", "reps"):
            buffer = getattr(self, name)
            buffer[:n] = buffer[keep]  # advanced indexing gathers into a copy first
        self.alive[:n] = True
        self.count, self.dead = n, 0
        self.slots = dict(zip(self.ids[:n].tolist(), range(n), strict=True))


class BlockStore:
    """Records, payloads and representative vectors of stored blocks, by granularity.

    Representatives (float32, one ``[C]`` or ``[L, C]`` tensor per block) are kept as one matrix
    per granularity so that retrieval is a single matrix product.

    ``ram_budget``: the most payload bytes held in RAM (``None``: all of them). When an :meth:`add`
    or :meth:`replace` leaves more, the oldest stored (non-provisional) payloads move to ``disk``
    (:class:`mukv.kv.disk.DiskTier`; a private temporary one, made at the first move, when not
    given) until RAM payload bytes are within it again; their records say ``location="disk"``
    and readers get them through the mapping. Provisional blocks (replaced at the next ingest),
    representatives and the index always stay in RAM.

    Every change keeps :attr:`stored_nbytes` (what a byte budget bounds) up to date, and removing a
    block is amortised O(1) (the index compacts lazily, :class:`_Index`), so a budget evicting one
    block per ingest over a long stream does not cost O(N) per block. Not thread-safe: reads may
    compact the index in place (callers serialise, as :class:`mukv.StreamSession` does).
    """

    def __init__(self, *, ram_budget: int | None = None, disk: DiskTier | None = None) -> None:
        if ram_budget is not None and ram_budget < 0:
            raise ValueError(f"ram_budget: must be a byte count >= 0, got {ram_budget}")
        self.ram_budget = ram_budget
        self._disk = disk
        # Payload bytes by place (provisional blocks included in RAM), kept as blocks come and go.
        self._ram_bytes = 0
        self._disk_bytes = 0
        # Record bytes (payload and representative) of the stored (non-provisional) blocks, kept as
        # blocks come, are replaced and go, so that a budget check is O(1). Neither counter above
        # is it: they count payloads only, provisional ones included.
        self._stored_bytes = 0
        # Ids of stored payloads in RAM, smallest (oldest) first; removed or moved ids are skipped
        # when popped. Only kept when there is a budget.
        self._in_ram: list[int] = []
        self._records: dict[int, BlockRecord] = {}
        self._payloads: dict[int, BlockPayload] = {}
        # Ids by granularity in storage order (a dict: removing one is O(1), not a list scan).
        self._by_granularity: dict[str, dict[int, None]] = defaultdict(dict)
        self._index: dict[str, _Index] = defaultdict(_Index)
        self._next_id = 0

    def add(
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
        """Store a block (payload moved to CPU memory) and return its record."""
        payload = payload.map_tensors(lambda t: t.to("cpu"))
        block_id = self._next_id
        self._next_id += 1
        record = BlockRecord(
            block_id=block_id,
            granularity=granularity,
            first_frame=first_frame,
            last_frame=last_frame,
            part=part,
            start_time=start_time,
            end_time=end_time,
            tokens=int(payload.kv.shape[3]),
            nbytes=payload.nbytes + representative.numel() * 4,
            location="cpu",
            provisional=provisional,
        )
        self._records[block_id] = record
        self._payloads[block_id] = payload
        self._by_granularity[granularity][block_id] = None
        self._index[granularity].append(block_id, end_time, representative.detach().float().cpu())
        self._ram_bytes += payload.nbytes
        if not provisional:
            self._stored_bytes += record.nbytes
        if self.ram_budget is not None and not provisional:
            heapq.heappush(self._in_ram, block_id)
        self._spill()
        return self._records[block_id]

    def adopt(self, record: BlockRecord, payload: BlockPayload, representative: torch.Tensor) -> BlockRecord:
        """Store a block under ``record``'s id (a saved memory being loaded): ids are kept, so that
        a loaded store reports and orders blocks exactly as the one that was saved. Blocks must be
        adopted in increasing id order (the order they were stored in: retrieval reads the index
        in storage order); the next :meth:`add` continues after the largest id."""
        if record.block_id < self._next_id:
            raise ValueError(f"adopt: block {record.block_id} is not after the stored ids (next id {self._next_id})")
        self._next_id = record.block_id
        stored = self.add(
            granularity=record.granularity,
            first_frame=record.first_frame,
            last_frame=record.last_frame,
            part=record.part,
            start_time=record.start_time,
            end_time=record.end_time,
            payload=payload,
            representative=representative,
            provisional=record.provisional,
        )
        return stored

    @property
    def next_id(self) -> int:
        """The id the next stored block gets (ids are never reused, provisional blocks consume them)."""
        return self._next_id

    @next_id.setter
    def next_id(self, value: int) -> None:
        if value < self._next_id:
            raise ValueError(f"next_id: {value} is below the ids already given (next id {self._next_id})")
        self._next_id = value

    def replace(self, block_id: int, payload: BlockPayload, *, location: str | None = None) -> BlockRecord:
        """Give block ``block_id`` another payload (fewer kept tokens, another storage form or
        place); its representative, span and place in the index stay. Returns the new record.

        ``location="disk"`` is for a payload this store's disk tier wrote (:meth:`_spill`); any
        other payload is held in RAM (a block that was on disk leaves it), and the RAM budget
        applies again."""
        record = previous = self._records[block_id]
        old = self._payloads[block_id]
        representative_bytes = record.nbytes - old.nbytes
        to_disk = location == "disk"
        if record.location == "disk":
            assert self._disk is not None
            self._disk.release(block_id)
            self._disk_bytes -= old.nbytes
            if not to_disk and self.ram_budget is not None and not record.provisional:
                heapq.heappush(self._in_ram, block_id)
            # Back in RAM unless the caller names another place.
            location = location or "cpu"
        else:
            self._ram_bytes -= old.nbytes
        if to_disk:
            self._disk_bytes += payload.nbytes
        else:
            self._ram_bytes += payload.nbytes
        record = dataclasses.replace(
            record,
            tokens=payload.tokens,
            nbytes=payload.nbytes + representative_bytes,
            location=location or record.location,
        )
        self._records[block_id] = record
        self._payloads[block_id] = payload
        if not record.provisional:
            self._stored_bytes += record.nbytes - previous.nbytes
        if not to_disk:
            self._spill()
        return self._records[block_id]

    def _spill(self) -> None:
        """Move the oldest stored RAM payloads to the disk tier until RAM payload bytes are within
        :attr:`ram_budget` (or only provisional ones are left in RAM)."""
        if self.ram_budget is None:
            return
        while self._ram_bytes > self.ram_budget and self._in_ram:
            block_id = heapq.heappop(self._in_ram)
            record = self._records.get(block_id)
            if record is None or record.location == "disk" or record.provisional:
                continue  # removed or moved since it was queued
            if self._disk is None:
                self._disk = DiskTier()
            try:
                mapped = self._disk.write(block_id, self._payloads[block_id])
            except BaseException:
                heapq.heappush(self._in_ram, block_id)  # still in RAM: a later add tries again
                raise
            self.replace(block_id, mapped, location="disk")

    @property
    def ram_nbytes(self) -> int:
        """Payload bytes held in RAM (provisional blocks included; representatives not)."""
        return self._ram_bytes

    @property
    def disk_nbytes(self) -> int:
        """Payload bytes held in the disk tier's memory-mapped files."""
        return self._disk_bytes

    @property
    def stored_nbytes(self) -> int:
        """``BlockRecord.nbytes`` (payload and representative) summed over the non-provisional
        blocks, in RAM or on disk: kept up to date by every add, replace and remove (O(1))."""
        return self._stored_bytes

    @property
    def disk(self) -> DiskTier | None:
        """The disk tier (``None`` until a payload first moved there, unless one was given)."""
        return self._disk

    def close(self) -> None:
        """Remove the disk tier's files and directory (payloads already read stay readable)."""
        if self._disk is not None:
            self._disk.close()

    def remove(self, block_id: int) -> None:
        record = self._records.pop(block_id)
        payload = self._payloads.pop(block_id)
        if record.location == "disk":
            assert self._disk is not None
            self._disk.release(block_id)
            self._disk_bytes -= payload.nbytes
        else:
            self._ram_bytes -= payload.nbytes
        if not record.provisional:
            self._stored_bytes -= record.nbytes
        del self._by_granularity[record.granularity][block_id]
        self._index[record.granularity].remove(block_id)

    def record(self, block_id: int) -> BlockRecord:
        return self._records[block_id]

    def payload(self, block_id: int) -> BlockPayload:
        return self._payloads[block_id]

    def representative(self, block_id: int) -> torch.Tensor:
        """The representative vector retrieval scores block ``block_id`` by (float32)."""
        index = self._index[self._records[block_id].granularity]
        assert index.reps is not None
        return index.reps[index.slots[block_id]]

    def records(self, granularity: str | None = None) -> list[BlockRecord]:
        if not granularity:
            return list(self._records.values())
        return [self._records[i] for i in self._by_granularity.get(granularity, ())]

    def index(self, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [N] long, representatives [N, ...] float32)`` of a granularity's blocks (views)."""
        index = self._index.get(granularity)
        if index is None or index.reps is None or index.live == 0:
            return torch.empty(0, dtype=torch.long), torch.empty(0, 0)
        index.compact()
        return index.ids[: index.count], index.reps[: index.count]

    def end_times(self, granularity: str) -> torch.Tensor:
        """End times ``[N]`` (seconds) of a granularity's blocks, aligned with :meth:`index`."""
        index = self._index.get(granularity)
        if index is None:
            return torch.empty(0, dtype=torch.float64)
        index.compact()
        return index.end_times[: index.count]

    def totals(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """Blocks, tokens and bytes held, by granularity."""
        blocks: dict[str, int] = {}
        tokens: dict[str, int] = {}
        nbytes: dict[str, int] = {}
        for record in self._records.values():
            g = record.granularity
            blocks[g] = blocks.get(g, 0) + 1
            tokens[g] = tokens.get(g, 0) + record.tokens
            nbytes[g] = nbytes.get(g, 0) + record.nbytes
        return blocks, tokens, nbytes

    def index_nbytes(self) -> int:
        """Bytes of the index buffers (ids, end times, liveness flags, representatives, spare room
        and slots of removed blocks not yet compacted included) beyond the representatives that the
        records' ``nbytes`` already count."""
        held = counted = 0
        for index in self._index.values():
            buffers = [index.ids, index.end_times, index.alive] + ([] if index.reps is None else [index.reps])
            held += sum(b.untyped_storage().nbytes() for b in buffers)
            if index.reps is not None:
                counted += index.reps[: index.live].nbytes  # the live rows' bytes, wherever they lie
        return held - counted

    def __len__(self) -> int:
        return len(self._records)
