"""What the block store keeps up to date as blocks come, change and go, without a model: the byte
count a budget reads (``BlockStore.stored_nbytes``) always equals the sum over the stored records,
and the lazily compacted index always reads as if every removal had shifted it in place, with
evictions amortised O(1) (one compaction per many removals, not one per removal)."""

from __future__ import annotations

import random

import pytest
import torch

from mukv.kv import blocks as kv_blocks
from mukv.kv.blocks import BlockPayload, BlockStore
from mukv.kv.disk import DiskTier
from mukv.memory.blocks import halve_by_score
from tests.conftest import recount_stored_bytes
from tests.unit.test_disk_tier import add
from tests.unit.test_disk_tier import payload as disk_payload

GRANULARITIES = ("patch", "frame", "segment")


def payload(n: int, seed: int) -> BlockPayload:
    """A block of ``n`` kept tokens out of ``2n``, float16, with scores."""
    return disk_payload(n, seed, torch.float16)


class Reference:
    """What the store should hold, kept the obvious way: ids, end times and representatives per
    granularity in storage order."""

    def __init__(self) -> None:
        self.by: dict[str, list[tuple[int, float, torch.Tensor]]] = {g: [] for g in GRANULARITIES}

    def add(self, granularity: str, block_id: int, end_time: float, representative: torch.Tensor) -> None:
        self.by[granularity].append((block_id, end_time, representative))

    def remove(self, granularity: str, block_id: int) -> None:
        self.by[granularity] = [entry for entry in self.by[granularity] if entry[0] != block_id]

    def check(self, store: BlockStore) -> None:
        for g, entries in self.by.items():
            assert [r.block_id for r in store.records(g)] == [i for i, _, _ in entries]
            ids, reps = store.index(g)
            assert ids.tolist() == [i for i, _, _ in entries]
            assert store.end_times(g).tolist() == [t for _, t, _ in entries]
            if entries:
                assert torch.equal(reps, torch.stack([r for _, _, r in entries]))
            for block_id, _, representative in entries:
                assert torch.equal(store.representative(block_id), representative)
        assert [r.block_id for r in store.records()] == sorted(i for e in self.by.values() for i, _, _ in e)


@pytest.mark.parametrize("ram_budget", [None, 3000], ids=["ram", "disk-tier"])
def test_counts_and_index_match_a_reference_through_random_changes(tmp_path, ram_budget):
    rng = random.Random(7)
    disk = None if ram_budget is None else DiskTier(tmp_path / "tier")
    store = BlockStore(ram_budget=ram_budget, disk=disk)
    reference = Reference()
    provisional: list[int] = []
    frame = 0
    for step in range(600):
        op = rng.random()
        stored = [r for r in store.records() if not r.provisional]
        if op < 0.45 or not stored:
            g = rng.choice(GRANULARITIES)
            is_provisional = rng.random() < 0.1
            representative = torch.randn(3, generator=torch.Generator().manual_seed(step))
            block_id = add(
                store,
                payload(rng.randint(1, 6), step),
                frame,
                provisional=is_provisional,
                granularity=g,
                end_time=frame + 0.5,
                representative=representative,
            )
            reference.add(g, block_id, frame + 0.5, representative)
            frame += 1
            if is_provisional:
                provisional.append(block_id)
        elif op < 0.7:
            # Evict the oldest of a granularity (what a budget does most), or any stored block.
            victim = stored[0] if rng.random() < 0.7 else rng.choice(stored)
            store.remove(victim.block_id)
            reference.remove(victim.granularity, victim.block_id)
        elif op < 0.85:
            # Re-prune (halve) one, in RAM or on disk: the record's bytes shrink, its place stays.
            target = rng.choice(stored)
            current = store.payload(target.block_id)
            if current.tokens > 1:
                store.replace(target.block_id, halve_by_score(current).map_tensors(lambda t: t.clone()))
        elif op < 0.9 and provisional:
            # Drop the provisional blocks, as the next ingest does.
            for block_id in provisional:
                reference.remove(store.record(block_id).granularity, block_id)
                store.remove(block_id)
            provisional = []
        assert store.stored_nbytes == recount_stored_bytes(store)
        if step % 7 == 0:  # reads now and then, so that removals pile up between compactions too
            reference.check(store)
    reference.check(store)
    assert store.stored_nbytes == recount_stored_bytes(store)
    if ram_budget is not None:
        assert store.disk_nbytes > 0  # the disk tier took part
    store.close()


def test_evicting_the_oldest_one_at_a_time_compacts_rarely(monkeypatch):
    """A budget's steady state: one block in, the oldest out, never read in between. Removals must
    not touch the buffers each time; compactions move slots only once half of them are dead."""
    moved: list[int] = []
    compact = kv_blocks._Index.compact

    def counting(self) -> None:
        if self.dead:
            moved.append(self.count)
        compact(self)

    monkeypatch.setattr(kv_blocks._Index, "compact", counting)
    store = BlockStore()
    held, steps = 1000, 5000

    for i in range(held):
        add(store, payload(1, i % 10), i, representative=torch.full((2,), float(i)))
    for i in range(held, held + steps):
        add(store, payload(1, i % 10), i, representative=torch.full((2,), float(i)))
        store.remove(i - held)
    # Slots moved over all compactions stay within a small multiple of the removals.
    assert sum(moved) <= 4 * steps
    assert len(moved) <= steps // (held // 2) + 1
    ids, reps = store.index("frame")
    assert ids.tolist() == list(range(steps, held + steps))
    assert reps[:, 0].tolist() == [float(i) for i in range(steps, held + steps)]
    # The buffers stay bounded (within twice what removing in place would keep).
    assert store._index["frame"].ids.shape[0] <= 4 * held
    assert store.stored_nbytes == recount_stored_bytes(store)
    assert store.index_nbytes() >= 0


def test_dead_slots_at_the_end_are_freed_without_a_compaction():
    """Removing the newest blocks (a question's provisional ones, dropped at the next ingest) frees
    their slots at once, so the next read compacts nothing; removing every block empties the index."""
    store = BlockStore()
    for i in range(5):
        add(store, payload(2, i), i, granularity="segment")
    index = store._index["segment"]
    store.remove(1)  # in the middle: marked dead, compacted later
    store.remove(4)
    store.remove(3)  # the end: freed at once (4, then 3)
    assert (index.count, index.dead) == (3, 1)  # checked before any read, which would compact
    for i in (0, 2):
        store.remove(i)
    assert (index.count, index.dead) == (0, 0)
    assert store.stored_nbytes == 0 == store.ram_nbytes
    ids, reps = store.index("segment")
    assert ids.numel() == 0 and reps.numel() == 0
    assert store.end_times("segment").numel() == 0
