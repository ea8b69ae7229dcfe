"""Benchmark annotation loaders and the video-root resolver.

:func:`load_benchmark` turns an annotation file into a list of :class:`~mukv.eval.schema.VideoItem`
(one per video, each with its :class:`~mukv.eval.schema.Question` records);
:func:`available_benchmarks` lists the registered names; :func:`resolve_videos` maps the videos to
files under a local video root.

Registered benchmarks
---------------------
``rvs-ego``, ``rvs-movie``
    A JSON list of videos ``{video_id, video_path, duration, conversations: [{question, answer,
    start_time, end_time}]}`` (seconds). The question is asked at ``end_time`` and
    ``(start_time, end_time)`` is its evidence window. ``duration`` may be absent or ``null``.
    Extra fields (RVS-Movie carries some) are ignored; ``video_path`` may name an ``.npy`` frame
    array.
``streamingbench-rt``
    StreamingBench real-time visual understanding: a JSON list of videos ``{video_id, video_path,
    conversations: [{question, answer, choices, end_time, task, ...}]}`` where ``answer`` is the
    text of the right choice. The question is asked at ``end_time``; there is no evidence window.
    ``task`` is kept (accuracy is reported per task) and is required, on the conversation or on
    the video record (see *Tasks* below); other fields (``time_stamp``, ``required_ability``) are
    ignored, except that a ``time_stamp`` disagreeing with ``end_time`` is logged.
``ovo-bench``
    OVO-Bench's real-time and backward-tracing tasks in the list-of-videos layout used for
    streaming evaluation: a JSON list of videos ``{video_id, video_path, task, conversations:
    [{question, answer, choices, end_time}]}``. Every question is multiple choice (``choices``
    required, at least 2) and is asked at ``end_time``; there is no evidence window
    (a ``start_time`` is ignored). ``answer`` is the text of the right choice; an option letter
    (``"A"`` .. ``"Z"``) or a 0-based integer index into ``choices`` is accepted too and turned
    into that text. A string that is one of the choices is taken as the text; a single letter
    that is both a choice and the letter of a different choice is rejected as ambiguous.
    ``task`` is required, on the video record or on the conversation. ``duration`` is optional;
    other fields are ignored (as for RVS). The forward active-responding tasks have no fixed
    answer time and are not read by this loader.
``generic``
    A format to write by hand: a JSON list of videos ::

        [
          {"video_id": "kitchen-01",
           "video": "videos/kitchen-01.mp4",
           "duration": 1800.0,
           "questions": [
             {"question": "What is on the table?", "answer": "A red mug.", "time": 120},
             {"question": "What did I cut?", "answer": "An onion.",
              "choices": ["A carrot.", "An onion.", "Bread."],
              "time": 300, "evidence": [240, 300], "task": "Action Recognition"}
           ]}
        ]

    ``video_id`` (string or integer), ``video`` (the file; ``video_path`` is accepted as an
    alias) and ``questions`` are required, ``duration`` is optional. Each question needs
    ``question``, ``answer`` and ``time`` (seconds from the start of the video, when it is
    asked); ``choices`` (at least 2, ``answer`` being one of them) makes it multiple choice,
    ``evidence`` is ``[start, end]`` with ``end <= time``, ``task`` is a free label. This shape is
    strict: an unknown key is an error (it is usually a typo); a video may carry ``task``, the
    default for its questions. A video record carrying ``conversations`` instead of
    ``questions`` is read in the RVS shape above (``start_time`` optional, ``choices`` and
    ``task`` allowed on the video and on each conversation, extra fields ignored).

Tasks
-----
``Question.task`` (accuracy is reported per task) may be given per question or per video: in
``streamingbench-rt``, ``ovo-bench`` and ``generic``, a video record's ``task`` is the task of
each of its questions that has none of its own, and a question's own ``task`` wins. Either must
be a non-empty string (or ``null``, meaning absent). ``rvs-ego`` and ``rvs-movie`` have no tasks:
a ``task`` there is ignored like any extra field.

Common rules
------------
- The file is a non-empty JSON list of video records (an empty list is an error: it is almost
  always the wrong file or a failed export); each video has at least one question.
- ``video_id`` is a non-empty string or an integer (kept as its decimal string); ids are unique
  within a file.
- A question's id is ``f"{video_id}/{index}"``, ``index`` being the 0-based position of the
  conversation in that video's list in the file, so reruns and shards agree.
- Within a video, questions are ordered by time with a stable sort (ties keep file order).
- Times are finite, non-negative JSON numbers. A question time beyond the video's ``duration``
  (by more than a second) or duplicate options in ``choices`` are logged as warnings, not
  rejected: the real files have such records.
- Every defect raises :class:`AnnotationError` with the file, the record (0-based video index
  and ``video_id``, 0-based conversation index) and the field, e.g.
  ``rvs_ego.json: video 3 (video_id 'abc'), conversation 7: field 'end_time': missing``.

Resolving videos
----------------
Annotation paths point to the original authors' disks, so :func:`resolve_videos` walks the video
root once (recursively, following symbolic links) and looks each video up by file name:

1. the exact file name of the annotation path (case-sensitive);
2. failing that, a file with the same stem and one of the extensions ``.mp4 .mkv .webm .mov
   .avi .npy`` (case-insensitive), taken in that order, so a re-encoded video or an ``.npy``
   frame array standing in for it is found (an ``.npy`` needs its frame rate from the caller).

When several files under the root match, the one whose parent folders agree with the most
trailing folders of the annotation path wins; a tie raises :class:`~mukv.errors.VideoError`
rather than guessing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mukv.errors import MukvError, VideoError
from mukv.eval.schema import Question, VideoItem

__all__ = [
    "VIDEO_EXTENSIONS",
    "AnnotationError",
    "available_benchmarks",
    "load_benchmark",
    "resolve_videos",
]

log = logging.getLogger(__name__)

#: Extensions tried, in this order, when a video's exact file name is not under the root.
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".npy")

# A question time may exceed the annotated duration by this much before a warning is logged.
_DURATION_SLACK = 1.0

_MISSING = object()


class AnnotationError(MukvError):
    """An annotation file is missing or malformed; the message names the file, the record and
    the field."""


# --------------------------------------------------------------------------------------------
# Error locations
# --------------------------------------------------------------------------------------------


class _Where:
    """Where in an annotation file a record lies, for error messages."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.video: int | None = None
        self.video_id: str | None = None
        self.item: int | None = None
        self.item_label = "conversation"

    def at_video(self, index: int) -> _Where:
        where = _Where(self.file)
        where.video = index
        return where

    def at_item(self, index: int, label: str) -> _Where:
        where = _Where(self.file)
        where.video, where.video_id = self.video, self.video_id
        where.item, where.item_label = index, label
        return where

    def __str__(self) -> str:
        record = []
        if self.video is not None:
            record.append(f"video {self.video}" + ("" if self.video_id is None else f" (video_id {self.video_id!r})"))
        if self.item is not None:
            record.append(f"{self.item_label} {self.item}")
        return f"{self.file}: {', '.join(record)}" if record else self.file

    def error(self, field: str | None, problem: str) -> AnnotationError:
        if field is None:
            return AnnotationError(f"{self}: {problem}")
        return AnnotationError(f"{self}: field {field!r}: {problem}")


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A short JSON rendering of a value for messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    except RecursionError:
        text = f"<{_type_name(value)} nested too deeply to show>"
    return text if len(text) <= 60 else text[:57] + "..."


def _from_validation_error(exc: ValidationError, where: _Where, names: dict[str, str]) -> AnnotationError:
    """An :class:`AnnotationError` naming the annotation field(s) behind a pydantic error.

    ``names`` maps schema field names to the annotation's own field names.
    """
    problems = []
    for err in exc.errors():
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        loc = [str(part) for part in err.get("loc", ())]
        if loc:
            field = names.get(loc[0], loc[0])
            if len(loc) > 1:
                field += "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in loc[1:])
        else:
            # Model-level checks start their message with the field they are about.
            head = re.split(r"[\s:]", message, maxsplit=1)[0]
            field = names.get(head, head) if head in Question.model_fields else "record"
        problems.append(f"field {field!r}: {message}")
    return AnnotationError(f"{where}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Field readers
# --------------------------------------------------------------------------------------------


def _get(record: dict[str, Any], key: str, where: _Where, *, required: bool = True) -> Any:
    if key not in record:
        if required:
            raise where.error(key, "missing")
        return _MISSING
    return record[key]


def _as_object(value: Any, where: _Where, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise where.error(None, f"{what} must be a JSON object, got {_type_name(value)}")
    return value


def _string(record: dict[str, Any], key: str, where: _Where, *, required: bool = True) -> str | None:
    value = _get(record, key, where, required=required)
    if value is _MISSING or (value is None and not required):
        return None
    if not isinstance(value, str):
        raise where.error(key, f"expected a string, got {_type_name(value)} {_show(value)}")
    return value


def _nonempty_string(record: dict[str, Any], key: str, where: _Where) -> str:
    value = _string(record, key, where)
    assert value is not None
    if not value.strip():
        raise where.error(key, "must not be empty")
    return value


def _time(value: Any, key: str, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(key, f"expected a number of seconds, got {_type_name(value)} {_show(value)}")
    if not math.isfinite(value):
        raise where.error(key, f"must be finite, got {value}")
    if value < 0:
        raise where.error(key, f"must be >= 0, got {value}")
    return float(value)


def _time_field(record: dict[str, Any], key: str, where: _Where, *, required: bool = True) -> float | None:
    value = _get(record, key, where, required=required)
    if value is _MISSING or (value is None and not required):
        return None
    return _time(value, key, where)


def _video_id(record: dict[str, Any], where: _Where) -> str:
    value = _get(record, "video_id", where)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise where.error("video_id", f"expected a string or an integer, got {_type_name(value)} {_show(value)}")
    if not value.strip():
        raise where.error("video_id", "must not be empty")
    return value


def _choices(record: dict[str, Any], where: _Where, *, required: bool) -> list[str] | None:
    value = _get(record, "choices", where, required=required)
    if value is _MISSING or (value is None and not required):
        return None
    if not isinstance(value, list):
        raise where.error("choices", f"expected a list of strings, got {_type_name(value)}")
    for i, choice in enumerate(value):
        if not isinstance(choice, str):
            raise where.error(f"choices[{i}]", f"expected a string, got {_type_name(choice)} {_show(choice)}")
        if not choice.strip():
            raise where.error(f"choices[{i}]", "must not be empty")
    repeated = sorted(choice for choice, n in Counter(value).items() if n > 1)
    if repeated:
        log.warning("%s: field 'choices': repeated option(s) %s", where, repeated)
    return value


def _task(record: dict[str, Any], where: _Where, *, required: bool) -> str | None:
    task = _string(record, "task", where, required=required)
    if task is not None and not task.strip():
        raise where.error("task", "must not be empty")
    return task


def _check_keys(record: dict[str, Any], allowed: set[str], where: _Where) -> None:
    unknown = sorted(set(record) - allowed)
    if unknown:
        raise where.error(unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> list[Any]:
    if not path.exists():
        raise AnnotationError(f"{path}: annotation file not found")
    if not path.is_file():
        raise AnnotationError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise AnnotationError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: top level must be a JSON list of videos, got {_type_name(data)}")
    return data


def _choice_answer(record: dict[str, Any], choices: list[str], where: _Where) -> str:
    """The text of the right choice from ``answer``: the text itself, an option letter ("A".."Z")
    or a 0-based integer index into ``choices``."""
    value = _get(record, "answer", where)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(choices):
            raise where.error("answer", f"index {value} is out of range for {len(choices)} choices")
        return choices[value]
    if not isinstance(value, str):
        raise where.error("answer", f"expected a string or an integer, got {_type_name(value)} {_show(value)}")
    if not value.strip():
        raise where.error("answer", "must not be empty")
    letter = ord(value) - ord("A") if len(value) == 1 and "A" <= value <= "Z" else None
    if value in choices:
        if letter is not None and letter < len(choices) and choices[letter] != value:
            raise where.error(
                "answer",
                f"{value!r} is ambiguous: it is a choice and the letter of another choice {choices[letter]!r}",
            )
        return value
    if letter is not None:
        if letter >= len(choices):
            raise where.error("answer", f"option letter {value!r} is out of range for {len(choices)} choices")
        return choices[letter]
    return value  # not a choice: reported by the Question check


def _question(where: _Where, names: dict[str, str], **fields: Any) -> Question:
    """A :class:`Question`; pydantic errors are reported against the annotation's field names
    (``names`` maps schema names to them where they differ)."""
    try:
        return Question(**fields)
    except ValidationError as exc:
        raise _from_validation_error(exc, where, names) from None


def _conversation(
    record: dict[str, Any],
    where: _Where,
    *,
    video_id: str,
    index: int,
    mode: str,
    duration: float | None,
    video_task: str | None = None,
) -> Question:
    """One question in the RVS / StreamingBench / OVO-Bench shape; ``mode`` is ``rvs``,
    ``streamingbench``, ``ovo`` or ``lenient`` (the RVS shape inside the generic format).
    ``video_task`` is the video record's ``task``, used when the conversation has none."""
    multiple_choice = mode in ("streamingbench", "ovo")
    question = _string(record, "question", where)
    answer = _nonempty_string(record, "answer", where) if mode != "ovo" else None
    end = _time_field(record, "end_time", where)
    assert end is not None
    evidence = None
    if mode in ("rvs", "lenient"):
        start = _time_field(record, "start_time", where, required=mode == "rvs")
        if start is not None:
            if start > end:
                raise where.error("start_time", f"{start:g} is after end_time {end:g}")
            evidence = (start, end)
    choices = _choices(record, where, required=multiple_choice) if mode != "rvs" else None
    if mode == "ovo":
        assert choices is not None
        answer = _choice_answer(record, choices, where)
    task = None
    if mode != "rvs":
        task = _task(record, where, required=False) or video_task
        if task is None and multiple_choice:
            raise where.error("task", "missing (give it on the conversation or on the video record)")
    if mode == "streamingbench":
        _check_time_stamp(record, end, where)
    _check_duration(end, duration, "end_time", where)
    return _question(
        where,
        {"time": "end_time", "evidence": "start_time"},
        qid=f"{video_id}/{index}",
        video_id=video_id,
        question=question,
        answer=answer,
        time=end,
        choices=choices,
        evidence=evidence,
        task=task,
    )


_GENERIC_QUESTION_KEYS = {"question", "answer", "time", "choices", "evidence", "task"}
_GENERIC_VIDEO_KEYS = {"video_id", "video", "video_path", "duration", "questions", "task"}


def _generic_question(
    record: dict[str, Any],
    where: _Where,
    *,
    video_id: str,
    index: int,
    duration: float | None,
    video_task: str | None = None,
) -> Question:
    _check_keys(record, _GENERIC_QUESTION_KEYS, where)
    question = _string(record, "question", where)
    answer = _nonempty_string(record, "answer", where)
    time = _time_field(record, "time", where)
    assert time is not None
    evidence = None
    raw = _get(record, "evidence", where, required=False)
    if raw is not _MISSING and raw is not None:
        if not isinstance(raw, list) or len(raw) != 2:
            raise where.error("evidence", f"expected [start, end] in seconds, got {_show(raw)}")
        start, end = _time(raw[0], "evidence[0]", where), _time(raw[1], "evidence[1]", where)
        if start > end:
            raise where.error("evidence", f"start {start:g} is after end {end:g}")
        if end > time:
            raise where.error("evidence", f"ends at {end:g}, after the question time {time:g}")
        evidence = (start, end)
    choices = _choices(record, where, required=False)
    task = _task(record, where, required=False) or video_task
    _check_duration(time, duration, "time", where)
    return _question(
        where,
        {},
        qid=f"{video_id}/{index}",
        video_id=video_id,
        question=question,
        answer=answer,
        time=time,
        choices=choices,
        evidence=evidence,
        task=task,
    )


def _check_duration(time: float, duration: float | None, key: str, where: _Where) -> None:
    if duration is not None and time > duration + _DURATION_SLACK:
        log.warning("%s: field %r: %g s is beyond the video's duration %g s", where, key, time, duration)


def _check_time_stamp(record: dict[str, Any], end: float, where: _Where) -> None:
    stamp = record.get("time_stamp")
    if not isinstance(stamp, str):
        return
    match = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)\s*", stamp)
    if match is None:
        return
    seconds = int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3])
    if abs(seconds - end) > 1.0:
        log.warning("%s: field 'time_stamp': %r disagrees with end_time %g s", where, stamp, end)


def _load_videos(data: list[Any], file: str, mode: str) -> list[VideoItem]:
    """Parse a list of video records; ``mode`` is ``rvs``, ``streamingbench``, ``ovo`` or ``generic``."""
    videos: list[VideoItem] = []
    seen: dict[str, int] = {}
    for v, raw in enumerate(data):
        where = _Where(file).at_video(v)
        record = _as_object(raw, where, "a video record")
        video_id = _video_id(record, where)
        where.video_id = video_id
        if video_id in seen:
            raise where.error("video_id", f"duplicate of video {seen[video_id]}")
        seen[video_id] = v

        shape, path_key = mode, "video_path"
        if mode == "generic":
            # The generic format's own shape, or the RVS shape (a record with ``conversations``).
            shape = "generic" if "questions" in record or "conversations" not in record else "lenient"
            if shape == "generic":
                _check_keys(record, _GENERIC_VIDEO_KEYS, where)
            preferred, alias = ("video", "video_path") if shape == "generic" else ("video_path", "video")
            path_key = alias if alias in record and preferred not in record else preferred
        path = _nonempty_string(record, path_key, where)
        duration = _time_field(record, "duration", where, required=False)
        video_task = _task(record, where, required=False) if shape != "rvs" else None

        list_key = "questions" if shape == "generic" else "conversations"
        items = _get(record, list_key, where)
        if not isinstance(items, list):
            raise where.error(list_key, f"expected a list, got {_type_name(items)}")
        if not items:
            raise where.error(list_key, "empty list (a video needs at least one question)")
        label = "question" if shape == "generic" else "conversation"
        questions = []
        for q, item in enumerate(items):
            at = where.at_item(q, label)
            item = _as_object(item, at, f"a {label}")
            if shape == "generic":
                questions.append(
                    _generic_question(item, at, video_id=video_id, index=q, duration=duration, video_task=video_task)
                )
            else:
                questions.append(
                    _conversation(
                        item, at, video_id=video_id, index=q, mode=shape, duration=duration, video_task=video_task
                    )
                )
        questions.sort(key=lambda question: question.time)  # stable: ties keep file order
        try:
            videos.append(VideoItem(video_id=video_id, path=path, duration=duration, questions=questions))
        except ValidationError as exc:
            raise _from_validation_error(exc, where, {"path": path_key}) from None
    return videos


_Loader = Callable[[list[Any], str], list[VideoItem]]
_LOADERS: dict[str, _Loader] = {
    "rvs-ego": lambda data, file: _load_videos(data, file, "rvs"),
    "rvs-movie": lambda data, file: _load_videos(data, file, "rvs"),
    "streamingbench-rt": lambda data, file: _load_videos(data, file, "streamingbench"),
    "ovo-bench": lambda data, file: _load_videos(data, file, "ovo"),
    "generic": lambda data, file: _load_videos(data, file, "generic"),
}


def available_benchmarks() -> list[str]:
    """The names :func:`load_benchmark` accepts, sorted."""
    return sorted(_LOADERS)


def load_benchmark(name: str, annotation_file: str | Path) -> list[VideoItem]:
    """Load the benchmark ``name`` from ``annotation_file``, videos in file order.

    Raises ``ValueError`` for an unknown ``name`` (listing the available ones) and
    :class:`AnnotationError` for a missing, malformed or empty file.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(available_benchmarks())}")
    path = Path(annotation_file)
    data = _read_json(path)
    if not data:
        raise AnnotationError(f"{path}: no videos (the top-level list is empty)")
    return loader(data, str(path))


# --------------------------------------------------------------------------------------------
# Resolving videos against a local root
# --------------------------------------------------------------------------------------------


def _split_path(path: str) -> list[str]:
    """Components of a path written on any system (``/`` or ``\\`` separators)."""
    return [part for part in re.split(r"[\\/]+", path) if part]


def _index_root(root: Path) -> dict[str, list[Path]]:
    """Every file under ``root`` by file name (one walk, symbolic links followed once)."""
    index: dict[str, list[Path]] = {}
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames.sort()
        for filename in sorted(filenames):
            index.setdefault(filename, []).append(Path(dirpath) / filename)
    return index


def _pick(video: VideoItem, candidates: list[Path], root: Path) -> Path:
    """The candidate whose folders agree with the most trailing folders of the annotation path."""
    if len(candidates) == 1:
        return candidates[0]
    wanted = _split_path(video.path)[:-1]

    def agreement(candidate: Path) -> int:
        folders = candidate.relative_to(root).parts[:-1]
        n = 0
        while n < min(len(folders), len(wanted)) and folders[-1 - n] == wanted[-1 - n]:
            n += 1
        return n

    scores = [agreement(candidate) for candidate in candidates]
    best = max(scores)
    winners = [candidate for candidate, score in zip(candidates, scores, strict=True) if score == best]
    if len(winners) > 1:
        listed = ", ".join(str(winner) for winner in winners)
        raise VideoError(f"video {video.video_id!r} ({video.path}): several files under {root} match: {listed}")
    return winners[0]


def resolve_videos(videos: list[VideoItem], root: str | Path) -> tuple[dict[str, Path], list[VideoItem]]:
    """Map each video to a file under ``root`` by file name.

    The root is walked once. A video matches the exact file name of its annotation path, or else
    a file with the same stem and an extension from :data:`VIDEO_EXTENSIONS` (first in that
    order). Several matches are told apart by their parent folders (see the module docstring).

    Returns the found paths by ``video_id`` and the videos with no file, both in input order.
    Raises :class:`~mukv.errors.VideoError` if ``root`` is not a directory or a match is
    ambiguous.
    """
    root = Path(root)
    if not root.is_dir():
        raise VideoError(f"{root}: video root is not a directory")
    by_name = _index_root(root)
    by_stem: dict[tuple[str, str], list[Path]] = {}
    for name, paths in by_name.items():
        stem, dot, suffix = name.rpartition(".")
        if dot and stem:
            by_stem.setdefault((stem, f".{suffix.lower()}"), []).extend(paths)

    found: dict[str, Path] = {}
    missing: list[VideoItem] = []
    for video in videos:
        parts = _split_path(video.path)
        name = parts[-1] if parts else ""
        candidates = by_name.get(name, []) if name else []
        if not candidates and name:
            stem = name.rpartition(".")[0] or name
            for extension in VIDEO_EXTENSIONS:
                candidates = by_stem.get((stem, extension), [])
                if candidates:
                    break
        if candidates:
            found[video.video_id] = _pick(video, sorted(candidates), root)
        else:
            missing.append(video)
    return found, missing
