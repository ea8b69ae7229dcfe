"""Answers served step by step on the device worker, and their events as JSON.

:class:`AnswerRun` drives :meth:`mukv.engine.StreamSession.ask_stream` on the device worker, one
event per job: each step queues the next one at question priority as soon as it is done (without
waiting for the client to read), so questions interleave token by token and no encoding job runs
while an answer is in progress. Events are handed to the event loop through an asyncio queue.
Cancelling a run (the client went away) makes its next step close the generator on the worker
thread, so decoding stops within one token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from mukv.engine.events import Answer, DoneEvent, Event, TokenEvent
from mukv.serve.worker import DeviceWorker, Priority

logger = logging.getLogger(__name__)

_END = object()


class AnswerRun:
    """One question being answered (call :meth:`start`, then :meth:`next` until a ``DoneEvent``).

    ``start`` runs on the worker in the run's first step and returns the run's event generator;
    it may yield ``None`` first, once per step of work before the first event (encoding frames the
    question needs): each such step is queued again at question priority, so other answers'
    tokens are made in between. ``on_finish(run)`` is called on the worker once, when the run
    completed, failed or was cancelled (:attr:`outcome`).
    """

    def __init__(
        self,
        worker: DeviceWorker,
        start: Callable[[], Iterator[Event | None]],
        *,
        on_finish: Callable[[AnswerRun], None] | None = None,
    ) -> None:
        self._worker = worker
        self._start = start
        self._on_finish = on_finish
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._generator: Iterator[Event | None] | None = None
        self.outcome: str | None = None  # "completed", "cancelled" or "failed" once finished
        self.tokens = 0
        self.received = time.perf_counter()  # the server's clock for this question starts here
        self.first_token_seconds: float | None = None
        self.total_seconds: float | None = None

    # -- event loop side ---------------------------------------------------------------------
    def start(self) -> None:
        """Queue the first step (raises ``RuntimeError`` when the worker is closed)."""
        self._worker.submit(Priority.QUESTION, self._step)

    async def next(self) -> Event:
        """The next event; raises what the step raised (a refused question raises on the first)."""
        item = await self._events.get()
        if item is _END:
            raise RuntimeError("the answer was cancelled")
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """Stop the answer: its generator is closed on the worker before another token is made."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- worker side ---------------------------------------------------------------------------
    def _deliver(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self._cancelled.set()

    def _finish(self, outcome: str) -> None:
        if self._generator is not None:
            self._generator.close()  # runs the generator's cleanup on this (the worker) thread
            self._generator = None
        self.outcome = outcome
        if self._on_finish is not None:
            try:
                self._on_finish(self)
            except Exception:
                logger.exception("bookkeeping of a finished answer failed")

    def _step(self) -> None:
        if self._cancelled.is_set():
            self._deliver(_END)
            self._finish("cancelled")
            return
        try:
            if self._generator is None:
                self._generator = self._start()
            event = next(self._generator)
        except StopIteration:
            self._deliver(RuntimeError("decoding ended without a result"))
            self._finish("failed")
            return
        except BaseException as exc:  # handed to the request: a refused question, a failure
            self._deliver(exc)
            self._finish("failed")
            return
        if event is None:  # a step of work before the first event (encoding the question's frames)
            self._submit_next()
            return
        now = time.perf_counter()
        if self.first_token_seconds is None:
            self.first_token_seconds = now - self.received
        if isinstance(event, TokenEvent):
            self.tokens += 1
        self._deliver(event)
        if isinstance(event, DoneEvent):
            self.total_seconds = now - self.received
            self._finish("completed")
            return
        self._submit_next()

    def _submit_next(self) -> None:
        try:
            self._worker.submit(Priority.QUESTION, self._step)
        except RuntimeError as exc:  # the worker closed (shutdown) mid-answer
            self._deliver(exc)
            self._finish("failed")


def token_json(event: TokenEvent) -> dict[str, Any]:
    """A token event's data: its text (may be empty mid-character) and token id."""
    return {"text": event.text, "id": event.token_id}


def done_json(answer: Answer, run: AnswerRun, *, frames_queued: int) -> dict[str, Any]:
    """The ``done`` event's data: the answer, what it was drawn from, and what it cost.

    ``retrieved`` lists the stream spans placed in the answering cache (granularity, frames,
    times); ``timings`` are the session's (model-side) seconds and ``server`` the request's own,
    queueing included; ``frames_queued`` counts frames received but not yet in memory when the
    question was answered (they are after its time ``time``).
    """
    return {
        "answer": answer.text,
        "question": answer.question,
        "choices": list(answer.choices) if answer.choices is not None else None,
        "time": answer.time,
        "frames_seen": answer.frames_seen,
        "frames_queued": frames_queued,
        "method": answer.method,
        "context_tokens": answer.context_tokens,
        "generated_tokens": answer.generated_tokens,
        "stop_reason": answer.stop_reason,
        "retrieved": [
            {
                "granularity": block.granularity,
                "first_frame": block.first_frame,
                "last_frame": block.last_frame,
                "start_time": block.start_time,
                "end_time": block.end_time,
                "tokens": block.tokens,
                "score": block.score,
            }
            for block in answer.retrieved
        ],
        "timings": answer.timings.to_dict(),
        "server": {
            "first_token": run.first_token_seconds,
            "total": time.perf_counter() - run.received if run.total_seconds is None else run.total_seconds,
        },
        "memory": answer.memory.to_dict(),
    }
