"""Block metadata apart from payload tensors.

A :class:`BlockRecord` is small, immutable bookkeeping (ids, frame span, times, bytes).
Payloads (the kept K/V of every layer) live in a :class:`BlockStore` addressed by id, in CPU
memory. Assembling a cache gathers the chosen payloads into one pinned staging buffer and copies
it to the accelerator asynchronously (:func:`to_device`): pinning every block instead would round
each allocation up to a power of two (up to +74% for a 196-token ReKV frame).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch


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

    ``kv``: ``[L, 2, Hkv, n, D]`` kept keys (index 0) and values (index 1) of every layer;
    ``positions``: ``[n]`` RoPE positions the keys carry; ``kept``: ``[n]`` indices of the kept
    tokens within the block; ``scores``: ``[n_block]`` fused importance of every block token.
    """

    kv: torch.Tensor
    positions: torch.Tensor
    kept: torch.Tensor
    scores: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.kv, self.positions, self.kept, self.scores))


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


class BlockStore:
    """Records, payloads and representative vectors of stored blocks, by granularity.

    Representatives (``[Hkv*D]`` float32 per block) are kept as one matrix per granularity so
    that retrieval is a single matrix product.
    """

    def __init__(self) -> None:
        self._records: dict[int, BlockRecord] = {}
        self._payloads: dict[int, BlockPayload] = {}
        self._representatives: dict[int, torch.Tensor] = {}
        self._by_granularity: dict[str, list[int]] = defaultdict(list)
        self._matrix: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
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
        kv = payload.kv.to("cpu")
        payload = BlockPayload(
            kv=kv, positions=payload.positions.cpu(), kept=payload.kept.cpu(), scores=payload.scores.cpu()
        )
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
        self._representatives[block_id] = representative.detach().float().cpu()
        self._by_granularity[granularity].append(block_id)
        self._matrix.pop(granularity, None)
        return record

    def remove(self, block_id: int) -> None:
        record = self._records.pop(block_id)
        del self._payloads[block_id]
        del self._representatives[block_id]
        self._by_granularity[record.granularity].remove(block_id)
        self._matrix.pop(record.granularity, None)

    def record(self, block_id: int) -> BlockRecord:
        return self._records[block_id]

    def payload(self, block_id: int) -> BlockPayload:
        return self._payloads[block_id]

    def records(self, granularity: str | None = None) -> list[BlockRecord]:
        ids = self._by_granularity.get(granularity, []) if granularity else list(self._records)
        return [self._records[i] for i in ids]

    def index(self, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [N] long, representatives [N, C] float32)`` of a granularity's blocks."""
        if granularity not in self._matrix:
            ids = self._by_granularity.get(granularity, [])
            reps = torch.stack([self._representatives[i] for i in ids]) if ids else torch.empty(0, 0)
            self._matrix[granularity] = (torch.tensor(ids, dtype=torch.long), reps)
        return self._matrix[granularity]

    def __len__(self) -> int:
        return len(self._records)
