"""LLM judge for open-ended answers (the Video-ChatGPT yes/no + 0-5 protocol the papers use).

Any OpenAI-compatible chat-completions endpoint works: ``POST {base_url}/chat/completions`` with
``{"model", "messages", "temperature": 0}``. The judge answers with a Python-dict string such as
``{'pred': 'yes', 'score': 4}``; :func:`parse_judge_reply` reads it (JSON or Python literal,
possibly inside code fences or among other text). Malformed replies, HTTP 429/5xx, connection
errors and timed-out requests are retried with exponential backoff; any other HTTP error, and a
reply larger than 10 MiB, fails at once.

Rate limits are honoured: an HTTP 429 or 503 with ``Retry-After`` (seconds, or an HTTP date)
waits that long instead of the backoff, and holds back every request of the judge (all threads)
until then, since the limit is the endpoint's, not one request's. The waiting of one question
(backoff and rate limits together) is bounded by ``JudgeConfig.max_wait``: a ``Retry-After``
beyond it fails that question at once, naming it. :meth:`Judge.judge_many` judges many answers
with at most ``concurrency`` requests in flight.

``JudgeConfig.timeout`` bounds each request as a whole (connect, TLS handshake, sending, the
response headers and body), however slowly the server sends its bytes: every socket operation
is given only the time left until the request's deadline.

Every score is cached in a JSONL file keyed by the SHA-256 of (judge model, prompt version,
question, answer, prediction), so re-scoring a run costs no request. The judge model's name is
stored with every score and reported with every aggregate: scores from different judges must
never be mixed (``docs/evaluation.md``, Scoring).

Only the standard library is used for HTTP (``urllib``).
"""

from __future__ import annotations

import ast
import collections
import datetime as dt
import email.utils
import functools
import hashlib
import http.client
import io
import json
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from http.client import HTTPException
from pathlib import Path
from typing import Any, Literal

from mukv.errors import MukvError

__all__ = [
    "PROMPT_VERSION",
    "Judge",
    "JudgeConfig",
    "JudgeError",
    "JudgeScore",
    "build_messages",
    "cache_key",
    "judge_records",
    "parse_judge_reply",
    "score_open_ended",
]

#: Part of every cache key: changing the prompt text must change this so old scores are not reused.
PROMPT_VERSION = "video-chatgpt-qa-v1"

# The Video-ChatGPT quantitative QA evaluation prompt (evaluate_activitynet_qa.py), kept word for
# word, quirks included (missing line breaks, the double space, the 4.8 example), because the
# papers' numbers were produced with it.
SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match "
    "meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', "
    "where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)

_MAX_SLEEP = 60.0
_EXCERPT = 300
#: Largest response body accepted from the judge; a chat completion holding a 0-5 verdict is a
#: few hundred bytes, so anything past this is a misconfigured endpoint, not a reply.
MAX_REPLY_BYTES = 10 * 1024 * 1024
_CHUNK = 64 * 1024


class JudgeError(MukvError):
    """The judge could not score an answer: a non-retryable HTTP error, or retries exhausted."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to reach the judge.

    ``base_url`` is the API root (``https://api.openai.com/v1``, ``http://localhost:8000/v1``);
    requests go to ``{base_url}/chat/completions``. ``api_key`` may be empty (no
    ``Authorization`` header). ``max_retries`` is the number of extra attempts after the first,
    shared by malformed replies and transient HTTP failures; transient failures wait
    ``backoff * 2**k`` seconds (k = 0, 1, ...; at most 60 s) before the next attempt.

    ``timeout`` is the total number of seconds one request attempt may take: connecting,
    sending, and receiving the whole response (headers and body), however slowly the server
    sends. An attempt that runs out of time is a transient failure and is retried like an HTTP
    503. A question therefore takes at most about ``(max_retries + 1) * timeout`` seconds plus
    the backoff sleeps (defaults: 5 attempts of 60 s plus 1 + 2 + 4 + 8 s of backoff).
    Name resolution (DNS) is left to the operating system and is not bounded by ``timeout``.

    ``max_wait`` bounds the seconds one question spends waiting between attempts: backoff, and
    the ``Retry-After`` of HTTP 429/503 replies (which replaces the backoff for that attempt). A
    wait that would pass it fails the question at once instead of sleeping.
    """

    base_url: str
    model: str
    api_key: str = field(default="", repr=False)
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0
    temperature: float = 0.0
    max_wait: float = 600.0

    def __post_init__(self) -> None:
        if not str(self.base_url).strip():
            raise ValueError("base_url: must not be empty")
        if not str(self.model).strip():
            raise ValueError("model: must not be empty")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout: must be a finite number of seconds > 0, got {self.timeout}")
        if int(self.max_retries) != self.max_retries or self.max_retries < 0:
            raise ValueError(f"max_retries: must be an integer >= 0, got {self.max_retries}")
        if not self.backoff >= 0:
            raise ValueError(f"backoff: must be >= 0 seconds, got {self.backoff}")
        if not (self.max_wait >= 0 and math.isfinite(self.max_wait)):
            raise ValueError(f"max_wait: must be a finite number of seconds >= 0, got {self.max_wait}")
        object.__setattr__(self, "base_url", str(self.base_url).strip().rstrip("/"))
        object.__setattr__(self, "model", str(self.model).strip())
        object.__setattr__(self, "api_key", str(self.api_key or "").strip())

    @classmethod
    def from_env(cls, **overrides: Any) -> JudgeConfig:
        """A configuration from the environment, with ``overrides`` (field names) taking precedence.

        ``base_url`` <- ``MUKV_JUDGE_BASE_URL``, else ``OPENAI_BASE_URL``; ``model`` <-
        ``MUKV_JUDGE_MODEL``; ``api_key`` <- ``MUKV_JUDGE_API_KEY``, else ``OPENAI_API_KEY``,
        else empty; ``timeout`` <- ``MUKV_JUDGE_TIMEOUT`` (seconds per request attempt), else 60.
        Empty variables count as unset. Raises ``ValueError`` naming the option and its variable
        when the URL or the model is missing or the timeout is not a number of seconds > 0, or
        for an unknown override.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown judge option(s) {unknown}; valid: {sorted(known)}")
        values = {k: v for k, v in overrides.items() if v is not None}

        def env(*names: str) -> str | None:
            for name in names:
                value = os.environ.get(name, "").strip()
                if value:
                    return value
            return None

        if "base_url" not in values:
            base_url = env("MUKV_JUDGE_BASE_URL", "OPENAI_BASE_URL")
            if base_url is None:
                raise ValueError(
                    "judge base_url is not set: pass base_url or set MUKV_JUDGE_BASE_URL (or OPENAI_BASE_URL)"
                )
            values["base_url"] = base_url
        if "model" not in values:
            model = env("MUKV_JUDGE_MODEL")
            if model is None:
                raise ValueError("judge model is not set: pass model or set MUKV_JUDGE_MODEL")
            values["model"] = model
        if "api_key" not in values:
            values["api_key"] = env("MUKV_JUDGE_API_KEY", "OPENAI_API_KEY") or ""
        if "timeout" not in values:
            text = env("MUKV_JUDGE_TIMEOUT")
            if text is not None:
                try:
                    timeout = float(text)
                except ValueError:
                    timeout = math.nan
                if not (timeout > 0 and math.isfinite(timeout)):
                    raise ValueError(f"MUKV_JUDGE_TIMEOUT: expected a number of seconds > 0, got {text!r}")
                values["timeout"] = timeout
        return cls(**values)


@dataclass(frozen=True)
class JudgeScore:
    """One judged answer: the verdict, the 0-5 score, the judge model that gave it, whether it
    came from the cache, and the judge's raw reply."""

    pred: Literal["yes", "no"]
    score: int
    model: str
    cached: bool
    raw: str


def build_messages(question: str, answer: str, prediction: str) -> list[dict[str, str]]:
    """The chat messages (system + user) asking the judge to compare ``prediction`` with ``answer``."""
    user = USER_PROMPT.format(question=question, answer=answer, prediction=prediction)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# --- reply parsing ---------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*(.*?)```", re.DOTALL)
_FLAT_DICT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_PRED_FIELD = re.compile(r"""["']?\bpred\b["']?\s*[:=]\s*["']?\s*(yes|no)\b""", re.IGNORECASE)
_SCORE_FIELD = re.compile(r"""["']?\bscore\b["']?\s*[:=]\s*["']?\s*(-?\d+(?:\.\d+)?)""", re.IGNORECASE)


def _verdict(value: Any) -> Literal["yes", "no"] | None:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        word = value.strip().strip(".!'\" ").lower()
        if word in ("yes", "no"):
            return word  # type: ignore[return-value]
    return None


def _score(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and float(value).is_integer() and 0 <= value <= 5:
        return int(value)
    return None


def _from_mapping(data: Any) -> tuple[Literal["yes", "no"], int] | None:
    if not isinstance(data, dict):
        return None
    lowered = {str(k).strip().lower(): v for k, v in data.items()}
    pred, score = _verdict(lowered.get("pred")), _score(lowered.get("score"))
    if pred is None or score is None:
        return None
    return pred, score


def parse_judge_reply(text: str | None) -> tuple[Literal["yes", "no"], int] | None:
    """``(pred, score)`` from a judge's reply, or ``None`` when it is malformed.

    Accepts a Python-dict string or JSON object with keys ``pred`` and ``score``
    (``{'pred': 'yes', 'score': 4}``), possibly inside code fences, after a ``<think>`` block or
    among other text; as a last resort ``pred: yes ... score: 4`` fields anywhere. ``pred`` is
    normalised to ``"yes"`` / ``"no"`` (case, surrounding punctuation, booleans); ``score`` must
    be an integer from 0 to 5 (``4.0`` and ``"4"`` are accepted, ``4.5`` and ``6`` are not).
    """
    if not text or not isinstance(text, str):
        return None
    text = _THINK.sub(" ", text)
    pieces = [*_FENCE.findall(text), text]
    for piece in pieces:
        for candidate in _FLAT_DICT.findall(piece):
            for loader in (json.loads, ast.literal_eval):
                try:
                    data = loader(candidate)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    continue
                parsed = _from_mapping(data)
                if parsed is not None:
                    return parsed
    pred = _PRED_FIELD.search(text)
    score = _SCORE_FIELD.search(text)
    if pred and score:
        verdict, value = _verdict(pred.group(1)), _score(score.group(1))
        if verdict is not None and value is not None:
            return verdict, value
    return None


# --- the judge -------------------------------------------------------------------------------


def cache_key(model: str, question: str, answer: str, prediction: str) -> str:
    """SHA-256 hex digest identifying one judgement (judge model, prompt version and the texts)."""
    payload = json.dumps([model, PROMPT_VERSION, question, answer, prediction], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class _Transient(Exception):
    """A failure worth retrying (HTTP 429/5xx, connection error, timeout); ``retry_after``: the
    seconds the server asked to wait (its ``Retry-After``), when it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds, or an HTTP date
    (RFC 9110, section 10.2.3; a date in the past means 0). ``None`` when absent or unreadable.
    ``now`` is the current POSIX time (default: the clock)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP dates are in GMT
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class _DeadlineSocket:
    """A connected socket whose every send and receive gets only the time left until ``deadline``
    (a ``time.monotonic()`` value), so a server trickling bytes cannot stretch a request.

    Used by ``http.client`` in place of the socket it connected: ``sendall``, ``makefile("rb")``
    and ``close`` are provided, anything else is passed through. Closing is deferred until the
    files made by ``makefile`` are closed, as for :class:`socket.socket`.
    """

    def __init__(self, sock: socket.socket, deadline: float, timeout: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._timeout = timeout
        self._files = 0
        self._closed = False

    def _arm(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete reply within {self._timeout:g} s")
        self._sock.settimeout(remaining)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        return self._sock.recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        return self._sock.recv(bufsize, flags)

    def sendall(self, data: Any) -> None:
        self._arm()  # sendall's timeout covers the whole call
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", buffering: int | None = None, **_: Any) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"only mode 'rb' is supported, got {mode!r}")
        self._files += 1
        size = buffering if buffering and buffering > 0 else io.DEFAULT_BUFFER_SIZE
        return io.BufferedReader(_DeadlineReader(self), size)

    def close(self) -> None:
        self._closed = True
        if self._files <= 0:
            self._sock.close()

    def _release(self) -> None:
        self._files -= 1
        if self._closed and self._files <= 0:
            self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _DeadlineReader(io.RawIOBase):
    """The raw stream behind :meth:`_DeadlineSocket.makefile`."""

    def __init__(self, owner: _DeadlineSocket) -> None:
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._owner.recv_into(buffer)

    def fileno(self) -> int:
        return self._owner.fileno()

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self._owner._release()


class _DeadlineConnection(http.client.HTTPConnection):
    """An HTTP connection that must be done by ``deadline`` (a ``time.monotonic()`` value);
    ``total`` is the timeout it came from, for messages."""

    def __init__(self, *args: Any, deadline: float, total: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._total = total
        self._create_connection = self._open_socket

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete reply within {self._total:g} s")
        return remaining

    def _open_socket(self, address: Any, timeout: Any = None, source_address: Any = None) -> socket.socket:
        sock = socket.create_connection(address, self._remaining(), source_address)
        try:
            sock.settimeout(self._remaining())  # what is left for a TLS handshake
        except TimeoutError:
            sock.close()
            raise
        return sock

    def connect(self) -> None:
        self.timeout = self._remaining()
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline, self._total)  # type: ignore[assignment]


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    """An HTTPS connection that must be done by ``deadline``; the TLS handshake is one timed
    operation, given the time left after connecting."""


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: float, total: float) -> None:
        super().__init__()
        self._connection = functools.partial(_DeadlineConnection, deadline=deadline, total=total)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)  # type: ignore[arg-type]


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: float, total: float) -> None:
        super().__init__()
        self._connection = functools.partial(_DeadlineHTTPSConnection, deadline=deadline, total=total)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)  # type: ignore[arg-type]


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


class Judge:
    """Scores open-ended answers through an OpenAI-compatible chat endpoint, with a cache.

    ``cache_path`` is a JSONL file (created with its folder when missing; ``None`` keeps the
    cache in memory only). Each line holds ``key``, ``model``, ``prompt``, ``qid``, ``pred``,
    ``score`` and ``raw``; a line that cannot be read (an interrupted write) is skipped. Lines
    are appended with one ``write`` each, so several processes may share the file. Thread-safe.
    """

    def __init__(self, config: JudgeConfig, cache_path: str | os.PathLike[str] | None = None) -> None:
        self.config = config
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.requests = 0  # HTTP requests sent by this instance (cache hits send none)
        self._lock = threading.Lock()
        # No request leaves before this time.monotonic() value: a Retry-After holds back every thread.
        self._not_before = 0.0
        self._cache: dict[str, dict[str, Any]] = {}
        if self.cache_path is not None and self.cache_path.is_file():
            self._load()

    @property
    def model(self) -> str:
        """The judge model's name, reported with every score."""
        return self.config.model

    def _load(self) -> None:
        assert self.cache_path is not None
        with self.cache_path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                    key = entry["key"]
                    if _verdict(entry["pred"]) is None or _score(entry["score"]) is None:
                        continue
                except (ValueError, KeyError, TypeError):
                    continue
                self._cache[key] = entry

    def _store(self, key: str, entry: dict[str, Any]) -> None:
        self._cache[key] = entry
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.cache_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # Start on a fresh line if a previous writer was interrupted mid-line.
            if os.fstat(fd).st_size > 0:
                with open(self.cache_path, "rb") as handle:
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        line = b"\n" + line
            os.write(fd, line)
        finally:
            os.close(fd)

    def judge(self, question: str, answer: str, prediction: str, qid: str | None = None) -> JudgeScore:
        """Judge ``prediction`` against the reference ``answer`` for ``question``.

        A cached judgement (same judge model and texts) is returned with ``cached=True`` and no
        request. Raises :class:`JudgeError` (naming ``qid``) on a non-retryable HTTP error or when
        every attempt failed or gave a malformed reply.
        """
        key = cache_key(self.config.model, question, answer, prediction)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return JudgeScore(
                pred=_verdict(hit["pred"]) or "no",
                score=_score(hit["score"]) or 0,
                model=str(hit.get("model", self.config.model)),
                cached=True,
                raw=str(hit.get("raw", "")),
            )
        pred, score, raw = self._ask(build_messages(question, answer, prediction), qid, question)
        entry = {
            "key": key,
            "model": self.config.model,
            "prompt": PROMPT_VERSION,
            "qid": qid,
            "pred": pred,
            "score": score,
            "raw": raw,
        }
        with self._lock:
            self._store(key, entry)
        return JudgeScore(pred=pred, score=score, model=self.config.model, cached=False, raw=raw)

    def _ask(
        self, messages: list[dict[str, str]], qid: str | None, question: str
    ) -> tuple[Literal["yes", "no"], int, str]:
        what = f"qid {qid!r}" if qid is not None else f"question {question[:80]!r}"
        attempts = self.config.max_retries + 1
        transient_failures = 0
        waited = 0.0
        last_problem = "no attempt made"
        for attempt in range(attempts):
            with self._lock:
                held = self._not_before - time.monotonic()
            if held > 0:  # a rate limit (this question's or another's) is in force
                why = f"the endpoint's Retry-After holds requests for {held:.1f} s more"
                waited = self._wait(held, waited, what, why if attempt == 0 else f"{last_problem}; {why}")
            try:
                reply = self._post(messages, what)
            except _Transient as exc:
                last_problem = str(exc)
                if attempt + 1 < attempts:
                    if exc.retry_after is not None:
                        with self._lock:
                            self._not_before = max(self._not_before, time.monotonic() + exc.retry_after)
                    else:
                        delay = min(_MAX_SLEEP, self.config.backoff * 2**transient_failures)
                        waited = self._wait(delay, waited, what, last_problem)
                transient_failures += 1
                continue
            parsed = parse_judge_reply(reply)
            if parsed is not None:
                return parsed[0], parsed[1], reply
            last_problem = f"malformed reply {reply[:_EXCERPT]!r}"
        raise JudgeError(
            f"judge {self.config.model} could not score {what} after {attempts} attempt(s); last: {last_problem}"
        )

    def _wait(self, seconds: float, waited: float, what: str, why: str) -> float:
        """Sleep ``seconds`` for a question that has waited ``waited`` so far; returns the new
        total. Raises :class:`JudgeError` instead when that would pass ``max_wait``."""
        if waited + seconds > self.config.max_wait:
            raise JudgeError(
                f"judge {self.config.model} could not score {what}: waiting {seconds:.1f} s more would pass "
                f"max_wait ({self.config.max_wait:g} s; {waited:.1f} s waited already); last: {why}"
            )
        if seconds > 0:
            time.sleep(seconds)
        return waited + seconds

    def judge_many(
        self,
        items: Sequence[tuple[str, str, str, str | None]],
        *,
        concurrency: int = 1,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[JudgeScore]:
        """Judge ``(question, answer, prediction, qid)`` items with at most ``concurrency``
        requests in flight; the scores in the order of ``items``. Items with the same texts are
        asked once. ``progress(done, total)`` is called as items are judged (cached ones at once).
        The first :class:`JudgeError` is raised after the requests in flight end; queued ones
        are not sent."""
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency: must be an integer >= 1, got {concurrency!r}")
        keys = [cache_key(self.config.model, q, a, p) for q, a, p, _ in items]
        first: dict[str, int] = {}
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        copies = collections.Counter(keys)
        results: dict[str, JudgeScore] = {}
        total, done = len(items), 0

        def finished(key: str, score: JudgeScore) -> None:
            nonlocal done
            results[key] = score
            done += copies[key]
            if progress is not None:
                progress(done, total)

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge") as pool:
            futures = {pool.submit(self.judge, *items[index]): key for key, index in first.items()}
            pending = set(futures)
            while pending:
                completed, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in completed:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()  # type: ignore[misc]
                    finished(futures[future], future.result())
        return [results[key] for key in keys]

    def _post(self, messages: list[dict[str, str]], what: str) -> str:
        """One request; the reply's message content ("" when the body is not a chat completion).

        Raises ``_Transient`` for retryable failures and :class:`JudgeError` for the others.
        """
        url = f"{self.config.base_url}/chat/completions"
        body = json.dumps(
            {"model": self.config.model, "messages": messages, "temperature": self.config.temperature}
        ).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with self._lock:
            self.requests += 1
        timeout = self.config.timeout
        deadline = time.monotonic() + timeout
        opener = urllib.request.build_opener(
            _DeadlineHTTPHandler(deadline, timeout), _DeadlineHTTPSHandler(deadline, timeout)
        )
        try:
            with opener.open(request, timeout=timeout) as response:
                payload = _read_body(response, deadline, timeout)
        except _TooLarge as exc:
            raise JudgeError(
                f"judge {self.config.model} at {url} sent a reply larger than {MAX_REPLY_BYTES // 2**20} MiB "
                f"for {what} ({exc}); is base_url an OpenAI-compatible API root?"
            ) from exc
        except urllib.error.HTTPError as exc:
            excerpt = _read_excerpt(exc)
            if exc.code == 429 or exc.code >= 500:
                # RFC 9110 gives Retry-After its meaning on 429 and 503; other 5xx get the backoff.
                retry_after = parse_retry_after(exc.headers.get("Retry-After")) if exc.code in (429, 503) else None
                told = f", Retry-After {retry_after:g} s" if retry_after is not None else ""
                raise _Transient(f"HTTP {exc.code}{told}: {excerpt!r}", retry_after) from exc
            raise JudgeError(
                f"judge {self.config.model} at {url} refused {what}: HTTP {exc.code}: {excerpt!r}"
            ) from exc
        except (OSError, HTTPException) as exc:  # URLError, connection reset, timeout, bad status line
            if _is_timeout(exc):
                raise _Transient(f"timed out: no complete reply within {timeout:g} s (timeout per request)") from exc
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return payload.decode("utf-8", errors="replace")
        return content if isinstance(content, str) else json.dumps(content)


class _TooLarge(Exception):
    """The response body is larger than :data:`MAX_REPLY_BYTES`."""


def _read_body(response: Any, deadline: float, timeout: float) -> bytes:
    """The whole response body, read in chunks; at most :data:`MAX_REPLY_BYTES` and by ``deadline``."""
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > MAX_REPLY_BYTES:
        raise _TooLarge(f"Content-Length {int(declared)}")
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no complete reply within {timeout:g} s")
        chunk = response.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise _TooLarge(f"more than {MAX_REPLY_BYTES} bytes")
        chunks.append(chunk)


def _read_excerpt(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read(4 * _EXCERPT).decode("utf-8", errors="replace")[:_EXCERPT]
    except Exception:
        return ""


def _get(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def judge_records(
    records: Iterable[Any],
    judge: Judge,
    *,
    concurrency: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[Any, JudgeScore]]:
    """Each open-ended record (mapping or object with ``question``, ``answer``, ``prediction``,
    ``qid``; records with ``choices`` are skipped) with its verdict, judged by
    :meth:`Judge.judge_many` (``concurrency``, ``progress`` as there)."""
    chosen = [record for record in records if not _get(record, "choices")]
    items = [
        (
            str(_get(record, "question") or ""),
            str(_get(record, "answer") or ""),
            str(_get(record, "prediction") or ""),
            _get(record, "qid"),
        )
        for record in chosen
    ]
    return list(zip(chosen, judge.judge_many(items, concurrency=concurrency, progress=progress), strict=True))


def score_open_ended(
    records: Iterable[Any],
    judge: Judge,
    *,
    concurrency: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The papers' open-ended metric: the judge's share of ``yes`` and mean 0-5 score.

    ``records`` are prediction records (mappings or objects) with ``question``, ``answer``,
    ``prediction`` and ``qid``; records with ``choices`` (multiple choice) are skipped. The
    judge model's name is part of the result and must be reported with it. With no records the
    means are 0.0 and ``count`` is 0. Raises :class:`JudgeError` when an answer cannot be judged.
    ``concurrency`` and ``progress`` are those of :meth:`Judge.judge_many`.

    Returns ``{"accuracy": float, "score": float, "judge_model": str, "count": int}``.
    """
    verdicts = judge_records(records, judge, concurrency=concurrency, progress=progress)
    return summarise_verdicts([score for _, score in verdicts], judge.model)


def summarise_verdicts(scores: Sequence[JudgeScore], model: str) -> dict[str, Any]:
    """``{"accuracy", "score", "judge_model", "count"}`` of judge verdicts (0.0 means when none)."""
    count = len(scores)
    return {
        "accuracy": sum(1.0 for s in scores if s.pred == "yes") / count if count else 0.0,
        "score": sum(s.score for s in scores) / count if count else 0.0,
        "judge_model": model,
        "count": count,
    }
