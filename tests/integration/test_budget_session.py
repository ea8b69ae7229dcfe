"""The byte budget (``memory_budget``) on the tiny model: stored blocks never exceed it when an
ingest returns, MuKV consolidates the finest and oldest blocks first and segments last, ReKV
thins the far past, the clock and answers are unaffected, counters add up, and an unbounded
memory behaves exactly as before."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mukv
from mukv.memory.blocks import BlockMemory, halve_by_score
from tests.conftest import make_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import synthetic

# Patch blocks of 4 tokens, frame blocks of 8, segments of 51 (P = 16, 4 frames per segment).
WIDE = {"keep_ratio.patch": 1.0, "keep_ratio.frame": 0.5}
FRAMES = 8  # two segments
INTERVAL = 2.0


def _filled(backend, budget=None) -> mukv.StreamSession:
    overrides = dict(WIDE) if budget is None else {**WIDE, "memory_budget": budget}
    session = mukv.StreamSession(backend, "mukv", overrides=overrides)
    synthetic.fill_mukv(session, 0, FRAMES, INTERVAL, seed=0)
    return session


def _tokens(session) -> dict[int, tuple[str, int]]:
    return {r.block_id: (r.granularity, r.tokens) for r in session.memory.store.records()}


@pytest.fixture(scope="module")
def reference(backend):
    session = _filled(backend)
    memory = session.memory
    by = {g: [r for r in memory.store.records(g)] for g in ("patch", "frame", "segment")}
    return {
        "tokens": _tokens(session),
        "bytes": memory.stored_bytes(),
        "sums": {g: sum(r.nbytes for r in records) for g, records in by.items()},
        "ids": {g: [r.block_id for r in records] for g, records in by.items()},
        "payload": {r.block_id: memory.store.payload(r.block_id) for r in memory.store.records()},
    }


def _changed(session, reference) -> dict[int, tuple[str, int] | None]:
    now = _tokens(session)
    return {i: now.get(i) for i, value in reference["tokens"].items() if now.get(i) != value}


def test_one_byte_over_halves_the_oldest_patch_block_by_score(backend, reference):
    session = _filled(backend, reference["bytes"] - 1)
    oldest = reference["ids"]["patch"][0]
    assert _changed(session, reference) == {oldest: ("patch", 2)}
    payload = session.memory.store.payload(oldest)
    expected = halve_by_score(reference["payload"][oldest])
    assert torch.equal(payload.kept, expected.kept)
    # The two highest-scored of its kept tokens, by hand.
    saved = reference["payload"][oldest]
    top = saved.kept[torch.argsort(saved.scores[saved.kept], descending=True)[:2]].sort().values
    assert payload.kept.tolist() == top.tolist()
    assert torch.equal(payload.dense(), saved.dense()[:, :, :, torch.isin(saved.kept, top)])
    # The representative is kept as it was.
    assert torch.equal(session.memory.store.representative(oldest), reference_rep(backend, oldest))
    stats = session.stats()
    freed = reference["bytes"] - session.memory.stored_bytes()
    assert stats.consolidated == {"freed_bytes.patch": freed, "repruned.patch": 1}


def reference_rep(backend, block_id: int) -> torch.Tensor:
    return _filled(backend).memory.store.representative(block_id)


def test_patches_go_first_then_frames_oldest_first(backend, reference):
    patches = reference["sums"]["patch"]
    session = _filled(backend, reference["bytes"] - patches)
    changed = _changed(session, reference)
    # Exactly every patch block is gone; frames and segments untouched.
    assert changed == dict.fromkeys(reference["ids"]["patch"])
    session = _filled(backend, reference["bytes"] - patches - 1)
    changed = _changed(session, reference)
    assert changed == {**dict.fromkeys(reference["ids"]["patch"]), reference["ids"]["frame"][0]: ("frame", 4)}
    counts = session.stats().consolidated
    assert counts["evicted.patch"] == len(reference["ids"]["patch"])
    assert "repruned.patch" not in counts  # all had to go: evicted outright, not halved first
    assert counts["repruned.frame"] == 1 and "evicted.frame" not in counts


def test_segments_go_last(backend, reference):
    segments = reference["sums"]["segment"]
    session = _filled(backend, segments - 1)
    changed = _changed(session, reference)
    first = reference["ids"]["segment"][0]
    assert changed == {
        **dict.fromkeys(reference["ids"]["patch"]),
        **dict.fromkeys(reference["ids"]["frame"]),
        first: ("segment", reference["tokens"][first][1] // 2),
    }
    assert session.memory.stored_bytes() <= segments - 1
    # A budget below one block: everything goes, the clock stays.
    session = _filled(backend, 100)
    assert len(session.memory.store) == 0
    assert session.memory.frames == FRAMES and session.memory.frames_until(FRAMES * INTERVAL) == FRAMES


def _ingest_stream(session, frames: np.ndarray, budget: int | None, chunk: int = 4, first: int = 0) -> list[int]:
    stored = []
    for start in range(0, len(frames), chunk):
        times = np.arange(first + start, first + start + chunk, dtype=np.float64) * INTERVAL
        session.ingest(frames[start : start + chunk], times)
        stored.append(session.memory.stored_bytes())
        if budget is not None:
            assert stored[-1] <= budget
        assert session.memory.frames == first + start + chunk
    return stored


LONG = 48  # twelve segments


@pytest.fixture(scope="module")
def long_frames():
    return make_frames(LONG, seed=3)


@pytest.fixture(scope="module")
def unbounded(backend, long_frames):
    out = {}
    for method in ("mukv", "rekv"):
        session = mukv.StreamSession(backend, method)
        _ingest_stream(session, long_frames, None)
        out[method] = session
    return out


@pytest.mark.parametrize("method", ["mukv", "rekv"])
def test_a_long_stream_stays_under_the_budget_and_answers(backend, long_frames, unbounded, method):
    full = unbounded[method].memory
    budget = full.stored_bytes() // 3
    session = mukv.StreamSession(backend, method, overrides={"memory_budget": budget})
    stored = _ingest_stream(session, long_frames, budget)
    assert max(stored) <= budget < full.stored_bytes()
    memory = session.memory
    assert memory.frames == LONG
    assert list(memory._timestamps) == list(full._timestamps)
    assert memory.frames_until(LONG * INTERVAL) == LONG
    answer = session.ask("What colour is the shape?", max_new_tokens=3)
    assert answer.retrieved and answer.generated_tokens > 0
    assert answer.to_dict()["memory"]["consolidated"] == answer.memory.consolidated
    # Counters add up: what was freed is what the unbounded memory holds beyond this one.
    counts = session.stats().consolidated
    assert sum(v for k, v in counts.items() if k.startswith("freed_bytes.")) == full.stored_bytes() - stored[-1]
    blocks, _, _ = memory.store.totals()
    full_blocks, _, _ = full.store.totals()
    for g, n in full_blocks.items():
        assert counts.get(f"evicted.{g}", 0) == n - blocks.get(g, 0)
    assert session.stats().to_dict()["consolidated"] == counts


def test_rekv_thins_the_far_past(backend, long_frames, unbounded):
    full = unbounded["rekv"].memory
    one = full.store.records()[0].nbytes
    budget = full.stored_bytes() - 6 * one  # six blocks must go
    session = mukv.StreamSession(backend, "rekv", overrides={"memory_budget": budget})
    _ingest_stream(session, long_frames, budget, chunk=LONG)
    firsts = [r.first_frame for r in session.memory.store.records()]
    # Every other block of the oldest half, oldest first; the first and the newest half stay.
    assert firsts[:8] == [0, 2, 4, 6, 8, 10, 12, 13]
    assert firsts[-LONG // 2 :] == list(range(LONG // 2, LONG))


@pytest.mark.parametrize("method", ["mukv", "rekv"])
def test_unbounded_is_unchanged(backend, long_frames, unbounded, method, monkeypatch):
    def refuse(self, excess):
        raise AssertionError("consolidated without a budget")

    monkeypatch.setattr(BlockMemory, "_consolidate", refuse)
    monkeypatch.setattr(type(unbounded[method].memory), "_consolidate", refuse)
    full = unbounded[method]
    session = mukv.StreamSession(backend, method, overrides={"memory_budget": "1TB"})
    _ingest_stream(session, long_frames, None)
    assert "consolidated" not in full.stats().to_dict()
    assert full.stats().consolidated is None
    assert session.stats().consolidated == {}
    records = full.memory.store.records()
    assert [(r.block_id, r.tokens) for r in records] == [(r.block_id, r.tokens) for r in session.memory.store.records()]
    for r in records:
        assert torch.equal(full.memory.store.payload(r.block_id).kv, session.memory.store.payload(r.block_id).kv)
    a = full.ask("What colour is the shape?", max_new_tokens=3)
    b = session.ask("What colour is the shape?", max_new_tokens=3)
    assert a.token_ids == b.token_ids


def test_a_consolidated_memory_saves_and_loads(backend, long_frames, unbounded, tmp_path):
    budget = unbounded["mukv"].memory.stored_bytes() // 3
    session = mukv.StreamSession(backend, "mukv", overrides={"memory_budget": budget})
    _ingest_stream(session, long_frames[:24], budget)
    path = tmp_path / "walk.mem"
    session.save(path)
    # More frames re-prune blocks saved above; saving again into the directory rewrites them.
    _ingest_stream(session, long_frames[24:], budget, first=24)
    assert session.stats().consolidated != mukv.StreamSession.load(backend, path).stats().consolidated
    session.save(path)
    loaded = mukv.StreamSession.load(backend, path)
    assert loaded.stats().consolidated == session.stats().consolidated
    assert _tokens(loaded) == _tokens(session)
    for r in session.memory.store.records():
        assert torch.equal(loaded.memory.store.payload(r.block_id).kv, session.memory.store.payload(r.block_id).kv)
    question = "What colour is the shape?"
    assert loaded.ask(question, max_new_tokens=3).token_ids == session.ask(question, max_new_tokens=3).token_ids
