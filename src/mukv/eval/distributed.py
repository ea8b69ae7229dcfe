"""The streaming evaluation on several model workers: Ray actors on one machine or a cluster.

``mukv eval ... --workers N`` starts a local Ray instance with N workers (one per GPU with
``--device cuda``, else N CPU workers sharing the cores); ``--ray ADDRESS`` joins a running
cluster (``auto``: the one ``ray start`` made on this machine). Each worker is a Ray actor that
loads the model once and answers whole videos with the runner's own per-video code
(:func:`mukv.eval.runner.stream_video`), so its records are those of a single-process run.

How the work is shared, and why nothing is lost or written twice:

- **One writer.** The driver (this process) holds the run directory's lock and is the only
  writer of ``predictions.jsonl`` and ``failures.jsonl``: workers yield events (an answer, a
  failure, a warning) as they happen, and the driver appends each answer as it arrives, in the
  single-process record format. A run resumes like a single-process one: questions already in
  any predictions file of the directory are skipped.
- **A queue of whole videos, longest first** (by the annotation's ``duration`` where known,
  else by question count), so the longest video does not start last and hold up the end of the
  run. A worker takes the next video when it has finished its last one.
- **At most one attempt per video at a time, and an attempt only asks what is not written.**
  When a worker dies (its process killed, its node lost) or raises, its video goes back to the
  queue, for whichever worker is free first (Ray restarts a dead worker, reloading its model,
  up to :data:`WORKER_RESTARTS` times). The retry replays the stream from the start, since
  memory state is not kept across processes, but asks only the questions that have no record
  yet. An answer the dead worker sent before dying was written; one it did not send is asked
  again: never a duplicate, never a gap. After ``max_attempts`` attempts the video is recorded
  in ``failures.jsonl`` (stage ``worker``) and listed in :attr:`RunSummary.worker_failed`.

Video files and the model must be readable at the same paths on every node of a cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mukv.eval.runner import (
    FAILURES_FILE,
    MERGED_FILE,
    Answered,
    Failed,
    PredictionWriter,
    Question,
    Resolved,
    RunConfig,
    RunError,
    RunLock,
    RunSummary,
    Shard,
    VideoEvent,
    VideoItem,
    _answered,
    _Failures,
    check_questions,
    plan_videos,
    prepare_run,
    stream_video,
    take_questions,
    write_run_file,
)

log = logging.getLogger(__name__)

#: How ``--workers`` / ``--ray`` ask for Ray when it is missing.
INSTALL_HINT = "pip install 'mukv[ray]'"
#: Times Ray restarts one worker whose process died, before the worker is given up.
WORKER_RESTARTS = 2
#: Test-only: ``VIDEO_ID:K`` makes the worker on the first attempt at VIDEO_ID exit its process
#: (``os._exit``) right after sending its K-th answer of that video: a real worker death, to test
#: that the retry writes every question exactly once. Read by the driver, passed in the task.
TEST_EXIT_VARIABLE = "MUKV_TEST_WORKER_EXIT"


def require_ray() -> Any:
    """The ``ray`` module; ``ImportError`` saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"--workers/--ray need Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class Progress:
    """Where a distributed run stands: videos finished (answered or given up) and questions
    answered in this run, out of those it set out to do; workers alive."""

    videos_done: int
    videos_total: int
    questions_done: int
    questions_total: int
    workers: int


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers to start and what each asks of Ray: ``num_cpus`` (fractional when
    workers share cores), ``num_gpus`` (1 per worker on GPUs), torch ``threads`` per worker."""

    count: int
    num_cpus: float
    num_gpus: float
    threads: int | None


def plan_workers(
    workers: int | None, device: str, cluster: dict[str, float], nodes: list[dict[str, float]]
) -> WorkerPlan:
    """The workers for ``device`` on a cluster with these total resources (``cluster``) and these
    per-node resources (``nodes``). ``workers=None`` means one per GPU (``cuda``) or one per node
    (``cpu``). Raises ``ValueError`` naming the option for a device workers cannot use, and
    :class:`RunError` when the cluster cannot hold the workers asked for."""
    if workers is not None and workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {workers}")
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(
                f"--device {device}: with --workers/--ray each worker is given a GPU of its own by Ray; "
                "pass --device cuda"
            )
        gpus = int(cluster.get("GPU", 0))
        count = workers if workers is not None else gpus
        if gpus == 0 or count > gpus:
            raise RunError(f"--workers {count}: --device cuda needs one GPU per worker, and the Ray cluster has {gpus}")
        return WorkerPlan(count=count, num_cpus=1, num_gpus=1, threads=None)
    if device != "cpu":
        raise ValueError(f"--device {device}: --workers/--ray run workers on cpu or cuda")
    cpus = float(cluster.get("CPU", 0))
    per_node = max((float(n.get("CPU", 0)) for n in nodes), default=0.0)
    count = workers if workers is not None else max(1, len(nodes))
    if cpus <= 0 or per_node <= 0:
        raise RunError("the Ray cluster has no CPUs to run workers on")
    share = min(per_node, cpus / count)
    # Ray accepts fractions of a CPU only below one; workers sharing cores each take a fraction.
    share = math.floor(share) if share >= 1 else round(share, 4)
    return WorkerPlan(count=count, num_cpus=share, num_gpus=0, threads=max(1, int(share)))


@dataclass(frozen=True)
class VideoTask:
    """One attempt at one video: its questions still to answer in time order (``pending``), of
    which the first ``take`` are to be answered (a ``--limit`` may stop short), the file, the
    questions too long for the model, and the test-only exit point."""

    video: VideoItem
    pending: list[Question]
    take: int
    file: str
    attempt: int
    too_long: dict[str, str]
    exit_after: int | None = None

    @property
    def priority(self) -> tuple[float, int]:
        """Longest first: the annotation's duration where known, else the number of questions."""
        duration = self.video.duration
        return (duration if duration is not None else -1.0, len(self.video.questions))


class EvalWorker:
    """A model worker (a Ray actor): loads the model once, then answers whole videos.

    A model that cannot be loaded is not raised from the constructor (Ray would report a dead
    actor with a traceback): :meth:`ready` returns the reason, and the driver names it."""

    def __init__(self, config: RunConfig, method_config: Any, threads: int | None) -> None:
        self.config = config
        self.method_config = method_config
        self.backend = None
        self.error: str | None = None
        try:
            import torch

            from mukv.backends import load_backend

            if threads is not None:
                torch.set_num_threads(threads)
            self.backend = load_backend(config.model, device=config.device, dtype=config.dtype)
        except Exception as exc:  # reported by ready(): any load failure is the run's error
            self.error = str(exc) or type(exc).__name__

    def ready(self) -> dict[str, Any]:
        """Who this worker is, and ``error`` when its model did not load."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "error": self.error}

    def check_questions(self, questions: list[Question]) -> dict[str, str]:
        """:func:`mukv.eval.runner.check_questions` with this worker's model."""
        return check_questions(self.backend, self.config, questions)

    def run_video(self, task: VideoTask) -> Iterator[VideoEvent]:
        """Answer one video, yielding the events of :func:`~mukv.eval.runner.stream_video`."""
        if self.backend is None:
            raise RunError(f"the model did not load in this worker: {self.error}")
        answers = 0
        for event in stream_video(
            self.backend,
            self.config,
            self.method_config,
            task.video,
            task.pending,
            Path(task.file),
            take=task.take,
            too_long=task.too_long,
        ):
            yield event
            if isinstance(event, Answered):
                answers += 1
                if task.exit_after is not None and answers >= task.exit_after:
                    os._exit(1)  # the test hook (TEST_EXIT_VARIABLE): a real process death


def _test_exit_point() -> tuple[str, int] | None:
    text = os.environ.get(TEST_EXIT_VARIABLE, "").strip()
    if not text:
        return None
    video_id, _, count = text.rpartition(":")
    if not video_id or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{TEST_EXIT_VARIABLE}: expected VIDEO_ID:K with K >= 1, got {text!r}")
    return video_id, int(count)


def _connect(ray: Any, address: str | None, verbose: bool) -> bool:
    """Join the cluster at ``address``, or start a local instance; reuse one this process has
    already joined. Returns whether this call did so (and so must shut it down)."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,  # workers report through events; their logs are for --verbose
        "configure_logging": False,  # Ray's messages go through this process's logging
    }
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--ray {address}" if address else "a local Ray instance"
        raise RunError(f"{where}: cannot start or connect ({exc})") from None
    return True


def _cause(exc: BaseException) -> BaseException:
    """The exception a worker raised, without Ray's wrapping."""
    return getattr(exc, "cause", None) or exc


def run_distributed(
    config: RunConfig,
    out: Path,
    *,
    workers: int | None = None,
    address: str | None = None,
    limit: int | None = None,
    allow_missing: bool = False,
    retry_failed: bool = False,
    max_attempts: int = 3,
    progress: Callable[[Progress], None] | None = None,
    verbose: bool = False,
) -> RunSummary:
    """Run (or resume) ``config`` into ``out`` on Ray workers; see the module docstring.

    ``workers``: how many (default: one per GPU of the cluster with ``config.device == "cuda"``,
    else one per node); ``address``: a running cluster (default: a local instance started here,
    and shut down at the end; a Ray session this process has already joined is reused).
    ``max_attempts``: attempts at one video whose worker died or raised before it is given up.
    ``progress`` is called after every answer and every finished video.

    The same checks as :func:`~mukv.eval.runner.run_benchmark` come first (nothing is written
    before they pass; the first worker checks the questions against the model's context), and
    the same errors are raised; ``ImportError`` when Ray is missing.
    """
    ray = require_ray()
    if max_attempts < 1:
        raise ValueError(f"max_attempts: must be >= 1, got {max_attempts}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {workers}")
    exit_point = _test_exit_point()
    method_config, videos, found, summary = prepare_run(config, out, Shard(), limit=limit, allow_missing=allow_missing)
    path = out / MERGED_FILE
    with RunLock(path):
        failures = _Failures(out / FAILURES_FILE)
        try:
            done = _answered(out, path)
            todo = plan_videos(videos, found, done, dict(failures.outstanding), summary, retry_failed=retry_failed)
            taken = take_questions(todo, limit)
            if not taken:
                write_run_file(out, config, method_config, own=path)
                return summary
            started = _connect(ray, address, verbose)
            driver = _Driver(ray, config, method_config, summary, failures, max_attempts, progress)
            try:
                driver.start(workers, len(taken))
                too_long = driver.check([q for _, pending in todo for q in pending])
                write_run_file(out, config, method_config, own=path)  # everything is checked: the run starts
                tasks = [
                    VideoTask(
                        video=video,
                        pending=pending,
                        take=take,
                        file=str(found[video.video_id].resolve()),  # workers may run in another directory
                        attempt=0,
                        too_long={q.qid: too_long[q.qid] for q in pending if q.qid in too_long},
                        exit_after=exit_point[1] if exit_point and exit_point[0] == video.video_id else None,
                    )
                    for video, pending, take in taken
                ]
                summary.videos = len(tasks)
                driver.run(tasks, path)
            finally:
                driver.stop()  # the workers end with the run, also on a cluster that outlives it
                if started:
                    ray.shutdown()
        finally:
            failures.close()
            summary.failed = sorted(failures.outstanding.values(), key=lambda f: (f["video_id"], f["key"]))
    return summary


class _Driver:
    """The scheduling and writing side of :func:`run_distributed`.

    One thread per worker takes tasks from the queue and forwards its worker's events to the
    main thread, which alone applies them to the run directory and decides on retries."""

    def __init__(self, ray, config, method_config, summary, failures, max_attempts, progress) -> None:
        self.ray, self.config, self.method_config = ray, config, method_config
        self.summary, self.failures, self.max_attempts, self.progress = summary, failures, max_attempts, progress
        self.actors: list[Any] = []
        self.queue: list[VideoTask] = []
        self.condition = threading.Condition()
        self.finished = False
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.threads: list[threading.Thread] = []
        self.alive = 0  # workers not gone for good
        self.written: set[str] = set()  # question ids written by this run
        self.attempts: dict[str, int] = {}  # failed attempts by video id
        self.videos_total = self.videos_done = self.questions_total = self.questions_done = 0

    def start(self, workers: int | None, videos: int) -> None:
        """Start the workers (no more than there are videos) and wait until their models loaded."""
        ray = self.ray
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        plan = plan_workers(workers, self.config.device, ray.cluster_resources(), nodes)
        count = min(plan.count, videos)
        # A local model directory by its absolute path: workers may run in another directory.
        config = self.config
        if Path(config.model).exists():
            config = dataclasses.replace(config, model=str(Path(config.model).resolve()))
        remote = ray.remote(EvalWorker).options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=WORKER_RESTARTS, max_task_retries=0
        )
        self.actors = [remote.remote(config, self.method_config, plan.threads) for _ in range(count)]
        try:
            states = ray.get([actor.ready.remote() for actor in self.actors])
        except ray.exceptions.RayError as exc:
            raise RunError(f"a worker died while loading {self.config.model}: {_cause(exc)}") from None
        errors = sorted({state["error"] for state in states if state["error"]})
        if errors:
            raise RunError(f"{self.config.model}: the model did not load in a worker: {'; '.join(errors)}")
        hosts = sorted({state["host"] for state in states})
        log.info("%d worker(s) ready on %s", count, ", ".join(hosts))
        self.alive = count

    def check(self, questions: list[Question]) -> dict[str, str]:
        """The questions too long for the model (checked by the first worker); ``ValueError``
        as in a single-process run when ``max_new_tokens`` leaves a question no room."""
        try:
            return self.ray.get(self.actors[0].check_questions.remote(questions))
        except self.ray.exceptions.RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, ValueError):
                raise ValueError(str(cause)) from None
            raise RunError(f"checking the questions failed in a worker: {cause}") from None
        except self.ray.exceptions.RayError as exc:
            raise RunError(f"a worker died while checking the questions: {exc}") from None

    def stop(self) -> None:
        """End the workers and the threads that serve them (before Ray may be shut down)."""
        with self.condition:
            self.finished = True
            self.condition.notify_all()
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception as exc:  # already gone: nothing to end
                log.debug("ending a worker: %s", exc)
        for thread in self.threads:
            thread.join(timeout=30)

    # ------------------------------------------------------------------ worker threads

    def _next(self) -> VideoTask | None:
        with self.condition:
            while not self.queue and not self.finished:
                self.condition.wait()
            if self.finished:
                return None
            return self.queue.pop(0)

    def _put(self, task: VideoTask) -> None:
        with self.condition:
            self.queue.append(task)
            self.queue.sort(key=lambda t: t.priority, reverse=True)
            self.condition.notify()

    def _serve(self, index: int) -> None:
        """Run tasks on worker ``index`` until the run ends or the worker is gone for good."""
        ray, actor = self.ray, self.actors[index]
        while (task := self._next()) is not None:
            try:
                for ref in actor.run_video.remote(task):
                    self.events.put(("event", task, ray.get(ref)))
            except ray.exceptions.RayTaskError as exc:
                self.events.put(("lost", task, f"the worker raised {type(_cause(exc)).__name__}: {_cause(exc)}"))
            except ray.exceptions.RayError as exc:
                self.events.put(("lost", task, f"the worker died ({type(exc).__name__})"))
                try:  # waits for Ray to restart it (its model reloads); fails when it is gone for good
                    state = ray.get(actor.ready.remote())
                except ray.exceptions.RayError:
                    state = {"error": "no restarts left"}
                if state["error"]:
                    self.events.put(("retired", index, state["error"]))
                    return
                continue
            except Exception as exc:  # the driver's own failure: the main thread reports it
                self.events.put(("crashed", task, exc))
                return
            self.events.put(("done", task))

    # ------------------------------------------------------------------ the main thread

    def run(self, tasks: list[VideoTask], path: Path) -> None:
        """Answer ``tasks``, writing each answer to ``path`` as it arrives."""
        for task in tasks:
            self._put(task)
        self.videos_total = len(tasks)
        self.questions_total = sum(task.take for task in tasks)
        open_ = len(tasks)  # videos queued or being answered
        writer = PredictionWriter(path)
        self.threads = [threading.Thread(target=self._serve, args=(i,), daemon=True) for i in range(len(self.actors))]
        for thread in self.threads:
            thread.start()
        try:
            self._report()
            while open_ > 0:
                if self.alive == 0:
                    open_ -= self._abandon_queue()
                    break
                message = self.events.get()
                kind = message[0]
                if kind == "event":
                    self._apply(message[1], message[2], writer)
                elif kind == "done":
                    open_ -= 1
                    self.videos_done += 1
                    self._report()
                elif kind == "lost":
                    open_ -= self._retry(message[1], message[2])
                elif kind == "retired":
                    self.alive -= 1
                    log.warning("worker %d is gone (%s); %d worker(s) left", message[1], message[2], self.alive)
                    self._report()
                else:  # "crashed"
                    raise message[2]
        finally:
            writer.close()

    def _apply(self, task: VideoTask, event: VideoEvent, writer: PredictionWriter) -> None:
        video, summary, failures = task.video, self.summary, self.failures
        if isinstance(event, Answered):
            if event.qid in self.written:
                # Impossible while one attempt per video runs and it asks only unwritten questions;
                # stop rather than write a second record.
                raise RunError(f"question {event.qid} was answered twice (attempt {task.attempt + 1}); not written")
            writer.write(event.record)
            self.written.add(event.qid)
            failures.resolve(event.qid)
            summary.answered += 1
            self.questions_done += 1
            self._report()
        elif isinstance(event, Failed):
            failures.add(event.key, video, event.stage, event.reason, event.qids, **event.extra)
        elif isinstance(event, Resolved):
            failures.resolve(event.key)
        else:
            log.warning("%s", event.message)
            summary.warnings.append(event.message)

    def _retry(self, task: VideoTask, reason: str) -> int:
        """Queue another attempt at ``task``'s video with its unwritten questions; returns 1 when
        the video is finished instead (given up, or nothing was left to ask)."""
        video = task.video
        attempts = self.attempts[video.video_id] = self.attempts.get(video.video_id, 0) + 1
        taken = {q.qid for q in task.pending[: task.take]}
        pending = [q for q in task.pending if q.qid not in self.written]
        take = sum(1 for q in pending if q.qid in taken)
        log.warning(
            "%s: attempt %d of %d failed: %s; %d question(s) left", video.video_id, attempts, self.max_attempts,
            reason, take,
        )  # fmt: skip
        if attempts >= self.max_attempts:
            self.failures.add(
                video.video_id, video, "worker", f"{reason} ({attempts} attempts)", [q.qid for q in pending],
                file=task.file, attempts=attempts,
            )  # fmt: skip
            self.summary.worker_failed.append(video.video_id)
            self.videos_done += 1
            self._report()
            return 1
        self._put(
            VideoTask(
                video=video, pending=pending, take=take, file=task.file, attempt=task.attempt + 1,
                too_long=task.too_long, exit_after=None,
            )
        )  # fmt: skip
        return 0

    def _abandon_queue(self) -> int:
        """Record every queued video as failed (no worker is left); returns how many."""
        with self.condition:
            left, self.queue = self.queue, []
        for task in left:
            pending = [q.qid for q in task.pending if q.qid not in self.written]
            self.failures.add(task.video.video_id, task.video, "worker", "every worker is gone", pending)
            self.summary.worker_failed.append(task.video.video_id)
        return len(left)

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(
                Progress(self.videos_done, self.videos_total, self.questions_done, self.questions_total, self.alive)
            )
