"""``mukv serve`` as a user runs it: a real server process on a loopback port, the shipped
``mukv-tiny`` model, frames pushed as PNG over HTTP, a video file played from an allowed
directory, answers over Server-Sent Events, through the official ``openai`` client and over a
stream's WebSocket (with the ``websockets`` client, as the web page talks to it).

One server for the module; every wait is bounded, every request goes to 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from mukv.video.streams import eval_kinds, make_stream, write_stream_video
from tests.e2e.test_cli import COMMAND

STARTUP_SECONDS = 120.0  # importing torch and loading the model on a busy 2-core machine
DEADLINE = 60.0
MAX_BODY_MIB = 0.25
# Streams whose questions mukv-tiny answers right (tests/integration/test_mukv_tiny.py): seed 100
# asks "What colour was the cross?" (blue) and "What colour was the small diamond?" (green), seed 102
# "What colour was the diamond?" (green), each after 8 frames.
PUSH_SEED = 100
FILE_SEED = 102


def png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Server:
    url: str
    token: str
    allowed: Path
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=DEADLINE, trust_env=False
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    allowed = root / "videos"
    allowed.mkdir()
    token = secrets.token_hex(16)
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MUKV_SERVE_TOKEN": token}
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                *COMMAND,
                "serve",
                "--model",
                "mukv-tiny",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--allow-dir",
                str(allowed),
                "--max-streams",
                "4",
                "--max-body-mib",
                str(MAX_BODY_MIB),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    running = Server(f"http://127.0.0.1:{port}", token, allowed, log)

    def ready() -> bool:
        assert process.poll() is None, f"the server exited:\n{log.read_text()}"
        try:
            return httpx.get(f"{running.url}/health/ready", timeout=5, trust_env=False).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "the server to load the model", STARTUP_SECONDS)
        yield running
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C does: uvicorn shuts down cleanly
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def info(http: httpx.Client, stream_id: str) -> dict:
    response = http.get(f"/v1/streams/{stream_id}")
    assert response.status_code == 200, response.text
    return response.json()


def encoded(http: httpx.Client, stream_id: str, count: int) -> dict:
    return wait_for(
        lambda: (data := info(http, stream_id))["frames"]["encoded"] >= count and data, f"{count} frames encoded"
    )


def ask(http: httpx.Client, stream_id: str, question: str, **extra) -> tuple[list[dict], dict]:
    """Token events and the done event of a question, read as the events arrive."""
    tokens, done = [], None
    body = {"question": question, "max_new_tokens": 6, **extra}
    with http.stream("POST", f"/v1/streams/{stream_id}/questions", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                assert event in ("token", "done"), (event, data)
                if event == "token":
                    tokens.append(data)
                else:
                    done = data
    assert done is not None
    return tokens, done


@pytest.fixture(scope="module")
def push_stream(server) -> Iterator[tuple[str, object]]:
    """A push stream (the server's default method, mukv) holding the 8 frames of ``PUSH_SEED``: four
    pushed one by one as PNG bodies, four in one multipart request."""
    clip = make_stream(8, seed=PUSH_SEED, kinds=eval_kinds(PUSH_SEED))
    with server.client() as http:
        created = http.post("/v1/streams", json={"source": "push"})
        assert created.status_code == 201, created.text
        stream_id = created.json()["id"]
        assert created.json()["method"] == "mukv"
        url = f"/v1/streams/{stream_id}/frames"
        for frame, t in zip(clip.frames[:4], clip.timestamps[:4], strict=True):
            response = http.post(url, params={"t": t}, content=png(frame), headers={"content-type": "image/png"})
            assert response.status_code == 202, response.text
        files = [("frame", (f"{k}.png", png(frame), "image/png")) for k, frame in enumerate(clip.frames[4:])]
        response = http.post(url, files=files, data={"t": [str(t) for t in clip.timestamps[4:]]})
        assert response.status_code == 202, response.text
        assert response.json()["accepted"] == 4
        encoded(http, stream_id, 8)
        yield stream_id, clip
        http.delete(f"/v1/streams/{stream_id}")


def test_a_pushed_stream_answers_over_sse(server, push_stream):
    stream_id, clip = push_stream
    with server.client() as http:
        data = info(http, stream_id)
        assert data["frames"] | {"dropped_by_reason": {}} == {
            "received": 8,
            "encoded": 8,
            "queued": 0,
            "encoding": 0,
            "dropped": 0,
            "dropped_by_reason": {},
        }
        assert data["time"] == data["encoded_time"] == clip.timestamps[-1]
        assert {"frame", "patch", "segment"} <= set(data["memory"]["bytes"])  # MuKV's granularities
        for question in clip.questions:
            started = time.perf_counter()
            tokens, done = ask(http, stream_id, question.question)
            assert done["answer"] == question.answer, (question, done)
            assert "".join(t["text"] for t in tokens).strip() == done["answer"]
            assert done["time"] == clip.timestamps[-1] and done["frames_seen"] == 8
            spans = done["retrieved"]
            assert spans and {s["granularity"] for s in spans} <= {"frame", "patch", "segment"}
            assert all(0 <= s["first_frame"] <= s["last_frame"] <= 7 and s["end_time"] <= 14.0 for s in spans)
            assert 0 < done["server"]["first_token"] <= done["server"]["total"] <= time.perf_counter() - started
        metrics = http.get("/metrics").text
        assert f'mukv_stream_frames_ingested_total{{stream="{stream_id}"}} 8.0' in metrics
        assert "mukv_question_first_token_seconds_count" in metrics


def test_the_openai_client_asks_about_a_stream(server, push_stream):
    stream_id, clip = push_stream
    question = clip.questions[0]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=DEADLINE)
    assert [model.id for model in client.models.list()] == ["mukv-tiny"]
    messages = [{"role": "user", "content": question.question}]
    completion = client.chat.completions.create(
        model="mukv-tiny", messages=messages, max_tokens=6, extra_body={"stream_id": stream_id}
    )
    assert completion.choices[0].message.content == question.answer
    assert completion.choices[0].finish_reason == "stop" and completion.usage.completion_tokens <= 6
    chunks = client.chat.completions.create(
        model="mukv-tiny", messages=messages, max_tokens=6, stream=True, extra_body={"stream_id": stream_id}
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.strip() == question.answer
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages, extra_body={"stream_id": stream_id})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_file_under_an_allowed_directory_plays_at_its_clock(server):
    clip = make_stream(8, seed=FILE_SEED, kinds=eval_kinds(FILE_SEED))
    video = write_stream_video(server.allowed / "clip.mp4", clip)
    with server.client() as http:
        body = {"source": str(video), "method": "full", "fps": 0.5, "speed": 8}
        created = http.post("/v1/streams", json=body)
        assert created.status_code == 201, created.text
        stream_id = created.json()["id"]
        assert created.json()["state"] == "playing" and created.json()["source"]["kind"] == "file"
        try:
            # 16 s of video at 8x: about 2 s of playing.
            data = wait_for(
                lambda: (d := info(http, stream_id))["state"] == "ended" and d["frames"]["encoded"] == 8 and d,
                "the file to play",
            )
            assert data["frames"]["received"] == 8 and data["frames"]["dropped"] == 0
            assert data["encoded_time"] == clip.timestamps[-1] and data["lag_seconds"] == 0.0
            _, done = ask(http, stream_id, clip.questions[0].question)
            assert done["answer"] == clip.questions[0].answer
            pushed = http.post(f"/v1/streams/{stream_id}/frames", content=b"", headers={"content-type": "image/png"})
            assert pushed.status_code == 409 and pushed.json()["error"]["code"] == "not_a_push_stream"
        finally:
            assert http.delete(f"/v1/streams/{stream_id}").status_code == 200
        outside = http.post("/v1/streams", json={"source": str(server.log)})
        assert outside.status_code == 403 and outside.json()["error"]["code"] == "source_not_allowed"


def test_a_client_that_disconnects_mid_answer_leaves_the_server_healthy(server, push_stream):
    stream_id, clip = push_stream
    question = clip.questions[0]
    with server.client() as http:
        body = {"question": question.question, "max_new_tokens": 6}
        with http.stream("POST", f"/v1/streams/{stream_id}/questions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # gone after the first token
        assert http.get("/health/ready").status_code == 200
        assert wait_for(lambda: info(http, stream_id)["answers"]["active"] == 0 or None, "the answer to end") is True
        _, done = ask(http, stream_id, question.question)
        assert done["answer"] == question.answer


def test_bad_input_gets_json_errors(server, push_stream):
    stream_id, clip = push_stream

    def error(response: httpx.Response, status: int) -> str:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"} and body["error"]["message"]
        return body["error"]["code"]

    with server.client() as http:
        frames = f"/v1/streams/{stream_id}/frames"
        later = {"t": 100.0}
        assert error(http.post(frames, params=later, content=png(clip.frames[0])), 415) == "unsupported_media_type"
        malformed = http.post(
            frames, params=later, content=b"\x89PNG\r\n\x1a\n" + bytes(64), headers={"content-type": "image/png"}
        )
        assert error(malformed, 422) == "invalid_image"
        wrong_type = http.post(frames, params=later, content=png(clip.frames[0]), headers={"content-type": "image/gif"})
        assert error(wrong_type, 415) == "unsupported_media_type"
        oversized = bytes(int(MAX_BODY_MIB * 2**20) + 1024)
        assert (
            error(http.post(frames, content=oversized, headers={"content-type": "image/png"}), 413) == "body_too_large"
        )
        assert error(http.get("/v1/streams/st_nothing"), 404) == "stream_not_found"
        assert error(http.post("/v1/streams/st_nothing/questions", json={"question": "Hm?"}), 404) == "stream_not_found"
        fresh = http.post("/v1/streams", json={"source": "push"}).json()["id"]
        try:
            before = http.post(f"/v1/streams/{fresh}/questions", json={"question": "What colour was the cross?"})
            assert error(before, 409) == "no_frames"
        finally:
            http.delete(f"/v1/streams/{fresh}")
        assert error(httpx.get(f"{server.url}/v1/streams", trust_env=False), 401) == "unauthorized"
        assert info(http, stream_id)["frames"]["received"] == 8  # nothing of the bad pushes was kept


def ws_connect(server: Server, path: str, **options):
    """A ``websockets`` client connection to ``path`` on the server (over a socket of its own, so that
    no proxy of the environment is involved)."""
    from websockets.sync.client import connect

    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        return connect(f"ws://127.0.0.1:{port}{path}", sock=sock, open_timeout=DEADLINE, close_timeout=5, **options)
    except BaseException:
        sock.close()
        raise


def ws_message(ws) -> dict:
    """The next message other than the stream's info (sent every second); bounded in time and count."""
    for _ in range(100):
        message = json.loads(ws.recv(timeout=DEADLINE))
        if message["type"] != "stream":
            return message
    pytest.fail("only stream info messages came")


def test_a_websocket_carries_frames_and_questions(server):
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    clip = make_stream(8, seed=PUSH_SEED, kinds=eval_kinds(PUSH_SEED))
    question = clip.questions[0]
    with server.client() as http:
        created = http.post("/v1/streams", json={"source": "push"})
        assert created.status_code == 201, created.text
        stream_id = created.json()["id"]
        path = f"/v1/streams/{stream_id}/ws"
        try:
            # As a browser connects: it cannot set headers, so the token comes as a subprotocol.
            with ws_connect(server, path, subprotocols=["mukv.v1", f"bearer.{server.token}"]) as ws:
                assert ws.subprotocol == "mukv.v1"
                assert ws_message(ws)["type"] == "ready"
                for frame, t in zip(clip.frames, clip.timestamps, strict=True):
                    ws.send(json.dumps({"type": "frame", "t": float(t), "data": base64.b64encode(png(frame)).decode()}))
                    ack = ws_message(ws)
                    assert ack["type"] == "frames" and ack["timestamps"] == [float(t)], ack
                body = {"type": "question", "id": "q", "question": question.question, "max_new_tokens": 6}
                ws.send(json.dumps(body))
                messages = [ws_message(ws)]
                while messages[-1]["type"] == "token" and len(messages) < 16:
                    messages.append(ws_message(ws))
                done = messages[-1]
                assert done["type"] == "done" and done["id"] == "q" and done["answer"] == question.answer, done
                assert "".join(m["text"] for m in messages[:-1]).strip() == question.answer
                assert done["frames_seen"] == 8 and done["time"] == clip.timestamps[-1]
                # A frame over --max-body-mib is refused with a message; a message over the transport's
                # limit (such a frame in base64) closes the connection.
                limit = int(MAX_BODY_MIB * 2**20)
                ws.send(b"\x89PNG\r\n\x1a\n" + bytes(limit))
                too_large = ws_message(ws)
                assert too_large["type"] == "error" and too_large["error"]["code"] == "body_too_large"
                ws.send(bytes(2 * limit))
                with pytest.raises(ConnectionClosed) as closed:
                    ws_message(ws)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            # A refused handshake is answered as the HTTP API answers: status, JSON error, and a
            # client that shows the response can say why.
            for options in ({"subprotocols": ["mukv.v1"]}, {"subprotocols": ["mukv.v1", "bearer.wrong-token-0123456"]}):
                with pytest.raises(InvalidStatus) as refused:
                    ws_connect(server, path, **options)
                response = refused.value.response
                assert response.status_code == 401 and response.headers["content-type"] == "application/json"
                assert response.headers["www-authenticate"] == "Bearer"
                assert json.loads(response.body)["error"]["code"] == "unauthorized"
            # Leaving never deletes the stream, nor what was pushed through the connection.
            data = info(http, stream_id)
            assert data["frames"]["received"] == 8 and data["answers"]["active"] == 0
        finally:
            assert http.delete(f"/v1/streams/{stream_id}").status_code == 200
