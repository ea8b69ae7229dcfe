"""Streams whose stored payloads live on the disk tier (a tiny ``ram_budget``) answer exactly as
streams that hold everything in RAM, on the tiny model, for ``mukv`` and ``rekv``; a spilled
memory saves and loads back, and a loaded memory applies its own ``ram_budget`` again."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from mukv import StreamSession
from tests.conftest import make_frames

QUESTION = "What colour was the triangle?"
FPS = 0.5
MUKV = {"top_k.patch": 3, "top_k.frame": 2, "top_k.segment": 1, "segment_frames": 4}
REKV = {"retrieve_blocks": 2, "block_frames": 2, "n_local": 32}
METHODS = [("mukv", MUKV), ("rekv", REKV)]


def feed(session: StreamSession, frames: np.ndarray, start: int, stop: int, chunk: int = 3) -> None:
    for a in range(start, stop, chunk):
        b = min(a + chunk, stop)
        session.ingest(frames[a:b], np.arange(a, b, dtype=float) / FPS)


def payload_bytes(session: StreamSession) -> tuple[int, int]:
    """(RAM, disk) payload bytes of the stored blocks, counted from the records."""
    store = session.memory.store
    ram = disk = 0
    for record in store.records():
        n = store.payload(record.block_id).nbytes
        if record.location == "disk":
            disk += n
        else:
            ram += n
    return ram, disk


def snapshot(session: StreamSession) -> dict[int, list[torch.Tensor]]:
    store = session.memory.store
    return {
        r.block_id: [getattr(store.payload(r.block_id), n).clone() for n in ("kv", "positions", "kept", "scores")]
        for r in store.records()
        if not r.provisional
    }


@pytest.mark.parametrize(("method", "overrides"), METHODS, ids=[m for m, _ in METHODS])
def test_a_spilled_stream_answers_with_the_same_tokens_as_one_in_ram(backend, method, overrides):
    frames = make_frames(11, seed=5)
    ram = StreamSession(backend, method, overrides=overrides, fps=FPS)
    budget = 4096
    disk = StreamSession(backend, method, overrides={**overrides, "ram_budget": budget}, fps=FPS)
    checks = 0
    for stop in (5, 8, 11):  # mid-group each time: provisional blocks take part in the answers
        for session in (ram, disk):
            feed(session, frames, session.frames_seen, stop)
        a = ram.ask(QUESTION, max_new_tokens=4, output_logits=True)
        b = disk.ask(QUESTION, max_new_tokens=4, output_logits=True)
        assert a.token_ids == b.token_ids
        assert torch.equal(a.first_logits, b.first_logits)
        assert a.retrieved == tuple(r for r in b.retrieved)
        in_ram, on_disk = payload_bytes(disk)
        stored_ram = sum(
            disk.memory.store.payload(r.block_id).nbytes
            for r in disk.memory.store.records()
            if r.location != "disk" and not r.provisional
        )
        assert stored_ram <= budget and on_disk > 0
        assert disk.stats().disk_bytes == on_disk == disk.memory.store.disk_nbytes
        assert disk.memory.store.ram_nbytes == in_ram
        # Everything is stored alike; only the place differs.
        assert disk.stats().total_bytes == ram.stats().total_bytes
        checks += 1
    assert checks == 3
    # Answering wrote nothing into the stored payloads (they are read through the mapping).
    before = snapshot(disk)
    disk.ask(QUESTION, max_new_tokens=2)
    after = snapshot(disk)
    for block_id, tensors in before.items():
        for x, y in zip(tensors, after[block_id], strict=True):
            assert torch.equal(x, y)
    directory = disk.memory.store.disk.directory
    assert directory.is_dir()
    disk.memory.close()
    assert not directory.exists()


def test_the_temporary_directory_goes_with_the_session(backend):
    session = StreamSession(backend, "rekv", overrides={**REKV, "ram_budget": 1}, fps=FPS)
    feed(session, make_frames(4, seed=2), 0, 4)
    directory = session.memory.store.disk.directory
    assert any(directory.glob("chunk-*.bin"))
    del session
    gc.collect()
    assert not directory.exists()


@pytest.mark.parametrize(("method", "overrides"), METHODS, ids=[m for m, _ in METHODS])
def test_a_spilled_memory_saves_and_loads_back_with_its_own_ram_budget(backend, tmp_path, method, overrides):
    frames = make_frames(11, seed=3)
    settings = {**overrides, "ram_budget": 4096, "disk_dir": str(tmp_path / "tier")}
    saved = StreamSession(backend, method, overrides=settings, fps=FPS)
    feed(saved, frames, 0, 7)
    assert saved.stats().disk_bytes > 0
    saved.save(tmp_path / "mem")
    loaded = StreamSession.load(backend, tmp_path / "mem")
    assert loaded.memory.config.ram_budget == 4096
    store = loaded.memory.store
    assert store.disk is not None and store.disk.directory.parent == tmp_path / "tier"
    assert sum(store.payload(r.block_id).nbytes for r in store.records() if r.location != "disk") <= 4096
    assert loaded.stats().disk_bytes == saved.stats().disk_bytes > 0
    a, b = saved.memory.store, loaded.memory.store
    assert [r.block_id for r in a.records()] == [r.block_id for r in b.records()]
    for record in a.records():
        for name in ("kv", "positions", "kept", "scores"):
            assert torch.equal(getattr(a.payload(record.block_id), name), getattr(b.payload(record.block_id), name))
    x = saved.ask(QUESTION, max_new_tokens=4, output_logits=True)
    y = loaded.ask(QUESTION, max_new_tokens=4, output_logits=True)
    assert x.token_ids == y.token_ids and torch.equal(x.first_logits, y.first_logits)
    # Both go on ingesting alike.
    for session in (saved, loaded):
        feed(session, frames, 7, 11)
    x = saved.ask(QUESTION, max_new_tokens=4)
    y = loaded.ask(QUESTION, max_new_tokens=4)
    assert x.token_ids == y.token_ids
    for session in (saved, loaded):
        session.memory.close()
    assert not any((tmp_path / "tier").iterdir())


@pytest.mark.parametrize(("method", "overrides"), METHODS, ids=[m for m, _ in METHODS])
def test_a_byte_budget_consolidating_spilled_blocks_answers_as_in_ram(backend, method, overrides):
    # Re-pruned or evicted blocks may be on disk: they leave it, and the files follow.
    frames = make_frames(12, seed=7)
    probe = StreamSession(backend, method, overrides=overrides, fps=FPS)
    feed(probe, frames, 0, 12)
    budget = probe.memory.stored_bytes() // 2
    settings = {**overrides, "memory_budget": budget}
    ram = StreamSession(backend, method, overrides=settings, fps=FPS)
    disk = StreamSession(backend, method, overrides={**settings, "ram_budget": 2048}, fps=FPS)
    for session in (ram, disk):
        feed(session, frames, 0, 12)
    assert disk.memory.stored_bytes() == ram.memory.stored_bytes() <= budget
    store = disk.memory.store
    assert store.disk_nbytes == sum(store.payload(r.block_id).nbytes for r in store.records() if r.location == "disk")
    assert store.disk_nbytes == store.disk.nbytes > 0
    a = ram.ask(QUESTION, max_new_tokens=4, output_logits=True)
    b = disk.ask(QUESTION, max_new_tokens=4, output_logits=True)
    assert a.token_ids == b.token_ids and torch.equal(a.first_logits, b.first_logits)
    disk.memory.close()
