"""The LLM judge against a real local OpenAI-compatible endpoint (``http.server`` in a thread).

Each test scripts the server's replies (good, fenced, malformed, HTTP errors, slow, trickled one
byte at a time, oversized) and counts the requests it receives. Backoff is 0 so everything
finishes in a few seconds; calls that could hang run in a thread with a time limit.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import pytest

import mukv.eval.judge as judge_module
from mukv.errors import MukvError
from mukv.eval.judge import Judge, JudgeConfig, JudgeError, JudgeScore, parse_judge_reply, score_open_ended

MODEL = "judge-test-model"
QUESTION = "What is the person holding?"
ANSWER = "A red cup."
PREDICTION = "They hold a red mug."


@dataclass
class Reply:
    """One scripted response: a chat completion whose message is ``content``, or a raw
    ``status`` / ``body``; ``delay`` seconds before answering. ``trickle`` sends one byte every
    0.2 s until the server stops, inside the response ``"headers"`` or ``"body"``. ``stream``
    sends that many bytes fast, without a Content-Length, then closes the connection.
    ``headers`` are sent with the reply (``Retry-After``, say)."""

    content: str | None = None
    status: int = 200
    body: str | None = None
    delay: float = 0.0
    trickle: Literal["headers", "body"] | None = None
    stream: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Endpoint:
    """The running test server: its base URL, the scripted replies and the requests received."""

    url: str
    script: deque[Reply] = field(default_factory=deque)
    default: Reply = field(default_factory=lambda: Reply(content="{'pred': 'yes', 'score': 4}"))
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)  # ends trickling replies
    active: int = 0  # requests being answered now
    peak: int = 0  # the most answered at once

    def queue(self, *replies: Reply) -> None:
        self.script.extend(replies)

    def next_reply(self) -> Reply:
        with self.lock:
            return self.script.popleft() if self.script else self.default


def completion(content: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }
    ).encode()


def make_handler(endpoint: Endpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            with endpoint.lock:
                endpoint.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers.items()),
                        "body": json.loads(raw or b"null"),
                        "at": time.monotonic(),
                    }
                )
                endpoint.active += 1
                endpoint.peak = max(endpoint.peak, endpoint.active)
            try:
                self.answer()
            finally:
                with endpoint.lock:
                    endpoint.active -= 1

        def answer(self) -> None:
            reply = endpoint.next_reply()
            if reply.delay:
                time.sleep(reply.delay)
            if self.path != "/v1/chat/completions":
                reply = Reply(status=404, body='{"error": "not found"}')
            if reply.trickle or reply.stream:
                self.close_connection = True
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client left
                    self.send_raw(reply)
                return
            payload = completion(reply.content) if reply.content is not None else (reply.body or "").encode()
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def send_raw(self, reply: Reply) -> None:
            if reply.trickle == "headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Padding: ")  # a header line that never ends
            else:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")  # no Content-Length: the body runs to EOF
                self.end_headers()
            if reply.stream:
                for _ in range(0, reply.stream, 1 << 16):
                    self.wfile.write(b" " * (1 << 16))
                return
            if reply.trickle == "body":
                self.wfile.write(b'{"choices": [')
            while not endpoint.stop.wait(0.2):
                self.wfile.write(b" ")

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


@pytest.fixture
def endpoint(monkeypatch) -> Iterator[Endpoint]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    state = Endpoint(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def config(endpoint: Endpoint, **overrides: Any) -> JudgeConfig:
    values: dict[str, Any] = {"base_url": endpoint.url, "model": MODEL, "backoff": 0.0, "timeout": 5.0}
    values.update(overrides)
    return JudgeConfig(**values)


def call_within(endpoint: Endpoint, limit: float, call: Callable[[], Any]) -> tuple[Any, float]:
    """``(result or raised exception, seconds taken)`` of ``call`` run in a thread; fails the test
    (and stops the server's trickling so the thread can end) when it takes longer than ``limit``."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    start = time.monotonic()
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(limit)
    elapsed = time.monotonic() - start
    if worker.is_alive():
        endpoint.stop.set()
        worker.join(5)
        pytest.fail(f"the judge did not return within {limit} s")
    return outcome[0], elapsed


# --- replies -------------------------------------------------------------------------------


def test_good_reply_and_request_shape(endpoint, tmp_path):
    judge = Judge(config(endpoint), tmp_path / "cache.jsonl")
    result = judge.judge(QUESTION, ANSWER, PREDICTION, qid="q1")
    assert result == JudgeScore(pred="yes", score=4, model=MODEL, cached=False, raw="{'pred': 'yes', 'score': 4}")
    assert len(endpoint.requests) == 1
    request = endpoint.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == MODEL
    assert request["body"]["temperature"] == 0
    assert "Authorization" not in request["headers"]
    system, user = request["body"]["messages"]
    assert system["role"] == "system" and "evaluating the correctness of generative outputs" in system["content"]
    assert user["role"] == "user"
    assert f"Question: {QUESTION}\nCorrect Answer: {ANSWER}\nPredicted Answer: {PREDICTION}" in user["content"]
    assert "integer value between 0 and 5" in user["content"] and "'pred' and 'score'" in user["content"]


def test_api_key_is_sent_as_bearer(endpoint):
    Judge(config(endpoint, api_key="sk-test-123")).judge(QUESTION, ANSWER, PREDICTION)
    assert endpoint.requests[0]["headers"]["Authorization"] == "Bearer sk-test-123"


def test_api_key_is_not_in_the_config_repr():
    assert "sk-secret" not in repr(JudgeConfig(base_url="http://x/v1", model="m", api_key="sk-secret"))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("```python\n{'pred': 'no', 'score': 1}\n```", ("no", 1)),
        ('```json\n{"pred": "Yes", "score": 5}\n```', ("yes", 5)),
        ("Here is my evaluation: {'pred': 'yes', 'score': 4.0} as requested.", ("yes", 4)),
        ("<think>Compare {cup} and {mug}.</think>{'pred': 'yes', 'score': 3}", ("yes", 3)),
    ],
)
def test_wrapped_replies(endpoint, content, expected):
    endpoint.queue(Reply(content=content))
    result = Judge(config(endpoint)).judge(QUESTION, ANSWER, PREDICTION)
    assert (result.pred, result.score) == expected
    assert result.raw == content
    assert len(endpoint.requests) == 1


def test_malformed_replies_are_retried(endpoint):
    endpoint.queue(Reply(content="I think it is right."), Reply(content="{'pred': 'maybe', 'score': 9}"))
    result = Judge(config(endpoint)).judge(QUESTION, ANSWER, PREDICTION, qid="q7")
    assert (result.pred, result.score) == ("yes", 4)
    assert len(endpoint.requests) == 3


def test_non_completion_body_counts_as_malformed(endpoint):
    endpoint.queue(Reply(status=200, body="<html>gateway</html>"))
    result = Judge(config(endpoint)).judge(QUESTION, ANSWER, PREDICTION)
    assert result.score == 4
    assert len(endpoint.requests) == 2


def test_always_malformed_gives_up_after_max_retries(endpoint):
    endpoint.default = Reply(content="not a verdict")
    with pytest.raises(JudgeError, match=r"qid 'q42'.*3 attempt.*not a verdict") as info:
        Judge(config(endpoint, max_retries=2)).judge(QUESTION, ANSWER, PREDICTION, qid="q42")
    assert isinstance(info.value, MukvError)
    assert len(endpoint.requests) == 3


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_transient_http_errors_are_retried(endpoint, status):
    endpoint.queue(Reply(status=status, body='{"error": "busy"}'))
    result = Judge(config(endpoint)).judge(QUESTION, ANSWER, PREDICTION)
    assert (result.pred, result.score) == ("yes", 4)
    assert len(endpoint.requests) == 2


def test_transient_errors_back_off_exponentially(endpoint, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(judge_module.time, "sleep", sleeps.append)
    endpoint.queue(Reply(status=500, body="x"), Reply(status=429, body="x"), Reply(status=503, body="x"))
    Judge(config(endpoint, backoff=1.0)).judge(QUESTION, ANSWER, PREDICTION)
    assert sleeps == [1.0, 2.0, 4.0]
    assert len(endpoint.requests) == 4


def test_server_errors_give_up_after_max_retries(endpoint):
    endpoint.default = Reply(status=500, body="internal failure")
    with pytest.raises(JudgeError, match=r"qid 'q3'.*HTTP 500.*internal failure"):
        Judge(config(endpoint, max_retries=3)).judge(QUESTION, ANSWER, PREDICTION, qid="q3")
    assert len(endpoint.requests) == 4


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_fail_at_once(endpoint, status):
    endpoint.default = Reply(status=status, body='{"error": {"message": "invalid api key"}}')
    with pytest.raises(JudgeError, match=rf"qid 'q1'.*HTTP {status}.*invalid api key"):
        Judge(config(endpoint)).judge(QUESTION, ANSWER, PREDICTION, qid="q1")
    assert len(endpoint.requests) == 1


def test_timeout_is_retried(endpoint):
    endpoint.queue(Reply(content="{'pred': 'no', 'score': 0}", delay=0.6))
    result = Judge(config(endpoint, timeout=0.2)).judge(QUESTION, ANSWER, PREDICTION)
    assert (result.pred, result.score) == ("yes", 4)  # the slow reply was abandoned
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize("where", ["headers", "body"])
def test_trickling_server_is_cut_off_by_the_total_timeout(endpoint, where):
    endpoint.default = Reply(trickle=where)
    judge = Judge(config(endpoint, timeout=1.0, max_retries=1))
    outcome, elapsed = call_within(endpoint, 10.0, lambda: judge.judge(QUESTION, ANSWER, PREDICTION, qid="q5"))
    assert isinstance(outcome, JudgeError), outcome
    assert re.search(rf"judge {MODEL} could not score qid 'q5' after 2 attempt.*timed out.*1 s", str(outcome))
    assert elapsed < 10.0  # a bound for the test: each of the 2 attempts ends after 1 s
    assert judge.requests == 2 and len(endpoint.requests) == 2


def test_trickled_attempt_is_retried(endpoint):
    endpoint.queue(Reply(trickle="body"))
    judge = Judge(config(endpoint, timeout=1.0))
    outcome, _ = call_within(endpoint, 10.0, lambda: judge.judge(QUESTION, ANSWER, PREDICTION))
    assert isinstance(outcome, JudgeScore), outcome
    assert (outcome.pred, outcome.score) == ("yes", 4)
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize("reply", [Reply(body="x" * (11 << 20)), Reply(stream=11 << 20)], ids=["length", "stream"])
def test_oversized_reply_fails_at_once(endpoint, reply):
    endpoint.default = reply
    judge = Judge(config(endpoint))
    outcome, _ = call_within(endpoint, 10.0, lambda: judge.judge(QUESTION, ANSWER, PREDICTION, qid="q6"))
    assert isinstance(outcome, JudgeError), outcome
    assert re.search(rf"judge {MODEL} .*larger than 10 MiB for qid 'q6'", str(outcome))
    assert len(endpoint.requests) == 1


def test_connection_refused_gives_up(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = Judge(JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, backoff=0.0, max_retries=2))
    with pytest.raises(JudgeError, match=r"qid 'q9'.*3 attempt"):
        judge.judge(QUESTION, ANSWER, PREDICTION, qid="q9")
    assert judge.requests == 3


# --- cache ---------------------------------------------------------------------------------


def test_cache_hits_make_no_request(endpoint, tmp_path):
    path = tmp_path / "judge" / "cache.jsonl"
    judge = Judge(config(endpoint), path)
    first = judge.judge(QUESTION, ANSWER, PREDICTION, qid="q1")
    second = judge.judge(QUESTION, ANSWER, PREDICTION, qid="q1")
    assert len(endpoint.requests) == 1
    assert first.cached is False and second.cached is True
    assert (second.pred, second.score, second.model, second.raw) == (first.pred, first.score, MODEL, first.raw)

    # Persistent: a new judge on the same file answers from it.
    again = Judge(config(endpoint), path).judge(QUESTION, ANSWER, PREDICTION)
    assert again.cached is True and again.score == 4
    assert len(endpoint.requests) == 1
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["model"] == MODEL and entries[0]["qid"] == "q1"

    # Any change of judge model or text is a miss.
    other = Judge(config(endpoint, model="another-judge"), path).judge(QUESTION, ANSWER, PREDICTION)
    assert other.cached is False and other.model == "another-judge"
    assert endpoint.requests[-1]["body"]["model"] == "another-judge"
    judge.judge(QUESTION, ANSWER, PREDICTION + " Maybe.")
    assert len(endpoint.requests) == 3
    assert len(path.read_text().splitlines()) == 3


def test_cache_keeps_zero_scores_and_skips_torn_lines(endpoint, tmp_path):
    path = tmp_path / "cache.jsonl"
    endpoint.queue(Reply(content="{'pred': 'no', 'score': 0}"))
    Judge(config(endpoint), path).judge(QUESTION, ANSWER, PREDICTION)
    with path.open("a") as handle:
        handle.write('{"key": "abc", "model": "x", "pre')  # an interrupted write
    judge = Judge(config(endpoint), path)
    result = judge.judge(QUESTION, ANSWER, PREDICTION)
    assert (result.pred, result.score, result.cached) == ("no", 0, True)
    judge.judge("Another question?", ANSWER, PREDICTION)  # appended on a fresh line
    assert len(Judge(config(endpoint), path)._cache) == 2
    assert len(endpoint.requests) == 2


def test_failures_are_not_cached(endpoint, tmp_path):
    path = tmp_path / "cache.jsonl"
    endpoint.default = Reply(status=401, body="no")
    with pytest.raises(JudgeError):
        Judge(config(endpoint), path).judge(QUESTION, ANSWER, PREDICTION)
    assert not path.exists()


# --- aggregation ---------------------------------------------------------------------------


def test_score_open_ended(endpoint, tmp_path):
    endpoint.queue(Reply(content="{'pred': 'yes', 'score': 5}"), Reply(content="{'pred': 'no', 'score': 1}"))
    records = [
        {"qid": "a", "question": "Q1?", "answer": "x", "prediction": "x", "choices": None},
        {"qid": "b", "question": "Q2?", "answer": "y", "prediction": "z", "choices": None},
        {"qid": "c", "question": "Q3?", "answer": "A map.", "prediction": "B", "choices": ["A cup.", "A map."]},
    ]
    judge = Judge(config(endpoint), tmp_path / "cache.jsonl")
    expected = {"accuracy": 0.5, "score": 3.0, "judge_model": MODEL, "count": 2}
    assert score_open_ended(records, judge) == expected
    assert len(endpoint.requests) == 2
    # Re-scoring is free.
    assert score_open_ended(records, Judge(config(endpoint), tmp_path / "cache.jsonl")) == expected
    assert len(endpoint.requests) == 2
    assert score_open_ended([], judge) == {"accuracy": 0.0, "score": 0.0, "judge_model": MODEL, "count": 0}


# --- rate limits and concurrency ----------------------------------------------------------


def test_retry_after_seconds_is_honoured(endpoint):
    endpoint.queue(Reply(status=429, body='{"error": "slow down"}', headers={"Retry-After": "1"}))
    judge = Judge(config(endpoint))  # backoff 0: only the Retry-After explains a wait
    result, _ = call_within(endpoint, 10.0, lambda: judge.judge(QUESTION, ANSWER, PREDICTION))
    assert (result.pred, result.score) == ("yes", 4)
    assert len(endpoint.requests) == 2
    assert endpoint.requests[1]["at"] - endpoint.requests[0]["at"] >= 0.95


def test_retry_after_http_date_is_honoured(endpoint):
    # HTTP dates have whole seconds: 3 s ahead is at least 2 s of waiting.
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    endpoint.queue(Reply(status=503, body="overloaded", headers={"Retry-After": when}))
    judge = Judge(config(endpoint))
    result, _ = call_within(endpoint, 15.0, lambda: judge.judge(QUESTION, ANSWER, PREDICTION))
    assert (result.pred, result.score) == ("yes", 4)
    assert endpoint.requests[1]["at"] - endpoint.requests[0]["at"] >= 1.9


def test_a_retry_after_past_max_wait_fails_at_once(endpoint):
    endpoint.default = Reply(status=429, body="quota", headers={"Retry-After": "3600"})
    judge = Judge(config(endpoint, max_wait=30.0))
    outcome, elapsed = call_within(endpoint, 10.0, lambda: judge.judge(QUESTION, ANSWER, PREDICTION, qid="q7"))
    assert isinstance(outcome, JudgeError), outcome
    assert re.search(r"qid 'q7'.*3600.* more would pass max_wait \(30 s.*HTTP 429, Retry-After 3600 s", str(outcome))
    assert elapsed < 5.0 and len(endpoint.requests) == 1


def test_rate_limit_waits_add_up_to_max_wait(endpoint):
    endpoint.default = Reply(status=429, body="quota", headers={"Retry-After": "0.4"})
    judge = Judge(config(endpoint, max_wait=1.0, max_retries=10))
    outcome, elapsed = call_within(endpoint, 10.0, lambda: judge.judge(QUESTION, ANSWER, PREDICTION, qid="q8"))
    assert isinstance(outcome, JudgeError) and "max_wait" in str(outcome), outcome
    assert len(endpoint.requests) == 3  # waited 0.4 + 0.4; a third 0.4 would pass 1.0
    assert 0.7 < elapsed < 5.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5.0), (" 0 ", 0.0), ("1.5", 1.5), ("-3", 0.0), ("soon", None), ("", None), (None, None), ("nan", None)],
)
def test_parse_retry_after_seconds(value, expected):
    assert judge_module.parse_retry_after(value) == expected


def test_parse_retry_after_dates():
    now = 1_700_000_000.0
    assert judge_module.parse_retry_after(email.utils.formatdate(now + 120, usegmt=True), now=now) == 120.0
    assert judge_module.parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0


def test_concurrent_requests_are_bounded(endpoint, tmp_path):
    endpoint.default = Reply(content="{'pred': 'yes', 'score': 3}", delay=0.3)
    records = [{"qid": f"q{i}", "question": f"Q{i}?", "answer": "a", "prediction": "b"} for i in range(12)]
    records.append(dict(records[0], qid="same-texts-as-q0"))  # one judgement for both
    judge = Judge(config(endpoint), tmp_path / "cache.jsonl")
    seen: list[tuple[int, int]] = []
    started = time.monotonic()
    result = score_open_ended(records, judge, concurrency=4, progress=lambda done, total: seen.append((done, total)))
    elapsed = time.monotonic() - started
    assert result == {"accuracy": 1.0, "score": 3.0, "judge_model": MODEL, "count": 13}
    assert len(endpoint.requests) == 12 and endpoint.peak == 4
    assert elapsed < 12 * 0.3  # sequential would take 3.6 s; 4 at a time about 0.9 s
    assert seen[-1] == (13, 13) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    again = Judge(config(endpoint), tmp_path / "cache.jsonl")
    assert score_open_ended(records, again, concurrency=4) == result and len(endpoint.requests) == 12  # cached


def test_a_retry_after_holds_back_every_thread(endpoint):
    # The first request to arrive is told to wait 1 s; the other, in flight meanwhile, succeeds
    # slowly. Every later request (the retry, and the next questions) waits for the Retry-After.
    endpoint.queue(
        Reply(status=429, body="slow down", headers={"Retry-After": "1"}),
        Reply(content="{'pred': 'no', 'score': 1}", delay=0.3),
    )
    records = [{"qid": f"q{i}", "question": f"Q{i}?", "answer": "a", "prediction": "b"} for i in range(4)]
    result = score_open_ended(records, Judge(config(endpoint)), concurrency=2)
    assert result["count"] == 4 and len(endpoint.requests) == 5
    first = endpoint.requests[0]["at"]
    assert all(request["at"] - first >= 0.95 for request in endpoint.requests[2:])


def test_a_judge_error_stops_the_queued_requests(endpoint):
    endpoint.default = Reply(status=401, body="bad key")
    records = [{"qid": f"q{i}", "question": f"Q{i}?", "answer": "a", "prediction": "b"} for i in range(20)]
    with pytest.raises(JudgeError, match="HTTP 401"):
        score_open_ended(records, Judge(config(endpoint)), concurrency=2)
    assert len(endpoint.requests) < 20


def test_concurrency_is_checked(endpoint):
    with pytest.raises(ValueError, match="concurrency: must be an integer >= 1"):
        Judge(config(endpoint)).judge_many([], concurrency=0)


# --- configuration -------------------------------------------------------------------------

ENV_NAMES = (
    "MUKV_JUDGE_BASE_URL",
    "MUKV_JUDGE_MODEL",
    "MUKV_JUDGE_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "MUKV_JUDGE_TIMEOUT",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_from_env_reads_mukv_variables(clean_env):
    clean_env.setenv("MUKV_JUDGE_BASE_URL", "http://judge.local/v1/")
    clean_env.setenv("MUKV_JUDGE_MODEL", "gpt-x")
    clean_env.setenv("MUKV_JUDGE_API_KEY", "k1")
    clean_env.setenv("OPENAI_BASE_URL", "http://other/v1")
    clean_env.setenv("OPENAI_API_KEY", "k2")
    cfg = JudgeConfig.from_env()
    assert (cfg.base_url, cfg.model, cfg.api_key) == ("http://judge.local/v1", "gpt-x", "k1")
    assert (cfg.timeout, cfg.max_retries, cfg.backoff, cfg.temperature) == (60.0, 4, 1.0, 0.0)


def test_from_env_falls_back_to_openai_variables(clean_env):
    clean_env.setenv("OPENAI_BASE_URL", "http://other/v1")
    clean_env.setenv("OPENAI_API_KEY", "k2")
    clean_env.setenv("MUKV_JUDGE_MODEL", "gpt-x")
    cfg = JudgeConfig.from_env()
    assert (cfg.base_url, cfg.api_key) == ("http://other/v1", "k2")


def test_from_env_overrides_win_and_key_may_be_empty(clean_env):
    clean_env.setenv("MUKV_JUDGE_BASE_URL", "http://judge.local/v1")
    cfg = JudgeConfig.from_env(model="local-judge", backoff=0.0, max_retries=1)
    assert (cfg.model, cfg.api_key, cfg.backoff, cfg.max_retries) == ("local-judge", "", 0.0, 1)


def test_from_env_reads_the_timeout(clean_env):
    clean_env.setenv("MUKV_JUDGE_BASE_URL", "http://judge.local/v1")
    clean_env.setenv("MUKV_JUDGE_MODEL", "gpt-x")
    clean_env.setenv("MUKV_JUDGE_TIMEOUT", " 2.5 ")
    assert JudgeConfig.from_env().timeout == 2.5
    assert JudgeConfig.from_env(timeout=7).timeout == 7  # the override wins
    assert JudgeConfig.from_env(timeout=None).timeout == 2.5  # an unset option does not
    clean_env.setenv("MUKV_JUDGE_TIMEOUT", "")  # blank counts as unset
    assert JudgeConfig.from_env().timeout == 60.0


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", "10s"])
def test_from_env_rejects_a_bad_timeout(clean_env, value):
    clean_env.setenv("MUKV_JUDGE_BASE_URL", "http://judge.local/v1")
    clean_env.setenv("MUKV_JUDGE_MODEL", "gpt-x")
    clean_env.setenv("MUKV_JUDGE_TIMEOUT", value)
    with pytest.raises(ValueError, match=rf"MUKV_JUDGE_TIMEOUT.*{re.escape(repr(value))}"):
        JudgeConfig.from_env()


def test_from_env_names_what_is_missing(clean_env):
    clean_env.setenv("MUKV_JUDGE_MODEL", "gpt-x")
    with pytest.raises(ValueError, match=r"base_url.*MUKV_JUDGE_BASE_URL"):
        JudgeConfig.from_env()
    clean_env.delenv("MUKV_JUDGE_MODEL")
    clean_env.setenv("MUKV_JUDGE_BASE_URL", "http://judge.local/v1")
    clean_env.setenv("MUKV_JUDGE_MODEL", "  ")  # blank counts as unset
    with pytest.raises(ValueError, match=r"model.*MUKV_JUDGE_MODEL"):
        JudgeConfig.from_env()
    with pytest.raises(ValueError, match="unknown judge option"):
        JudgeConfig.from_env(model="m", temprature=0.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"timeout": 0},
        {"timeout": float("inf")},
        {"timeout": float("nan")},
        {"max_retries": -1},
        {"backoff": -1.0},
        {"max_wait": -1.0},
        {"max_wait": float("inf")},
        {"base_url": " "},
        {"model": ""},
    ],
)
def test_config_validation(overrides):
    values = {"base_url": "http://x/v1", "model": "m", **overrides}
    with pytest.raises(ValueError):
        JudgeConfig(**values)


# --- reply parsing (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{'pred': 'yes', 'score': 4}", ("yes", 4)),
        ('{"pred": "no", "score": 0}', ("no", 0)),
        ("{'pred': 'YES', 'score': '5'}", ("yes", 5)),
        ("{'pred': 'yes.', 'score': 3.0}", ("yes", 3)),
        ("{'Pred': 'No', 'Score': 2}", ("no", 2)),
        ("{'pred': True, 'score': 5}", ("yes", 5)),
        ("```\n{'pred': 'yes', 'score': 4}\n```", ("yes", 4)),
        ("Evaluation:\n{'pred': 'no', 'score': 1}\nThe prediction is wrong.", ("no", 1)),
        ("pred: yes, score: 4", ("yes", 4)),
        ("{'pred': 'yes', 'score': 4.5}", None),
        ("{'pred': 'yes', 'score': 6}", None),
        ("{'pred': 'yes', 'score': -1}", None),
        ("{'pred': 'maybe', 'score': 3}", None),
        ("{'pred': 'yes'}", None),
        ("{'score': 4}", None),
        ("yes", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_judge_reply(text, expected):
    assert parse_judge_reply(text) == expected
