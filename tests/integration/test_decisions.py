"""What the memory methods decide on fixed streams, recorded once and checked on every run.

For a few fixed streams on the shipped ``mukv-tiny`` model, every configuration below records the
token indices each stored block kept, the blocks each question retrieved and the answer tokens.
The record (``tests/data/decisions.json``) guards behaviour across refactoring: a change that
moves any decision fails here, naming the configuration and the question. Regenerate it only for
an intended change of behaviour: ``MUKV_RECORD_DECISIONS=1 pytest tests/integration/test_decisions.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mukv import StreamSession
from mukv.video.streams import eval_kinds, make_stream

RECORD = Path(__file__).resolve().parents[1] / "data" / "decisions.json"
FRAMES = 12
SEEDS = (300, 301)

# name -> (method, overrides); each exercises a different path of the block machinery.
CONFIGS: dict[str, tuple[str, dict]] = {
    "mukv-paper": ("mukv", {}),
    "mukv-temporal-shared": ("mukv", {"order": "temporal", "encode": "shared", "patch_layout": "quadrant"}),
    "mukv-hierarchical-dedup": (
        "mukv",
        {"retrieval": "hierarchical", "dedup": True, "segment_frames": 8, "causal_correction": True},
    ),
    "rekv-evicting": ("rekv", {"n_local": 48, "retrieve_blocks": 3}),
    "rekv-shared-blocks": ("rekv", {"layer_shared": True, "block_frames": 5, "retrieve_blocks": 2}),
    "full": ("full", {}),
    "uniform": ("uniform", {"num_frames": 4}),
    "recent": ("recent", {"num_frames": 4}),
}


def _kept(memory) -> list[list]:
    """``[granularity, first frame, last frame, part, kept token indices]`` of every stored block."""
    store = getattr(memory, "store", None)
    if store is None:
        return []
    out = []
    for record in sorted(store.records(), key=lambda r: (r.first_frame, r.granularity, r.part, r.last_frame)):
        if record.provisional:
            continue
        kept = store.payload(record.block_id).kept.tolist()
        out.append([record.granularity, record.first_frame, record.last_frame, record.part, kept])
    return out


@torch.inference_mode()
def decide(backend, method: str, overrides: dict, seed: int) -> dict:
    """Ingest the stream frame by frame, asking each question when its time comes (its answer
    may use frames of groups that are still open), and record every decision."""
    stream = make_stream(FRAMES, seed=seed, fps=0.5, kinds=eval_kinds(seed))
    session = StreamSession(backend, method, overrides=overrides)
    answers = []
    for frame in range(FRAMES):
        session.ingest(stream.frames[frame : frame + 1], stream.timestamps[frame : frame + 1])
        for question in stream.questions:
            if question.ask_frame == frame:
                answer = session.ask(question.question, max_new_tokens=4)
                retrieved = [[b.granularity, b.first_frame, b.last_frame, b.tokens] for b in answer.retrieved]
                answers.append({"frame": frame, "tokens": list(answer.token_ids), "retrieved": retrieved})
    # One more question at the end of the stream.
    answer = session.ask("What colour was the last shape?", max_new_tokens=4)
    answers.append({"frame": FRAMES - 1, "tokens": list(answer.token_ids), "retrieved": _spans(answer)})
    return {"answers": answers, "kept": _kept(session.memory)}


def _spans(answer) -> list[list]:
    return [[b.granularity, b.first_frame, b.last_frame, b.tokens] for b in answer.retrieved]


def _cases() -> list:
    """One case per configuration and stream; the second stream's cases run in ``make test-slow``
    (the first exercises every configuration's path in the default run)."""
    cases = []
    for name, (method, overrides) in CONFIGS.items():
        for seed in SEEDS:
            marks = (pytest.mark.slow,) if seed != SEEDS[0] else ()
            cases.append(pytest.param(name, method, overrides, seed, id=f"{name}/seed{seed}", marks=marks))
    return cases


@pytest.fixture(scope="module")
def tiny_trained():
    from mukv.backends import load_backend

    return load_backend("mukv-tiny")


def test_the_record_covers_every_case_and_what_it_guards():
    recorded = json.loads(RECORD.read_text())
    assert sorted(recorded) == sorted(f"{name}/seed{seed}" for name in CONFIGS for seed in SEEDS)
    # The record must exercise what it guards: pruned blocks, retrieval, several granularities.
    mukv = recorded["mukv-paper/seed300"]
    assert {g for g, *_ in mukv["kept"]} == {"patch", "frame", "segment"}
    assert any(len(kept) < 16 for *_, kept in mukv["kept"])
    assert all(answer["retrieved"] for answer in mukv["answers"])


@pytest.mark.parametrize(("name", "method", "overrides", "seed"), _cases())
def test_decisions_match_the_record(tiny_trained, name, method, overrides, seed):
    key = f"{name}/seed{seed}"
    got = decide(tiny_trained, method, overrides, seed)
    if os.environ.get("MUKV_RECORD_DECISIONS") == "1":  # run with -m "slow or not slow" to record all
        recorded = json.loads(RECORD.read_text()) if RECORD.exists() else {}
        recorded[key] = got
        RECORD.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
    expected = json.loads(RECORD.read_text())[key]
    for i, (a, b) in enumerate(zip(got["answers"], expected["answers"], strict=True)):
        assert a == b, f"{key}: question {i} decided differently"
    assert len(got["answers"]) == len(expected["answers"]), f"{key}: a different number of questions"
    assert got["kept"] == expected["kept"], f"{key}: stored blocks kept different tokens"
