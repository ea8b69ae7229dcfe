"""Every registered memory method, through the same session interface, on every model family's
frame layout: LLaVA-OneVision (a unit is a frame), Qwen2.5-VL (a unit is a pair of frames, whose
stream is placed in time by its rate) and Qwen3-VL (pairs too, each fed between its timestamp text).
Sessions count frames; memories count units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mukv import StreamSession
from mukv.engine import DoneEvent, TokenEvent
from mukv.errors import StreamError
from mukv.memory import MemoryStats, Query, available_methods, create_memory
from tests.conftest import make_frames

METHODS = available_methods()
# Small settings so that every method has to choose among the frames on the tiny model.
SMALL = {
    "uniform": {"num_frames": 3},
    "mukv": {"top_k.patch": 3, "top_k.frame": 2, "top_k.segment": 1},
    "rekv": {"retrieve_blocks": 3, "n_local": 64},
    "recent": {"num_frames": 4},
    "infinipot": {"max_units": 7, "keep_units": 2, "recent_ratio": 0.15},
}


FPS = 0.5


# The Qwen families run the contract in `make test-slow`: their own modules (test_qwen_backends.py,
# test_qwen3_vl.py) answer with every method through the session in the default run.
FAMILIES = [
    "llava_onevision",
    pytest.param("qwen2_5_vl", marks=pytest.mark.slow),
    pytest.param("qwen3_vl", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=FAMILIES)
def backend(request, backend, tmp_path_factory):
    """The shared tiny LLaVA-OneVision, or a tiny Qwen2.5-VL (56 x 56 px frames: 4 tokens per unit), or a
    tiny Qwen3-VL (64 x 64 px frames: 4 tokens per unit, with its timestamp text and DeepStack maps)."""
    if request.param == "llava_onevision":
        return backend
    from mukv.backends import load_backend
    from mukv.backends.tiny_qwen import build_tiny_qwen

    return load_backend(build_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param))


def units(backend, frames: int) -> int:
    """Whole units ``frames`` frames fill (what a memory stores of them)."""
    return frames // backend.layout.frames_per_unit


def unit_of(backend, frame: int) -> int:
    """The unit frame ``frame`` belongs to."""
    return frame // backend.layout.frames_per_unit


def new_session(backend, method):
    return StreamSession(backend, method, overrides=SMALL.get(method), fps=FPS)


@pytest.mark.parametrize("method", METHODS)
def test_ingests_answers_and_reports(backend, method):
    session = new_session(backend, method)
    frames = make_frames(7)
    assert session.ingest(frames[:4], [0.0, 2.0, 4.0, 6.0]) == 4
    assert session.ingest(frames[4:], [8.0, 10.0, 12.0]) == 3
    answer = session.ask("What is shown?", max_new_tokens=4)
    assert answer.method == method
    assert answer.frames_seen == 7 and answer.time == 12.0
    assert 1 <= len(answer.token_ids) <= 4
    assert answer.context_tokens > 0 and answer.retrieved
    assert 0 <= answer.timings.prepare <= answer.timings.first_token <= answer.timings.total
    assert answer.timings.vision > 0 and answer.timings.memory >= 0
    assert answer.timings.encode == answer.timings.vision + answer.timings.memory
    assert answer.generated_tokens >= len(answer.token_ids)
    assert answer.stop_reason == ("length" if answer.generated_tokens == len(answer.token_ids) else "eos")
    stats = answer.memory
    assert isinstance(stats, MemoryStats) and stats.frames == units(backend, 7)
    assert stats.total_bytes > 0 and stats.total_tokens > 0
    assert answer.to_dict()["memory"]["total_bytes"] == stats.total_bytes
    assert session.ask("What is shown?", max_new_tokens=2).timings.encode == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_multiple_choice(backend, method):
    session = new_session(backend, method)
    session.ingest(make_frames(2), [0.0, 1.0])
    answer = session.ask("Which colour?", ["red", "blue", "green"])
    assert answer.choices == ("red", "blue", "green")
    assert len(answer.token_ids) <= 16


@pytest.mark.parametrize("method", METHODS)
def test_retrieved_frames_are_never_after_the_question_time(backend, method):
    session = new_session(backend, method)
    frames = make_frames(9)
    for start in range(0, 9, 3):
        session.ingest(frames[start : start + 3], np.arange(start, start + 3) * 1.5)
        answer = session.ask("What is shown?", max_new_tokens=2)
        assert answer.frames_seen == start + 3
        for block in answer.retrieved:
            assert block.end_time <= answer.time
            assert block.last_frame <= unit_of(backend, answer.frames_seen - 1)


@pytest.mark.parametrize("method", METHODS)
def test_frames_after_the_question_time_do_not_influence_the_answer(backend, method):
    """A memory holding later frames answers a question at ``t`` exactly as one that never saw them."""
    frames = make_frames(12, seed=11)
    times = np.arange(12) * 2.0
    config = SMALL.get(method)
    early = create_memory(method, backend, overrides=config, fps=FPS)
    everything = create_memory(method, backend, overrides=config, fps=FPS)
    # The question time closes the 8th frame: a segment boundary for every segment length that
    # divides 8, so methods that summarise groups of frames see the same groups. A unit is taken
    # at its last frame's time.
    per_unit = backend.layout.frames_per_unit
    unit_times = times[per_unit - 1 :: per_unit]
    early.ingest(backend.encode_frames(frames[:8]), unit_times[: units(backend, 8)])
    everything.ingest(backend.encode_frames(frames[:8]), unit_times[: units(backend, 8)])
    everything.ingest(backend.encode_frames(frames[8:]), unit_times[units(backend, 8) :])
    query = Query(text="What is shown?", ids=backend.tokenize("What is shown?"), time=float(times[7]))
    if not everything.answers_past_questions:
        # A method that cannot look back must refuse rather than use later frames.
        with pytest.raises(StreamError):
            everything.materialize(query.time)
            everything.prepare(query)
        return
    early.materialize(query.time)
    everything.materialize(query.time)
    a, b = early.prepare(query), everything.prepare(query)
    assert a.context_tokens == b.context_tokens and a.next_position == b.next_position
    assert [r.first_frame for r in a.retrieved] == [r.first_frame for r in b.retrieved]
    prompt = backend.embed_ids(backend.tokenize(backend.prompts.render_question(query.text)))
    positions = backend.positions.text(a.next_position, prompt.shape[1])
    logits_a = backend.forward(prompt, a.cache, positions)
    logits_b = backend.forward(prompt, b.cache, positions)
    assert (logits_a - logits_b).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_streaming_events_spell_the_answer(backend, method):
    session = new_session(backend, method)
    session.ingest(make_frames(3), [0.0, 1.0, 2.0])
    events = list(session.ask_stream("Describe it.", max_new_tokens=6))
    assert isinstance(events[-1], DoneEvent)
    tokens = [e for e in events[:-1] if isinstance(e, TokenEvent)]
    answer = events[-1].answer
    assert [e.token_id for e in tokens] == list(answer.token_ids)
    assert "".join(e.text for e in tokens).strip() == answer.text


@pytest.mark.parametrize("method", METHODS)
def test_asking_is_idempotent(backend, method):
    """Asking may complete derived state once (e.g. a provisional block for a partial group of
    frames), but asking again changes nothing and answers the same."""
    session = new_session(backend, method)
    session.ingest(make_frames(5), [0.0, 1.0, 2.0, 3.0, 4.0])
    first = session.ask("What?", max_new_tokens=3, output_logits=True)
    after_first = session.stats()
    second = session.ask("What?", max_new_tokens=3, output_logits=True)
    assert session.stats() == after_first
    assert torch.equal(first.first_logits, second.first_logits)
    assert first.retrieved == second.retrieved


@pytest.mark.parametrize("method", METHODS)
def test_bad_input_is_rejected_and_loses_nothing(backend, method):
    session = new_session(backend, method)
    with pytest.raises(StreamError, match="no frames ingested"):
        session.ask("What?")
    session.ingest(make_frames(2), [0.0, 1.0])
    with pytest.raises(StreamError, match="not after the stream time"):
        session.ingest(make_frames(1), [1.0])
    with pytest.raises(StreamError, match="strictly increasing"):
        session.ingest(make_frames(2), [5.0, 4.0])
    with pytest.raises(ValueError, match="2 values for 3 frames"):
        session.ingest(make_frames(3), [6.0, 7.0])
    with pytest.raises(ValueError, match="finite"):
        session.ingest(make_frames(1), [float("nan")])
    with pytest.raises(ValueError, match="uint8"):
        session.ingest(make_frames(1).astype(np.float32), [9.0])
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        session.ingest(np.zeros((1, 8, 8), dtype=np.uint8), [9.0])
    with pytest.raises(ValueError, match="must not be empty"):
        session.ask("   ")
    with pytest.raises(ValueError, match="max_new_tokens"):
        session.ask("What?", max_new_tokens=0)
    # Nothing of the rejected calls was stored.
    assert session.frames_seen == 2 and session.time == 1.0
    assert session.ask("What?", max_new_tokens=2).frames_seen == 2


def test_unknown_method_and_bad_options(backend):
    with pytest.raises(ValueError, match="unknown 'nope'"):
        StreamSession(backend, "nope")
    with pytest.raises(ValueError, match="num_frames"):
        StreamSession(backend, "uniform", overrides={"num_frames": "many"})
    with pytest.raises(ValueError, match="takes UniformConfig"):
        create_memory("uniform", backend, config=object(), fps=FPS)


@pytest.mark.parametrize("method", METHODS)
def test_frames_ingested_while_an_answer_streams_do_not_change_it(backend, method):
    """Decoding runs on a cache of its own, outside the session lock: a stream keeps ingesting
    while a question about it is answered, and the answer is the one it had at question time."""
    frames = make_frames(8)
    reference = new_session(backend, method)
    reference.ingest(frames[:5], np.arange(5) * 2.0)
    expected = reference.ask("What is shown?", max_new_tokens=6)

    session = new_session(backend, method)
    session.ingest(frames[:5], np.arange(5) * 2.0)
    events = session.ask_stream("What is shown?", max_new_tokens=6)
    first = next(events)
    assert session.ingest(frames[5:], np.arange(5, 8) * 2.0) == 3  # same thread, answer suspended
    done = [first, *events][-1]
    assert isinstance(done, DoneEvent)
    assert done.answer.token_ids == expected.token_ids
    assert done.answer.frames_seen == 5 and done.answer.memory.frames == units(backend, 5)
    assert session.frames_seen == 8
