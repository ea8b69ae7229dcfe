"""The OpenAI-compatible ``/v1/chat/completions``: a chat request becomes a question about a stream.

The last user message is the question; earlier messages and system prompts are not used (each
answer comes from the stream's memory and the model's own prompt). The stream is named by a
top-level ``stream_id`` (the ``openai`` client sends it with ``extra_body={"stream_id": ...}``),
and ``at`` may set the question time the same way. Decoding is greedy: sampling options
(``temperature``, ``top_p``, ...) are accepted and have no effect.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from mukv.engine import DoneEvent, TokenEvent
from mukv.engine.events import Answer
from mukv.serve.answers import AnswerRun
from mukv.serve.errors import ApiError, from_exception


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat request this server reads (others are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_id: str | None = None
    at: float | None = Field(default=None, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = None
    stream_options: dict[str, Any] | None = None


def stream_id_of(body: ChatRequest) -> str:
    if not body.stream_id:
        raise ApiError(
            422,
            "invalid_request",
            "stream_id: name the video stream to ask about (openai client: extra_body={'stream_id': ...})",
            field="stream_id",
        )
    return body.stream_id


def max_tokens_field(body: ChatRequest) -> str:
    return "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"


def question_of(body: ChatRequest) -> tuple[str, int | None]:
    """The question (the last user message's text) and the answer length limit."""
    if body.n not in (None, 1):
        raise ApiError(422, "invalid_request", f"n: one answer per request, got {body.n}", field="n")
    for index in range(len(body.messages) - 1, -1, -1):
        message = body.messages[index]
        if message.role != "user":
            continue
        where = f"messages.{index}.content"
        if isinstance(message.content, str):
            return message.content, body.max_completion_tokens or body.max_tokens
        texts = []
        for part in message.content or []:
            if part.get("type") != "text":
                raise ApiError(
                    422,
                    "invalid_request",
                    f"{where}: only text parts; frames go to POST /v1/streams/{{id}}/frames",
                    field=where,
                )
            texts.append(str(part.get("text", "")))
        return "\n".join(texts), body.max_completion_tokens or body.max_tokens
    raise ApiError(422, "invalid_request", "messages: no user message to answer", field="messages")


def wants_usage(body: ChatRequest) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


@dataclass
class Completion:
    """The id, time and model every chunk or response of one completion carries."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }


def _finish_reason(answer: Answer) -> str:
    return "stop" if answer.stop_reason == "eos" else "length"


def _usage(answer: Answer) -> dict[str, int]:
    """Token counts: the prompt is the answering cache (frames, system prompt) plus the question."""
    prompt = answer.context_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": answer.generated_tokens,
        "total_tokens": prompt + answer.generated_tokens,
    }


async def stream_chunks(
    run: AnswerRun, first: TokenEvent | DoneEvent, completion: Completion, *, include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    """``chat.completion.chunk`` events, then ``[DONE]``; leaving early cancels the answer."""
    try:
        yield {"data": json.dumps(completion.chunk({"role": "assistant", "content": ""}))}
        event = first
        while isinstance(event, TokenEvent):
            if event.text:
                yield {"data": json.dumps(completion.chunk({"content": event.text}))}
            try:
                event = await run.next()
            except Exception as exc:
                yield {"data": json.dumps(from_exception(exc).body())}
                return
        answer = event.answer
        yield {"data": json.dumps(completion.chunk({}, _finish_reason(answer)))}
        if include_usage:
            yield {"data": json.dumps({**completion.chunk({}), "choices": [], "usage": _usage(answer)})}
        yield {"data": "[DONE]"}
    finally:
        run.cancel()


async def collect(run: AnswerRun, first: TokenEvent | DoneEvent, completion: Completion, request: Request) -> dict:
    """The whole ``chat.completion``; an answer whose client went away is cancelled between tokens."""
    try:
        event = first
        while not isinstance(event, DoneEvent):
            if await request.is_disconnected():
                raise ApiError(499, "client_closed", "the client closed the connection")
            try:
                event = await run.next()
            except Exception as exc:
                raise from_exception(exc) from None
    finally:
        run.cancel()
    answer = event.answer
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": _finish_reason(answer),
            }
        ],
        "usage": _usage(answer),
        "mukv": {
            "time": answer.time,
            "frames_seen": answer.frames_seen,
            "retrieved": [block.to_dict() for block in answer.retrieved],
            "timings": answer.timings.to_dict(),
        },
    }
