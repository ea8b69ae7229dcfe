"""The device worker: one thread runs every forward pass of one device, questions first.

A model on one device computes one thing at a time; running two forward passes from two threads
only makes both slower and their memory peaks add up. So every piece of device work (loading the
model, setting up a stream, encoding a batch of frames, one step of an answer) is a job on one
thread, taken from a priority queue: jobs of a higher priority (a person waiting for an answer)
go before any job of a lower one (encoding backlog), jobs of one priority in the order they came.
Long work is cut into short jobs (a batch of frames, one token), so a question waits for at most
one of them.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from enum import IntEnum
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Priority(IntEnum):
    """Lower values run first."""

    QUESTION = 0  # answers, stream setup, model loading: someone is waiting
    ENCODE = 1  # frames waiting to be stored


class _Job:
    __slots__ = ("fn", "future", "priority")

    def __init__(self, priority: Priority, fn: Callable[[], Any]) -> None:
        self.priority = priority
        self.fn = fn
        self.future: Future = Future()


class DeviceWorker:
    """Runs submitted callables one at a time on a thread of its own, by priority then arrival."""

    def __init__(self, name: str = "mukv-device") -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._waiting = dict.fromkeys(Priority, 0)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: Priority, fn: Callable[[], T]) -> Future[T]:
        """Queue ``fn`` and return a future of its result (cancelling it before it starts skips it)."""
        job = _Job(priority, fn)
        with self._lock:
            if self._closed:
                raise RuntimeError("the device worker is closed")
            self._waiting[priority] += 1
            self._queue.put((int(priority), next(self._order), job))
        return job.future

    def waiting(self) -> dict[str, int]:
        """Jobs waiting to run, by priority name (``question``, ``encode``)."""
        with self._lock:
            return {p.name.lower(): n for p, n in self._waiting.items()}

    def on_worker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        # Each job runs in a call of its own: nothing of it (its closure, the stream it names) stays
        # referenced by this loop while it waits for the next one.
        while self._execute(self._queue.get()[2]):
            pass
        self._cancel_waiting()

    def _execute(self, job: _Job | None) -> bool:
        if job is None:
            return False
        with self._lock:
            self._waiting[job.priority] -= 1
        if not job.future.set_running_or_notify_cancel():
            return True
        try:
            result = job.fn()
        except BaseException as exc:  # handed to whoever waits on the future
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
        return True

    def _cancel_waiting(self) -> None:
        while True:
            try:
                _, _, job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.future.cancel()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop after the running job; jobs still waiting are cancelled."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put((-1, -1, None))  # before every waiting job
        if not self.on_worker_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the device worker is still running a job after %.0f s; leaving it", timeout)
