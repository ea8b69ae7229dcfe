"""The session under hostile use: generators crossing threads, questions longer than the model's context."""

from __future__ import annotations

import threading

import pytest

from mukv.engine import DoneEvent, StreamSession
from tests.conftest import make_frames


def run_in_thread(target, timeout: float = 60.0):
    """Run ``target`` in a new thread; its result, or the exception it raised. Fails the test if it
    has not finished within ``timeout`` seconds (a deadlock)."""
    outcome: dict = {}

    def body():
        try:
            outcome["value"] = target()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the thread is blocked (deadlock)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def test_an_answer_started_in_one_thread_and_finished_in_another_releases_the_session(backend):
    session = StreamSession(backend, "full")
    session.ingest(make_frames(2), [0.0, 2.0])
    events = session.ask_stream("What is there?", max_new_tokens=4)
    first = run_in_thread(lambda: next(events))  # started in thread A (the session lock is taken there)
    rest = run_in_thread(lambda: list(events))  # advanced to the end in thread B
    assert isinstance(([first, *rest])[-1], DoneEvent)
    assert run_in_thread(lambda: session.ingest(make_frames(1, seed=1), [4.0])) == 1  # thread C is not blocked
    assert session.frames_seen == 3


def test_an_answer_closed_from_another_thread_releases_the_session(backend):
    session = StreamSession(backend, "full")
    session.ingest(make_frames(2), [0.0, 2.0])
    events = session.ask_stream("What is there?", max_new_tokens=4)
    run_in_thread(lambda: next(events))
    run_in_thread(events.close)
    assert run_in_thread(lambda: session.ingest(make_frames(1, seed=1), [4.0])) == 1


def count_forwards(backend, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = backend.forward

    def forward(embeds, *args, **kwargs):
        calls.append(embeds.shape[1])
        return original(embeds, *args, **kwargs)

    monkeypatch.setattr(backend, "forward", forward)
    return calls


@pytest.mark.parametrize("method", ["full", "rekv"])
def test_a_question_longer_than_the_context_fails_before_any_work(backend, monkeypatch, method):
    session = StreamSession(backend, method)
    session.ingest(make_frames(2), [0.0, 2.0])
    limit = backend.text.max_positions
    calls = count_forwards(backend, monkeypatch)
    with pytest.raises(ValueError, match=r"question: [\d,]+ tokens is longer than the model's context"):
        session.ask("why " * (limit + 10), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"question: [\d,]+ characters is longer than the model's context"):
        session.ask("x" * (100 * limit), max_new_tokens=4)
    assert calls == []
    assert session.ask("What is there?", max_new_tokens=2).generated_tokens >= 1  # the session still works


def test_max_new_tokens_is_checked_against_the_context(backend, monkeypatch):
    session = StreamSession(backend, "full")
    session.ingest(make_frames(2), [0.0, 2.0])
    limit = backend.text.max_positions
    calls = count_forwards(backend, monkeypatch)
    for bad in (0, -1, limit, 10**9):
        with pytest.raises(ValueError, match="max_new_tokens: must be between 1 and"):
            session.ask("What?", max_new_tokens=bad)
    with pytest.raises(ValueError, match="max_new_tokens: expected an integer"):
        session.ask("What?", max_new_tokens=2.5)
    assert calls == []
    # Fits alone, but not after the answering context: refused before decoding.
    with pytest.raises(ValueError, match=r"the answering context holds \d+ tokens.*more than the model's"):
        session.ask("What?", max_new_tokens=limit - 40)
    assert max(calls, default=0) < 40  # no prefill of the question and no decoding ran


def test_an_answer_advanced_by_a_pool_of_worker_threads(backend):
    """As a web server consumes a sync iterator: every ``next()`` may run on another worker thread."""
    from concurrent.futures import ThreadPoolExecutor

    session = StreamSession(backend, "full")
    session.ingest(make_frames(2), [0.0, 2.0])
    expected = session.ask("What is there?", max_new_tokens=6).token_ids
    events = session.ask_stream("What is there?", max_new_tokens=6)
    collected = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        while True:
            event = pool.submit(next, events, None).result(timeout=60)
            if event is None:
                break
            collected.append(event)
            pool.submit(session.stats).result(timeout=60)  # the session answers in between
    assert collected[-1].answer.token_ids == expected
