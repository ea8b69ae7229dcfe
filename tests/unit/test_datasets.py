"""Benchmark loaders on the real annotation files and hand-written ones, malformed-file messages,
and the video-root resolver."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mukv.errors import MukvError, VideoError
from mukv.eval.datasets import AnnotationError, _show, available_benchmarks, load_benchmark, resolve_videos
from mukv.eval.schema import VideoItem
from tests.conftest import ANNOTATIONS, REQUIRE_SHARED

RVS_EGO = ANNOTATIONS / "rvs_ego.json"
STREAMINGBENCH = ANNOTATIONS / "streamingbench_realtime.json"
# Skipped without the shared annotations, except where they are required (CI): there these fail.
needs_annotations = pytest.mark.skipif(
    not ANNOTATIONS.is_dir() and not REQUIRE_SHARED, reason=f"shared annotations not found at {ANNOTATIONS}"
)


def write(tmp_path: Path, data: Any, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def check_order_and_ids(videos: list[VideoItem], raw: list[dict[str, Any]], list_key: str = "conversations") -> None:
    """Questions sorted by time, ties in file order; qids ``video_id/index`` point at the raw record."""
    qids = [q.qid for v in videos for q in v.questions]
    assert len(qids) == len(set(qids))
    for video, record in zip(videos, raw, strict=True):
        assert video.video_id == str(record["video_id"])
        indices = []
        for q in video.questions:
            prefix, _, index = q.qid.rpartition("/")
            assert prefix == video.video_id == q.video_id
            indices.append(int(index))
            assert record[list_key][int(index)]["question"] == q.question
        keys = [(q.time, i) for q, i in zip(video.questions, indices, strict=True)]
        assert keys == sorted(keys)
        assert sorted(indices) == list(range(len(record[list_key])))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_available_benchmarks() -> None:
    assert available_benchmarks() == ["generic", "ovo-bench", "rvs-ego", "rvs-movie", "streamingbench-rt"]


def test_unknown_benchmark_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'ovo'") as info:
        load_benchmark("ovo", tmp_path / "x.json")
    for name in available_benchmarks():
        assert name in str(info.value)


def test_missing_annotation_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "rvs_ego.json"
    with pytest.raises(AnnotationError, match="annotation file not found") as info:
        load_benchmark("rvs-ego", path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, MukvError)


# --------------------------------------------------------------------------------------------
# Real annotation files
# --------------------------------------------------------------------------------------------


@needs_annotations
def test_rvs_ego_real_file() -> None:
    videos = load_benchmark("rvs-ego", RVS_EGO)
    raw = json.loads(RVS_EGO.read_text())
    assert len(videos) == 10
    assert sum(len(v.questions) for v in videos) == 1465
    check_order_and_ids(videos, raw)
    for video, record in zip(videos, raw, strict=True):
        assert video.path == record["video_path"]
        assert video.duration == pytest.approx(record["duration"])
        for q in video.questions:
            conv = record["conversations"][int(q.qid.rpartition("/")[2])]
            assert q.kind == "open" and q.choices is None and q.task is None
            assert q.time == conv["end_time"]
            assert q.evidence == (conv["start_time"], conv["end_time"])
            assert q.answer == conv["answer"]


@needs_annotations
def test_streamingbench_real_file(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mukv.eval.datasets"):
        videos = load_benchmark("streamingbench-rt", STREAMINGBENCH)
    raw = json.loads(STREAMINGBENCH.read_text())
    questions = [q for v in videos for q in v.questions]
    assert len(videos) == 498
    assert len(questions) == 2495
    check_order_and_ids(videos, raw)
    for q in questions:
        assert q.kind == "choice" and q.evidence is None and q.task
        assert q.answer_letter in {"A", "B", "C", "D"}
        assert q.choices is not None and q.choices[ord(q.answer_letter) - ord("A")] == q.answer
    tasks = Counter(q.task for q in questions)
    assert len(tasks) == 10
    assert sum(tasks.values()) == len(questions)
    assert tasks["Object Recognition"] == 367
    # One record repeats an option (video_id 182, conversation 4): logged, not rejected.
    assert "video_id '182'), conversation 4: field 'choices': repeated option" in caplog.text


# --------------------------------------------------------------------------------------------
# Hand-written files
# --------------------------------------------------------------------------------------------


def test_rvs_movie_tolerates_extra_fields_and_npy(tmp_path: Path) -> None:
    data = [
        {
            "video_id": "tt0120338",
            "video_path": "/mnt/movienet/frames/tt0120338.npy",
            "duration": 1800,
            "fps": 1,
            "genre": ["drama"],
            "conversations": [
                {"question": "Who boards?", "answer": "Rose.", "start_time": 60, "end_time": 600, "type": "who"},
                {"question": "Where?", "answer": "A ship.", "start_time": 0, "end_time": 300, "clip": 3},
                {"question": "Why?", "answer": "To travel.", "start_time": 100, "end_time": 300},
            ],
        },
        {
            "video_id": 7,
            "video_path": "C:\\movies\\seven.npy",
            "conversations": [{"question": "What?", "answer": "Rain.", "start_time": 5, "end_time": 5.5}],
        },
    ]
    videos = load_benchmark("rvs-movie", write(tmp_path, data, "rvs_movie.json"))
    first, second = videos
    assert first.path.endswith(".npy") and first.duration == 1800
    assert [q.qid for q in first.questions] == ["tt0120338/1", "tt0120338/2", "tt0120338/0"]
    assert [q.evidence for q in first.questions] == [(0, 300), (100, 300), (60, 600)]
    assert second.video_id == "7" and second.duration is None
    assert second.questions[0].qid == "7/0" and second.questions[0].time == 5.5


def test_generic_format(tmp_path: Path) -> None:
    data = [
        {
            "video_id": "kitchen-01",
            "video": "videos/kitchen-01.mp4",
            "duration": 900.0,
            "questions": [
                {"question": "What did I cut?", "answer": "An onion.", "time": 300, "choices": ["Bread.", "An onion."]},
                {"question": "What is on the table?", "answer": "A red mug.", "time": 120, "evidence": [60, 120]},
                {"question": "Same time?", "answer": "Yes.", "time": 300, "task": "misc"},
            ],
        },
        {  # the RVS shape is accepted too, with optional start_time, choices and task
            "video_id": "walk",
            "video_path": "/data/walk.mp4",
            "conversations": [
                {"question": "Q1?", "answer": "A1.", "end_time": 30, "extra": 1},
                {"question": "Q2?", "answer": "B", "choices": ["A", "B"], "start_time": 5, "end_time": 20, "task": "t"},
            ],
        },
    ]
    kitchen, walk = load_benchmark("generic", write(tmp_path, data))
    assert [q.qid for q in kitchen.questions] == ["kitchen-01/1", "kitchen-01/0", "kitchen-01/2"]
    mug, cut, same = kitchen.questions
    assert mug.evidence == (60, 120) and mug.kind == "open" and mug.choices is None
    assert cut.kind == "choice" and cut.answer_letter == "B" and cut.evidence is None
    assert same.task == "misc"
    assert kitchen.path == "videos/kitchen-01.mp4"
    assert [q.qid for q in walk.questions] == ["walk/1", "walk/0"]
    assert walk.questions[0].evidence == (5, 20) and walk.questions[0].answer_letter == "B"
    assert walk.questions[1].evidence is None and walk.questions[1].time == 30


def test_streamingbench_task_on_the_video_record(tmp_path: Path) -> None:
    conv = {"question": "What now?", "answer": "A map.", "choices": ["A map.", "A compass."], "end_time": 6.0}
    data = [
        {"video_id": "a", "video_path": "/x/a.mp4", "task": "Object Recognition", "conversations": [conv]},
        {
            "video_id": "b",
            "video_path": "/x/b.mp4",
            "task": "Counting",
            "conversations": [dict(conv, end_time=9.0, task="Text Recognition"), dict(conv, task=None)],
        },
    ]
    a, b = load_benchmark("streamingbench-rt", write(tmp_path, data))
    assert [q.task for q in a.questions] == ["Object Recognition"]
    assert [(q.qid, q.task) for q in b.questions] == [("b/1", "Counting"), ("b/0", "Text Recognition")]
    assert all(q.kind == "choice" and q.evidence is None for q in [*a.questions, *b.questions])


def test_generic_task_on_the_video_record(tmp_path: Path) -> None:
    data = [
        {
            "video_id": "own",
            "video": "own.mp4",
            "task": "Counting",
            "questions": [
                {"question": "How many?", "answer": "Two.", "time": 5},
                {"question": "Which?", "answer": "Left.", "time": 9, "task": "Direction"},
            ],
        },
        {  # the RVS shape, as ReKV-style multiple-choice files are laid out
            "video_id": "rekv",
            "video_path": "/data/rekv.mp4",
            "task": "EPM",
            "conversations": [
                {"question": "Q1?", "answer": "B", "choices": ["A", "B"], "end_time": 20},
                {"question": "Q2?", "answer": "A", "choices": ["A", "B"], "end_time": 30, "task": "ASI"},
            ],
        },
        {"video_id": "none", "video": "none.mp4", "questions": [{"question": "Q?", "answer": "A.", "time": 1}]},
    ]
    own, rekv, none = load_benchmark("generic", write(tmp_path, data))
    assert [q.task for q in own.questions] == ["Counting", "Direction"]
    assert [q.task for q in rekv.questions] == ["EPM", "ASI"]
    assert [q.answer_letter for q in rekv.questions] == ["B", "A"]
    assert none.questions[0].task is None


@pytest.mark.parametrize("benchmark", ["rvs-ego", "rvs-movie"])
def test_rvs_ignores_a_task(tmp_path: Path, benchmark: str) -> None:
    data = rvs()
    data[0]["task"] = 3
    data[1]["conversations"][0]["task"] = "t"
    videos = load_benchmark(benchmark, write(tmp_path, data))
    assert all(q.task is None for v in videos for q in v.questions)


def test_malformed_task_on_the_video_record(tmp_path: Path) -> None:
    data = sb(task=None)
    data[1]["task"] = ""
    path = write(tmp_path, data, "sb.json")
    with pytest.raises(AnnotationError) as info:
        load_benchmark("streamingbench-rt", path)
    assert str(info.value) == f"{path}: video 1 (video_id 'b'): field 'task': must not be empty"
    data[1]["task"] = 7
    with pytest.raises(AnnotationError, match=r"video 1 \(video_id 'b'\): field 'task': expected a string"):
        load_benchmark("generic", write(tmp_path, data, "sb.json"))


def test_time_beyond_duration_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = [
        {
            "video_id": "a",
            "video": "a.mp4",
            "duration": 10,
            "questions": [{"question": "Q?", "answer": "A", "time": 12}],
        }
    ]
    with caplog.at_level(logging.WARNING, logger="mukv.eval.datasets"):
        (video,) = load_benchmark("generic", write(tmp_path, data))
    assert video.questions[0].time == 12
    assert "video 0 (video_id 'a'), question 0: field 'time': 12 s is beyond the video's duration 10 s" in caplog.text


# --------------------------------------------------------------------------------------------
# Malformed files
# --------------------------------------------------------------------------------------------


def edited(record: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``changes`` applied in place (a ``None`` value deletes the key)."""
    for key, value in changes.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    return record


def rvs(**conv_changes: Any) -> list[dict[str, Any]]:
    """Two RVS videos; ``conv_changes`` edits conversation 1 of the second (``None`` deletes)."""
    conv = {"question": "What?", "answer": "That.", "start_time": 0, "end_time": 300}
    second = [dict(conv), edited(dict(conv, end_time=600), conv_changes)]
    return [
        {"video_id": "a", "video_path": "/x/a.mp4", "duration": 900, "conversations": [dict(conv)]},
        {"video_id": "b", "video_path": "/x/b.mp4", "duration": 900, "conversations": second},
    ]


def sb(**conv_changes: Any) -> list[dict[str, Any]]:
    """One StreamingBench video ``b`` (at index 1 after a clean one) with conversation 1 edited."""
    conv = {"question": "What now?", "answer": "A map.", "choices": ["A map.", "A compass."], "end_time": 6.0}
    conv["task"] = "Object Recognition"
    data = rvs()
    for video in data:
        video["conversations"] = [dict(conv), dict(conv, end_time=9.0)]
    for key, value in conv_changes.items():
        if value is None:
            del data[1]["conversations"][1][key]
        else:
            data[1]["conversations"][1][key] = value
    return data


RECORD = "video 1 (video_id 'b'), conversation 1"

MALFORMED = [
    # (benchmark, data, expected message fragments after the file name)
    ("rvs-ego", rvs(end_time=None), [RECORD, "field 'end_time': missing"]),
    ("rvs-ego", rvs(start_time=None), [RECORD, "field 'start_time': missing"]),
    ("rvs-ego", rvs(question=None), [RECORD, "field 'question': missing"]),
    ("rvs-ego", rvs(end_time="600"), [RECORD, "field 'end_time': expected a number", '"600"']),
    ("rvs-ego", rvs(end_time=True), [RECORD, "field 'end_time': expected a number"]),
    ("rvs-ego", rvs(answer=42), [RECORD, "field 'answer': expected a string, got number 42"]),
    ("rvs-ego", rvs(question="   "), [RECORD, "field 'question': must not be empty"]),
    ("rvs-ego", rvs(answer=""), [RECORD, "field 'answer': must not be empty"]),
    ("rvs-ego", rvs(start_time=-1), [RECORD, "field 'start_time': must be >= 0, got -1"]),
    ("rvs-ego", rvs(end_time=-5.0), [RECORD, "field 'end_time': must be >= 0"]),
    ("rvs-ego", rvs(start_time=700), [RECORD, "field 'start_time': 700 is after end_time 600"]),
    ("streamingbench-rt", sb(answer="A globe."), [RECORD, "field 'answer':", "'A globe.' is not one of the choices"]),
    ("streamingbench-rt", sb(choices=None), [RECORD, "field 'choices': missing"]),
    ("streamingbench-rt", sb(choices="A map."), [RECORD, "field 'choices': expected a list"]),
    ("streamingbench-rt", sb(choices=["A map.", 3]), [RECORD, "field 'choices[1]': expected a string"]),
    ("streamingbench-rt", sb(choices=["A map."]), [RECORD, "field 'choices': choices: need at least 2 options"]),
    ("streamingbench-rt", sb(task=None), [RECORD, "field 'task': missing"]),
    ("streamingbench-rt", sb(end_time=float("nan")), [RECORD, "field 'end_time': must be finite"]),
]


@pytest.mark.parametrize(("benchmark", "data", "fragments"), MALFORMED)
def test_malformed_record_names_file_record_and_field(
    tmp_path: Path, benchmark: str, data: Any, fragments: list[str]
) -> None:
    path = write(tmp_path, data, "bench.json")
    with pytest.raises(AnnotationError) as info:
        load_benchmark(benchmark, path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
        ({"videos": []}, "top level must be a JSON list of videos, got object"),
        (["x"], "video 0: a video record must be a JSON object, got string"),
        ([{"video_path": "/a.mp4", "conversations": []}], "video 0: field 'video_id': missing"),
        ([{"video_id": 1.5, "video_path": "/a.mp4"}], "video 0: field 'video_id': expected a string or an integer"),
        ([{"video_id": True, "video_path": "/a.mp4"}], "video 0: field 'video_id': expected a string or an integer"),
        ([{"video_id": "a", "conversations": []}], "video 0 (video_id 'a'): field 'video_path': missing"),
        (
            [{"video_id": "a", "video_path": "/a.mp4", "duration": "1h", "conversations": []}],
            "video 0 (video_id 'a'): field 'duration': expected a number",
        ),
        ([{"video_id": "a", "video_path": "/a.mp4"}], "video 0 (video_id 'a'): field 'conversations': missing"),
        (
            [{"video_id": "a", "video_path": "/a.mp4", "conversations": {}}],
            "video 0 (video_id 'a'): field 'conversations': expected a list, got object",
        ),
        (
            [{"video_id": "a", "video_path": "/a.mp4", "conversations": []}],
            "video 0 (video_id 'a'): field 'conversations': empty list",
        ),
        (
            [{"video_id": "a", "video_path": "/a.mp4", "conversations": [[1]]}],
            "video 0 (video_id 'a'), conversation 0: a conversation must be a JSON object, got list",
        ),
        (
            [*rvs(), {"video_id": "a", "video_path": "/c.mp4", "conversations": []}],
            "video 2 (video_id 'a'): field 'video_id': duplicate of video 0",
        ),
    ],
)
def test_malformed_file_or_video(tmp_path: Path, data: Any, expected: str) -> None:
    path = write(tmp_path, data, "rvs_ego.json")
    with pytest.raises(AnnotationError) as info:
        load_benchmark("rvs-ego", path)
    assert str(info.value).startswith(f"{path}: {expected}")


def test_deeply_nested_json_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[" * 100_000 + "]" * 100_000, "deep.json")
    with pytest.raises(AnnotationError) as info:
        load_benchmark("generic", path)
    assert str(info.value) == f"{path}: JSON nested too deeply to read"


def test_deeply_nested_value_in_a_message_is_shown_briefly() -> None:
    value: list[Any] = []
    for _ in range(sys.getrecursionlimit() + 10):
        value = [value]
    assert _show(value) == "<list nested too deeply to show>"


@pytest.mark.parametrize("benchmark", available_benchmarks())
def test_empty_video_list_names_the_file(tmp_path: Path, benchmark: str) -> None:
    path = write(tmp_path, [], "empty.json")
    with pytest.raises(AnnotationError) as info:
        load_benchmark(benchmark, path)
    assert str(info.value).startswith(f"{path}: no videos")


def test_integer_and_string_ids_collide(tmp_path: Path) -> None:
    data = sb()
    data[0]["video_id"], data[1]["video_id"] = 5, "5"
    with pytest.raises(AnnotationError, match=r"video 1 \(video_id '5'\): field 'video_id': duplicate of video 0"):
        load_benchmark("streamingbench-rt", write(tmp_path, data))


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ({"question": "Q?", "answer": "A", "time": 5, "evidance": [0, 5]}, "field 'evidance': unknown field"),
        ({"question": "Q?", "answer": "A"}, "field 'time': missing"),
        ({"question": "Q?", "answer": "A", "time": 5, "evidence": [0]}, "field 'evidence': expected [start, end]"),
        ({"question": "Q?", "answer": "A", "time": 5, "evidence": [0, -1]}, "field 'evidence[1]': must be >= 0"),
        ({"question": "Q?", "answer": "A", "time": 5, "evidence": [4, 2]}, "field 'evidence': start 4 is after end 2"),
        ({"question": "Q?", "answer": "A", "time": 5, "evidence": [0, 9]}, "field 'evidence': ends at 9, after"),
        ({"question": "Q?", "answer": "A", "time": 5, "choices": ["B", "C"]}, "field 'answer': answer 'A' is not"),
        ({"question": "", "answer": "A", "time": 5}, "field 'question': must not be empty"),
        ({"question": "Q?", "answer": "A", "time": 5, "task": ""}, "field 'task': must not be empty"),
    ],
)
def test_malformed_generic_question(tmp_path: Path, question: dict[str, Any], expected: str) -> None:
    ok = {"question": "Fine?", "answer": "Yes.", "time": 1}
    data = [{"video_id": "v", "video": "v.mp4", "questions": [ok, question]}]
    path = write(tmp_path, data, "mine.json")
    with pytest.raises(AnnotationError) as info:
        load_benchmark("generic", path)
    assert str(info.value).startswith(f"{path}: video 0 (video_id 'v'), question 1: {expected}")


def test_malformed_generic_video(tmp_path: Path) -> None:
    data = [{"video_id": "v", "video": "v.mp4", "duraton": 3, "questions": []}]
    with pytest.raises(AnnotationError, match=r"mine.json: video 0 \(video_id 'v'\): field 'duraton': unknown field"):
        load_benchmark("generic", write(tmp_path, data, "mine.json"))
    data = [{"video_id": "v", "questions": [{"question": "Q?", "answer": "A", "time": 1}]}]
    with pytest.raises(AnnotationError, match=r"video 0 \(video_id 'v'\): field 'video': missing"):
        load_benchmark("generic", write(tmp_path, data, "mine.json"))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"video_id": "\xff"}]')
    with pytest.raises(AnnotationError, match=r"bad\.json: not UTF-8 text"):
        load_benchmark("generic", path)


# --------------------------------------------------------------------------------------------
# Resolving videos
# --------------------------------------------------------------------------------------------


def video(video_id: str, path: str) -> VideoItem:
    return VideoItem(video_id=video_id, path=path, questions=[])


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_resolve_videos(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    flat = touch(root / "a.mp4")
    nested = touch(root / "ego" / "part2" / "b.mp4")
    npy = touch(root / "movie" / "c.npy")
    upper = touch(root / "d.MKV")
    in_movie = touch(root / "movie" / "e.mp4")
    touch(root / "other" / "e.mp4")
    touch(root / "notes" / "a.txt")
    items = [
        video("a", "/data/authors/a.mp4"),
        video("b", "C:\\datasets\\ego\\b.mp4"),
        video("c", "/mnt/movienet/c.mp4"),  # only the .npy sibling exists
        video("d", "/x/d.mp4"),  # only d.MKV exists
        video("e", "/srv/movie/e.mp4"),  # two e.mp4: the one under movie/ wins
        video("f", "/data/f.mp4"),
        video("g", "/data/"),
    ]
    found, missing = resolve_videos(items, root)
    assert found == {"a": flat, "b": nested, "c": npy, "d": upper, "e": in_movie}
    assert [v.video_id for v in missing] == ["f", "g"]
    assert list(found) == ["a", "b", "c", "d", "e"]


def test_resolve_videos_prefers_the_exact_name(tmp_path: Path) -> None:
    exact = touch(tmp_path / "deep" / "x.mp4")
    touch(tmp_path / "x.npy")
    touch(tmp_path / "x.mkv")
    found, missing = resolve_videos([video("x", "/a/x.mp4"), video("y", "/a/x.webm")], tmp_path)
    assert found == {"x": exact, "y": tmp_path / "deep" / "x.mp4"}
    assert missing == []


def test_resolve_videos_ambiguous_or_bad_root(tmp_path: Path) -> None:
    touch(tmp_path / "one" / "x.mp4")
    touch(tmp_path / "two" / "x.mp4")
    with pytest.raises(VideoError, match="several files under"):
        resolve_videos([video("x", "/data/x.mp4")], tmp_path)
    with pytest.raises(VideoError, match="video root is not a directory"):
        resolve_videos([video("x", "/data/x.mp4")], tmp_path / "absent")


def test_resolve_videos_follows_links_without_looping(tmp_path: Path) -> None:
    store = tmp_path / "store"
    target = touch(store / "clip.mp4")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(store, target_is_directory=True)
    (store / "loop").symlink_to(root, target_is_directory=True)
    found, missing = resolve_videos([video("clip", "/x/clip.mp4")], root)
    assert found["clip"].resolve() == target.resolve()
    assert missing == []
