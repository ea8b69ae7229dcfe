"""The ``ovo-bench`` loader: OVO-Bench real-time and backward tasks in the list-of-videos layout,
the task on the video record."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mukv.eval.datasets import AnnotationError, load_benchmark
from tests.unit.test_datasets import edited

CHOICES = ["A red mug.", "A blue cup.", "A glass.", "Nothing."]


def write(tmp_path: Path, data: Any, name: str = "ovo.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def ovo(**conv_changes: Any) -> list[dict[str, Any]]:
    """Two videos; ``conv_changes`` edits conversation 1 of the second (``None`` deletes)."""
    conv = {"question": "What is on the table?", "answer": "A glass.", "choices": list(CHOICES), "end_time": 30.0}
    second = [dict(conv), edited(dict(conv, end_time=60.0), conv_changes)]
    return [
        {"video_id": "a", "video_path": "/ovo/src/a.mp4", "task": "OCR", "conversations": [dict(conv)]},
        {"video_id": "b", "video_path": "/ovo/src/b.mp4", "task": "EPM", "conversations": second},
    ]


def test_ovo_bench_layout(tmp_path: Path) -> None:
    data = [
        {
            "video_id": 101,
            "video_path": "/data/ovo/chunks/101.mp4",
            "task": "EPM",
            "duration": 400,
            "source": "ego4d",  # extra fields are ignored, as in the RVS files
            "conversations": [
                {"question": "Where was the key?", "answer": "A blue cup.", "choices": CHOICES, "end_time": 300},
                {"question": "What did I hold?", "answer": "Nothing.", "choices": CHOICES, "end_time": 120, "id": 7},
                {
                    "question": "What is written?",
                    "answer": "A red mug.",
                    "choices": CHOICES,
                    "end_time": 120,
                    "task": "OCR",
                    "start_time": 100,  # no evidence window in this benchmark
                },
            ],
        },
        {
            "video_id": "rt-2",
            "video_path": "/data/ovo/chunks/rt-2.mp4",
            "task": "ACR",
            "conversations": [{"question": "What now?", "answer": "A glass.", "choices": CHOICES, "end_time": 5.5}],
        },
    ]
    first, second = load_benchmark("ovo-bench", write(tmp_path, data))
    assert first.video_id == "101" and first.path == "/data/ovo/chunks/101.mp4" and first.duration == 400
    assert [q.qid for q in first.questions] == ["101/1", "101/2", "101/0"]
    assert [q.time for q in first.questions] == [120, 120, 300]
    assert [q.task for q in first.questions] == ["EPM", "OCR", "EPM"]
    assert [q.answer_letter for q in first.questions] == ["D", "A", "B"]
    questions = [*first.questions, *second.questions]
    assert all(q.kind == "choice" and q.evidence is None and q.choices == CHOICES for q in questions)
    assert second.duration is None and second.questions[0].qid == "rt-2/0"
    assert Counter(q.task for q in questions) == {"EPM": 2, "OCR": 1, "ACR": 1}


@pytest.mark.parametrize(
    ("answer", "text"),
    [("A glass.", "A glass."), ("C", "A glass."), (2, "A glass."), ("A", "A red mug."), (0, "A red mug.")],
)
def test_ovo_bench_answer_as_text_letter_or_index(tmp_path: Path, answer: Any, text: str) -> None:
    _, b = load_benchmark("ovo-bench", write(tmp_path, ovo(answer=answer)))
    question = b.questions[1]
    assert question.answer == text and question.choices is not None
    assert question.choices[ord(question.answer_letter or "?") - ord("A")] == text


def test_ovo_bench_letter_that_is_also_the_same_choice(tmp_path: Path) -> None:
    # The options are themselves letters: "B" is both the text and the letter of option B.
    _, b = load_benchmark("ovo-bench", write(tmp_path, ovo(answer="B", choices=["A", "B", "C"])))
    assert b.questions[1].answer == "B" and b.questions[1].answer_letter == "B"
    # "E" is an option's text; there are only two options, so it cannot be a letter.
    _, b = load_benchmark("ovo-bench", write(tmp_path, ovo(answer="E", choices=["D", "E"])))
    assert b.questions[1].answer == "E" and b.questions[1].answer_letter == "B"


def test_ovo_bench_task_on_the_conversation_only(tmp_path: Path) -> None:
    data = ovo(task="STU")
    del data[1]["task"]
    data[1]["conversations"][0]["task"] = "FPD"
    _, b = load_benchmark("ovo-bench", write(tmp_path, data))
    assert [q.task for q in b.questions] == ["FPD", "STU"]


RECORD = "video 1 (video_id 'b'), conversation 1"


def no_task() -> list[dict[str, Any]]:
    """Video ``b`` without a task; only its conversation 0 has one."""
    data = ovo()
    del data[1]["task"]
    data[1]["conversations"][0]["task"] = "EPM"
    return data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (no_task(), f"{RECORD}: field 'task': missing (give it on the conversation or on the video record)"),
        (ovo(task=""), f"{RECORD}: field 'task': must not be empty"),
        (ovo(choices=None), f"{RECORD}: field 'choices': missing"),
        (ovo(choices=["A glass."]), f"{RECORD}: field 'choices': choices: need at least 2 options"),
        (ovo(end_time=None), f"{RECORD}: field 'end_time': missing"),
        (ovo(answer=None), f"{RECORD}: field 'answer': missing"),
        (ovo(answer=""), f"{RECORD}: field 'answer': must not be empty"),
        (ovo(answer=4), f"{RECORD}: field 'answer': index 4 is out of range for 4 choices"),
        (ovo(answer=-1), f"{RECORD}: field 'answer': index -1 is out of range for 4 choices"),
        (ovo(answer="E"), f"{RECORD}: field 'answer': option letter 'E' is out of range for 4 choices"),
        (ovo(answer=True), f"{RECORD}: field 'answer': expected a string or an integer, got boolean true"),
        (ovo(answer=2.0), f"{RECORD}: field 'answer': expected a string or an integer, got number 2.0"),
        (ovo(answer="a"), f"{RECORD}: field 'answer': answer 'a' is not one of the choices"),
        (ovo(answer="A mug."), f"{RECORD}: field 'answer': answer 'A mug.' is not one of the choices"),
        (
            ovo(answer="A", choices=["B", "A"]),
            f"{RECORD}: field 'answer': 'A' is ambiguous: it is a choice and the letter of another choice 'B'",
        ),
    ],
)
def test_ovo_bench_malformed(tmp_path: Path, data: Any, expected: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(AnnotationError) as info:
        load_benchmark("ovo-bench", path)
    assert str(info.value) == f"{path}: {expected}"


def test_ovo_bench_malformed_video_task(tmp_path: Path) -> None:
    data = ovo()
    data[1]["task"] = ["EPM"]
    path = write(tmp_path, data)
    with pytest.raises(AnnotationError) as info:
        load_benchmark("ovo-bench", path)
    assert str(info.value) == f"{path}: video 1 (video_id 'b'): field 'task': expected a string, got list [\"EPM\"]"
