"""The WebSocket of a stream (``/v1/streams/{id}/ws``) in this process, through Starlette's TestClient:
frames (binary and base64), questions answered token by token by the shipped ``mukv-tiny`` (right
answers), several in flight, cancellation, per-message errors, auth, and a client that leaves.

Answers are made deterministic in time by holding the device worker (a job that waits on a gate):
while it is held, questions are accepted but no step of theirs runs.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from mukv.serve import ServeConfig, create_app
from mukv.serve.app import same_origin
from mukv.serve.worker import Priority
from mukv.video.streams import eval_kinds, make_stream, write_stream_video
from tests.integration.test_serve_app import (
    AUTH,
    DEADLINE,
    TOKEN,
    jpeg,
    metric_samples,
    png,
    small_frames,
    sse_events,
    wait_encoded,
    wait_for,
)

MAX_MESSAGES = 500  # any message a test waits for comes within this many
BODY_LIMIT = 64 * 1024

# A clip whose frame and patch questions the shipped model answers right (8 frames, `full`).
WS_SEED = 102


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("videos")
    write_stream_video(directory / "clip.mp4", make_stream(4, seed=3))
    return directory


@pytest.fixture(scope="module")
def config(videos) -> ServeConfig:
    return ServeConfig(
        model="mukv-tiny",
        token=TOKEN,
        max_streams=4,
        max_body_bytes=BODY_LIMIT,
        max_frame_pixels=128 * 128,
        max_queued_frames=16,
        max_new_tokens=64,
        allow_dirs=(videos,),
        default_method="full",
    )


@pytest.fixture
def stream_id(client) -> Iterator[str]:
    """A push stream, deleted after the test."""
    response = client.post("/v1/streams", json={"source": "push"})
    assert response.status_code == 201, response.text
    yield response.json()["id"]
    client.delete(f"/v1/streams/{response.json()['id']}")


@pytest.fixture(scope="module")
def clip():
    """Eight frames whose questions mukv-tiny answers right (``tests/e2e/test_serve.py``)."""
    return make_stream(8, seed=WS_SEED, kinds=eval_kinds(WS_SEED))


def ws_url(stream_id: str) -> str:
    return f"/v1/streams/{stream_id}/ws"


def receive(ws, timeout: float = DEADLINE) -> dict:
    """The next message (``WebSocketDisconnect`` once closed); fails after ``timeout`` seconds.

    The TestClient's own ``receive`` waits without a limit, so this reads its queue under one.
    """

    async def bounded():
        with anyio.fail_after(timeout):
            return await ws._send_rx.receive()

    message = ws.portal.call(bounded)
    ws._raise_on_close(message)
    return json.loads(message["text"])


def next_message(ws, *, skip: tuple[str, ...] = ("stream",)) -> dict:
    """The next message whose type is not in ``skip`` (the stream's info comes every second)."""
    for _ in range(MAX_MESSAGES):
        message = receive(ws)
        if message["type"] not in skip:
            return message
    pytest.fail(f"no message but {skip} in {MAX_MESSAGES}")


def expect_error(
    ws, code: str, *, question_id: str | None = None, field: str | None = None, ref: str | None = None
) -> dict:
    """The next message is an ``error`` with ``code``, ending question ``question_id`` (or none),
    naming ``ref`` (or no id) as the id of the refused message."""
    message = next_message(ws)
    assert message["type"] == "error" and message["id"] == question_id, message
    assert message.get("ref") == ref, message
    assert set(message) - {"ref"} == {"type", "id", "error"} and message["error"]["message"], message
    assert message["error"]["code"] == code, message
    if field is not None:
        assert message["error"].get("field") == field, message
    return message["error"]


def collect_answers(ws, ids: set[str]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Token messages and the final (``done`` or ``error``) message of each question in ``ids``."""
    tokens: dict[str, list[dict]] = {qid: [] for qid in ids}
    final: dict[str, dict] = {}
    for _ in range(MAX_MESSAGES):
        if set(final) == ids:
            return tokens, final
        message = next_message(ws)
        assert message["id"] in ids and message["id"] not in final, message
        if message["type"] == "token":
            tokens[message["id"]].append(message)
        else:
            assert message["type"] in ("done", "error"), message
            final[message["id"]] = message
    pytest.fail(f"the answers of {ids} did not end")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def send_clip(ws, clip) -> None:
    """The clip's frames as base64 messages at their own times, each acknowledged."""
    for frame, t in zip(clip.frames, clip.timestamps, strict=True):
        ws.send_json({"type": "frame", "t": float(t), "data": b64(png(frame))})
        ack = next_message(ws)
        assert ack["type"] == "frames" and ack["accepted"] == 1 and ack["timestamps"] == [float(t)], ack


@contextlib.contextmanager
def held_device(app) -> Iterator[None]:
    """Hold the device worker (no step of any answer runs) for the duration of the block."""
    held, gate = threading.Event(), threading.Event()
    app.state.mukv.worker.submit(Priority.QUESTION, lambda: (held.set(), gate.wait(DEADLINE)))
    try:
        assert held.wait(DEADLINE)
        yield
    finally:
        gate.set()


def answers(client, stream_id: str) -> dict:
    return client.get(f"/v1/streams/{stream_id}").json()["answers"]


def active_runs(app, stream_id: str) -> list:
    return list(app.state.mukv.streams.get(stream_id).active)


# -- frames -----------------------------------------------------------------------------------------
def test_frames_arrive_as_binary_and_base64_messages(client, stream_id):
    frame = small_frames(1)[0]
    with client.websocket_connect(ws_url(stream_id), subprotocols=["mukv.v1"]) as ws:
        assert ws.accepted_subprotocol == "mukv.v1"
        ready = next_message(ws)
        assert ready["type"] == "ready" and ready["stream"]["id"] == stream_id
        assert ready["stream"]["frames"]["received"] == 0
        ws.send_bytes(png(frame))  # timestamped by the stream's clock
        first = next_message(ws)
        assert first["type"] == "frames" and first["accepted"] == 1 and first["dropped"] == 0
        assert set(first) == {"type", "accepted", "timestamps", "queued", "dropped"}
        (clock,) = first["timestamps"]
        assert 0 < clock < DEADLINE
        ws.send_json({"type": "frame", "t": clock + 1, "data": b64(png(frame))})
        assert next_message(ws)["timestamps"] == [clock + 1]
        data_url = "data:image/jpeg;base64," + b64(jpeg(frame))
        ws.send_json({"type": "frame", "t": clock + 2.5, "data": data_url})
        assert next_message(ws)["timestamps"] == [clock + 2.5]
        stored = wait_encoded(client, stream_id, 3)
        assert stored["frames"]["received"] == 3 and stored["encoded_time"] == clock + 2.5
        # The stream's info comes on its own, at most once a second.
        info = next_message(ws, skip=("frames",))
        # As the ready message: the info under "stream".
        assert set(info) == {"type", "stream"} and info["type"] == "stream", info
        assert info["stream"]["id"] == stream_id and info["stream"]["frames"]["received"] == 3
        second = receive(ws, timeout=3.0)
        assert second["type"] == "stream" and second["stream"]["position"] >= info["stream"]["position"] + 0.5


# -- questions --------------------------------------------------------------------------------------
def test_a_question_is_answered_token_by_token_then_done(client, stream_id, clip):
    question = clip.questions[0]
    with client.websocket_connect(ws_url(stream_id), subprotocols=["mukv.v1"]) as ws:
        next_message(ws)  # ready
        send_clip(ws, clip)
        ws.send_json({"type": "question", "id": "q1", "question": question.question, "max_new_tokens": 6})
        tokens, final = collect_answers(ws, {"q1"})
    done = final["q1"]
    assert done["type"] == "done" and done["answer"] == question.answer, done
    assert tokens["q1"] and "".join(t["text"] for t in tokens["q1"]).strip() == done["answer"]
    assert all(set(t) == {"type", "id", "text", "token_id"} and isinstance(t["token_id"], int) for t in tokens["q1"])
    assert done["time"] == clip.timestamps[-1] and done["frames_seen"] == 8
    # The same fields as the done event of Server-Sent Events, and the same answer.
    body = {"question": question.question, "max_new_tokens": 6}
    name, sse_done = sse_events(client.post(f"/v1/streams/{stream_id}/questions", json=body).text)[-1]
    assert name == "done"
    assert set(done) - {"type", "id"} == set(sse_done) and sse_done["answer"] == done["answer"]
    assert answers(client, stream_id) == {"completed": 2, "cancelled": 0, "failed": 0, "active": 0}


def test_two_questions_in_flight_are_told_apart_by_id(app, client, stream_id, clip):
    first, second = clip.questions[:2]
    with client.websocket_connect(ws_url(stream_id)) as ws:
        next_message(ws)
        send_clip(ws, clip)
        wait_encoded(client, stream_id, 8)
        with held_device(app):
            ws.send_json({"type": "question", "id": "cross", "question": first.question, "max_new_tokens": 6})
            ws.send_json({"type": "question", "id": "diamond", "question": second.question, "max_new_tokens": 6})
            wait_for(lambda: answers(client, stream_id)["active"] == 2, "both questions in flight")
            # Refusals of messages about a question in flight name it as "ref", never as "id": only
            # that question's own done or error does (collect_answers checks there is one each).
            ws.send_json({"type": "question", "id": "cross", "question": "Again?"})
            expect_error(ws, "duplicate_question_id", field="id", ref="cross")
            ws.send_json({"type": "question", "id": "cross", "question": "Again?", "at": "soon"})
            expect_error(ws, "invalid_request", field="at", ref="cross")
            ws.send_json({"type": "question", "id": "diamond"})
            expect_error(ws, "invalid_request", field="question", ref="diamond")
            ws.send_json({"type": "cancel", "id": "cross", "now": True})
            expect_error(ws, "invalid_request", field="now", ref="cross")
        tokens, final = collect_answers(ws, {"cross", "diamond"})
    assert final["cross"]["answer"] == first.answer and final["diamond"]["answer"] == second.answer, final
    for qid in ("cross", "diamond"):
        assert "".join(t["text"] for t in tokens[qid]).strip() == final[qid]["answer"]
    assert answers(client, stream_id) == {"completed": 2, "cancelled": 0, "failed": 0, "active": 0}


def test_a_cancelled_answer_stops_and_the_other_goes_on(app, client, stream_id, clip):
    question = clip.questions[0]
    with client.websocket_connect(ws_url(stream_id)) as ws:
        next_message(ws)
        send_clip(ws, clip)
        with held_device(app):
            ws.send_json({"type": "question", "id": "stop", "question": question.question, "max_new_tokens": 6})
            ws.send_json({"type": "question", "id": "keep", "question": question.question, "max_new_tokens": 6})
            wait_for(lambda: answers(client, stream_id)["active"] == 2, "both questions in flight")
            ws.send_json({"type": "cancel", "id": "stop"})
            error = expect_error(ws, "cancelled", question_id="stop")
            assert error == {"code": "cancelled", "message": "the answer was cancelled"}
            ws.send_json({"type": "cancel", "id": "never-asked"})  # nothing in flight by that id: ignored
            ws.send_json({"type": "cancel", "id": "stop"})
        # Nothing more about "stop": the next messages are the kept answer's.
        _, final = collect_answers(ws, {"keep"})
        assert final["keep"]["type"] == "done" and final["keep"]["answer"] == question.answer
        counts = wait_for(lambda: (a := answers(client, stream_id))["active"] == 0 and a, "the answers to end")
        assert counts == {"completed": 1, "cancelled": 1, "failed": 0, "active": 0}
        # The id is free again once its answer ended.
        ws.send_json({"type": "question", "id": "stop", "question": question.question, "max_new_tokens": 6})
        _, final = collect_answers(ws, {"stop"})
        assert final["stop"]["answer"] == question.answer


def test_questions_in_flight_are_limited_per_connection(app, client, stream_id):
    from mukv.serve.ws import MAX_QUESTIONS_IN_FLIGHT

    with client.websocket_connect(ws_url(stream_id)) as ws:
        next_message(ws)
        ws.send_json({"type": "frame", "t": 0.0, "data": b64(png(small_frames(1)[0]))})
        assert next_message(ws)["type"] == "frames"
        with held_device(app):
            for k in range(MAX_QUESTIONS_IN_FLIGHT + 1):
                ws.send_json({"type": "question", "id": f"q{k}", "question": "What is there?", "max_new_tokens": 2})
            expect_error(ws, "too_many_questions", question_id=f"q{MAX_QUESTIONS_IN_FLIGHT}")
    counts = wait_for(lambda: (a := answers(client, stream_id))["active"] == 0 and a, "the answers to end")
    assert counts["cancelled"] == MAX_QUESTIONS_IN_FLIGHT and counts["completed"] == 0


# -- errors -----------------------------------------------------------------------------------------
def test_bad_messages_get_error_messages_and_the_connection_stays(client, stream_id):
    frame = small_frames(1)[0]
    with client.websocket_connect(ws_url(stream_id)) as ws:
        next_message(ws)
        ws.send_json({"type": "question", "id": "early", "question": "What is there?"})
        expect_error(ws, "no_frames", question_id="early")
        ws.send_text("{not json")
        expect_error(ws, "invalid_json")
        ws.send_json([1, 2])
        expect_error(ws, "invalid_request", field="type")
        ws.send_json({"type": "dance"})
        expect_error(ws, "unknown_message_type", field="type")
        ws.send_json({"type": "frame", "data": "!!not base64!!"})
        expect_error(ws, "invalid_request", field="data")
        ws.send_json({"type": "frame", "data": b64(b"\x89PNG\r\n\x1a\n" + bytes(64))})
        expect_error(ws, "invalid_image", field="data")
        ws.send_json({"type": "frame", "t": -1, "data": b64(png(frame))})
        expect_error(ws, "invalid_request", field="t")
        ws.send_json({"type": "frame", "t": 1, "data": b64(png(frame)), "colour": "red"})
        expect_error(ws, "invalid_request", field="colour")
        ws.send_json({"type": "frame", "t": 1e300, "data": b64(png(frame))})  # would block every later frame
        expect_error(ws, "invalid_request", field="t")
        ws.send_text("[" * 30_000 + "]" * 30_000)  # too deep for the JSON reader, under the size limit
        expect_error(ws, "invalid_json")
        ws.send_bytes(b"GIF89a" + bytes(32))
        expect_error(ws, "unsupported_media_type", field="frame")
        ws.send_bytes(b"\x89PNG\r\n\x1a\n" + bytes(BODY_LIMIT))
        expect_error(ws, "body_too_large", field="frame")
        ws.send_json({"type": "frame", "data": b64(b"\x89PNG\r\n\x1a\n" + bytes(BODY_LIMIT))})
        expect_error(ws, "body_too_large", field="data")
        ws.send_text(json.dumps({"type": "frame", "data": "A" * (2 * BODY_LIMIT)}))
        expect_error(ws, "body_too_large")
        big = np.zeros((200, 200, 3), dtype=np.uint8)  # 40,000 pixels: over the limit, a tiny file
        ws.send_bytes(png(big))
        expect_error(ws, "frame_too_large", field="frame")
        ws.send_json({"type": "question", "question": "Who?"})
        expect_error(ws, "invalid_request", field="id")
        ws.send_json({"type": "question", "id": 7, "question": "Who?"})
        expect_error(ws, "invalid_request", field="id")
        # An id that is not valid Unicode (a lone surrogate) is refused and never sent back.
        ws.send_text('{"type": "question", "id": "\\ud800", "question": "Who?"}')
        expect_error(ws, "invalid_request", field="id")
        ws.send_text('{"type": "cancel", "id": "\\ud800"}')
        expect_error(ws, "invalid_request", field="id")
        ws.send_json({"type": "question", "id": "long", "question": "Who?", "max_new_tokens": 65})
        expect_error(ws, "invalid_request", question_id="long", field="max_new_tokens")
        ws.send_json({"type": "question", "id": "empty"})
        expect_error(ws, "invalid_request", question_id="empty", field="question")
        ws.send_json({"type": "frame", "t": 2.0, "data": b64(png(frame))})
        assert next_message(ws)["timestamps"] == [2.0]  # still open, and nothing bad was kept
        ws.send_json({"type": "frame", "t": 1.0, "data": b64(png(frame))})
        expect_error(ws, "timestamp_not_increasing", field="t")
        ws.send_json({"type": "question", "id": "blank", "question": "   "})
        expect_error(ws, "invalid_value", question_id="blank", field="question")  # refused by the session
        ws.send_json({"type": "question", "id": "late", "question": "What?", "at": 5.0})
        expect_error(ws, "at_after_stream_time", question_id="late", field="at")
        # A choice the tokenizer cannot take (a lone surrogate) is a bad request, not a server failure.
        ws.send_text('{"type": "question", "id": "pick", "question": "Which?", "choices": ["red \\udfff", "blue"]}')
        expect_error(ws, "invalid_request", question_id="pick", field="choices.0")
    assert client.get(f"/v1/streams/{stream_id}").json()["frames"]["received"] == 1
    counts = wait_for(lambda: (a := answers(client, stream_id))["active"] == 0 and a, "the refused answer to end")
    assert counts == {"completed": 0, "cancelled": 0, "failed": 1, "active": 0}


def next_within(ws, seconds: float) -> dict:
    """The next message but the stream's info, within ``seconds`` (a server failure must not hang)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        message = receive(ws, timeout=left)
        if message["type"] != "stream":
            return message
    pytest.fail(f"no message within {seconds} s")


def test_a_failure_while_answering_still_ends_the_question(app, client, stream_id, monkeypatch):
    """Whatever fails in an answer's task, its question ends with ``internal_error`` under its id."""
    import mukv.serve.ws as ws_module

    def broken(*args, **kwargs):
        raise RuntimeError("done_json broke")

    with client.websocket_connect(ws_url(stream_id)) as ws:
        next_message(ws)
        ws.send_json({"type": "frame", "t": 0.0, "data": b64(png(small_frames(1)[0]))})
        assert next_message(ws)["type"] == "frames"
        monkeypatch.setattr(ws_module, "done_json", broken)
        ws.send_json({"type": "question", "id": "q", "question": "What is there?", "max_new_tokens": 2})
        message = next_within(ws, 20)
        while message["type"] == "token":
            message = next_within(ws, 20)
        assert message["type"] == "error" and message["id"] == "q", message
        assert message["error"]["code"] == "internal_error" and "done_json broke" in message["error"]["message"]
        monkeypatch.undo()
        ws.send_json({"type": "question", "id": "q", "question": "What is there?", "max_new_tokens": 2})
        _, final = collect_answers(ws, {"q"})  # the id is free again and the connection goes on
        assert final["q"]["type"] == "done"


def test_a_message_that_cannot_be_sent_closes_the_connection(client, stream_id, monkeypatch):
    """A message the server fails to send (here one that is not JSON) closes the connection with
    1011 rather than leaving its question without an end."""
    import mukv.serve.ws as ws_module

    monkeypatch.setattr(ws_module, "token_json", lambda event: {"text": object(), "id": 0})
    with client.websocket_connect(ws_url(stream_id)) as ws:
        next_message(ws)
        ws.send_json({"type": "frame", "t": 0.0, "data": b64(png(small_frames(1)[0]))})
        assert next_message(ws)["type"] == "frames"
        ws.send_json({"type": "question", "id": "q", "question": "What is there?", "max_new_tokens": 2})
        with pytest.raises(WebSocketDisconnect) as closed:
            next_within(ws, 20)
    assert closed.value.code == 1011


def test_a_failing_stream_info_is_reported_and_the_connection_stays(app, client, stream_id, monkeypatch):
    served = app.state.mukv.streams.get(stream_id)
    with client.websocket_connect(ws_url(stream_id)) as ws:
        assert next_message(ws)["type"] == "ready"

        def broken() -> dict:
            raise RuntimeError("info broke")

        monkeypatch.setattr(served, "info", broken)
        error = next_within(ws, 10)
        assert error["type"] == "error" and error["id"] is None and error["error"]["code"] == "internal_error"
        assert "info broke" in error["error"]["message"]
        ws.send_text("{not json")
        expect_error(ws, "invalid_json")


def test_frames_sent_to_a_file_stream_are_refused(client, videos):
    created = client.post("/v1/streams", json={"source": str(videos / "clip.mp4"), "fps": 0.5})
    assert created.status_code == 201, created.text
    stream_id = created.json()["id"]
    try:
        with client.websocket_connect(ws_url(stream_id)) as ws:
            assert next_message(ws)["stream"]["source"]["kind"] == "file"
            ws.send_bytes(png(small_frames(1)[0]))
            expect_error(ws, "not_a_push_stream")
            ws.send_json({"type": "frame", "t": 100, "data": b64(png(small_frames(1)[0]))})
            expect_error(ws, "not_a_push_stream")
    finally:
        assert client.delete(f"/v1/streams/{stream_id}").status_code == 200


def test_an_unknown_stream_is_named_then_closed(client):
    with client.websocket_connect(ws_url("st_nothing")) as ws:
        expect_error(ws, "stream_not_found", field="stream_id")
        with pytest.raises(WebSocketDisconnect) as closed:
            receive(ws)
    assert closed.value.code == 1008 and "st_nothing" in closed.value.reason


def test_deleting_the_stream_closes_its_connections(client):
    stream_id = client.post("/v1/streams", json={"source": "push"}).json()["id"]
    with client.websocket_connect(ws_url(stream_id)) as ws:
        next_message(ws)
        assert client.delete(f"/v1/streams/{stream_id}").status_code == 200
        expect_error(ws, "stream_not_found")
        with pytest.raises(WebSocketDisconnect) as closed:
            receive(ws)
    assert closed.value.code == 1000 and stream_id in closed.value.reason


# -- auth and readiness -----------------------------------------------------------------------------
def test_the_token_comes_as_a_header_or_a_subprotocol(app, stream_id):
    plain = TestClient(app)  # no default headers
    url = ws_url(stream_id)
    with plain.websocket_connect(url, subprotocols=["mukv.v1", f"bearer.{TOKEN}"]) as ws:
        assert ws.accepted_subprotocol == "mukv.v1"  # never the token
        assert next_message(ws)["type"] == "ready"
    with plain.websocket_connect(url, headers=AUTH) as ws:
        assert ws.accepted_subprotocol is None
        assert next_message(ws)["type"] == "ready"
    # A page of another origin may connect with the token (it could not know it).
    with plain.websocket_connect(url, headers={**AUTH, "Origin": "http://elsewhere.example"}) as ws:
        assert next_message(ws)["type"] == "ready"
    refused = [
        {},
        {"subprotocols": ["mukv.v1"]},
        {"subprotocols": ["mukv.v1", "bearer.wrong-token-wrong-token"]},
        {"subprotocols": ["mukv.v1", f"Bearer.{TOKEN}x"]},
        {"headers": {"Authorization": "Bearer wrong-token-wrong-token"}},
        {"headers": {"Authorization": f"Basic {TOKEN}"}},
    ]
    for options in refused:
        # Answered as the HTTP API answers (the TestClient, as uvicorn, takes an HTTP response).
        with pytest.raises(WebSocketDenialResponse) as denied, plain.websocket_connect(url, **options):
            pass
        assert_denied(denied.value, 401, "unauthorized")
        assert denied.value.headers["www-authenticate"] == "Bearer"
    # Health stays open; an unknown route under /v1 needs the token too.
    assert plain.get("/health/ready").status_code == 200
    with pytest.raises(WebSocketDenialResponse) as denied, plain.websocket_connect("/v1/nothing/ws"):
        pass
    assert_denied(denied.value, 401, "unauthorized")
    # A server that cannot answer a handshake with a response closes it instead.
    bare = TestClient(without_http_responses(app))  # not entered: the app is already started
    for options in refused:
        closed = refusal(bare, url, **options)
        assert isinstance(closed, WebSocketDisconnect) and closed.code == 1008 and "token" in closed.reason, options


def assert_denied(response, status: int, code: str) -> None:
    """A refused handshake's HTTP response: ``status`` and the HTTP API's JSON error ``code``."""
    assert response.status_code == status, response.content
    assert response.headers["content-type"] == "application/json"
    error = json.loads(response.content)["error"]
    assert error["code"] == code and error["message"], error


def refusal(client: TestClient, path: str, **options) -> Exception:
    """How a handshake that must be refused was refused: an HTTP response or a close."""
    with (
        pytest.raises((WebSocketDenialResponse, WebSocketDisconnect)) as refused,
        client.websocket_connect(path, **options),
    ):
        pass
    return refused.value


def without_http_responses(app):
    """``app`` served as by a server without ASGI's ``websocket.http.response`` extension."""

    async def bare(scope, receive, send):
        if scope["type"] == "websocket":
            scope = {**scope, "extensions": {}}
        await app(scope, receive, send)

    return bare


def test_connections_wait_for_the_model(config):
    app = create_app(config)  # not started: the model is not loaded
    loading = TestClient(app, headers=AUTH)
    with pytest.raises(WebSocketDenialResponse) as denied, loading.websocket_connect(ws_url("st_any")):
        pass
    assert_denied(denied.value, 503, "model_loading")
    assert denied.value.headers["retry-after"] == "5"
    bare = TestClient(without_http_responses(app), headers=AUTH)
    with pytest.raises(WebSocketDisconnect) as closed, bare.websocket_connect(ws_url("st_any")):
        pass
    assert closed.value.code == 1013 and "loading" in closed.value.reason


def test_without_a_token_only_the_pages_own_origin_connects(config):
    """A server without a token (the default on loopback) refuses a browser page of another origin,
    which any site the user visits could otherwise open; the model is not loaded here, so a handshake
    that passes the origin check is refused as loading (503)."""
    app = create_app(dataclasses.replace(config, token=None))
    client = TestClient(app)
    url = "ws://127.0.0.1:8000" + ws_url("st_a")  # sent with Host: 127.0.0.1:8000
    passed = [None, "http://127.0.0.1:8000", "HTTP://127.0.0.1:8000"]
    for origin in passed:
        headers = {} if origin is None else {"Origin": origin}
        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            client.websocket_connect(url, headers=headers),
        ):
            pass
        assert_denied(denied.value, 503, "model_loading")
    others = ["http://evil.example", "http://127.0.0.1:8001", "http://localhost:8000", "null"]
    for origin in others:
        denied = refusal(client, url, headers={"Origin": origin})
        assert_denied(denied, 403, "origin_not_allowed")
    bare = TestClient(without_http_responses(app))
    closed = refusal(bare, url, headers={"Origin": "http://evil.example"})
    assert isinstance(closed, WebSocketDisconnect) and closed.code == 1008 and "origin" in closed.reason


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("http://LocalHost:8000", "localhost:8000", True),
        ("http://example.com", "example.com:80", True),
        ("https://example.com", "example.com", True),
        ("https://example.com:443", "example.com", True),
        ("http://[::1]:8000", "[::1]:8000", True),
        ("http://example.com", "example.com:8000", False),
        ("https://example.com", "example.com:80", False),
        ("http://example.com.evil.example", "example.com", False),
        ("http://[::1]:8000", "[::2]:8000", False),
        ("http://example.com:99999", "example.com:99999", False),
        ("null", "example.com", False),
        ("http://example.com", None, False),
        ("http://example.com", "", False),
    ],
)
def test_same_origin_compares_host_and_port(origin, host, same):
    assert same_origin(origin, host) is same


# -- leaving ------------------------------------------------------------------------------------------
def test_leaving_cancels_the_answers_in_flight_and_keeps_the_stream(app, client, stream_id, clip):
    question = clip.questions[0]
    cancelled = metric_samples(client.get("/metrics").text, "mukv_answers_total").get((("outcome", "cancelled"),), 0)
    with client.websocket_connect(ws_url(stream_id)) as ws:
        next_message(ws)
        send_clip(ws, clip)
    with held_device(app):
        with client.websocket_connect(ws_url(stream_id)) as ws:
            next_message(ws)
            for qid in ("a", "b"):
                ws.send_json({"type": "question", "id": qid, "question": question.question, "max_new_tokens": 6})
            runs = wait_for(lambda: len(r := active_runs(app, stream_id)) == 2 and r, "both questions in flight")
            assert not any(run.cancelled for run in runs)
        # Gone: both answers are told to stop while the device is still held (before any step of theirs).
        wait_for(lambda: all(run.cancelled for run in runs), "the answers to be cancelled", timeout=10)
    counts = wait_for(lambda: (a := answers(client, stream_id))["active"] == 0 and a, "the answers to end")
    assert counts == {"completed": 0, "cancelled": 2, "failed": 0, "active": 0}
    text = client.get("/metrics").text
    assert metric_samples(text, "mukv_answers_total")[(("outcome", "cancelled"),)] == cancelled + 2
    assert app.state.mukv.worker.waiting() == {"question": 0, "encode": 0}
    # The stream and its frames stay; the server answers the next question.
    assert client.get("/health/ready").status_code == 200
    assert client.get(f"/v1/streams/{stream_id}").json()["frames"]["received"] == 8
    with client.websocket_connect(ws_url(stream_id)) as ws:
        next_message(ws)
        ws.send_json({"type": "question", "id": "after", "question": question.question, "max_new_tokens": 6})
        _, final = collect_answers(ws, {"after"})
    assert final["after"]["answer"] == question.answer
