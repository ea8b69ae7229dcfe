"""The streaming evaluation runner (evaluation.md, "Streaming protocol").

One stream per video; questions in time order; before each question every frame up to its time
is ingested, then the question is asked. Each answer is appended to a JSONL file as it arrives
(flushed and synced), so an interrupted run resumes where it stopped: answered questions are
skipped, a partly written last line is discarded, nothing is duplicated. Videos are split over
shards by index (video ``k`` goes to shard ``k % n``); :func:`merge_predictions` joins shard files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mukv.errors import MukvError
from mukv.eval.schema import Prediction, Question, VideoItem

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
MERGED_FILE = "predictions.jsonl"


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
        if self.sample_fps <= 0:
            raise ValueError(f"sample_fps: must be > 0, got {self.sample_fps}")
        if self.npy_fps is not None and self.npy_fps <= 0:
            raise ValueError(f"npy_fps: must be > 0, got {self.npy_fps}")


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

    def videos(self, videos: list[VideoItem]) -> list[VideoItem]:
        return [v for k, v in enumerate(videos) if k % self.count == self.index]


def read_predictions(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a predictions file. A last line without its newline is an interrupted write:
    it is ignored, and removed from the file when ``repair`` is set. Other bad lines raise."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete, _, tail = data.rpartition(b"\n")
    if tail and repair:
        with path.open("r+b") as handle:
            handle.truncate(len(complete) + 1 if complete else 0)
        log.warning("%s: dropped an incomplete last line (%d bytes) from an interrupted write", path, len(tail))
    records = []
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RunError(f"{path}: line {number} is not valid JSON ({exc})") from None
    return records


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


def prepare_run_dir(out: Path, config: RunConfig, method_config: Any) -> None:
    """Create ``out`` with ``run.json`` (resolved config, versions, machine), or check that an
    existing one describes the same run."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_FILE
    identity = _identity(config, method_config)
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("identity") != json.loads(json.dumps(identity)):
            raise RunError(f"{out} holds a run of another configuration (see {path}); use a new --out directory")
        return
    document = {
        "identity": identity,
        "config": dataclasses.asdict(config),
        "method_config": dataclasses.asdict(method_config) | {"__class__": type(method_config).__name__},
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_accelerator_bytes(backend) -> int | None:
    import torch

    if backend.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(backend.device))
    return None


def _record(question: Question, answer, backend, sample_period: float) -> dict[str, Any]:
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
    )
    return prediction.model_dump(mode="json")


@dataclass
class RunSummary:
    answered: int = 0
    skipped_done: int = 0
    videos: int = 0
    missing: list[str] = field(default_factory=list)


def run_benchmark(
    config: RunConfig,
    out: Path,
    *,
    shard: Shard | None = None,
    limit: int | None = None,
    allow_missing: bool = False,
    backend=None,
    progress: Callable[[Iterator[Question], int], Iterator[Question]] | None = None,
) -> RunSummary:
    """Run (or resume) ``config`` into ``out``; see the module docstring.

    ``backend`` may be passed to reuse a loaded model; ``progress`` wraps the question iterator
    (e.g. with a progress bar) and receives the number of questions still to answer.
    """
    from mukv.engine import StreamSession
    from mukv.eval.datasets import load_benchmark, resolve_videos
    from mukv.memory import method_config as resolve_method_config
    from mukv.video import open_source

    shard = shard or Shard()
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
    prepare_run_dir(out, config, method_config)
    path = out / shard.filename
    done = {record["qid"] for record in read_predictions(path, repair=True)}
    todo = [(v, [q for q in v.questions if q.qid not in done]) for v in videos if v.video_id in found]
    summary.skipped_done = sum(len(v.questions) for v in videos if v.video_id in found) - sum(len(q) for _, q in todo)
    remaining = sum(len(q) for _, q in todo)
    if limit is not None:
        remaining = min(remaining, limit)
    if remaining == 0:
        return summary
    if backend is None:
        from mukv.backends import load_backend

        backend = load_backend(config.model, device=config.device, dtype=config.dtype)
    writer = PredictionWriter(path)
    try:
        budget = remaining
        for video, questions in todo:
            if budget == 0:
                break
            if not questions:
                continue
            questions = questions[:budget]
            summary.videos += 1
            session = StreamSession(backend, config.method, method_config=method_config)
            source = open_source(found[video.video_id], sample_fps=config.sample_fps, npy_fps=config.npy_fps)
            try:
                iterator: Iterator[Question] = iter(questions)
                if progress is not None:
                    iterator = progress(iterator, len(questions))
                for question in iterator:
                    session.ingest_source(source, until=question.time)
                    # Asked at the question's time: with no frame by then, from the prompt alone.
                    answer = session.ask(
                        question.question, question.choices, max_new_tokens=config.max_new_tokens, at=question.time
                    )
                    writer.write(_record(question, answer, backend, 1.0 / config.sample_fps))
                    summary.answered += 1
                    budget -= 1
            finally:
                source.close()
    finally:
        writer.close()
    return summary


def merge_predictions(run_dir: Path) -> Path:
    """Join ``run_dir``'s shard files into ``predictions.jsonl`` (sorted by video, then question
    index). A pure function of the shard files: duplicates must be identical, or it raises."""
    shards = sorted(run_dir.glob("predictions.shard-*-of-*.jsonl"))
    if not shards:
        raise RunError(f"{run_dir}: no shard files (predictions.shard-I-of-N.jsonl) to merge")
    counts = {p.name.rsplit("-of-", 1)[1].removesuffix(".jsonl") for p in shards}
    if len(counts) != 1:
        raise RunError(f"{run_dir}: shard files of different shard counts: {sorted(p.name for p in shards)}")
    merged: dict[str, dict[str, Any]] = {}
    for path in shards:
        for record in read_predictions(path):
            previous = merged.setdefault(record["qid"], record)
            if previous is not record and previous != record:
                raise RunError(f"{run_dir}: question {record['qid']} answered differently in two shard files")

    def order(qid: str) -> tuple[str, int]:
        video, _, index = qid.rpartition("/")
        return (video, int(index)) if index.isdigit() else (qid, -1)

    target = run_dir / MERGED_FILE
    temporary = target.with_suffix(".jsonl.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for qid in sorted(merged, key=order):
            handle.write(json.dumps(merged[qid], ensure_ascii=False) + "\n")
    temporary.replace(target)
    return target
