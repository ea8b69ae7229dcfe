"""The shipped ``mukv-tiny`` checkpoint loads offline and answers short synthetic clips.

Thresholds sit below the accuracy measured when the checkpoint was shipped (model card and
``benchmarks/results/accuracy.md``), with room for floating-point differences across machines,
and far above chance (one colour of six). Streams hold one large and one small rare target
(``eval_kinds``), the setting the model card reports.
"""

from __future__ import annotations

import pytest

from mukv.backends import load_backend
from mukv.engine import StreamSession
from mukv.eval.metrics import exact_match
from mukv.video import from_array
from mukv.video.streams import eval_kinds, make_stream

SEEDS = range(100, 110)  # fixed clips, not used in training (training draws its own seeds)


def _no_hub(*args, **kwargs):
    raise AssertionError("the hub was contacted")


@pytest.fixture(scope="module")
def backend(monkeypatch_module):
    import huggingface_hub

    # Offline for certain: any hub download fails the test.
    monkeypatch_module.setattr(huggingface_hub, "snapshot_download", _no_hub)
    return load_backend("mukv-tiny")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def accuracy(backend, method: str, frames: int) -> tuple[float, list[str]]:
    right, total, wrong = 0, 0, []
    for seed in SEEDS:
        stream = make_stream(frames, seed=seed, kinds=eval_kinds(seed))
        session = StreamSession(backend, method)
        session.ingest_source(from_array(stream.frames, timestamps=stream.timestamps))
        for q in stream.questions:
            total += 1
            text = session.ask(q.question, max_new_tokens=6).text
            if exact_match(text, q.answer):
                right += 1
            else:
                wrong.append(f"seed {seed} {q.kind}: {text!r} != {q.answer!r}")
    return right / total, wrong


def test_the_checkpoint_is_the_trained_one(backend):
    assert backend.tokens_per_frame == 16
    assert backend.model_id == "mukv-tiny"


# Measured when shipped: 20/20 for each of these methods (and uniform, recent) on these clips.
@pytest.mark.parametrize(("method", "threshold"), [("full", 0.9), ("mukv", 0.9), ("rekv", 0.9)])
def test_answers_eight_frame_clips(backend, method, threshold):
    score, wrong = accuracy(backend, method, 8)
    assert score >= threshold, wrong


def test_answers_from_the_evidence_frame_alone(backend):
    right = total = 0
    for seed in SEEDS:
        stream = make_stream(8, seed=seed, kinds=("frame", "patch"))
        for q in stream.questions:
            session = StreamSession(backend, "full")
            session.ingest(stream.frames[q.first_frame : q.first_frame + 1], stream.timestamps[:1])
            right += bool(exact_match(session.ask(q.question, max_new_tokens=6).text, q.answer))
            total += 1
    assert right / total >= 0.9
