"""The byte budget's running count (``BlockMemory.stored_bytes``, kept by the store) equals the sum
over the stored records, computed from scratch, in every state a stream goes through on the tiny
model: ingests that re-prune and evict under a small ``memory_budget``, payloads moving to the disk
tier (``ram_budget``) and back, provisional blocks of a question, a save and a load (also under a
smaller budget, which consolidates at once), and ingesting on after the load."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mukv import StreamSession
from mukv.memory.blocks import BlockMemory
from tests.conftest import make_frames, recount_stored_bytes

FPS = 0.5
QUESTION = "What colour is the shape?"
MUKV = {"segment_frames": 4, "keep_ratio.patch": 1.0, "keep_ratio.frame": 0.5}
CASES = {
    "mukv": ("mukv", MUKV),
    # Quantized payloads: a halved block is quantized again (``_stored_payload``) before it is stored.
    "mukv-int8": ("mukv", {**MUKV, "kv_dtype": "int8", "kv_group": 8}),
    "rekv": ("rekv", {"block_frames": 2, "n_local": 32}),
}


def check(session: StreamSession) -> int:
    memory = session.memory
    assert isinstance(memory, BlockMemory)
    counted = memory.stored_bytes()
    assert counted == recount_stored_bytes(memory.store)
    budget = memory.memory_budget
    assert budget is None or counted <= budget
    return counted


def feed(session: StreamSession, frames: np.ndarray, start: int, stop: int, *, ask_every: int = 0) -> int:
    """Ingest frames ``start..stop-1`` three at a time (mid-group: open groups at every step),
    checking the count after each; every ``ask_every``-th chunk a question adds provisional blocks.
    Returns how many checks saw provisional blocks."""
    with_provisional = 0
    for n, a in enumerate(range(start, stop, 3)):
        b = min(a + 3, stop)
        session.ingest(frames[a:b], np.arange(a, b, dtype=float) / FPS)
        check(session)
        if ask_every and n % ask_every == 0:
            session.ask(QUESTION, max_new_tokens=1)
            check(session)
            with_provisional += bool(session.memory.provisional_ids)
    return with_provisional


@pytest.mark.parametrize("case", list(CASES))
def test_the_running_count_is_the_sum_of_the_records(backend, tmp_path, case):
    method, overrides = CASES[case]
    frames = make_frames(30, seed=11)
    unbounded = StreamSession(backend, method, overrides=overrides, fps=FPS)
    feed(unbounded, frames, 0, 15)
    full = check(unbounded)
    settings = {**overrides, "memory_budget": full // 3, "ram_budget": 6000, "disk_dir": str(tmp_path / "tier")}
    session = StreamSession(backend, method, overrides=settings, fps=FPS)
    assert feed(session, frames, 0, 20, ask_every=2) > 0
    counts = session.stats().consolidated
    assert any(k.startswith("evicted.") for k in counts)
    if method == "mukv":
        assert any(k.startswith("repruned.") for k in counts)
    assert session.stats().disk_bytes > 0

    session.save(tmp_path / "mem")
    loaded = StreamSession.load(backend, tmp_path / "mem")
    assert check(loaded) == check(session)
    # Loaded under a smaller budget: consolidated at once, and the count follows.
    smaller = dataclasses.replace(session.memory.config, memory_budget=full // 5)
    tighter = StreamSession.load(backend, tmp_path / "mem", method_config=smaller)
    assert check(tighter) < check(session)
    # Both go on as the saved one does.
    for s in (session, loaded, tighter):
        feed(s, frames, 20, 30, ask_every=3)
    assert check(loaded) == check(session)
    session.memory.close()
