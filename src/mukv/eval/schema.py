"""Typed records shared by datasets, the runner, judges and reports.

A benchmark is a list of :class:`VideoItem`, each with its :class:`Question` records. The runner
writes one :class:`Prediction` per question to an append-only JSONL file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

QuestionKind = Literal["open", "choice"]


class Question(BaseModel):
    """One question about a video, asked at ``time`` seconds (the annotation's ``end_time``).

    ``evidence`` is the annotated window ``[start, end]`` in seconds when the benchmark has one
    (RVS: ``[start_time, end_time]``). For multiple choice, ``choices`` holds the options and
    ``answer`` the text of the right one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    qid: str
    video_id: str
    question: str
    answer: str
    time: float = Field(ge=0)
    choices: list[str] | None = None
    evidence: tuple[float, float] | None = None
    task: str | None = None

    @field_validator("question")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> Question:
        if self.choices is not None:
            if len(self.choices) < 2:
                raise ValueError("choices: need at least 2 options")
            if self.answer not in self.choices:
                raise ValueError(f"answer {self.answer!r} is not one of the choices")
        if self.evidence is not None and self.evidence[0] > self.evidence[1]:
            raise ValueError(f"evidence: start {self.evidence[0]} is after end {self.evidence[1]}")
        return self

    @property
    def kind(self) -> QuestionKind:
        return "open" if self.choices is None else "choice"

    @property
    def answer_letter(self) -> str | None:
        """The right option's letter (A, B, ...) for multiple choice."""
        if self.choices is None:
            return None
        return chr(ord("A") + self.choices.index(self.answer))


class VideoItem(BaseModel):
    """A video of a benchmark: ``path`` as written in the annotations (often another machine's
    disk; the runner resolves it against a video root by file name)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    video_id: str
    path: str
    duration: float | None = None
    questions: list[Question]


class Prediction(BaseModel):
    """One answered question, as written to ``predictions.jsonl``."""

    model_config = ConfigDict(extra="allow")

    qid: str
    video_id: str
    question: str
    answer: str
    choices: list[str] | None = None
    task: str | None = None
    evidence: tuple[float, float] | None = None
    prediction: str
    method: str
    time: float
    frames_seen: int
    encode_seconds: float
    vision_seconds: float
    memory_seconds: float
    prepare_seconds: float
    first_token_seconds: float
    total_seconds: float
    context_tokens: int
    generated_tokens: int
    stop_reason: str
    retrieved: list[dict[str, Any]]
    memory: dict[str, Any]
    peak_rss_bytes: int
    peak_accelerator_bytes: int | None = None
    # Seconds between sampled frames: a frame stands for the interval until the next sample.
    sample_period: float | None = None
    # Frames encoded since the previous question in this process (re-encoding after a resume included).
    frames_encoded: int | None = None
    # Asked after the video's last decoded frame (``video_end``, seconds): answered from frames up to then.
    past_end: bool | None = None
    video_end: float | None = None
