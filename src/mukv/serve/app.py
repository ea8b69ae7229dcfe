"""The HTTP API: :func:`create_app` builds a FastAPI app serving one model to many video streams.

Routes (``/v1`` and ``/metrics`` need ``Authorization: Bearer <token>`` when a token is set):

- ``GET /health/live``, ``GET /health/ready`` (503 until the model is loaded), ``GET /metrics``;
- ``POST /v1/streams`` (create), ``GET /v1/streams``, ``GET|DELETE /v1/streams/{id}``;
- ``POST /v1/streams/{id}/save``: the stream's memory to ``--memory-dir`` (:mod:`mukv.serve.saved`);
- ``POST /v1/streams/{id}/frames``: one PNG/JPEG body (``?t=`` seconds) or ``multipart/form-data``
  with ``frame`` images and one ``t`` per frame; answered 202 once queued;
- ``POST /v1/streams/{id}/questions``: the answer as Server-Sent Events (``token``, then ``done``);
- ``GET /v1/streams/{id}/ws``: a WebSocket carrying frames and questions in, answer tokens out
  (:mod:`mukv.serve.ws`; it may send its token as the subprotocol ``bearer.<token>`` instead);
- ``GET /v1/models``, ``POST /v1/chat/completions`` (OpenAI-compatible; ``stream_id`` names the stream);
- ``GET /v1/sources``: the video files under the allowed directories (names to give as ``source``);
- ``GET /``: the web page (its files under ``/static``; :mod:`mukv.serve.page`).

Every error is JSON ``{"error": {"code", "message", "field"?}}`` (:mod:`mukv.serve.errors`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mukv import __version__
from mukv.engine import DoneEvent, TokenEvent
from mukv.serve import chat
from mukv.serve.answers import AnswerRun, done_json, token_json
from mukv.serve.config import ServeConfig
from mukv.serve.errors import ApiError, field_of, from_exception
from mukv.serve.images import DECODERS, decode_image, media_type, sniff
from mukv.serve.metrics import CONTENT_TYPE, ServeMetrics
from mukv.serve.page import add_page_routes, list_sources
from mukv.serve.sources import parse_source
from mukv.serve.streams import Offer, ServedStream, StreamManager, StreamOptions
from mukv.serve.worker import DeviceWorker, Priority

logger = logging.getLogger(__name__)

# Seconds between SSE comments that keep idle connections (and proxies) open.
SSE_PING_SECONDS = 15


class ServerState:
    """Everything one app holds: its config, device worker, model, streams and metrics."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = ServeMetrics()
        self.worker: DeviceWorker | None = None
        self.manager: StreamManager | None = None
        self.model_id: str | None = None
        self.load_error: BaseException | None = None
        self.started = int(time.time())
        # Called (on the worker thread) when the model fails to load: `mukv serve` stops the server.
        self.on_load_error: Callable[[BaseException], None] | None = None
        self._ready = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        """Start the device worker and load the model on it (the app serves health checks meanwhile)."""
        self.worker = DeviceWorker()
        self.manager = StreamManager(self.config, self.worker, self.metrics)
        self.metrics.watch(self.manager.streams, self.worker.waiting)
        self.worker.submit(Priority.QUESTION, self._load).add_done_callback(self._loaded)

    def _load(self) -> str:
        from mukv.backends import load_backend

        logger.info("loading %s on %s", self.config.model, self.config.device)
        backend = load_backend(self.config.model, device=self.config.device, dtype=self.config.dtype)
        assert self.manager is not None
        self.manager.backend = backend
        self.manager.restore_saved()  # streams saved in --memory-dir, before the server is ready
        return self.config.model_name or backend.model_id

    def _loaded(self, future: Any) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self.model_id = future.result()
            self._ready.set()
            logger.info("model %s loaded: ready", self.model_id)
            return
        self.load_error = error
        logger.error("loading %s failed: %s", self.config.model, error)
        if self.on_load_error is not None:
            self.on_load_error(error)

    def stop(self) -> None:
        if self.manager is not None:
            self.manager.close()
        if self.worker is not None:
            self.worker.close()

    @property
    def streams(self) -> StreamManager:
        assert self.manager is not None
        return self.manager


class _Guard:
    """Checks made before a request reaches a route: the bearer token (``/v1`` and ``/metrics``),
    readiness (``/v1``), and the body size (the declared length at once, a streamed body as it
    arrives). WebSockets under ``/v1`` get the same token and readiness checks (:meth:`_websocket`)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        config = self.state.config
        error = None
        if (path.startswith("/v1") or path == "/metrics") and config.token is not None:
            error = _check_token(headers.get("authorization"), config.token)
        if error is None and path.startswith("/v1") and not self.state.ready:
            error = _not_ready(self.state)
        limit = config.max_body_bytes
        if error is None:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                error = _too_large(limit)
        if error is not None:
            await _json_error(error)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, limited, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a WebSocket under ``/v1`` before accepting it: without the token (401), from a page
        of another origin when the server has no token (403), or while the model is not loaded (503).

        Browsers cannot set headers, so the token may also come as an offered subprotocol
        ``bearer.<token>``. The refusal is an HTTP response with the JSON error body of the HTTP API
        where the server supports it (ASGI's ``websocket.http.response`` extension, as uvicorn
        does); elsewhere the handshake is closed with code 1008 (token, origin) or 1013 (loading).
        """
        if scope["path"].startswith("/v1"):
            error, code = self._websocket_refusal(scope)
            if error is not None:
                await _refuse_websocket(scope, send, error, code)
                return
        await self.app(scope, receive, send)

    def _websocket_refusal(self, scope: Scope) -> tuple[ApiError | None, int]:
        """Why a WebSocket handshake under ``/v1`` is refused (its error and close code), if it is."""
        token = self.state.config.token
        if token is not None:
            if not _websocket_has_token(scope, token):
                return _unauthorized(WS_UNAUTHORIZED), WS_POLICY_VIOLATION
        else:
            # Without a token any page the user visits could reach a loopback server: only the page's
            # own origin may connect. A page without the token cannot connect to a server that has one.
            headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
            origin = headers.get("origin")
            if origin is not None and not same_origin(origin, headers.get("host")):
                message = f"origin {origin[:100]!r} is not this server's: connect from its own page (or use a token)"
                return ApiError(403, "origin_not_allowed", message), WS_POLICY_VIOLATION
        if not self.state.ready:
            return _not_ready(self.state), WS_TRY_AGAIN_LATER
        return None, 0


async def _refuse_websocket(scope: Scope, send: Send, error: ApiError, code: int) -> None:
    """Answer a WebSocket handshake with ``error`` as an HTTP response where the server can send one,
    so that a client sees the status and the body; else close it with ``code``."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [
            (key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in (error.headers or {}).items()
        ]
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        return
    await send({"type": "websocket.close", "code": code, "reason": close_reason(error.message)})


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def same_origin(origin: str, host: str | None) -> bool:
    """Whether a handshake's ``Origin`` names the host and port it was sent to (its ``Host``).

    A page's origin is ``scheme://host[:port]``; a port left out is its scheme's default, for the
    ``Host`` header too (a reverse proxy must pass ``Host`` through unchanged). ``null`` (a sandboxed
    page, a local file) and anything unparsable is another origin.
    """
    if not host:
        return False
    try:
        seen = urlsplit(origin)
        sent = urlsplit(f"{seen.scheme}://{host}")
        default = _DEFAULT_PORTS.get(seen.scheme.lower())
        origin_at = (seen.hostname, seen.port or default)
        host_at = (sent.hostname, sent.port or default)
    except ValueError:  # a bad port or IPv6 address
        return False
    return seen.hostname is not None and origin_at == host_at


# WebSocket close codes (RFC 6455 section 7.4.1; 1013 is IANA's "Try Again Later").
WS_POLICY_VIOLATION = 1008
WS_TRY_AGAIN_LATER = 1013
# A close frame's reason holds at most 123 bytes of UTF-8 (RFC 6455 section 5.5).
MAX_CLOSE_REASON_BYTES = 123
WS_TOKEN_PREFIX = "bearer."
WS_UNAUTHORIZED = f"missing or wrong token: send Authorization: Bearer <token> or subprotocol {WS_TOKEN_PREFIX}<token>"


def close_reason(text: str) -> str:
    """``text`` cut to fit a WebSocket close frame."""
    data = text.encode()
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return text
    return data[: MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


def _websocket_has_token(scope: Scope, token: str) -> bool:
    """Whether a WebSocket handshake carries ``token``: as ``Authorization: Bearer`` or as one of its
    offered subprotocols ``bearer.<token>``."""
    for key, value in scope["headers"]:
        if key.lower() == b"authorization" and _check_token(value.decode("latin-1"), token) is None:
            return True
    for offered in scope.get("subprotocols") or ():
        if offered.startswith(WS_TOKEN_PREFIX) and hmac.compare_digest(
            offered[len(WS_TOKEN_PREFIX) :].encode(), token.encode()
        ):
            return True
    return False


def _check_token(header: str | None, token: str) -> ApiError | None:
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
        return None
    return _unauthorized("missing or wrong token: send Authorization: Bearer <token>")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


# A WebSocket subprotocol is an HTTP token (RFC 6455 section 4.1, RFC 9110 section 5.6.2): a
# browser's WebSocket constructor refuses any other character, so the page cannot send such a token.
_SUBPROTOCOL_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def token_fits_subprotocol(token: str) -> bool:
    """Whether ``token`` can be sent as the subprotocol ``bearer.<token>`` (as the web page does)."""
    return all(char in _SUBPROTOCOL_CHARS for char in token)


def _not_ready(state: ServerState) -> ApiError:
    if state.load_error is not None:
        return ApiError(503, "model_load_failed", f"the model failed to load: {state.load_error}")
    message = f"the model {state.config.model} is still loading"
    return ApiError(503, "model_loading", message, headers={"Retry-After": "5"})


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body is over the limit of {limit:,} bytes")


def _json_error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# -- request bodies ----------------------------------------------------------------------------
OverrideValue = str | bool | int | float | None

# The latest time a pushed frame may carry, in seconds of stream time (about 31 years). Frame times
# only increase, so a frame far in the future would leave the stream no time for any later frame,
# a clock-stamped one included; a client with a clock of its own (Unix time, say) stays well below.
MAX_FRAME_SECONDS = 1e9


def _unicode(text: str) -> str:
    """``text`` unless it holds a lone surrogate (JSON's ``"\\ud800"``): such a string cannot be
    encoded as UTF-8, by the tokenizer or in a reply."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text (a lone surrogate at character {exc.start})") from None
    return text


UnicodeText = Annotated[str, AfterValidator(_unicode)]


class StreamRequest(BaseModel):
    """``POST /v1/streams``."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=4096, description='"push", a file path, or a live URL')
    method: str | None = None
    preset: str | None = None
    overrides: dict[str, OverrideValue] | None = Field(default=None, description="dotted option -> value")
    fps: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="frames sampled per second")
    speed: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="file playback speed")
    npy_fps: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="frame rate of .npy")


class QuestionRequest(BaseModel):
    """``POST /v1/streams/{id}/questions``."""

    model_config = ConfigDict(extra="forbid")

    question: str
    choices: list[UnicodeText] | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    at: float | None = Field(default=None, allow_inf_nan=False, description="seconds of stream time")


def _text(value: OverrideValue) -> str:
    """An override as the command line types it, so that it is converted and checked the same way."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def stream_options(body: StreamRequest, config: ServeConfig) -> StreamOptions:
    """Validate a stream request (source, method, preset, overrides) as the command line does."""
    from mukv.memory import method_config

    source = parse_source(body.source, config)
    if source.kind == "push":
        for name in ("fps", "speed", "npy_fps"):
            if getattr(body, name) is not None:
                raise ApiError(422, "invalid_request", f"{name}: pushed frames carry their own times", field=name)
    if source.kind == "live":
        for name in ("speed", "npy_fps"):
            if getattr(body, name) is not None:
                raise ApiError(422, "invalid_request", f"{name}: a live source plays at its own pace", field=name)
    method = body.method or config.default_method
    preset = body.preset if body.method is not None or body.preset is not None else config.default_preset
    overrides = {key: _text(value) for key, value in (body.overrides or {}).items()}
    if "preset" in overrides:
        raise ApiError(
            422, "invalid_override", "preset: give it as the request's preset, not as an override", field="overrides"
        )
    if "disk_dir" in overrides:
        # A client must not choose where the server writes: a stream's disk tier (``ram_budget``)
        # lives in a private temporary directory of the server, removed with the stream.
        raise ApiError(
            422,
            "invalid_override",
            "disk_dir: chosen by the server (a stream's disk tier lives in its own temporary directory)",
            field="overrides.disk_dir",
        )
    try:
        resolved = method_config(method, overrides, preset)
    except ValueError as exc:
        message = str(exc)
        named = field_of(message)
        if named in ("method", "preset"):
            raise ApiError(422, f"invalid_{named}", message, field=named) from None
        raise ApiError(422, "invalid_override", message, field=f"overrides.{named}" if named else "overrides") from None
    return StreamOptions(
        source=source,
        method=method,
        preset=preset,
        overrides=overrides,
        method_config=resolved,
        fps=body.fps if body.fps is not None else config.default_fps,
        speed=body.speed if body.speed is not None else 1.0,
        npy_fps=body.npy_fps,
    )


# -- the app -------------------------------------------------------------------------------------
def create_app(config: ServeConfig) -> FastAPI:
    """A FastAPI app serving ``config.model`` (loaded when the app starts, on its device worker)."""
    state = ServerState(config)
    if config.token is not None and not token_fits_subprotocol(config.token):
        logger.warning(
            "the token holds characters a WebSocket subprotocol cannot carry: the web page cannot "
            "send it to a stream's WebSocket (its webcam streams fail); choose letters, digits and -._~"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.stop)

    app = FastAPI(
        title="mukv",
        version=__version__,
        summary="Questions about live video streams, answered from a compressed KV-cache memory.",
        lifespan=lifespan,
    )
    app.state.mukv = state
    app.add_middleware(_Guard, state=state)
    _add_error_handlers(app)
    _add_health_routes(app, state)
    app.include_router(_api_router(state), prefix="/v1")
    add_page_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        error = ApiError(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return _json_error(ApiError(500, "internal_error", f"{type(exc).__name__}: {exc}"))


def validation_error(errors: Sequence[Any]) -> ApiError:
    """The API error for pydantic's validation errors of a request (the first one names the field)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, "invalid_json", f"the body is not valid JSON: {first.get('msg')}")
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    field = ".".join(location) or None
    message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    return ApiError(422, "invalid_request", message, field=field)


def _add_health_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health/live")
    async def live() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        """200 once the model is loaded, 503 before (or when it failed to load)."""
        if not state.ready:
            return _json_error(_not_ready(state))
        return JSONResponse({"status": "ready", "model": state.model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _api_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    config = state.config

    @router.get("/models")
    async def models() -> dict[str, Any]:
        """The one model this server serves."""
        return {
            "object": "list",
            "data": [{"id": state.model_id, "object": "model", "created": state.started, "owned_by": "mukv"}],
        }

    @router.get("/sources")
    async def sources() -> dict[str, Any]:
        """Video files under the allowed directories, by the names a stream's ``source`` takes
        (bounded in count and depth; ``truncated`` says whether more were left out)."""
        return (await asyncio.to_thread(list_sources, config)).to_json()

    @router.post("/streams", status_code=201)
    async def create_stream(body: StreamRequest) -> JSONResponse:
        """Create a stream: pushed frames, a file played at its clock, or a live URL."""
        stream = await state.streams.create(stream_options(body, config))
        return JSONResponse(stream.info(), status_code=201, headers={"Location": f"/v1/streams/{stream.id}"})

    @router.get("/streams")
    async def list_streams() -> dict[str, Any]:
        return {"object": "list", "data": [stream.info() for stream in state.streams.streams()]}

    @router.get("/streams/{stream_id}")
    async def get_stream(stream_id: str) -> dict[str, Any]:
        return state.streams.get(stream_id).info()

    @router.delete("/streams/{stream_id}")
    async def delete_stream(stream_id: str) -> dict[str, Any]:
        """Stop the stream's source, cancel its answers, free its memory."""
        await state.streams.delete(stream_id)
        return {"id": stream_id, "object": "stream", "deleted": True}

    @router.post("/streams/{stream_id}/save")
    async def save_stream(stream_id: str) -> dict[str, Any]:
        """Save the stream's memory to ``--memory-dir``/<id> (reopened when a server starts there):
        the frames and stream time saved and the bytes written."""
        return await state.streams.save(stream_id)

    @router.post("/streams/{stream_id}/frames", status_code=202)
    async def push_frames(
        stream_id: str,
        request: Request,
        t: float | None = Query(
            default=None, ge=0, le=MAX_FRAME_SECONDS, allow_inf_nan=False, description="seconds of stream time"
        ),
    ) -> JSONResponse:
        """Queue frames for encoding: a PNG/JPEG body at ``t`` (default: seconds since the stream was
        created), or multipart ``frame`` parts with one ``t`` part each (a single frame may take
        ``t`` from the query or the clock instead)."""
        stream = state.streams.get(stream_id)
        arrival = stream.clock()
        check_push_stream(stream)
        kind = media_type(request.headers.get("content-type"))
        if kind == "multipart/form-data":
            images, times = await _multipart_frames(request, config, default_time=arrival if t is None else t)
        elif kind in DECODERS:
            images, times = [(await request.body(), kind, "body")], [arrival if t is None else t]
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"frames are image/png, image/jpeg or multipart/form-data, got {kind or 'no Content-Type'}",
                field="content-type",
            )
        offer = await accept_frames(state, stream, images, times)
        return JSONResponse(
            {
                "stream_id": stream.id,
                "accepted": offer.accepted,
                "timestamps": times,
                "queue_position": offer.position,
                "queued": offer.queued,
                "dropped": offer.dropped,
            },
            status_code=202,
        )

    @router.websocket("/streams/{stream_id}/ws")
    async def stream_socket(websocket: WebSocket, stream_id: str) -> None:
        """Frames and questions in, answer tokens out, over one connection (:mod:`mukv.serve.ws`)."""
        from mukv.serve.ws import serve_socket  # that module builds on this one's helpers

        await serve_socket(websocket, state, stream_id)

    @router.post("/streams/{stream_id}/questions")
    async def ask(stream_id: str, body: QuestionRequest) -> EventSourceResponse:
        """Answer at time ``at`` (default: the stream time), as Server-Sent Events: ``token``
        events ``{"text", "id"}``, then one ``done`` event (or an ``error`` event)."""
        stream = state.streams.get(stream_id)
        check_max_new_tokens(body.max_new_tokens, config, "max_new_tokens")
        run, first = await _start_answer(
            state, stream, body.question, body.choices, max_new_tokens=body.max_new_tokens, at=body.at
        )
        return EventSourceResponse(_question_events(run, first, stream), ping=SSE_PING_SECONDS, sep="\n")

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: chat.ChatRequest, request: Request) -> JSONResponse | EventSourceResponse:
        """OpenAI-compatible: the last user message is the question about stream ``stream_id``."""
        if body.model != state.model_id:
            message = f"model {body.model!r} is not served here; this server serves {state.model_id!r}"
            raise ApiError(404, "model_not_found", message, field="model")
        question, max_new_tokens = chat.question_of(body)
        check_max_new_tokens(max_new_tokens, config, chat.max_tokens_field(body))
        stream = state.streams.get(chat.stream_id_of(body))
        run, first = await _start_answer(state, stream, question, None, max_new_tokens=max_new_tokens, at=body.at)
        completion = chat.Completion(model=state.model_id or "")
        if body.stream:
            chunks = chat.stream_chunks(run, first, completion, include_usage=chat.wants_usage(body))
            return EventSourceResponse(chunks, ping=SSE_PING_SECONDS, sep="\n")
        return JSONResponse(await chat.collect(run, first, completion, request))

    return router


def check_push_stream(stream: ServedStream) -> None:
    """Raise ``not_a_push_stream`` unless ``stream`` takes pushed frames (its source is ``push``)."""
    kind = stream.options.source.kind
    if kind != "push":
        raise ApiError(409, "not_a_push_stream", f"stream {stream.id} plays its {kind} source")


async def accept_frames(
    state: ServerState, stream: ServedStream, images: Sequence[tuple[bytes, str, str]], times: Sequence[float]
) -> Offer:
    """Decode ``images`` (``(bytes, media type, field)`` each, off the event loop) and queue them in
    ``stream`` at ``times``; all or none are kept (the first bad image raises its :class:`ApiError`)."""
    max_pixels = state.config.max_frame_pixels
    frames = await asyncio.to_thread(
        lambda: [decode_image(data, kind, max_pixels=max_pixels, field=field) for data, kind, field in images]
    )
    return state.streams.offer(stream, frames, times)


def check_max_new_tokens(value: int | None, config: ServeConfig, field: str) -> None:
    """Raise ``invalid_request`` (naming ``field``) for an answer longer than the server allows."""
    if value is not None and value > config.max_new_tokens:
        raise ApiError(
            422, "invalid_request", f"{field}: at most {config.max_new_tokens} on this server, got {value}", field=field
        )


async def _start_answer(
    state: ServerState,
    stream: ServedStream,
    question: str,
    choices: list[str] | None,
    *,
    max_new_tokens: int | None,
    at: float | None,
) -> tuple[AnswerRun, TokenEvent | DoneEvent]:
    """Start an answer and wait for its first event, so that a refused question is a JSON error
    (the status line is not sent until the question is accepted)."""
    run = state.streams.ask(stream, question, choices, max_new_tokens=max_new_tokens, at=at)
    try:
        first = await run.next()
    except asyncio.CancelledError:
        run.cancel()
        raise
    except Exception as exc:
        raise from_exception(exc) from None
    return run, first


async def _question_events(
    run: AnswerRun, first: TokenEvent | DoneEvent, stream: ServedStream
) -> AsyncIterator[dict[str, str]]:
    """SSE events of an answer; leaving early (the client disconnected) cancels the answer."""
    try:
        event = first
        while True:
            if isinstance(event, TokenEvent):
                yield {"event": "token", "data": json.dumps(token_json(event))}
            else:
                data = done_json(event.answer, run, frames_queued=stream.counters()["queued"])
                yield {"event": "done", "data": json.dumps(data)}
                return
            try:
                event = await run.next()
            except Exception as exc:
                yield {"event": "error", "data": json.dumps(from_exception(exc).body())}
                return
    finally:
        run.cancel()


async def _multipart_frames(
    request: Request, config: ServeConfig, *, default_time: float
) -> tuple[list[tuple[bytes, str, str]], list[float]]:
    """``frame`` image parts and their ``t`` parts (one each, in order; a single frame may omit it)."""
    from starlette.datastructures import UploadFile

    try:
        form = await request.form(max_files=config.max_frames_per_request, max_fields=config.max_frames_per_request + 8)
    except StarletteHTTPException as exc:
        raise ApiError(422, "invalid_multipart", f"cannot read the multipart body: {exc.detail}") from None
    try:
        unknown = sorted(set(form.keys()) - {"frame", "t"})
        if unknown:
            raise ApiError(422, "invalid_multipart", f"{unknown[0]}: unknown part (parts: frame, t)", field=unknown[0])
        parts = form.getlist("frame")
        if not parts:
            raise ApiError(422, "invalid_multipart", "frame: no frame parts", field="frame")
        images = []
        for index, part in enumerate(parts):
            field = f"frame.{index}"
            if not isinstance(part, UploadFile):
                raise ApiError(422, "invalid_multipart", f"{field}: must be an image file part", field=field)
            data = await part.read()
            kind = media_type(part.content_type)
            if kind not in DECODERS:
                if kind not in (None, "application/octet-stream") or sniff(data) is None:
                    raise ApiError(
                        415, "unsupported_media_type", f"{field}: frames are image/png or image/jpeg", field=field
                    )
                kind = sniff(data)
            images.append((data, kind, field))
        texts = form.getlist("t")
        if not texts and len(images) == 1:
            return images, [default_time]
        if len(texts) != len(images):
            message = f"t: one timestamp per frame ({len(images)} frames, {len(texts)} t parts)"
            raise ApiError(422, "invalid_multipart", message, field="t")
        times = []
        for index, text in enumerate(texts):
            times.append(_seconds(text if isinstance(text, str) else "", f"t.{index}"))
        return images, times
    finally:
        await form.close()


def _seconds(text: str, field: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ApiError(422, "invalid_request", f"{field}: expected seconds, got {text!r}", field=field) from None
    if not math.isfinite(value) or not 0 <= value <= MAX_FRAME_SECONDS:
        message = f"{field}: must be seconds from 0 to {MAX_FRAME_SECONDS:.0e}, got {text}"
        raise ApiError(422, "invalid_request", message, field=field)
    return value
