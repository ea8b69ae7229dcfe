"""The streaming evaluation runner (evaluation.md, "Streaming protocol").

One stream per video; questions in time order; before each question every frame up to its time
is ingested, then the question is asked. Each answer is appended to a JSONL file as it arrives
(flushed and synced), so an interrupted run resumes where it stopped: answered questions are
skipped, a partly written last line is discarded, nothing is duplicated. Videos are split over
shards by index (video ``k`` goes to shard ``k % n``); :func:`merge_predictions` joins shard files.

Guarantees:

- **One owner per predictions file.** A process holds an exclusive lock (``<file>.lock``, with
  its pid, host and command) while it writes a predictions file; a second process on the same
  run directory and shard fails at once, naming the owner. The lock dies with its process, so a
  killed run leaves nothing to clean up.
- **Nothing written before everything is checked.** ``run.json`` is written only after the
  annotations, videos, options and model have loaded; a run directory with no records yet may be
  re-configured by a corrected command.
- **One bad video never stops a run.** A video that cannot be opened or fails to decode is
  recorded in ``failures.jsonl`` (reason, questions affected), the run goes on with the next one;
  a re-run skips recorded failures unless asked to retry them (``retry_failed``). A question the
  model cannot take (longer than its context, say) is recorded the same way. A file that ends
  well before its declared duration is reported, and questions asked after the last decoded
  frame carry ``past_end`` in their record.
- **Merging never loses a record.** :func:`merge_predictions` reads the existing merged file with
  the shards, refuses while a shard is being written, and refuses (naming them) when shards or
  questions are missing unless ``allow_partial`` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import platform
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mukv.errors import MukvError, VideoError
from mukv.eval.schema import Prediction, Question, VideoItem
from mukv.kv.options import StorageOptions, with_storage_defaults

try:  # advisory locks; absent on Windows, where an exclusive lock file is used instead
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
MERGED_FILE = "predictions.jsonl"
FAILURES_FILE = "failures.jsonl"
LOCK_SUFFIX = ".lock"

# Record fields that depend on the machine and the moment, not on the answer: two records of one
# question that differ only here are the same answer (a re-run shard, say), not a conflict.
VOLATILE_FIELDS = frozenset(
    {
        "encode_seconds",
        "vision_seconds",
        "memory_seconds",
        "prepare_seconds",
        "first_token_seconds",
        "total_seconds",
        "peak_rss_bytes",
        "peak_accelerator_bytes",
        "frames_encoded",
    }
)


class RunError(MukvError):
    """A run cannot start or continue (missing videos, a run directory of another configuration)."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that determines a run's predictions (timings aside)."""

    benchmark: str
    annotation: str
    videos: str
    model: str
    method: str
    preset: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    sample_fps: float = 0.5
    npy_fps: float | None = None
    device: str = "cpu"
    dtype: str = "auto"
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.sample_fps > 0 or self.sample_fps == float("inf"):
            raise ValueError(f"sample_fps: must be a positive number, got {self.sample_fps}")
        if self.npy_fps is not None and (not self.npy_fps > 0 or self.npy_fps == float("inf")):
            raise ValueError(f"npy_fps: must be a positive number, got {self.npy_fps}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``index`` from 0)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard: expected i/n with 0 <= i < n, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        if not text:
            return cls()
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard: expected i/n (e.g. 0/4), got {text!r}") from None
        return cls(index, count)

    @property
    def filename(self) -> str:
        return MERGED_FILE if self.count == 1 else f"predictions.shard-{self.index}-of-{self.count}.jsonl"

    @property
    def failures_filename(self) -> str:
        return FAILURES_FILE if self.count == 1 else f"failures.shard-{self.index}-of-{self.count}.jsonl"

    def videos(self, videos: list[VideoItem]) -> list[VideoItem]:
        return [v for k, v in enumerate(videos) if k % self.count == self.index]


def read_jsonl_lines(path: Path, *, repair: bool) -> list[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of a JSONL file's complete lines. A last line without its
    newline is an interrupted write: ignored, and removed from the file when ``repair`` is set.
    Any other unreadable line raises :class:`RunError` naming the file and the line."""
    if not path.exists():
        return []
    if not path.is_file():
        raise RunError(f"{path}: not a file")
    data = path.read_bytes()
    complete, _, tail = data.rpartition(b"\n")
    if tail and repair:
        with path.open("r+b") as handle:
            handle.truncate(len(complete) + 1 if complete else 0)
        log.warning("%s: dropped an incomplete last line (%d bytes) from an interrupted write", path, len(tail))
    parsed = []
    for number, line in enumerate(complete.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RunError(f"{path}: line {number} is not UTF-8 text (byte {exc.start})") from None
        if "\x00" in text:
            raise RunError(f"{path}: line {number} holds NUL bytes (a damaged file); remove or repair that line")
        try:
            parsed.append((number, json.loads(text)))
        except (ValueError, RecursionError) as exc:
            raise RunError(f"{path}: line {number} is not valid JSON ({exc})") from None
    return parsed


def read_predictions(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a predictions file, each checked against :class:`Prediction`.

    A last line without its newline is an interrupted write: it is ignored, and removed from the
    file when ``repair`` is set. A line that is not JSON, not an object, or lacks a field raises
    :class:`RunError` naming the file, the line and the field.
    """
    records = []
    for number, record in read_jsonl_lines(path, repair=repair):
        if not isinstance(record, dict):
            raise RunError(f"{path}: line {number} is not a prediction record (a JSON {type(record).__name__})")
        try:
            Prediction.model_validate(record)
        except ValidationError as exc:
            problems = "; ".join(
                f"field {'.'.join(str(part) for part in err['loc']) or 'record'!r}: {err['msg']}"
                for err in exc.errors()[:3]
            )
            raise RunError(f"{path}: line {number} is not a prediction record ({problems})") from None
        records.append(record)
    return records


def read_json_file(path: Path, what: str) -> Any:
    """A JSON document written by this package; a damaged one raises :class:`RunError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise RunError(f"{path}: {what} is damaged or truncated ({exc}); restore or delete it") from None
    except OSError as exc:
        raise RunError(f"{path}: {what} cannot be read ({exc.strerror or exc})") from None


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old or the new file, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


class RunLock:
    """Exclusive ownership of one file of a run directory by one process.

    The lock is an advisory ``flock`` on ``<file>.lock``, which holds the owner's pid, host,
    command and start time. The operating system releases it when its owner exits or is killed,
    so a lock file left behind by a dead process is stale: it is taken over (and the takeover
    logged). While the owner lives, :meth:`acquire` raises :class:`RunError` naming it. Two locks
    on one file conflict within one process too.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.with_name(target.name + LOCK_SUFFIX)
        self._fd: int | None = None

    @staticmethod
    def _describe(text: str) -> str:
        try:
            owner = json.loads(text)
            command = " ".join(str(part) for part in owner.get("command", []))[:200]
            return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: {command}"
        except (ValueError, KeyError, TypeError, AttributeError):
            return "an unknown process"

    def _read(self, fd: int) -> str:
        return os.pread(fd, 65536, 0).decode("utf-8", errors="replace")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"{self.path}: cannot create the lock file ({exc.strerror or exc})") from None

    def acquire(self, *, wait: float = 0.0, announce: bool = True) -> RunLock:
        """Take the lock, waiting up to ``wait`` seconds for its owner to release it.

        ``announce`` logs the takeover of a lock left by a process that died."""
        if self._fd is not None:
            return self
        fd = self._open()
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    self._lock(fd)
                    break
                except RunError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        previous = self._read(fd).strip()
        if previous and announce:
            log.warning(
                "%s: taking over from a process that ended without releasing it (%s)",
                self.path,
                self._describe(previous),
            )
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode("utf-8"), 0)
        self._fd = fd
        return self

    def _lock(self, fd: int) -> None:
        if fcntl is None:  # pragma: no cover - the owner's pid decides instead
            text = self._read(fd).strip()
            if text:
                try:
                    pid = int(json.loads(text)["pid"])
                    os.kill(pid, 0)
                except (ValueError, KeyError, TypeError, ProcessLookupError):
                    return
                except PermissionError:
                    pass
                raise RunError(f"{self.target} is being written by {self._describe(text)}")
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunError(f"{self.path}: cannot lock ({exc.strerror or exc})") from None
            raise RunError(
                f"{self.target} is being written by another process ({self._owner_text(fd)}); "
                "wait for it to finish or stop it, or use another --out"
            ) from None

    def _owner_text(self, fd: int) -> str:
        """The owner's description; an owner that has just taken the lock writes it a moment later."""
        for _ in range(20):
            text = self._read(fd).strip()
            if text:
                break
            time.sleep(0.05)
        return self._describe(text)

    def owner(self) -> str | None:
        """Who holds the lock now (``None`` when nobody does), without taking it or touching the file."""
        if not self.path.exists() or self._fd is not None:
            return None
        fd = self._open()
        try:
            self._lock(fd)
        except RunError:
            return self._owner_text(fd)
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        os.ftruncate(fd, 0)  # an empty lock file marks a clean exit
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class PredictionWriter:
    """Append-only JSONL writer: one line per record, flushed and synced before returning."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    import mukv

    return {
        "mukv": mukv.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _identity(config: RunConfig, method_config: Any) -> dict[str, Any]:
    """The fields that must agree for two processes to write into the same run directory."""
    data = dataclasses.asdict(config)
    # The device and the video root may change between resumes; the numeric precision may not.
    for key in ("device", "videos"):
        data.pop(key)
    data["method_config"] = dataclasses.asdict(method_config)
    return data


def _has_records(out: Path) -> bool:
    """Whether ``out`` holds any answered or failed question (a complete line in its JSONL files)."""
    for pattern in ("predictions*.jsonl", "failures*.jsonl"):
        for path in out.glob(pattern):
            if path.is_file() and any(line.strip() for line in path.read_bytes().split(b"\n")[:-1]):
                return True
    return False


def _other_writers(out: Path, own: Path | None) -> list[str]:
    """The predictions files of ``out`` that another process is writing now (with their owners)."""
    writers = []
    for lock in sorted(out.glob(f"predictions*.jsonl{LOCK_SUFFIX}")):
        target = lock.with_name(lock.name.removesuffix(LOCK_SUFFIX))
        if target != own and (owner := RunLock(target).owner()) is not None:
            writers.append(f"{target.name} ({owner})")
    return writers


def check_run_dir(out: Path, config: RunConfig, method_config: Any, *, own: Path | None = None) -> bool:
    """Whether ``out``'s ``run.json`` must be written (it is missing, or describes another
    configuration in a directory with no records yet and no other writer). Raises
    :class:`RunError` when ``out`` is not a directory, or holds records of another configuration,
    or another process runs it. ``own`` is the predictions file this process writes."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: exists and is not a directory")
    path = out / RUN_FILE
    if not path.exists():
        return True
    previous = read_json_file(path, "the run's configuration")
    identity = json.loads(json.dumps(_identity(config, method_config)))
    saved = previous.get("identity") if isinstance(previous, dict) else None
    old = saved.get("method_config") if isinstance(saved, dict) else None
    if isinstance(method_config, StorageOptions) and isinstance(old, dict):
        # A run started before some storage option existed ran with that option's default.
        saved = {**saved, "method_config": with_storage_defaults(old)}
    if saved == identity:
        return False
    if _has_records(out):
        raise RunError(f"{out} holds a run of another configuration (see {path}); use a new --out directory")
    writers = _other_writers(out, own)
    if writers:
        raise RunError(
            f"{out} is being run with another configuration (see {path}) by: {'; '.join(writers)}; "
            "use a new --out directory"
        )
    return True


def write_run_file(out: Path, config: RunConfig, method_config: Any, *, own: Path | None = None) -> None:
    """Write ``out/run.json`` (resolved config, versions, machine), unless an equal one is there.

    Checked again under a short-lived directory lock (waited for), so that shards starting
    together agree on one file."""
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out / RUN_FILE).acquire(wait=60.0, announce=False):
        if not check_run_dir(out, config, method_config, own=own):
            return
        if (out / RUN_FILE).exists():
            log.warning("%s: no records yet; re-configured for this command", out)
        document = {
            "identity": _identity(config, method_config),
            "config": dataclasses.asdict(config),
            "method_config": dataclasses.asdict(method_config) | {"__class__": type(method_config).__name__},
            "versions": _versions(),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
            "command": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_atomic(out / RUN_FILE, json.dumps(document, indent=2) + "\n")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_accelerator_bytes(backend) -> int | None:
    import torch

    if backend.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(backend.device))
    return None


def prediction_record(question: Question, answer, backend, sample_period: float, **flags: Any) -> dict[str, Any]:
    """The predictions-file record of ``answer`` to ``question`` (``flags``: ``past_end``/``video_end``
    where they apply), as every run of the harness writes it."""
    t = answer.timings
    prediction = Prediction(
        qid=question.qid,
        video_id=question.video_id,
        question=question.question,
        answer=question.answer,
        choices=question.choices,
        task=question.task,
        evidence=question.evidence,
        prediction=answer.text,
        method=answer.method,
        time=answer.time,
        frames_seen=answer.frames_seen,
        encode_seconds=t.encode,
        vision_seconds=t.vision,
        memory_seconds=t.memory,
        prepare_seconds=t.prepare,
        first_token_seconds=t.first_token,
        total_seconds=t.total,
        context_tokens=answer.context_tokens,
        generated_tokens=answer.generated_tokens,
        stop_reason=answer.stop_reason,
        retrieved=[b.to_dict() for b in answer.retrieved],
        memory=answer.memory.to_dict(),
        peak_rss_bytes=_peak_rss_bytes(),
        peak_accelerator_bytes=_peak_accelerator_bytes(backend),
        sample_period=sample_period,
        frames_encoded=answer.frames_encoded,
        **flags,
    )
    # The flags appear only where they apply, so ordinary records stay as they were.
    return prediction.model_dump(mode="json", exclude=None if flags else {"past_end", "video_end"})


def read_failures(path: Path, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Outstanding failures of a failures file, by key (a video id, or a question id for a
    question-level failure). The file is append-only: a later ``resolved`` entry for a key clears
    it (the retry succeeded). ``repair`` drops a half-written last line (its owner only)."""
    failures: dict[str, dict[str, Any]] = {}
    for number, entry in read_jsonl_lines(path, repair=repair):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise RunError(f"{path}: line {number} is not a failure record")
        if entry.get("resolved"):
            failures.pop(entry["key"], None)
        else:
            failures[entry["key"]] = entry
    return failures


@dataclass
class RunSummary:
    """What a call of :func:`run_benchmark` did. ``failed`` holds the failures outstanding after
    it (new ones and earlier ones), each with ``key``, ``video_id``, ``stage``, ``reason`` and
    the ``qids`` of the questions it left unanswered; ``warnings`` what a person should read."""

    answered: int = 0
    skipped_done: int = 0
    videos: int = 0
    missing: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped_failed: int = 0
    warnings: list[str] = field(default_factory=list)
    # Videos given up after every attempt of a worker on them died or raised (distributed runs only).
    worker_failed: list[str] = field(default_factory=list)

    @property
    def failed_videos(self) -> list[str]:
        return sorted({f["video_id"] for f in self.failed if f["stage"] != "question"})

    @property
    def failed_questions(self) -> int:
        return sum(len(f["qids"]) for f in self.failed)


class _Failures:
    """The failures file of one shard, appended as failures happen and resolve."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.outstanding = read_failures(path, repair=True)  # under the shard's lock
        self._writer: PredictionWriter | None = None

    def _write(self, entry: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = PredictionWriter(self.path)
        self._writer.write(entry)

    def add(self, key: str, video: VideoItem, stage: str, reason: str, qids: list[str], **extra: Any) -> None:
        entry = {
            "key": key,
            "video_id": video.video_id,
            "annotation_path": video.path,
            "stage": stage,
            "reason": reason,
            "qids": qids,
            **extra,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.outstanding[key] = entry
        self._write(entry)
        log.warning("%s: %s failed (%s): %s; %d question(s) unanswered", video.video_id, stage, key, reason, len(qids))

    def resolve(self, key: str) -> None:
        if self.outstanding.pop(key, None) is not None:
            self._write({"key": key, "resolved": True, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _check_inputs(config: RunConfig, found: dict[str, Path]) -> None:
    """Everything that can be checked about the inputs before a model is loaded."""
    if config.npy_fps is None:
        arrays = [str(path) for path in found.values() if path.suffix.lower() == ".npy"]
        if arrays:
            more = f" and {len(arrays) - 3} more" if len(arrays) > 3 else ""
            raise RunError(
                f"{len(arrays)} video(s) are .npy frame arrays ({', '.join(arrays[:3])}{more}): "
                "give their frame rate with --npy-fps"
            )


def prepare_run(
    config: RunConfig, out: Path, shard: Shard, *, limit: int | None, allow_missing: bool
) -> tuple[Any, list[VideoItem], dict[str, Path], RunSummary]:
    """Everything checked before a run takes its lock: the method's options, the annotations, the
    videos (missing ones raise :class:`RunError` unless ``allow_missing``), the inputs and the run
    directory. Returns the method config, the shard's videos, the found video files and a fresh
    summary. Creates ``out``; writes nothing in it."""
    from mukv.eval.datasets import load_benchmark, resolve_videos
    from mukv.memory import method_config as resolve_method_config

    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    method_config = resolve_method_config(config.method, config.overrides, config.preset)
    videos = shard.videos(load_benchmark(config.benchmark, config.annotation))
    found, missing = resolve_videos(videos, Path(config.videos))
    summary = RunSummary(missing=[v.video_id for v in missing])
    if missing and not allow_missing:
        names = ", ".join(f"{v.video_id} ({Path(v.path).name})" for v in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise RunError(f"{len(missing)} of {len(videos)} videos not found under {config.videos}: {names}{more}")
    _check_inputs(config, found)
    check_run_dir(out, config, method_config)
    out.mkdir(parents=True, exist_ok=True)
    return method_config, videos, found, summary


def run_benchmark(
    config: RunConfig,
    out: Path,
    *,
    shard: Shard | None = None,
    limit: int | None = None,
    allow_missing: bool = False,
    retry_failed: bool = False,
    backend=None,
    progress: Callable[[Iterator[Question], int], Iterator[Question]] | None = None,
) -> RunSummary:
    """Run (or resume) ``config`` into ``out``; see the module docstring.

    ``backend`` may be passed to reuse a loaded model; ``progress`` wraps the question iterator
    (e.g. with a progress bar) and receives the number of questions still to answer.
    ``retry_failed`` runs again the videos and questions recorded as failed by earlier runs.
    Raises :class:`RunError` when another process owns the run directory (and shard), when the
    directory holds a run of another configuration, or when videos are missing (unless
    ``allow_missing``); ``ValueError`` when ``max_new_tokens`` leaves a question no room in the
    model's context. Nothing is written before these checks pass.
    """
    shard = shard or Shard()
    method_config, videos, found, summary = prepare_run(config, out, shard, limit=limit, allow_missing=allow_missing)
    with RunLock(out / shard.filename):
        failures = _Failures(out / shard.failures_filename)
        try:
            _Run(config, out, shard, method_config, summary, failures, backend, progress).run(
                videos, found, limit=limit, retry_failed=retry_failed
            )
        finally:
            failures.close()
            summary.failed = sorted(failures.outstanding.values(), key=lambda f: (f["video_id"], f["key"]))
    return summary


def _answered(out: Path, own: Path) -> set[str]:
    """Question ids answered in any predictions file of ``out``: the merged file and every shard's
    (so a sharded run after an unsharded one, or the reverse, answers nothing twice). Only the
    owner's file is repaired; another file's half-written last line is another writer's."""
    done = {record["qid"] for record in read_predictions(own, repair=True)}
    for path in sorted(out.glob("predictions*.jsonl")):
        if path != own:
            done.update(record["qid"] for record in read_predictions(path))
    return done


def plan_videos(
    videos: list[VideoItem],
    found: dict[str, Path],
    done: set[str],
    failed_before: dict[str, dict[str, Any]],
    summary: RunSummary,
    *,
    retry_failed: bool,
) -> list[tuple[VideoItem, list[Question]]]:
    """The questions still to answer, by video in annotation order: those not in ``done``, nor
    (unless ``retry_failed``) recorded as failed. Counts what it skips into ``summary``; videos
    that are not found are left out."""
    failed_videos = {f["video_id"] for f in failed_before.values() if f["stage"] != "question"}
    todo: list[tuple[VideoItem, list[Question]]] = []
    for video in videos:
        if video.video_id not in found:
            continue
        pending = [q for q in video.questions if q.qid not in done]
        summary.skipped_done += len(video.questions) - len(pending)
        if not retry_failed:
            skipped = [q for q in pending if video.video_id in failed_videos or q.qid in failed_before]
            summary.skipped_failed += len(skipped)
            pending = [q for q in pending if q not in skipped]
        todo.append((video, pending))
    return todo


def take_questions(
    todo: list[tuple[VideoItem, list[Question]]], limit: int | None
) -> list[tuple[VideoItem, list[Question], int]]:
    """The videos with questions to answer, each with how many of its pending questions to take:
    all of them, or (with ``limit``) the first ``limit`` questions of the run in annotation order."""
    budget = limit
    taken = []
    for video, pending in todo:
        if not pending:
            continue
        take = len(pending) if budget is None else min(budget, len(pending))
        if take == 0:
            break
        taken.append((video, pending, take))
        if budget is not None:
            budget -= take
    return taken


def check_questions(backend, config: RunConfig, questions: list[Question]) -> dict[str, str]:
    """Check every question against the model's context before anything is written: a
    ``max_new_tokens`` that leaves a question no room raises ``ValueError`` now; a question too
    long on its own is returned (question id -> why), to be recorded as a failure in its turn."""
    from mukv.engine import StreamSession

    # Tokenizer and context size: nothing is encoded (the rate only lets a Qwen2.5-VL session be made).
    session = StreamSession(backend, "full", fps=config.sample_fps)
    too_long: dict[str, str] = {}
    for question in questions:
        try:
            session.check_question(question.question, question.choices, max_new_tokens=config.max_new_tokens)
        except ValueError as exc:
            try:
                session.check_question(question.question, question.choices, max_new_tokens=1)
            except ValueError as alone:
                too_long[question.qid] = str(alone)
                continue
            raise ValueError(f"--max-new-tokens {config.max_new_tokens}: question {question.qid}: {exc}") from None
    return too_long


@dataclass(frozen=True)
class Answered:
    """A question was answered: ``record`` is its line of the predictions file."""

    qid: str
    record: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """A video (``key`` = its id) or one question (``key`` = the question id) failed at ``stage``
    (``open``, ``decode``, ``question``), leaving ``qids`` unanswered."""

    key: str
    stage: str
    reason: str
    qids: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Resolved:
    """An earlier failure of ``key`` (a video or question id) no longer holds."""

    key: str


@dataclass(frozen=True)
class Warned:
    """Something a person should read (a truncated file, say)."""

    message: str


#: What :func:`stream_video` reports, in order; whoever writes the run directory applies them.
VideoEvent = Answered | Failed | Resolved | Warned


def stream_video(
    backend,
    config: RunConfig,
    method_config: Any,
    video: VideoItem,
    pending: list[Question],
    file: Path,
    *,
    take: int | None = None,
    too_long: Mapping[str, str] | None = None,
    progress: Callable[[Iterator[Question], int], Iterator[Question]] | None = None,
) -> Iterator[VideoEvent]:
    """Stream one video through a fresh session and answer the first ``take`` (default: all) of
    ``pending`` (its questions still to answer, in time order), yielding what happens as it
    happens. Writes nothing: the single-process run and the distributed driver both apply the
    events to the run directory, so the two produce the same records.

    Every frame up to a question's time is ingested before it is asked, answered questions or
    not, so a resumed or retried video answers its remaining questions from the same frames as an
    uninterrupted run. A video that cannot be opened or decoded yields a :class:`Failed` with
    every pending question it leaves unanswered; questions whose frames were all decoded before
    the failure are still answered. A question in ``too_long`` fails alone."""
    from mukv.engine import StreamSession
    from mukv.video import open_source

    period = 1.0 / config.sample_fps
    too_long = too_long or {}
    questions = pending if take is None else pending[:take]
    answered: set[str] = set()

    def failed(stage: str, reason: str, **extra: Any) -> Failed:
        unanswered = [q.qid for q in pending if q.qid not in answered]
        return Failed(video.video_id, stage, reason, unanswered, {"file": str(file), **extra})

    try:
        source = open_source(file, sample_fps=config.sample_fps, npy_fps=config.npy_fps)
    except VideoError as exc:
        yield failed("open", str(exc))
        return
    # The stream's sampling rate places its frames in time (Qwen2.5-VL).
    session = StreamSession(backend, config.method, method_config=method_config, fps=source.sample_fps)
    declared = [d for d in (source.duration, video.duration) if d is not None]
    decode_error: VideoError | None = None
    warned = False
    try:
        iterator: Iterator[Question] = iter(questions)
        if progress is not None:
            iterator = progress(iterator, len(questions))
        for question in iterator:
            if decode_error is None:
                try:
                    session.ingest_source(source, until=question.time)
                except VideoError as exc:
                    decode_error = exc
            # Decoding failed after the frame at session.time: a question before the next sample
            # is answered from the frames it needs; the rest of the video fails.
            if decode_error is not None and (session.time is None or question.time >= session.time + period):
                yield failed("decode", str(decode_error), frames_decoded=session.frames_seen, stream_time=session.time)
                return
            flags: dict[str, Any] = {}
            end = source.last_time
            if decode_error is None and source.exhausted and source.error is None and end is not None:
                if question.time > end + period:
                    flags = {"past_end": True, "video_end": end}
                if not warned and declared and end + period + 1.0 < max(declared):
                    warned = True
                    yield Warned(
                        f"{video.video_id}: {file.name} declares {max(declared):.1f} s but its frames end at "
                        f"{end:.1f} s (a truncated file?); questions after that are answered from frames up "
                        f"to {end:.1f} s and marked past_end"
                    )
            if question.qid in too_long:
                yield Failed(question.qid, "question", too_long[question.qid], [question.qid])
                continue
            # Asked at the question's time: with no frame by then, from the prompt alone.
            answer = session.ask(
                question.question, question.choices, max_new_tokens=config.max_new_tokens, at=question.time
            )
            answered.add(question.qid)
            yield Answered(question.qid, prediction_record(question, answer, backend, period, **flags))
        if decode_error is not None and len(questions) < len(pending):
            yield failed("decode", str(decode_error), frames_decoded=session.frames_seen, stream_time=session.time)
        else:
            yield Resolved(video.video_id)
    finally:
        source.close()


class _Run:
    """One locked pass of :func:`run_benchmark` over a shard's videos."""

    def __init__(self, config, out, shard, method_config, summary, failures, backend, progress) -> None:
        self.config, self.out, self.shard = config, out, shard
        self.method_config, self.summary, self.failures = method_config, summary, failures
        self.backend, self.progress = backend, progress

    def run(self, videos: list[VideoItem], found: dict[str, Path], *, limit: int | None, retry_failed: bool) -> None:
        config, summary = self.config, self.summary
        path = self.out / self.shard.filename
        done = _answered(self.out, path)
        todo = plan_videos(videos, found, done, dict(self.failures.outstanding), summary, retry_failed=retry_failed)
        taken = take_questions(todo, limit)
        if not taken:
            write_run_file(self.out, config, self.method_config, own=path)
            return
        if self.backend is None:
            from mukv.backends import load_backend

            self.backend = load_backend(config.model, device=config.device, dtype=config.dtype)
        too_long = check_questions(self.backend, config, [q for _, questions in todo for q in questions])
        write_run_file(self.out, config, self.method_config, own=path)  # everything is checked: the run starts
        writer = PredictionWriter(path)
        try:
            for video, pending, take in taken:
                summary.videos += 1
                file = found[video.video_id]
                for event in stream_video(
                    self.backend,
                    config,
                    self.method_config,
                    video,
                    pending,
                    file,
                    take=take,
                    too_long=too_long,
                    progress=self.progress,
                ):
                    apply_event(event, video, writer, self.failures, summary)
        finally:
            writer.close()


def apply_event(event: VideoEvent, video: VideoItem, writer: PredictionWriter, failures: _Failures, summary) -> None:
    """Apply one event of :func:`stream_video` to the run directory (the one writer's job)."""
    if isinstance(event, Answered):
        writer.write(event.record)
        failures.resolve(event.qid)
        summary.answered += 1
    elif isinstance(event, Failed):
        failures.add(event.key, video, event.stage, event.reason, event.qids, **event.extra)
    elif isinstance(event, Resolved):
        failures.resolve(event.key)
    else:
        log.warning("%s", event.message)
        summary.warnings.append(event.message)


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in VOLATILE_FIELDS}


def _expected_questions(run_dir: Path, count: int) -> dict[int, set[str]] | None:
    """Question ids of each of ``count`` shards, from the run's annotations (``None`` when the
    annotation file cannot be read any more)."""
    from mukv.eval.datasets import load_benchmark

    info = read_json_file(run_dir / RUN_FILE, "the run's configuration") if (run_dir / RUN_FILE).exists() else None
    config = info.get("config", {}) if isinstance(info, dict) else {}
    try:
        videos = load_benchmark(config["benchmark"], config["annotation"])
    except (KeyError, TypeError, MukvError, ValueError, OSError) as exc:
        log.warning("%s: cannot read the run's annotations to count its questions (%s)", run_dir, exc)
        return None
    return {index: {q.qid for v in Shard(index, count).videos(videos) for q in v.questions} for index in range(count)}


def merge_predictions(run_dir: Path, *, allow_partial: bool = False) -> Path:
    """Join ``run_dir``'s shard files into ``predictions.jsonl`` (sorted by video, then question
    index), and their failure files into ``failures.jsonl``.

    Records already in ``predictions.jsonl`` are kept: a merge never drops a record it did not
    read. Two records of one question must agree on everything but timings, or it raises. It
    refuses while a shard is still being written, and when shards are missing or have questions
    neither answered nor recorded as failed (naming them and their question counts), unless
    ``allow_partial``.
    """
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: not a run directory")
    shards = sorted(run_dir.glob("predictions.shard-*-of-*.jsonl"))
    if not shards:
        raise RunError(f"{run_dir}: no shard files (predictions.shard-I-of-N.jsonl) to merge")
    counts = {p.name.rsplit("-of-", 1)[1].removesuffix(".jsonl") for p in shards}
    if len(counts) != 1 or not next(iter(counts)).isdigit():
        raise RunError(f"{run_dir}: shard files of different shard counts: {sorted(p.name for p in shards)}")
    count = int(next(iter(counts)))
    target = run_dir / MERGED_FILE
    with contextlib.ExitStack() as held:
        # Every shard's lock is held for the whole merge, so no shard starts writing meanwhile.
        held.enter_context(RunLock(target))
        busy = []
        for i in range(count):
            try:
                held.enter_context(RunLock(run_dir / Shard(i, count).filename).acquire(announce=False))
            except RunError:
                busy.append(f"shard {i} ({RunLock(run_dir / Shard(i, count).filename).owner()})")
        if busy:
            raise RunError(f"{run_dir}: still being written: {'; '.join(busy)}; merge when it has finished")
        merged: dict[str, dict[str, Any]] = {}
        sources = ([target] if target.exists() else []) + shards
        answered: dict[int, set[str]] = {}
        for path in sources:
            for record in read_predictions(path):
                previous = merged.setdefault(record["qid"], record)
                if previous is not record and _comparable(previous) != _comparable(record):
                    differing = sorted(
                        k
                        for k in set(previous) | set(record)
                        if k not in VOLATILE_FIELDS and previous.get(k) != record.get(k)
                    )
                    raise RunError(
                        f"{run_dir}: question {record['qid']} answered differently in {path.name} and an earlier "
                        f"file (fields {', '.join(differing)})"
                    )
        failures: dict[str, dict[str, Any]] = {}
        for i in range(count):
            shard = Shard(i, count)
            answered[i] = {r["qid"] for r in read_predictions(run_dir / shard.filename)}
            failures.update(read_failures(run_dir / shard.failures_filename))
        present = {i for i in range(count) if (run_dir / Shard(i, count).filename).exists()}
        expected = _expected_questions(run_dir, count)
        problems = []
        failed_qids = {qid for f in failures.values() for qid in f["qids"]}
        for i in range(count):
            if expected is None:
                if i not in present:
                    problems.append(f"shard {i} of {count} is missing (question count unknown)")
                continue
            # A question counts once it is in any file read (the merged file included) or failed.
            open_ = expected[i] - answered[i] - failed_qids - set(merged)
            if i not in present and open_:
                problems.append(f"shard {i} of {count} is missing ({len(open_)} questions)")
            elif open_:
                problems.append(f"shard {i} of {count} has {len(open_)} of {len(expected[i])} questions unanswered")
        if problems and not allow_partial:
            raise RunError(
                f"{run_dir}: not merged: {'; '.join(problems)}. Run the missing shards into this directory "
                "(mukv eval ... --shard I/N), or pass --allow-partial to merge what is there"
            )
        for problem in problems:
            log.warning("%s: merged without: %s", run_dir, problem)

        def order(qid: str) -> tuple[str, int]:
            video, _, index = qid.rpartition("/")
            return (video, int(index)) if index.isdigit() else (qid, -1)

        write_atomic(
            target, "".join(json.dumps(merged[qid], ensure_ascii=False) + "\n" for qid in sorted(merged, key=order))
        )
        if failures or (run_dir / FAILURES_FILE).exists():
            existing = read_failures(run_dir / FAILURES_FILE)
            outstanding = {k: v for k, v in (existing | failures).items() if not set(v["qids"]) <= set(merged)}
            write_atomic(
                run_dir / FAILURES_FILE,
                "".join(json.dumps(outstanding[k], ensure_ascii=False) + "\n" for k in sorted(outstanding)),
            )
    return target
