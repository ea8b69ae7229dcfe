"""Typed results of answering: decoding yields :class:`TokenEvent` then one :class:`DoneEvent`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mukv.memory.base import MemoryStats, RetrievedBlock


@dataclass(frozen=True)
class Timings:
    """Seconds spent. Since the previous question: ``vision`` (vision tower, projector, pooling)
    and ``memory`` (the method's ingest work, e.g. prefilling visual KV); ``encode`` is their sum.
    For this question: ``prepare`` (assembling the answering cache, including any fresh prefill),
    ``first_token`` (question asked -> first token, prepare included) and ``total`` (question
    asked -> answer done). ``stages`` splits ``prepare`` into the method's named parts (MuKV:
    ``eligible``, ``query``, ``rank``, ``assemble``; empty where a method names none). On CUDA the
    clock is read after synchronising the device."""

    vision: float
    memory: float
    prepare: float
    first_token: float
    total: float
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def encode(self) -> float:
        return self.vision + self.memory

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "encode": self.encode}


@dataclass(frozen=True)
class Answer:
    """One answered question.

    ``stop_reason`` is ``"eos"`` when the model ended the answer, ``"length"`` when
    ``max_new_tokens`` cut it. ``generated_tokens`` counts every decoded token, EOS included.
    ``frames_encoded`` counts the frames ingested since the previous question.
    ``first_logits`` (float32 ``[V]``, the distribution of the first answer token) is kept only
    when asked for, since it is as large as the vocabulary.
    """

    question: str
    choices: tuple[str, ...] | None
    text: str
    token_ids: tuple[int, ...]
    time: float
    frames_seen: int
    context_tokens: int
    timings: Timings
    retrieved: tuple[RetrievedBlock, ...]
    memory: MemoryStats
    method: str
    stop_reason: str
    generated_tokens: int
    frames_encoded: int = 0
    first_logits: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (without logits)."""
        return {
            "question": self.question,
            "choices": list(self.choices) if self.choices is not None else None,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "time": self.time,
            "frames_seen": self.frames_seen,
            "context_tokens": self.context_tokens,
            "timings": self.timings.to_dict(),
            "retrieved": [b.to_dict() for b in self.retrieved],
            "memory": self.memory.to_dict(),
            "method": self.method,
            "stop_reason": self.stop_reason,
            "generated_tokens": self.generated_tokens,
            "frames_encoded": self.frames_encoded,
        }


@dataclass(frozen=True)
class TokenEvent:
    """A generated token and the text it completes (``text`` may be empty while a multi-byte
    character is still incomplete)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class DoneEvent:
    """The end of an answer."""

    answer: Answer


Event = TokenEvent | DoneEvent
