"""Streams as server resources: each holds a :class:`~mukv.engine.StreamSession`, a bounded queue of
frames waiting to be encoded, its source player (file and live sources) and its counters.

Frames reach a stream from HTTP pushes or its player; they wait in the stream's queue and are
encoded by the device worker in batches, at encoding priority. When a stream falls behind, its
queue holds at most ``max_queued_frames``: the oldest waiting frames are dropped to make room for
new ones (a live stream's memory should reach the present; what is dropped is counted, in the
stream's info and in the metrics). The frames a question waiting for the device must see (those
up to its time) are never dropped and do not count against that cap: they were all received
before the question was asked, so they are at most ``max_queued_frames`` more. A stream whose
memory reaches its budget takes no more frames.

A question is answered at its time ``at`` (default: the newest frame received): its first step,
at question priority, encodes the frames up to ``at`` still waiting in the queue, so an answer
never misses a frame the stream had received before it, and never sees one after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mukv.backends.base import Backend
from mukv.engine import DoneEvent, Event, StreamSession
from mukv.errors import SavedMemoryError
from mukv.memory import MemoryStats
from mukv.serve.answers import AnswerRun
from mukv.serve.config import ServeConfig
from mukv.serve.errors import ApiError
from mukv.serve.metrics import ServeMetrics
from mukv.serve.saved import (
    EXTRA_KEY,
    directory_bytes,
    memory_path,
    remove_saved,
    saved_dirs,
    saved_facts,
    source_of,
)
from mukv.serve.sources import SourcePlayer, SourceSpec, open_frames
from mukv.serve.worker import DeviceWorker, Priority

logger = logging.getLogger(__name__)

DROP_REASONS = ("queue_full", "memory_budget", "stream_closed", "encode_failed")


@dataclass(frozen=True)
class StreamOptions:
    """What a stream was created with (validated): its source, memory method and frame sampling.

    ``fps`` is the rate file and live sources are sampled at; a push stream's frames carry their own
    times, and ``fps`` (the server's ``default_fps``) is then the rate its session assumes for
    models that place frames in time by it (Qwen2.5-VL)."""

    source: SourceSpec
    method: str
    preset: str | None
    overrides: dict[str, str]
    method_config: Any
    fps: float
    speed: float
    npy_fps: float | None = None


@dataclass(frozen=True)
class Offer:
    """The outcome of queueing frames: ``accepted`` frames, ``dropped`` (the oldest waiting frames
    pushed out to make room, possibly some of these), ``queued`` frames now waiting, and
    ``position``: how many waiting frames are ahead of the first accepted one."""

    accepted: int
    dropped: int
    queued: int
    position: int


class ServedStream:
    """One stream held by the server. Thread-safe: the event loop, its player and the device worker
    all touch it; the session itself is only driven from the device worker.

    ``state``: ``live`` (a push stream), ``playing`` (a file or live source being read), ``ended``
    (its source ended), ``stopped`` (its memory reached its budget) or ``failed`` (its source or
    the encoder failed; ``error`` says why).
    """

    def __init__(
        self,
        stream_id: str,
        options: StreamOptions,
        session: StreamSession,
        stats: MemoryStats,
        *,
        max_queued: int,
        memory_budget: int,
        metrics: ServeMetrics,
    ) -> None:
        self.id = stream_id
        self.options = options
        self.session = session
        self.max_queued = max_queued
        self.memory_budget = memory_budget
        self._metrics = metrics
        self.created_at = time.time()
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._queue: deque[tuple[np.ndarray, float]] = deque()
        self._encode_scheduled = False
        self._received = 0
        self._encoded = 0
        self._encoding = 0  # taken from the queue, being encoded now
        self._dropped: Counter[str] = Counter()
        self._answers: Counter[str] = Counter()
        self._last_received: float | None = None
        self._encoded_time: float | None = None
        # Times of questions whose frames are not in memory yet, by key: waiting frames up to the
        # latest of them are kept beyond the cap (received before the question was asked, they
        # number at most max_queued themselves).
        self._pins: dict[int, float] = {}
        self._next_pin = 0
        # Computed on the worker after each change: reading it never waits for the session's lock.
        self._stats = stats
        self.state = "live" if options.source.kind == "push" else "playing"
        self.error: dict[str, str] | None = None
        self.closed = False
        self.player: SourcePlayer | None = None
        self.active: set[AnswerRun] = set()

    # -- clock and counters --------------------------------------------------------------------
    def clock(self) -> float:
        """Seconds since the stream was created (the default timestamp of a pushed frame)."""
        return time.monotonic() - self._started

    @property
    def memory_bytes(self) -> int:
        return self._stats.total_bytes

    @property
    def encoded_time(self) -> float | None:
        """Timestamp of the newest frame in memory."""
        return self._encoded_time

    @property
    def last_received(self) -> float | None:
        """Timestamp of the newest frame received (queued or encoded): the stream time."""
        return self._last_received

    def counters(self) -> dict[str, Any]:
        """Frames ``received`` (queued at least once), ``encoded``, ``queued``, ``encoding`` (being
        encoded now) and ``dropped`` (never encoded), with the drops ``dropped_by_reason``."""
        source_dropped = self.player.dropped() if self.player is not None else 0
        with self._lock:
            by_reason = {reason: self._dropped[reason] for reason in DROP_REASONS}
            by_reason["source_behind"] = source_dropped
            return {
                "received": self._received,
                "encoded": self._encoded,
                "queued": len(self._queue),
                "encoding": self._encoding,
                "dropped": sum(by_reason.values()),
                "dropped_by_reason": by_reason,
            }

    def lag(self) -> float | None:
        """How far the memory is behind real time, in seconds of stream time (file and live sources):
        the source's real-time position (its newest frame once it ended, or for a live source)
        minus the newest encoded frame's time."""
        if self.options.source.kind == "push":
            return None
        position = self.player.position() if self.player is not None else None
        if position is None or (self.player is not None and self.player.ended):
            position = self._last_received
        if position is None:
            return 0.0
        return max(0.0, position - (self._encoded_time if self._encoded_time is not None else 0.0))

    def info(self) -> dict[str, Any]:
        """The stream as the API shows it: ``time`` is the newest frame received (the stream time),
        ``encoded_time`` the newest in memory, ``position`` where real time is (a file's playing
        position, a live source's clock, the default timestamp of a pushed frame), ``lag_seconds``
        how far the memory is behind it (file and live sources)."""
        counters = self.counters()
        dropped = {reason: n for reason, n in counters.pop("dropped_by_reason").items() if n}
        with self._lock:
            answers = {"completed": 0, "cancelled": 0, "failed": 0, **self._answers, "active": len(self.active)}
        if self.options.source.kind == "push":
            position: float | None = self.clock()  # the time a frame pushed now without ``t`` gets
        else:
            position = self.player.position() if self.player is not None and not self.player.ended else None
        return {
            "id": self.id,
            "object": "stream",
            "created_at": self.created_at,
            "state": self.state,
            "source": self.options.source.to_json(),
            "method": self.options.method,
            "preset": self.options.preset,
            "overrides": self.options.overrides,
            "fps": self.options.fps if self.options.source.kind != "push" else None,
            "speed": self.options.speed if self.options.source.kind == "file" else None,
            "frames": {**counters, "dropped_by_reason": dropped},
            "time": self._last_received,
            "encoded_time": self._encoded_time,
            "position": position,
            "lag_seconds": self.lag(),
            "memory": self._stats.to_dict(),
            "memory_budget_bytes": self.memory_budget,
            "answers": answers,
            "error": self.error,
        }

    # -- frames in -----------------------------------------------------------------------------
    def offer(self, frames: Sequence[np.ndarray], timestamps: Sequence[float]) -> tuple[Offer, bool]:
        """Queue frames (uint8 ``[H, W, 3]`` each) at increasing ``timestamps``.

        Returns the :class:`Offer` and whether the caller must schedule an encoding job. Raises
        :class:`ApiError` (keeping none of these frames) for a timestamp not after the stream's
        newest, or when the stream takes no more frames.
        """
        count = len(frames)
        with self._lock:
            if self.closed:
                raise ApiError(404, "stream_not_found", f"stream {self.id} was deleted")
            if self._stats.total_bytes >= self.memory_budget:
                raise self._budget_error()
            if self.error is not None:
                message = f"stream {self.id} takes no more frames: {self.error['message']}"
                raise ApiError(409, self.error["code"], message)
            previous = self._last_received
            for t in timestamps:
                if previous is not None and t <= previous:
                    raise ApiError(
                        409,
                        "timestamp_not_increasing",
                        f"frame at {t:.6g} s is not after the stream's newest frame ({previous:.6g} s): "
                        "timestamps must increase",
                        field="t",
                    )
                previous = t
            ahead = len(self._queue)
            self._queue.extend(zip(frames, (float(t) for t in timestamps), strict=True))
            self._received += count
            self._last_received = float(timestamps[-1])
            pinned = self._pinned_frames()
            overflow = max(0, len(self._queue) - pinned - self.max_queued)
            for _ in range(overflow):
                del self._queue[pinned]  # the oldest frame no waiting question needs
            self._count_dropped("queue_full", overflow)
            schedule = not self._encode_scheduled and bool(self._queue)
            self._encode_scheduled = self._encode_scheduled or schedule
            position = ahead - min(overflow, ahead - pinned)
            offer = Offer(count, overflow, len(self._queue), max(0, position))
        return offer, schedule

    def _pinned_frames(self) -> int:
        """How many waiting frames (from the oldest) a waiting question must see (lock held)."""
        if not self._pins:
            return 0
        until = max(self._pins.values())
        pinned = 0
        for _, t in self._queue:
            if t > until:
                break
            pinned += 1
        return pinned

    def pin(self, until: float) -> int:
        """Keep the waiting frames up to ``until`` from being dropped (a question's), until
        :meth:`unpin` with the returned key."""
        with self._lock:
            key = self._next_pin
            self._next_pin += 1
            self._pins[key] = until
            return key

    def unpin(self, key: int) -> None:
        """Release a :meth:`pin` (again: nothing happens)."""
        with self._lock:
            self._pins.pop(key, None)

    def _budget_error(self) -> ApiError:
        return ApiError(
            507,
            "memory_budget_exceeded",
            f"stream {self.id} holds {self._stats.total_bytes:,} bytes, its budget is {self.memory_budget:,}: "
            "it takes no more frames (delete it, or create a stream with a smaller memory method)",
        )

    def _count_dropped(self, reason: str, count: int) -> None:
        if count:
            self._dropped[reason] += count
            self._metrics.frames_dropped.labels(reason).inc(count)

    def take(self, max_frames: int, until: float | None = None, *, release: bool = False) -> list:
        """Take up to ``max_frames`` waiting frames of one size with timestamp <= ``until``.

        ``release``: the caller is the stream's encoding job, which is no longer scheduled when
        nothing is left to take (checked under the lock the pushes take, so no frame is forgotten).
        """
        with self._lock:
            batch: list[tuple[np.ndarray, float]] = []
            while self._queue and len(batch) < max_frames:
                frame, t = self._queue[0]
                if (until is not None and t > until) or (batch and frame.shape != batch[0][0].shape):
                    break
                batch.append(self._queue.popleft())
            if release and not batch:
                self._encode_scheduled = False
            self._encoding += len(batch)
            return batch

    def discard_queue(self, reason: str) -> None:
        with self._lock:
            self._count_dropped(reason, len(self._queue))
            self._queue.clear()

    def stop_taking(self, code: str, message: str, *, state: str) -> None:
        """Take no more frames (the budget is reached, the source failed): the reason is shown in the
        stream's info and given to anyone who pushes."""
        with self._lock:
            if self.error is None:
                self.error = {"code": code, "message": message}
            self.state = state
        if self.player is not None:
            self.player.stop()

    # -- worker side -----------------------------------------------------------------------------
    def encode(self, max_frames: int, until: float | None = None, *, release: bool = False) -> int:
        """Encode one batch of waiting frames into the session (device worker only). Returns the
        number of frames encoded (0: nothing to do)."""
        if self.closed:
            return 0
        if self._stats.total_bytes >= self.memory_budget:
            self.stop_taking("memory_budget_exceeded", self._budget_error().message, state="stopped")
            with self._lock:
                self._count_dropped("memory_budget", len(self._queue))
                self._queue.clear()
                if release:
                    self._encode_scheduled = False
            return 0
        batch = self.take(max_frames, until, release=release)
        if not batch:
            return 0
        times = np.asarray([t for _, t in batch], dtype=np.float64)
        try:
            self.session.ingest(np.stack([frame for frame, _ in batch]), times)
            stats = self.session.stats()
        except Exception as exc:
            logger.exception("encoding frames of stream %s failed", self.id)
            with self._lock:
                self._encoding -= len(batch)
                self._count_dropped("encode_failed", len(batch))
            self.stop_taking("encode_failed", f"{type(exc).__name__}: {exc}", state="failed")
            self.discard_queue("encode_failed")
            return 0
        with self._lock:
            self._encoding -= len(batch)
            self._encoded += len(batch)
            self._encoded_time = float(times[-1])
            self._stats = stats
        self._metrics.frames_ingested.inc(len(batch))
        return len(batch)

    def refresh_stats(self) -> None:
        """Re-read the memory's stats (device worker only; a question may add provisional blocks)."""
        stats = self.session.stats()
        with self._lock:
            self._stats = stats

    def add_answer(self, run: AnswerRun) -> None:
        with self._lock:
            if self.closed:
                raise ApiError(404, "stream_not_found", f"stream {self.id} was deleted")
            self.active.add(run)

    def record_answer(self, run: AnswerRun) -> None:
        with self._lock:
            self._answers[run.outcome or "failed"] += 1
            self.active.discard(run)

    def source_ended(self, error: ApiError | None) -> None:
        """Called by the player when its source ended (or failed)."""
        if error is not None:
            state = "stopped" if error.code == "memory_budget_exceeded" else "failed"
            self.stop_taking(error.code, error.message, state=state)
        elif self.state == "playing":
            self.state = "ended"

    def resume(self, clock: float, created_at: float) -> None:
        """Take up a reopened saved memory's counts and clock: its frames are received and encoded,
        its stream time is the saved one, and the clock of pushed frames goes on from the saved
        clock. A file or live stream is ``ended``: its source is not played again."""
        newest = self.session.time
        frames = self.session.frames_seen
        with self._lock:
            self._received = self._encoded = frames
            self._last_received = self._encoded_time = newest
            self.created_at = created_at
            self._started = time.monotonic() - max(clock, newest if newest is not None else 0.0)
            if self.options.source.kind != "push":
                self.state = "ended"

    def close(self) -> None:
        """Stop the source, cancel answers in progress and drop the waiting frames. The memory itself
        is released by :meth:`close_memory`, on the device worker."""
        with self._lock:
            self.closed = True
            active = list(self.active)
        if self.player is not None:
            self.player.stop()
        for run in active:
            run.cancel()
        self.discard_queue("stream_closed")

    def close_memory(self) -> None:
        """Release what the memory holds outside this process's RAM (its disk tier's files) now rather
        than when the session is garbage-collected (device worker only, after :meth:`close`).

        Safe on the worker once the stream is closed: every ingest, answer step or save of it that
        started before is done (the worker runs one job at a time), and every one that runs later
        finds the stream closed and leaves the memory alone (an encoding job encodes nothing, a
        cancelled answer only closes its generator, whose cache is its own, a save is refused)."""
        try:
            self.session.memory.close()
        except Exception:  # the stream is gone either way; its files then go with the session
            logger.exception("closing the memory of stream %s failed", self.id)


class StreamManager:
    """The streams of one server, created and driven through one device worker and one model."""

    def __init__(self, config: ServeConfig, worker: DeviceWorker, metrics: ServeMetrics) -> None:
        self.config = config
        self.worker = worker
        self.metrics = metrics
        self.backend: Backend | None = None
        self._streams: dict[str, ServedStream] = {}
        self._reserved = 0  # streams being created (counted against the limit before they exist)
        self._lock = threading.Lock()

    def streams(self) -> list[ServedStream]:
        with self._lock:
            return list(self._streams.values())

    def get(self, stream_id: str) -> ServedStream:
        with self._lock:
            stream = self._streams.get(stream_id)
        if stream is None:
            raise ApiError(404, "stream_not_found", f"no stream {stream_id!r}", field="stream_id")
        return stream

    async def create(self, options: StreamOptions) -> ServedStream:
        """Open the source, set up the session on the device worker, start playing."""
        assert self.backend is not None
        with self._lock:
            if len(self._streams) + self._reserved >= self.config.max_streams:
                raise ApiError(
                    429,
                    "too_many_streams",
                    f"the server holds {self.config.max_streams} streams, its limit: delete one first",
                )
            self._reserved += 1
        source = None
        try:
            if options.source.kind != "push":
                source = await asyncio.to_thread(open_frames, options.source, fps=options.fps, npy_fps=options.npy_fps)
            backend = self.backend

            # The stream's own rate places its frames in time (Qwen2.5-VL): the source's, or for
            # pushed frames the stream's fps option (the server's default_fps).
            fps = source.sample_fps if source is not None and source.sample_fps is not None else options.fps

            def setup() -> tuple[StreamSession, MemoryStats]:
                session = StreamSession(backend, options.method, method_config=options.method_config, fps=fps)
                return session, session.stats()

            session, stats = await asyncio.wrap_future(self.worker.submit(Priority.QUESTION, setup))
            stream = ServedStream(
                f"st_{secrets.token_hex(8)}",
                options,
                session,
                stats,
                max_queued=self.config.max_queued_frames,
                memory_budget=self.config.stream_memory_bytes,
                metrics=self.metrics,
            )
        except BaseException:
            if source is not None:
                source.close()
            with self._lock:
                self._reserved -= 1
            raise
        with self._lock:
            self._reserved -= 1
            self._streams[stream.id] = stream
        if source is not None:
            stream.player = SourcePlayer(
                source,
                speed=options.speed if options.source.kind == "file" else None,
                deliver=lambda frames, times: self.offer(stream, list(frames), times.tolist()),
                on_end=stream.source_ended,
                name=f"mukv-source-{stream.id}",
            )
            stream.player.start()
        return stream

    def offer(self, stream: ServedStream, frames: Sequence[np.ndarray], timestamps: Sequence[float]) -> Offer:
        """Queue frames in ``stream`` and make sure an encoding job will take them (thread-safe)."""
        offer, schedule = stream.offer(frames, timestamps)
        if schedule:
            self.worker.submit(Priority.ENCODE, lambda: self._encode_job(stream))
        return offer

    def _encode_job(self, stream: ServedStream) -> None:
        """One batch of a stream's queue; queued again behind other streams' batches while frames wait."""
        if stream.encode(self._batch_frames(stream), release=True):
            self.worker.submit(Priority.ENCODE, lambda: self._encode_job(stream))

    def _batch_frames(self, stream: ServedStream) -> int:
        return self.config.encode_batch_frames

    def ask(
        self,
        stream: ServedStream,
        question: str,
        choices: Sequence[str] | None,
        *,
        max_new_tokens: int | None,
        at: float | None,
    ) -> AnswerRun:
        """Start answering ``question`` at time ``at`` (default: the stream time); events come from
        :meth:`AnswerRun.next` (the first raises if the question is refused)."""
        newest = stream.last_received
        if newest is None:
            raise ApiError(
                409, "no_frames", f"stream {stream.id} has no frames yet: push frames (or wait for its source) first"
            )
        encoded = stream.encoded_time
        if at is not None and encoded is not None and at < encoded:
            raise ApiError(
                409,
                "at_before_memory",
                f"at: {at:.6g} s is before the newest frame already in memory ({encoded:.6g} s)",
                field="at",
            )
        if at is not None and at > newest:
            raise ApiError(
                409,
                "at_after_stream_time",
                f"at: {at:.6g} s is after the stream time {newest:.6g} s (a question never sees a frame after it)",
                field="at",
            )
        when = newest if at is None else at
        pin = stream.pin(when)  # until they are encoded, its frames are not dropped for newer ones

        def start() -> Iterator[Event | None]:
            # Frames the question must see, still waiting, are encoded first, one batch per step
            # (``None``): other answers' tokens are made between the batches.
            while stream.encode(self._batch_frames(stream), until=when):
                yield None
            stream.unpin(pin)
            # A question "now" keeps up with frames another question had encoded meanwhile.
            memory_time = stream.session.time
            asked_at = max(when, memory_time) if at is None and memory_time is not None else when
            yield from self._answer_events(stream, question, choices, max_new_tokens, asked_at)

        def finished(run: AnswerRun) -> None:
            stream.unpin(pin)  # a question cancelled or refused before its frames were encoded
            self._finished(stream, run)

        run = AnswerRun(self.worker, start, on_finish=finished)
        try:
            stream.add_answer(run)
            run.start()
        except ApiError:
            stream.unpin(pin)
            raise
        except RuntimeError:
            stream.unpin(pin)
            stream.record_answer(run)
            raise ApiError(503, "shutting_down", "the server is shutting down") from None
        return run

    @staticmethod
    def _answer_events(
        stream: ServedStream, question: str, choices: Sequence[str] | None, max_new_tokens: int | None, at: float
    ) -> Iterator[Event]:
        for event in stream.session.ask_stream(question, choices, max_new_tokens=max_new_tokens, at=at):
            if isinstance(event, DoneEvent):
                stream.refresh_stats()
            yield event

    def _finished(self, stream: ServedStream, run: AnswerRun) -> None:
        stream.record_answer(run)
        self.metrics.answers.labels(run.outcome).inc()
        self.metrics.answer_tokens.inc(run.tokens)
        if run.first_token_seconds is not None and run.outcome == "completed":
            self.metrics.first_token.observe(run.first_token_seconds)
        if run.total_seconds is not None:
            self.metrics.answer_seconds.observe(run.total_seconds)

    async def delete(self, stream_id: str) -> None:
        """Remove a stream: stop its source, cancel its answers, drop its memory (its disk tier's files
        are removed before this returns) and its saved memory."""
        with self._lock:
            stream = self._streams.pop(stream_id, None)
        if stream is None:
            raise ApiError(404, "stream_not_found", f"no stream {stream_id!r}", field="stream_id")
        stream.close()
        if stream.player is not None:
            await asyncio.to_thread(stream.player.stop, 2.0)

        def forget() -> None:
            # On the worker, after any ingest, answer step or save of the stream still queued or
            # running there: none of them reads a closed memory. Its files go now, not when the
            # session happens to be collected (a server runs for days; its disk tier can hold GBs).
            stream.close_memory()
            if self.config.memory_dir is not None:
                # Its saved memory goes too (else it would come back at the next start).
                remove_saved(self.config, stream_id)

        try:
            # Shielded: a client that drops the request must not cancel the job; the stream is
            # already gone from the server, so nothing else would ever close its memory.
            await asyncio.shield(asyncio.wrap_future(self.worker.submit(Priority.QUESTION, forget)))
        except RuntimeError:  # the worker has stopped (shutting down)
            # A job of the stream may still be running on it: the memory's files are left to its
            # finalizer (garbage collection, interpreter exit).
            if self.config.memory_dir is not None:
                await asyncio.to_thread(remove_saved, self.config, stream_id)

    # -- saved streams (memory_dir) ----------------------------------------------------------------
    async def save(self, stream_id: str) -> dict[str, Any]:
        """Save a stream's memory to ``memory_dir/<id>`` on the device worker, after encoding the
        frames it had received (so the save holds every frame received before the request)."""
        from mukv.memory.blocks import BlockMemory

        stream = self.get(stream_id)
        path = memory_path(self.config, stream.id)
        if not isinstance(stream.session.memory, BlockMemory):
            raise ApiError(
                409,
                "method_not_saveable",
                f"stream {stream.id} uses method {stream.options.method!r}, whose memory cannot be saved "
                "(saving covers the block-based methods: mukv, rekv)",
                field="method",
            )
        until = stream.last_received

        def job() -> dict[str, Any]:
            if stream.closed:
                raise ApiError(404, "stream_not_found", f"stream {stream.id} was deleted", field="stream_id")
            if until is not None:
                while stream.encode(self._batch_frames(stream), until=until):
                    pass
            facts = saved_facts(stream.id, stream.options, stream.clock(), stream.created_at)
            stream.session.save(path, extra=facts)
            session = stream.session
            return {
                "id": stream.id,
                "object": "stream.saved",
                "frames": session.frames_seen,
                "time": session.time,
                "bytes": directory_bytes(path),
            }

        try:
            return await asyncio.wrap_future(self.worker.submit(Priority.QUESTION, job))
        except SavedMemoryError as exc:
            raise ApiError(409, "save_failed", str(exc)) from None
        except OSError as exc:
            logger.exception("saving stream %s failed", stream.id)
            raise ApiError(500, "save_failed", f"cannot write the stream's memory: {exc.strerror or exc}") from None
        except RuntimeError:
            raise ApiError(503, "shutting_down", "the server is shutting down") from None

    def restore_saved(self) -> None:
        """Reopen every stream saved in ``memory_dir`` (device worker, once the model is loaded). A
        memory that cannot be reopened is logged and skipped."""
        directory = self.config.memory_dir
        if directory is None:
            return
        try:
            paths = saved_dirs(directory)
        except OSError as exc:
            logger.error("memory dir %s: cannot list it (%s): no stream reopened", directory, exc)
            return
        for path in paths:
            with self._lock:
                if len(self._streams) >= self.config.max_streams:
                    logger.warning(
                        "memory dir: %s not reopened: the server holds %d streams, its limit",
                        path.name,
                        self.config.max_streams,
                    )
                    continue
            try:
                stream = self._reopen(path)
            except Exception as exc:  # a damaged or foreign memory never stops the server
                logger.error("memory dir: skipping %s: %s", path.name, exc)
                continue
            with self._lock:
                self._streams[stream.id] = stream
            logger.info(
                "reopened stream %s (%s, %d frames, stream time %s s)",
                stream.id,
                stream.options.method,
                stream.session.frames_seen,
                f"{stream.session.time:.6g}" if stream.session.time is not None else "-",
            )

    def _reopen(self, path: Path) -> ServedStream:
        from mukv.memory import method_config
        from mukv.memory.persist import read_manifest

        assert self.backend is not None
        manifest = read_manifest(path)
        extra = manifest.get("extra")
        facts = extra.get(EXTRA_KEY) if isinstance(extra, dict) else None
        if not isinstance(facts, dict) or facts.get("id") != path.name:
            raise SavedMemoryError("not saved by the server (its manifest holds no stream of that id)")
        try:
            method = str(facts["method"])
            preset = facts.get("preset")
            overrides = {str(key): str(value) for key, value in dict(facts.get("overrides") or {}).items()}
            resolved = method_config(method, overrides, preset)
            options = StreamOptions(
                source=source_of(facts["source"]),
                method=method,
                preset=preset,
                overrides=overrides,
                method_config=resolved,
                fps=float(facts["fps"]),
                speed=float(facts.get("speed") or 1.0),
                npy_fps=facts.get("npy_fps"),
            )
            clock, created_at = float(facts.get("clock") or 0.0), float(facts.get("created_at") or time.time())
        except (KeyError, TypeError, ValueError) as exc:
            raise SavedMemoryError(f"damaged stream facts in its manifest ({type(exc).__name__}: {exc})") from None
        session = StreamSession.load(self.backend, path, method=method, method_config=resolved)
        stream = ServedStream(
            path.name,
            options,
            session,
            session.stats(),
            max_queued=self.config.max_queued_frames,
            memory_budget=self.config.stream_memory_bytes,
            metrics=self.metrics,
        )
        stream.resume(clock, created_at)
        return stream

    def close(self, timeout: float = 10.0) -> None:
        """Close every stream and release their memories (server shutdown, before the device worker
        stops): the memories are closed on the worker once the job running there is done, waiting
        at most ``timeout`` seconds; past that, their files are left to the memories' finalizers
        (garbage collection, interpreter exit)."""
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.close()
        if not streams:
            return

        def release() -> None:
            for stream in streams:
                stream.close_memory()

        # On the worker, like a deletion (see :meth:`delete`): a job of these streams may be running.
        try:
            released = self.worker.submit(Priority.QUESTION, release)
        except RuntimeError:  # the worker has stopped already
            return
        try:
            released.result(timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            released.cancel()  # not to run later, on a worker stopping
            logger.warning("streams closed without releasing their memories: the device worker is still busy")
