"""The WebSocket of a stream, ``GET /v1/streams/{id}/ws``: frames and questions in, answer tokens out.

One connection carries what ``POST /v1/streams/{id}/frames`` and ``POST /v1/streams/{id}/questions``
do, for a page that films with the browser's webcam and asks as it goes.

**Connecting.** Offer the subprotocol ``mukv.v1``; the server accepts with it when offered. When the
server has a token, send it as ``Authorization: Bearer <token>`` or, from a browser (which cannot
set headers), as a second offered subprotocol ``bearer.<token>``::

    new WebSocket(url, ["mukv.v1", "bearer." + token])

A handshake is refused before it is accepted, answered with an HTTP error and the HTTP API's JSON
error body: 401 ``unauthorized`` without the right token, 503 ``model_loading`` (or
``model_load_failed``) while the model is not loaded, and, on a server without a token, 403
``origin_not_allowed`` for a browser page of another origin (an ``Origin`` header whose host and
port are not the ``Host`` the handshake was sent to: only the server's own page may connect, so
that no other site the user visits can reach a server on their loopback address). A server that
cannot answer a handshake with a response (no ASGI ``websocket.http.response`` extension) closes
it instead, with code 1008 (token, origin) or 1013 (loading). A browser tells a page neither: its
socket just closes (code 1006). For a stream id that does not exist the connection is accepted,
sent an ``error`` message (code ``stream_not_found``) and closed with code 1008 and a reason
naming the id.

**Client to server.**

- a *binary* message: one PNG or JPEG frame, timestamped by the stream's clock when it arrives (as
  a push without ``t``);
- ``{"type": "frame", "t": <seconds, optional>, "data": "<base64 PNG/JPEG>"}`` (``data`` may also
  be a ``data:image/...;base64,`` URL, as ``canvas.toDataURL()`` makes; ``t`` from 0 to
  :data:`~mukv.serve.app.MAX_FRAME_SECONDS`, after the stream's newest frame: a stream's frames
  are either all clock-stamped or all given their times, as a frame far ahead of the stream's
  clock leaves no time for clock-stamped frames after it);
- ``{"type": "question", "id": "<client id>", "question": "...", "choices": [...]?, "at": <seconds>?,
  "max_new_tokens": <int>?}``: up to :data:`MAX_QUESTIONS_IN_FLIGHT` may be in flight at once,
  each tagged by its own ``id`` (a string of at most :data:`MAX_ID_CHARS` characters);
- ``{"type": "cancel", "id": "<client id>"}``: stop that answer. Cancelling an id that is not in
  flight (its answer just ended) does nothing.

**Server to client** (JSON text messages).

- ``{"type": "ready", "stream": <the stream as GET /v1/streams/{id}>}`` once, first;
- ``{"type": "frames", "accepted": n, "timestamps": [...], "queued": q, "dropped": d}`` for each
  frame message taken (``dropped``: waiting frames this push pushed out of a full queue);
- ``{"type": "token", "id": <question id>, "text": ..., "token_id": ...}`` as the answer is made;
- ``{"type": "done", "id": <question id>, ...}``: the answer, with the fields of the SSE ``done``
  event (:func:`mukv.serve.answers.done_json`);
- ``{"type": "error", "id": <question id or null>, "ref"?: <id>, "error": {"code", "message",
  "field"?}}``: the codes and body of the HTTP errors; the connection stays open (a bad message, a
  frame that does not decode or is too large, a frame sent to a file or live stream
  (``not_a_push_stream``), a refused question). Every question ends with exactly one ``done`` or
  one ``error`` under its ``id``; a cancelled one with the error code ``cancelled``, one the server
  failed with ``internal_error``. So ``id`` is a question's only when the error ends it: a refused
  question message whose own id is valid and not in flight. The refusal of any other message that
  names an id (a question reusing the id of one in flight, a bad ``cancel``) has ``id`` null and
  the id in ``ref``; an id that is not a valid one (not a string of 1 to :data:`MAX_ID_CHARS`
  characters of valid Unicode) is not sent back at all;
- ``{"type": "stream", "stream": <the stream>}``: the stream's info every
  :data:`STREAM_INFO_SECONDS` while connected, so a page can draw its timeline without polling.
  When the stream is deleted, an ``error`` (``stream_not_found``) is sent and the connection closed
  (code 1000).

Messages are ASCII JSON (any other character escaped). Should the server fail to send one, it logs
why and closes the connection with code 1011.

**Limits.** A frame holds at most ``max_body_bytes`` bytes (a larger one is answered with the error
``body_too_large``) and ``max_frame_pixels`` pixels (``frame_too_large``). A message over
:func:`max_message_bytes` (a frame's bytes in base64 plus room for the JSON around them) closes the
connection with code 1009, where the server enforces it (``mukv serve`` passes it to uvicorn).

**Leaving.** Closing the connection cancels its answers in progress; frames it pushed stay in the
stream, and the stream itself stays (``DELETE /v1/streams/{id}`` removes it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from mukv.engine import TokenEvent
from mukv.serve.answers import AnswerRun, done_json, token_json
from mukv.serve.app import (
    MAX_FRAME_SECONDS,
    WS_POLICY_VIOLATION,
    QuestionRequest,
    UnicodeText,
    accept_frames,
    check_max_new_tokens,
    check_push_stream,
    close_reason,
    validation_error,
)
from mukv.serve.config import ServeConfig
from mukv.serve.errors import ApiError, error_body, from_exception
from mukv.serve.images import sniff

if TYPE_CHECKING:
    from mukv.serve.app import ServerState
    from mukv.serve.streams import ServedStream

logger = logging.getLogger(__name__)

PROTOCOL = "mukv.v1"
STREAM_INFO_SECONDS = 1.0
MAX_QUESTIONS_IN_FLIGHT = 8
MAX_ID_CHARS = 128
# Room for the JSON around a base64 frame: {"type": "frame", "t": ..., "data": "data:image/jpeg;base64,"}.
ENVELOPE_BYTES = 1024
WS_NORMAL_CLOSURE = 1000
WS_INTERNAL_ERROR = 1011


def max_message_bytes(config: ServeConfig) -> int:
    """The largest message a connection may send: a frame of ``max_body_bytes`` in base64, in its JSON."""
    return 4 * math.ceil(config.max_body_bytes / 3) + ENVELOPE_BYTES


class FrameMessage(BaseModel):
    """``{"type": "frame", "t"?, "data"}``: one base64 PNG or JPEG frame."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["frame"]
    t: float | None = Field(
        default=None, ge=0, le=MAX_FRAME_SECONDS, allow_inf_nan=False, description="seconds of stream time"
    )
    data: str


class QuestionMessage(QuestionRequest):
    """``{"type": "question", "id", ...}``: the body of ``POST /v1/streams/{id}/questions`` and its id."""

    type: Literal["question"]
    id: UnicodeText = Field(min_length=1, max_length=MAX_ID_CHARS)


class CancelMessage(BaseModel):
    """``{"type": "cancel", "id"}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["cancel"]
    id: UnicodeText = Field(min_length=1, max_length=MAX_ID_CHARS)


def _parse(model: type[BaseModel], message: dict[str, Any]) -> Any:
    try:
        return model.model_validate(message)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def error_message(question_id: str | None, error: ApiError, *, ref: str | None = None) -> dict[str, Any]:
    """The ``error`` message of ``error``: the end of question ``question_id``, or of none (``None``);
    ``ref`` names the id a refused message carried when the refusal does not end that question."""
    message: dict[str, Any] = {"type": "error", "id": question_id, **error.body()}
    if ref is not None:
        message["ref"] = ref
    return message


def valid_id(value: object) -> str | None:
    """``value`` if it is a question id the server may send back: a string of 1 to
    :data:`MAX_ID_CHARS` characters of valid Unicode (no lone surrogate); else ``None``."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _decode(text: str) -> Any:
    """A text message's JSON; ``invalid_json`` for one that is not JSON or nests too deep to read."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the message is not valid JSON: {exc}") from None
    except RecursionError:  # thousands of nested arrays: refused like any other unreadable message
        raise ApiError(400, "invalid_json", "the message is not valid JSON: nested too deep") from None


async def serve_socket(websocket: WebSocket, state: ServerState, stream_id: str) -> None:
    """Serve one connection to stream ``stream_id`` until the client leaves or the stream is deleted.
    The token and readiness were checked before (the app's guard)."""
    offered = websocket.scope.get("subprotocols") or ()
    await websocket.accept(subprotocol=PROTOCOL if PROTOCOL in offered else None)
    try:
        stream = state.streams.get(stream_id)
    except ApiError as error:
        # Accepted first so that a browser, which sees no reason for a refused handshake, is told why.
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the client left first
            await websocket.send_text(json.dumps(error_message(None, error)))
            await websocket.close(WS_POLICY_VIOLATION, close_reason(f"no stream {stream_id!r}"))
        return
    await _Connection(websocket, state, stream).serve()


class _Connection:
    """One client of one stream: reads its messages in order (frames are queued in the order sent),
    answers each question in its own task, and cancels what is left when the client goes."""

    def __init__(self, websocket: WebSocket, state: ServerState, stream: ServedStream) -> None:
        self.websocket = websocket
        self.state = state
        self.stream = stream
        self.config = state.config
        self.open = True
        # Messages come from the reading loop, the answer tasks and the ticker: one at a time on the wire.
        self._send_lock = asyncio.Lock()
        self._answers: dict[str, tuple[AnswerRun, asyncio.Task[None]]] = {}

    async def serve(self) -> None:
        ticker: asyncio.Task[None] | None = None
        try:
            if not await self.send({"type": "ready", "stream": self.stream.info()}):
                return
            ticker = asyncio.create_task(self._tick())
            while self.open:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await self._handle(message)
        except WebSocketDisconnect:
            pass
        finally:
            # Synchronous on purpose: this also runs when the connection's task is being cancelled.
            self.open = False
            if ticker is not None:
                ticker.cancel()
            for run, task in self._answers.values():
                run.cancel()
                task.cancel()
            self._answers.clear()

    async def send(self, message: dict[str, Any]) -> bool:
        """Send one message; ``False`` once the connection is gone (nothing more is sent then).

        Messages are ASCII JSON: a string that is not valid Unicode (a lone surrogate a client sent
        as ``"\\ud800"``) is escaped rather than refused by the transport's UTF-8 encoding. Any
        other failure to send is logged once and closes the connection (code 1011): a connection
        that cannot be written to would leave its questions without an end.
        """
        async with self._send_lock:
            if not self.open:
                return False
            try:
                await self.websocket.send_text(json.dumps(message))
            except (WebSocketDisconnect, RuntimeError):  # the client left, or the socket was closed
                self.open = False
                return False
            except Exception:
                self.open = False
                logger.exception(
                    "sending a %s message on the WebSocket of stream %s failed", message.get("type"), self.stream.id
                )
                with contextlib.suppress(Exception):  # the transport itself may be what failed
                    await self.websocket.close(WS_INTERNAL_ERROR, close_reason("the server could not send a message"))
                return False
            return True

    async def _close(self, code: int, reason: str) -> None:
        async with self._send_lock:
            if not self.open:
                return
            self.open = False
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the client left first
                await self.websocket.close(code, close_reason(reason))

    # -- messages in -------------------------------------------------------------------------------
    async def _handle(self, message: dict[str, Any]) -> None:
        """One client message; a bad one is answered with an ``error`` message, the connection stays."""
        arrival = self.stream.clock()  # a binary frame's time: when it reached the server
        # A refusal carries as its id only the question it ends: a question message's own id, once
        # valid and not in flight. Any other id the message named (a duplicate of a question in
        # flight, a cancel's) is sent back as ``ref``, so no question seems to end twice.
        question_id = None
        ref = None
        try:
            if message.get("bytes") is not None:
                await self._frame(message["bytes"], arrival, field="frame")
                return
            text = message.get("text") or ""
            limit = max_message_bytes(self.config)
            if len(text) > limit:
                raise ApiError(413, "body_too_large", f"the message is over the limit of {limit:,} bytes")
            data = _decode(text)
            if not isinstance(data, dict):
                raise ApiError(422, "invalid_request", "a message is a JSON object with a type", field="type")
            kind = data.get("type")
            named = valid_id(data.get("id")) if kind in ("question", "cancel") else None
            if kind == "question" and named is not None and named not in self._answers:
                question_id = named
            else:
                ref = named
            if kind == "frame":
                body = _parse(FrameMessage, data)
                await self._frame(_base64(body.data), arrival if body.t is None else body.t, field="data")
            elif kind == "question":
                self._question(_parse(QuestionMessage, data))
            elif kind == "cancel":
                await self._cancel(_parse(CancelMessage, data).id)
            else:
                raise ApiError(
                    422,
                    "unknown_message_type",
                    f"type: expected frame, question or cancel, got {kind!r}",
                    field="type",
                )
        except ApiError as error:
            await self.send(error_message(question_id, error, ref=ref))
        except Exception as exc:
            logger.exception("a message on the WebSocket of stream %s failed", self.stream.id)
            await self.send(error_message(question_id, from_exception(exc), ref=ref))

    async def _frame(self, data: bytes, t: float, *, field: str) -> None:
        check_push_stream(self.stream)
        limit = self.config.max_body_bytes
        if len(data) > limit:
            message = f"{field}: frame of {len(data):,} bytes is over the limit of {limit:,}"
            raise ApiError(413, "body_too_large", message, field=field)
        kind = sniff(data)
        if kind is None:
            raise ApiError(415, "unsupported_media_type", f"{field}: frames are PNG or JPEG images", field=field)
        offer = await accept_frames(self.state, self.stream, [(data, kind, field)], [t])
        await self.send(
            {
                "type": "frames",
                "accepted": offer.accepted,
                "timestamps": [t],
                "queued": offer.queued,
                "dropped": offer.dropped,
            }
        )

    def _question(self, body: QuestionMessage) -> None:
        if body.id in self._answers:
            raise ApiError(409, "duplicate_question_id", f"id: question {body.id!r} is still in flight", field="id")
        if len(self._answers) >= MAX_QUESTIONS_IN_FLIGHT:
            raise ApiError(
                429,
                "too_many_questions",
                f"{MAX_QUESTIONS_IN_FLIGHT} questions are in flight on this connection: wait for one to end",
            )
        check_max_new_tokens(body.max_new_tokens, self.config, "max_new_tokens")
        run = self.state.streams.ask(
            self.stream, body.question, body.choices, max_new_tokens=body.max_new_tokens, at=body.at
        )
        self._answers[body.id] = (run, asyncio.create_task(self._answer(body.id, run)))

    async def _cancel(self, question_id: str) -> None:
        entry = self._answers.pop(question_id, None)
        if entry is None:
            return  # its answer already ended (its done or error message is sent): nothing to stop
        run, task = entry
        run.cancel()
        task.cancel()
        await self.send({"type": "error", "id": question_id, **error_body("cancelled", "the answer was cancelled")})

    # -- messages out ------------------------------------------------------------------------------
    async def _answer(self, question_id: str, run: AnswerRun) -> None:
        """Send the answer's tokens, then its ``done`` (or ``error``) message. Whatever fails here
        still ends the question, with the error ``internal_error``."""
        ended = False  # its done or error message is sent (or the connection is gone)
        try:
            while True:
                try:
                    event = await run.next()
                except Exception as exc:  # a refused question, a failure, the stream deleted
                    self._forget(question_id, run)
                    ended = True
                    error = self._deleted() if self.stream.closed else from_exception(exc)
                    await self.send(error_message(question_id, error))
                    return
                if isinstance(event, TokenEvent):
                    data = token_json(event)
                    message = {"type": "token", "id": question_id, "text": data["text"], "token_id": data["id"]}
                    if not await self.send(message):
                        return
                    continue
                data = done_json(event.answer, run, frames_queued=self.stream.counters()["queued"])
                # Ended: no longer cancellable, so a cancel racing the done message is not answered twice.
                self._forget(question_id, run)
                ended = True
                await self.send({"type": "done", "id": question_id, **data})
                return
        except Exception as exc:
            logger.exception("the answer to question %r on stream %s failed", question_id, self.stream.id)
            # Unless a cancel already ended it (and answered for it), the question ends here.
            if not ended and self._forget(question_id, run):
                await self.send(
                    error_message(question_id, ApiError(500, "internal_error", f"{type(exc).__name__}: {exc}"))
                )
        finally:
            run.cancel()  # no-op once it ended; stops it when the client left
            self._forget(question_id, run)

    def _deleted(self) -> ApiError:
        return ApiError(404, "stream_not_found", f"stream {self.stream.id} was deleted")

    def _forget(self, question_id: str, run: AnswerRun) -> bool:
        """Take ``run`` out of the questions in flight; whether it was still there."""
        entry = self._answers.get(question_id)
        if entry is not None and entry[0] is run:  # a later question may reuse the id
            del self._answers[question_id]
            return True
        return False

    async def _tick(self) -> None:
        """The stream's info every :data:`STREAM_INFO_SECONDS`; closes the connection once it is deleted.
        Should the info fail, the client is told (``internal_error``) and the ticks stop; the
        connection stays."""
        try:
            while self.open:
                await asyncio.sleep(STREAM_INFO_SECONDS)
                if self.stream.closed:
                    error = self._deleted()
                    await self.send(error_message(None, error))
                    await self._close(WS_NORMAL_CLOSURE, error.message)
                    return
                if not await self.send({"type": "stream", "stream": self.stream.info()}):
                    return
        except Exception as exc:
            logger.exception("the info of stream %s failed", self.stream.id)
            message = f"the stream's info stopped: {type(exc).__name__}: {exc}"
            await self.send(error_message(None, ApiError(500, "internal_error", message)))


def _base64(data: str) -> bytes:
    """The bytes of a base64 string or ``data:`` URL (``ApiError`` on ``data`` when it is neither)."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_request", "data: not base64", field="data") from None
