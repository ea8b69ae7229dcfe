"""The WebSocket of a stream (``/v1/streams/{id}/ws``) in this process, through Starlette's TestClient:
frames (binary and base64), questions answered token by token by the shipped ``mukv-tiny`` (right
answers), several in flight, cancellation, per-message errors, auth, and a client that leaves.

Answers are made deterministic in time by holding the device worker (a job that waits on a gate):
while it is held, questions are accepted but no step of theirs runs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from mukv.serve import ServeConfig, create_app
from mukv.serve.worker import Priority
from mukv.video.streams import eval_kinds, make_stream, write_stream_video
from tests.e2e.test_serve import PUSH_SEED
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
    return make_stream(8, seed=PUSH_SEED, kinds=eval_kinds(PUSH_SEED))


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


def expect_error(ws, code: str, *, question_id: str | None = None, field: str | None = None) -> dict:
    message = next_message(ws)
    assert message["type"] == "error" and message["id"] == question_id, message
    assert set(message) == {"type", "id", "error"} and message["error"]["message"], message
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
        assert info["type"] == "stream" and info["id"] == stream_id and info["frames"]["received"] == 3
        second = receive(ws, timeout=3.0)
        assert second["type"] == "stream" and second["position"] >= info["position"] + 0.5


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
            ws.send_json({"type": "question", "id": "cross", "question": "Again?"})
            expect_error(ws, "duplicate_question_id", question_id="cross", field="id")
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
    assert client.get(f"/v1/streams/{stream_id}").json()["frames"]["received"] == 1
    counts = wait_for(lambda: (a := answers(client, stream_id))["active"] == 0 and a, "the refused answer to end")
    assert counts == {"completed": 0, "cancelled": 0, "failed": 1, "active": 0}


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
    refused = [
        {},
        {"subprotocols": ["mukv.v1"]},
        {"subprotocols": ["mukv.v1", "bearer.wrong-token-wrong-token"]},
        {"subprotocols": ["mukv.v1", f"Bearer.{TOKEN}x"]},
        {"headers": {"Authorization": "Bearer wrong-token-wrong-token"}},
        {"headers": {"Authorization": f"Basic {TOKEN}"}},
    ]
    for options in refused:
        with pytest.raises(WebSocketDisconnect) as closed, plain.websocket_connect(url, **options):
            pass
        assert closed.value.code == 1008 and "token" in closed.value.reason, options
    # Health stays open; an unknown route under /v1 needs the token too.
    assert plain.get("/health/ready").status_code == 200
    with pytest.raises(WebSocketDisconnect) as closed, plain.websocket_connect("/v1/nothing/ws"):
        pass
    assert closed.value.code == 1008


def test_connections_wait_for_the_model(config):
    loading = TestClient(create_app(config), headers=AUTH)  # not started: the model is not loaded
    with pytest.raises(WebSocketDisconnect) as closed, loading.websocket_connect(ws_url("st_any")):
        pass
    assert closed.value.code == 1013 and "loading" in closed.value.reason


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
