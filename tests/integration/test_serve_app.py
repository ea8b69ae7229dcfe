"""The server app in this process (FastAPI's TestClient, and uvicorn on a thread where a real
connection is needed): validation, auth, limits, the drop policy, deletion, cancellation.

The model is the tiny random checkpoint (``tiny_model_dir``): its answers are nonsense, and long,
which is what the cancellation test needs. Answers that must be right are checked with the trained
``mukv-tiny`` in ``tests/e2e/test_serve.py``.
"""

from __future__ import annotations

import functools
import gc
import http.server
import io
import json
import socket
import sys
import threading
import time
import types
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mukv.engine import StreamSession
from mukv.serve import ServeConfig, create_app
from mukv.serve.app import MAX_FRAME_SECONDS
from mukv.serve.worker import DeviceWorker, Priority
from mukv.video.streams import make_stream, write_stream_video
from tests.e2e.test_serve import ws_message

TOKEN = "integration-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEADLINE = 60.0  # seconds any wait of these tests may take


def png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "JPEG")
    return buffer.getvalue()


def small_frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def wait_for(check, what: str, timeout: float = DEADLINE):
    """Poll ``check()`` until it returns a true value (returned); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    if field is not None:
        assert error.get("field") == field, error
    return error


def sse_events(text: str) -> list[tuple[str, dict]]:
    """``(event, data)`` pairs of a Server-Sent Events body (comments skipped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def metric_samples(text: str, name: str) -> dict[tuple, float]:
    """Samples of metric ``name`` keyed by their sorted labels."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                samples[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("allowed")
    write_stream_video(directory / "clip.mp4", make_stream(4, seed=3))
    return directory


@pytest.fixture(scope="module")
def config(tiny_model_dir, allowed) -> ServeConfig:
    return ServeConfig(
        model=str(tiny_model_dir),
        model_name="tiny",
        token=TOKEN,
        max_streams=3,
        max_body_bytes=64 * 1024,
        max_frame_pixels=128 * 128,
        max_frames_per_request=8,
        max_queued_frames=4,
        max_new_tokens=64,
        allow_dirs=(allowed,),
        default_method="full",
    )


def wait_ready(client: TestClient | httpx.Client) -> None:
    wait_for(lambda: client.get("/health/ready").status_code == 200, "the model to load")


@pytest.fixture
def streams(client) -> Iterator[list[str]]:
    """Ids of streams a test creates; deleted after it (the server holds at most 3)."""
    created: list[str] = []
    yield created
    for stream_id in created:
        client.delete(f"/v1/streams/{stream_id}")


def create(client, streams: list[str], **body) -> dict:
    response = client.post("/v1/streams", json={"source": "push", **body})
    assert response.status_code == 201, response.text
    streams.append(response.json()["id"])
    return response.json()


def push(client, stream_id: str, frame: np.ndarray, t: float | None = None) -> httpx.Response:
    params = {} if t is None else {"t": t}
    return client.post(
        f"/v1/streams/{stream_id}/frames", params=params, content=png(frame), headers={"content-type": "image/png"}
    )


def info(client, stream_id: str) -> dict:
    response = client.get(f"/v1/streams/{stream_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_encoded(client, stream_id: str, count: int) -> dict:
    return wait_for(
        lambda: (data := info(client, stream_id))["frames"]["encoded"] >= count and data, f"{count} frames encoded"
    )


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"host": "0.0.0.0"}, "token"),
        ({"host": "192.168.1.5", "token": "short"}, "token"),
        ({"port": 70000}, "port"),
        ({"max_streams": 0}, "max_streams"),
        ({"default_method": "nope"}, "method"),
        ({"default_preset": "nope"}, "preset"),
        ({"allow_dirs": ("/definitely/not/here",)}, "allow_dirs"),
        ({"allowed_schemes": ("file",)}, "allowed_schemes"),
        ({"default_fps": 0}, "default_fps"),
    ],
)
def test_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        ServeConfig(model="mukv-tiny", **kwargs)


def test_config_binds_loopback_by_default_and_other_hosts_with_a_token():
    assert ServeConfig(model="mukv-tiny").host == "127.0.0.1"
    assert ServeConfig(model="mukv-tiny", host="0.0.0.0", token=TOKEN).token == TOKEN
    assert ServeConfig(model="mukv-tiny", host="::1").token is None


@pytest.mark.parametrize("missing", ["uvicorn", "fastapi"])
def test_serve_without_its_extra_says_how_to_install_it(monkeypatch, missing):
    from typer.testing import CliRunner

    from mukv.cli import app as cli

    monkeypatch.setitem(sys.modules, missing, None)  # what an install without the extra looks like
    result = CliRunner().invoke(cli, ["serve", "--model", "mukv-tiny"])
    assert result.exit_code == 2
    assert "pip install 'mukv[serve]'" in result.output and missing in result.output


def test_serve_checks_its_options_before_anything_else():
    from typer.testing import CliRunner

    from mukv.cli import app as cli

    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"], env={"MUKV_SERVE_TOKEN": ""})
    assert result.exit_code == 2 and "needs a token" in result.output
    result = CliRunner().invoke(cli, ["serve", "--method", "nope"])
    assert result.exit_code == 2 and "method: unknown 'nope'" in result.output


def test_serve_exits_when_the_model_cannot_load(tmp_path):
    from typer.testing import CliRunner

    from mukv.cli import app as cli

    outcome: dict = {}
    args = ["serve", "--model", str(tmp_path / "missing"), "--port", "0"]
    worker = threading.Thread(target=lambda: outcome.update(result=CliRunner().invoke(cli, args)), daemon=True)
    worker.start()
    worker.join(DEADLINE)
    assert not worker.is_alive(), "the server kept running without a model"
    result = outcome["result"]
    assert result.exit_code == 2 and "could not load" in result.output


# -- health, readiness, auth -------------------------------------------------------------------
def test_ready_is_503_until_the_model_is_loaded(config):
    app = create_app(config)
    plain = TestClient(app, headers=AUTH)  # no `with`: the app has not started, so no model
    assert plain.get("/health/live").json() == {"status": "ok"}
    assert_error(plain.get("/health/ready"), 503, "model_loading")
    assert_error(plain.post("/v1/streams", json={"source": "push"}), 503, "model_loading")


def test_a_model_that_fails_to_load_is_reported(tmp_path):
    with TestClient(create_app(ServeConfig(model=str(tmp_path / "missing")))) as failing:
        wait_for(lambda: failing.get("/health/ready").json()["error"]["code"] == "model_load_failed", "the failure")
        assert "could not load" in failing.get("/health/ready").json()["error"]["message"]


def test_health_models_and_metrics(client):
    assert client.get("/health/ready").json() == {"status": "ready", "model": "tiny"}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "mukv_question_first_token_seconds" in metrics.text
    assert metric_samples(metrics.text, "mukv_device_queue_depth")


@pytest.mark.parametrize("path", ["/v1/models", "/v1/streams", "/metrics"])
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-wrong-token", f"Basic {TOKEN}", TOKEN])
def test_a_token_is_required_beyond_health(app, client, path, header):
    plain = TestClient(app)
    headers = {} if header is None else {"Authorization": header}
    error = assert_error(plain.get(path, headers=headers), 401, "unauthorized")
    assert "Bearer" in error["message"]
    assert plain.get("/health/live").status_code == 200
    assert plain.get("/health/ready").status_code == 200


def test_unknown_routes_and_methods_are_json_errors(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.put("/v1/streams"), 405, "method_not_allowed")


# -- creating streams ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"method": "nope"}, 422, "invalid_method", "method"),
        ({"method": "mukv", "preset": "nope"}, 422, "invalid_preset", "preset"),
        ({"method": "uniform", "overrides": {"frames_please": 3}}, 422, "invalid_override", "overrides.frames_please"),
        ({"method": "uniform", "overrides": {"num_frames": "many"}}, 422, "invalid_override", "overrides.num_frames"),
        ({"method": "uniform", "overrides": {"num_frames": 1.5}}, 422, "invalid_override", "overrides.num_frames"),
        ({"method": "mukv", "overrides": {"keep_ratio": 0.2}}, 422, "invalid_override", "overrides.keep_ratio"),
        ({"overrides": {"preset": "paper"}}, 422, "invalid_override", "overrides"),
        ({"method": "mukv", "overrides": {"disk_dir": "/etc"}}, 422, "invalid_override", "overrides.disk_dir"),
        ({"method": "rekv", "overrides": {"kv_dtype": "int3"}}, 422, "invalid_override", "overrides.kv_dtype"),
        ({"method": "mukv", "overrides": {"memory_budget": "1XB"}}, 422, "invalid_override", "overrides.memory_budget"),
        ({"fps": 2}, 422, "invalid_request", "fps"),
        ({"colour": "red"}, 422, "invalid_request", "colour"),
        ({"source": ""}, 422, "invalid_request", "source"),
        ({"source": "file:///etc/passwd"}, 422, "scheme_not_allowed", "source"),
        ({"source": "https://example.com/live.m3u8"}, 422, "scheme_not_allowed", "source"),
        ({"source": "/etc/passwd"}, 403, "source_not_allowed", "source"),
        ({"source": "../../../etc/passwd"}, 403, "source_not_allowed", "source"),
        ({"source": "missing.mp4"}, 404, "source_not_found", "source"),
    ],
)
def test_stream_requests_are_validated_like_the_command_line(client, body, status, code, field):
    assert_error(client.post("/v1/streams", json={"source": "push", **body}), status, code, field)


def test_a_malformed_body_is_a_json_error(client):
    response = client.post("/v1/streams", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_json")


def test_overrides_reach_the_method(client, streams):
    created = create(client, streams, method="uniform", overrides={"num_frames": 3})
    assert created["method"] == "uniform" and created["overrides"] == {"num_frames": "3"}
    stream = client.app.state.mukv.streams.get(created["id"])
    assert stream.session.memory.config.num_frames == 3
    # Storage options are method options like the others; byte sizes are typed with their unit.
    created = create(client, streams, method="rekv", overrides={"kv_dtype": "int4", "memory_budget": "2GB"})
    config = client.app.state.mukv.streams.get(created["id"]).session.memory.config
    assert (config.kv_dtype, config.memory_budget) == ("int4", 2 * 10**9)


def test_live_urls_wait_for_the_live_module(client, streams, monkeypatch):
    # Whatever mukv.video.live holds today, a module without open_live means no live sources yet.
    monkeypatch.setitem(sys.modules, "mukv.video.live", types.ModuleType("mukv.video.live"))
    error = assert_error(
        client.post("/v1/streams", json={"source": "rtsp://127.0.0.1:9/cam"}), 501, "live_sources_unavailable"
    )
    assert error["message"] == "live sources: not available yet"


@pytest.fixture
def http_video(tmp_path) -> Iterator[tuple[str, object]]:
    """A 2 s video (4 frames at 2 fps) served over HTTP on loopback: a live source at its own pace."""
    clip = make_stream(4, seed=5, fps=2.0)
    write_stream_video(tmp_path / "live.mp4", clip)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/live.mp4", clip
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


def test_a_live_url_plays_through_open_live(tiny_model_dir, http_video):
    plain, clip = http_video
    # Credentials in the URL reach the source (the file server ignores them) and never a response.
    url = plain.replace("http://", "http://viewer:s3cret@") + "?access_token=s3cret&part=1"
    config = ServeConfig(model=str(tiny_model_dir), default_method="full", allowed_schemes=("http",))
    with TestClient(create_app(config)) as live:
        wait_ready(live)
        created = live.post("/v1/streams", json={"source": url, "fps": 2.0})
        assert created.status_code == 201, created.text
        shown = plain.replace("http://", "http://viewer:***@") + "?access_token=***&part=1"
        assert created.json()["source"] == {"kind": "live", "url": shown} and created.json()["speed"] is None
        assert "s3cret" not in live.get("/v1/streams").text
        stream_id = created.json()["id"]
        with live.websocket_connect(f"/v1/streams/{stream_id}/ws") as ws:  # its info there too
            ready = ws.receive_json()
            assert ready["type"] == "ready" and ready["stream"]["source"]["url"] == shown
        data = wait_for(
            lambda: (d := info(live, stream_id))["state"] == "ended" and d["frames"]["encoded"] == 4 and d,
            "the live source to end",
        )
        assert data["encoded_time"] == clip.timestamps[-1] and data["frames"]["dropped"] == 0
        done = sse_events(live.post(f"/v1/streams/{stream_id}/questions", json={"question": "What?"}).text)[-1][1]
        assert done["frames_seen"] == 4
        gone = url.replace("live.mp4", "missing.mp4")
        refused = live.post("/v1/streams", json={"source": gone})
        assert_error(refused, 422, "source_unreadable", "source")
        assert "s3cret" not in refused.text and shown.replace("live.mp4", "missing.mp4") in refused.text
        assert_error(live.post("/v1/streams", json={"source": url, "speed": 2}), 422, "invalid_request", "speed")


def test_the_number_of_streams_is_limited(client, streams):
    for _ in range(3):
        create(client, streams)
    assert_error(client.post("/v1/streams", json={"source": "push"}), 429, "too_many_streams")
    assert client.delete(f"/v1/streams/{streams.pop()}").status_code == 200
    create(client, streams)


def test_streams_are_listed_and_deleted(client, streams):
    stream_id = create(client, streams)["id"]
    assert stream_id in [s["id"] for s in client.get("/v1/streams").json()["data"]]
    assert client.delete(f"/v1/streams/{stream_id}").json() == {"id": stream_id, "object": "stream", "deleted": True}
    assert_error(client.get(f"/v1/streams/{stream_id}"), 404, "stream_not_found")
    assert_error(client.delete(f"/v1/streams/{stream_id}"), 404, "stream_not_found")
    assert stream_id not in [s["id"] for s in client.get("/v1/streams").json()["data"]]


def test_deleting_a_stream_frees_its_memory(client, streams):
    stream_id = create(client, streams)["id"]
    for k, frame in enumerate(small_frames(2)):
        assert push(client, stream_id, frame, t=float(k)).status_code == 202
    wait_encoded(client, stream_id, 2)
    session = weakref.ref(client.app.state.mukv.streams.get(stream_id).session)
    assert session() is not None
    assert client.delete(f"/v1/streams/{stream_id}").status_code == 200
    gc.collect()
    assert session() is None
    labels = metric_samples(client.get("/metrics").text, "mukv_stream_memory_bytes")
    assert all(dict(key)["stream"] != stream_id for key in labels)


# A memory whose stored payloads spill to the disk tier after the first frame.
SPILLING = {"method": "rekv", "overrides": {"ram_budget": "1", "block_frames": 1}}


def spilled_stream(client, streams: list[str] | None = None) -> tuple[object, Path]:
    """A push stream holding 3 frames on its disk tier: the served stream, held here as a request in
    progress would hold it (so only closing its memory removes its files), and the tier's directory
    (a private temporary one: the server refuses a client's ``disk_dir``)."""
    response = client.post("/v1/streams", json={"source": "push", **SPILLING})
    assert response.status_code == 201, response.text
    stream_id = response.json()["id"]
    if streams is not None:
        streams.append(stream_id)
    for k, frame in enumerate(small_frames(3)):
        assert push(client, stream_id, frame, t=float(k)).status_code == 202
    assert wait_encoded(client, stream_id, 3)["memory"]["disk_bytes"] > 0
    stream = client.app.state.mukv.streams.get(stream_id)
    directory = stream.session.memory.store.disk.directory
    assert directory.name.startswith("mukv-disk-") and any(directory.glob("chunk-*.bin"))
    return stream, directory


def test_deleting_a_stream_removes_its_disk_tier_once_its_device_work_is_done(client, streams):
    stream, directory = spilled_stream(client, streams)
    # A job running on the device worker (as an ingest, answer step or save of the stream would):
    # the memory is closed after it, never under it.
    gate, running = threading.Event(), threading.Event()
    client.app.state.mukv.worker.submit(Priority.QUESTION, lambda: (running.set(), gate.wait(DEADLINE)))
    assert running.wait(DEADLINE)
    with ThreadPoolExecutor(1) as pool:
        try:
            deleting = pool.submit(client.delete, f"/v1/streams/{stream.id}")
            wait_for(lambda: stream.closed, "the stream to be closed")
            time.sleep(0.2)
            assert not deleting.done() and any(directory.glob("chunk-*.bin"))
        finally:
            gate.set()
        assert deleting.result(DEADLINE).status_code == 200
    streams.remove(stream.id)
    # Gone when the deletion answers, though the stream is still referenced (no garbage collection).
    assert not directory.exists()
    assert stream.session.memory.store.disk.closed


def test_shutting_the_server_down_removes_the_disk_tiers_of_its_streams(tiny_model_dir):
    config = ServeConfig(model=str(tiny_model_dir), default_method="full")
    with TestClient(create_app(config)) as server:
        wait_ready(server)
        stream, directory = spilled_stream(server)
    assert not directory.exists() and stream.session.memory.store.disk.closed


# -- pushing frames --------------------------------------------------------------------------------
def test_pushed_frames_are_queued_then_encoded(client, streams):
    stream_id = create(client, streams)["id"]
    frames = small_frames(3)
    first = push(client, stream_id, frames[0])  # no t: seconds since the stream was created
    assert first.status_code == 202
    start = first.json()["timestamps"][0]
    assert first.json()["accepted"] == 1 and 0 < start < DEADLINE
    jpeg_push = client.post(
        f"/v1/streams/{stream_id}/frames",
        params={"t": start + 1},
        content=jpeg(frames[1]),
        headers={"content-type": "image/jpeg"},
    )
    assert jpeg_push.status_code == 202, jpeg_push.text
    assert push(client, stream_id, frames[2], t=start + 2).json()["timestamps"] == [start + 2]
    data = wait_encoded(client, stream_id, 3)
    assert data["frames"]["received"] == 3 and data["frames"]["dropped"] == 0
    assert data["memory"]["frames"] == 3 and data["memory"]["bytes"]["frame"] > 0
    assert data["time"] == data["encoded_time"] == start + 2
    ingested = metric_samples(client.get("/metrics").text, "mukv_stream_frames_ingested_total")
    assert ingested[(("stream", stream_id),)] == 3


def test_multipart_pushes_several_frames_with_their_times(client, streams):
    stream_id = create(client, streams)["id"]
    frames = small_frames(3, seed=1)
    files = [("frame", (f"{k}.png", png(f), "image/png")) for k, f in enumerate(frames)]
    response = client.post(f"/v1/streams/{stream_id}/frames", files=files, data={"t": ["1", "2", "3.5"]})
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 3 and response.json()["timestamps"] == [1.0, 2.0, 3.5]
    assert wait_encoded(client, stream_id, 3)["encoded_time"] == 3.5
    # The whole request is refused when one timestamp is wrong: nothing of it is kept.
    bad = client.post(f"/v1/streams/{stream_id}/frames", files=files[:2], data={"t": ["4", "3.9"]})
    assert_error(bad, 409, "timestamp_not_increasing", "t")
    assert info(client, stream_id)["frames"]["received"] == 3
    assert_error(
        client.post(f"/v1/streams/{stream_id}/frames", files=files[:2], data={"t": ["5"]}),
        422,
        "invalid_multipart",
        "t",
    )
    assert_error(
        client.post(f"/v1/streams/{stream_id}/frames", files=files[:1], data={"t": ["6"], "colour": "red"}),
        422,
        "invalid_multipart",
        "colour",
    )
    assert_error(client.post(f"/v1/streams/{stream_id}/frames", files={"t": (None, "6")}), 422, "invalid_multipart")
    too_many = [("frame", (f"{k}.png", png(small_frames(1, k)[0]), "image/png")) for k in range(9)]
    assert_error(client.post(f"/v1/streams/{stream_id}/frames", files=too_many), 422, "invalid_multipart")


def test_bad_frames_get_json_errors(client, streams):
    stream_id = create(client, streams)["id"]
    url = f"/v1/streams/{stream_id}/frames"
    frame = small_frames(1)[0]
    assert_error(
        client.post(url, content=png(frame), headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
    )
    assert_error(
        client.post(url, content=b"\x89PNG\r\n\x1a\nnot really", headers={"content-type": "image/png"}),
        422,
        "invalid_image",
    )
    assert_error(client.post(url, content=png(frame)[:60], headers={"content-type": "image/png"}), 422, "invalid_image")
    assert_error(client.post(url, content=png(frame), headers={"content-type": "image/jpeg"}), 422, "invalid_image")
    big = np.zeros((200, 200, 3), dtype=np.uint8)  # 40,000 pixels: over the limit, a tiny file
    assert_error(client.post(url, content=png(big), headers={"content-type": "image/png"}), 413, "frame_too_large")
    assert_error(push(client, stream_id, frame, t=-1), 422, "invalid_request", "t")
    assert_error(
        client.post(url, params={"t": "nan"}, content=png(frame), headers={"content-type": "image/png"}),
        422,
        "invalid_request",
        "t",
    )
    # A time far ahead would leave no time for any later frame, clock-stamped ones included.
    assert_error(push(client, stream_id, frame, t=1e300), 422, "invalid_request", "t")
    assert_error(push(client, stream_id, frame, t=MAX_FRAME_SECONDS * 1.5), 422, "invalid_request", "t")
    one = [("frame", ("0.png", png(frame), "image/png"))]
    assert_error(client.post(url, files=one, data={"t": ["1e300"]}), 422, "invalid_request", "t.0")
    assert_error(push(client, "st_missing", frame, t=1), 404, "stream_not_found")
    assert push(client, stream_id, frame, t=2).status_code == 202
    assert_error(push(client, stream_id, frame, t=2), 409, "timestamp_not_increasing", "t")
    assert_error(push(client, stream_id, frame, t=1), 409, "timestamp_not_increasing", "t")
    assert info(client, stream_id)["frames"]["received"] == 1


def test_bodies_over_the_limit_are_refused(client, streams):
    stream_id = create(client, streams)["id"]
    url = f"/v1/streams/{stream_id}/frames"
    body = b"\x89PNG\r\n\x1a\n" + bytes(70 * 1024)
    assert_error(client.post(url, content=body, headers={"content-type": "image/png"}), 413, "body_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(70):
            yield bytes(1024)

    assert_error(client.post(url, content=chunks(), headers={"content-type": "image/png"}), 413, "body_too_large")


def test_a_stream_that_falls_behind_drops_its_oldest_waiting_frames(client, streams):
    stream_id = create(client, streams)["id"]
    held = threading.Event()
    gate = threading.Event()
    # Hold the device: nothing is encoded until the gate opens, so the queue fills.
    client.app.state.mukv.worker.submit(Priority.QUESTION, lambda: (held.set(), gate.wait(DEADLINE)))
    try:
        assert held.wait(DEADLINE)
        files = [("frame", (f"{k}.png", png(f), "image/png")) for k, f in enumerate(small_frames(6))]
        response = client.post(f"/v1/streams/{stream_id}/frames", files=files, data={"t": [str(k) for k in range(6)]})
        assert response.status_code == 202, response.text
        assert response.json() | {"timestamps": None} == {
            "stream_id": stream_id,
            "accepted": 6,
            "timestamps": None,
            "queue_position": 0,
            "queued": 4,
            "dropped": 2,
        }
        later = push(client, stream_id, small_frames(1, 9)[0], t=6.0)
        assert later.json()["dropped"] == 1 and later.json()["queue_position"] == 3
    finally:
        gate.set()
    data = wait_encoded(client, stream_id, 4)
    assert data["frames"] | {"encoding": 0} == {
        "received": 7,
        "encoded": 4,
        "queued": 0,
        "encoding": 0,
        "dropped": 3,
        "dropped_by_reason": {"queue_full": 3},
    }
    assert data["encoded_time"] == 6.0 and data["memory"]["frames"] == 4
    text = client.get("/metrics").text
    assert (
        metric_samples(text, "mukv_stream_frames_dropped_total")[(("reason", "queue_full"), ("stream", stream_id))] == 3
    )
    assert metric_samples(text, "mukv_frames_dropped_total")[(("reason", "queue_full"),)] >= 3


def test_frames_a_waiting_question_must_see_are_not_dropped(client, streams):
    """A question waiting for the device keeps the frames up to its time beyond the queue's cap:
    when newer frames overflow it meanwhile, the oldest of those are dropped, and the answer sees
    every frame up to its time."""
    stream_id = create(client, streams)["id"]
    held, gate = threading.Event(), threading.Event()
    client.app.state.mukv.worker.submit(Priority.QUESTION, lambda: (held.set(), gate.wait(DEADLINE)))
    answer = {}
    try:
        assert held.wait(DEADLINE)
        frames = small_frames(9)
        for k in range(4):  # a full queue (max_queued_frames = 4)
            assert push(client, stream_id, frames[k], t=float(k)).status_code == 202
        asking = threading.Thread(
            target=lambda: answer.update(
                response=client.post(f"/v1/streams/{stream_id}/questions", json={"question": "What?"})
            )
        )
        asking.start()
        wait_for(lambda: info(client, stream_id)["answers"]["active"] == 1, "the question to wait")
        for k in range(4, 8):  # four more fit: the question's frames are not counted
            assert push(client, stream_id, frames[k], t=float(k)).json()["dropped"] == 0
        later = push(client, stream_id, frames[8], t=8.0).json()
        # Frame 4, the oldest after the question's frames, makes room; 0-3 wait for the question.
        assert (later["dropped"], later["queued"], later["queue_position"]) == (1, 8, 7)
    finally:
        gate.set()
    asking.join(DEADLINE)
    done = sse_events(answer["response"].text)[-1]
    assert done[0] == "done" and done[1]["frames_seen"] == 4 and done[1]["time"] == 3.0
    data = wait_encoded(client, stream_id, 8)
    assert data["frames"]["dropped"] == 1 and data["encoded_time"] == 8.0
    assert data["frames"]["received"] == 9


def test_a_stream_takes_no_frames_beyond_its_memory_budget(tiny_model_dir, backend):
    session = StreamSession(backend, "full")
    empty = session.stats().total_bytes
    session.ingest(small_frames(1), [0.0])
    per_frame = session.stats().total_bytes - empty
    config = ServeConfig(
        model=str(tiny_model_dir), default_method="full", stream_memory_bytes=empty + per_frame * 3 // 2
    )
    with TestClient(create_app(config)) as budgeted:
        wait_ready(budgeted)
        stream_id = budgeted.post("/v1/streams", json={"source": "push"}).json()["id"]
        for k in range(2):
            assert push(budgeted, stream_id, small_frames(1, k)[0], t=float(k)).status_code == 202
            wait_encoded(budgeted, stream_id, k + 1)
        error = assert_error(push(budgeted, stream_id, small_frames(1, 5)[0], t=5.0), 507, "memory_budget_exceeded")
        assert "budget" in error["message"]
        data = info(budgeted, stream_id)
        assert data["frames"]["received"] == 2 and data["memory"]["total_bytes"] == empty + 2 * per_frame


# -- questions --------------------------------------------------------------------------------------
def test_questions_are_answered_as_server_sent_events(client, streams):
    stream_id = create(client, streams)["id"]
    for k, frame in enumerate(small_frames(2)):
        push(client, stream_id, frame, t=2.0 * k)
    response = client.post(
        f"/v1/streams/{stream_id}/questions", json={"question": "What is there?", "max_new_tokens": 5}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"token"} and len(names) >= 2
    done = events[-1][1]
    assert done["time"] == 2.0 and done["frames_seen"] == 2  # the question waited for the frames it must see
    assert done["generated_tokens"] <= 5 and done["stop_reason"] in ("eos", "length")
    assert done["answer"] == "".join(data["text"] for _, data in events[:-1]).strip()
    assert all(isinstance(data["id"], int) for _, data in events[:-1])
    assert {"granularity", "first_frame", "last_frame", "start_time", "end_time"} <= set(done["retrieved"][0])
    assert done["memory"]["bytes"] and done["timings"]["total"] > 0 and done["server"]["first_token"] > 0
    assert info(client, stream_id)["answers"] == {"completed": 1, "cancelled": 0, "failed": 0, "active": 0}


def test_questions_never_see_later_frames(client, streams):
    stream_id = create(client, streams)["id"]
    for k, frame in enumerate(small_frames(3)):
        push(client, stream_id, frame, t=float(k))
    url = f"/v1/streams/{stream_id}/questions"
    assert_error(client.post(url, json={"question": "What?", "at": 2.5}), 409, "at_after_stream_time", "at")
    wait_encoded(client, stream_id, 3)
    assert_error(client.post(url, json={"question": "What?", "at": 1.0}), 409, "at_before_memory", "at")
    done = sse_events(client.post(url, json={"question": "What?", "at": 2.0, "max_new_tokens": 2}).text)[-1][1]
    assert done["time"] == 2.0 and done["frames_seen"] == 3


def test_bad_questions_get_json_errors(client, streams):
    stream_id = create(client, streams)["id"]
    url = f"/v1/streams/{stream_id}/questions"
    assert_error(client.post(url, json={"question": "Anything yet?"}), 409, "no_frames")
    push(client, stream_id, small_frames(1)[0], t=0.0)
    assert_error(client.post(url, json={"question": "  "}), 422, "invalid_value", "question")
    assert_error(client.post(url, json={"question": "Which?", "choices": ["a"]}), 422, "invalid_value", "choices")
    assert_error(
        client.post(url, json={"question": "Long?", "max_new_tokens": 65}), 422, "invalid_request", "max_new_tokens"
    )
    assert_error(
        client.post(url, json={"question": "Zero?", "max_new_tokens": 0}), 422, "invalid_request", "max_new_tokens"
    )
    assert_error(client.post(url, json={}), 422, "invalid_request", "question")
    # A lone surrogate (valid JSON, not valid Unicode) in a choice: a bad request, not a server failure.
    surrogate = b'{"question": "Which?", "choices": ["red \\udfff", "blue"]}'
    refused = client.post(url, content=surrogate, headers={"content-type": "application/json"})
    assert_error(refused, 422, "invalid_request", "choices.0")
    assert_error(client.post("/v1/streams/st_missing/questions", json={"question": "Hm?"}), 404, "stream_not_found")


def test_chat_requests_are_checked(client, streams):
    stream_id = create(client, streams)["id"]
    push(client, stream_id, small_frames(1)[0], t=0.0)
    message = [{"role": "user", "content": "What?"}]
    url = "/v1/chat/completions"
    assert_error(
        client.post(url, json={"model": "other", "messages": message, "stream_id": stream_id}),
        404,
        "model_not_found",
        "model",
    )
    assert_error(client.post(url, json={"model": "tiny", "messages": message}), 422, "invalid_request", "stream_id")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]
    assert_error(
        client.post(url, json={"model": "tiny", "messages": image, "stream_id": stream_id}),
        422,
        "invalid_request",
        "messages.0.content",
    )
    system = [{"role": "system", "content": "Be brief."}]
    assert_error(
        client.post(url, json={"model": "tiny", "messages": system, "stream_id": stream_id}),
        422,
        "invalid_request",
        "messages",
    )
    answer = client.post(url, json={"model": "tiny", "messages": message, "stream_id": stream_id, "max_tokens": 3})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 3 and body["mukv"]["frames_seen"] == 1


# -- the device worker ---------------------------------------------------------------------------
def test_the_device_worker_runs_questions_before_encoding_backlog():
    worker = DeviceWorker()
    try:
        gate = threading.Event()
        order: list[str] = []
        worker.submit(Priority.ENCODE, lambda: gate.wait(DEADLINE))
        jobs = [worker.submit(Priority.ENCODE, lambda k=k: order.append(f"encode {k}")) for k in range(3)]
        jobs.append(worker.submit(Priority.QUESTION, lambda: order.append("question")))
        assert worker.waiting()["encode"] >= 3 and worker.waiting()["question"] == 1
        gate.set()
        for job in jobs:
            job.result(DEADLINE)
        assert order == ["question", "encode 0", "encode 1", "encode 2"]
        failing = worker.submit(Priority.QUESTION, lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(DEADLINE)
        assert worker.submit(Priority.QUESTION, lambda: "still running").result(DEADLINE) == "still running"
    finally:
        worker.close()


# -- a real connection: a client that goes away --------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tiny_model_dir) -> Iterator[tuple[str, object]]:
    import uvicorn

    port = free_port()
    config = ServeConfig(model=str(tiny_model_dir), port=port, default_method="full", max_new_tokens=4000)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=DEADLINE) as http:
        wait_for(lambda: _ready(http), "the server to start")
    yield url, app
    server.should_exit = True
    thread.join(DEADLINE)


def _ready(http: httpx.Client) -> bool:
    try:
        return http.get("/health/ready").status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("route", ["questions", "chat"])
def test_a_client_that_disconnects_mid_answer_stops_the_answer(live_server, route):
    url, app = live_server
    with httpx.Client(base_url=url, timeout=DEADLINE) as http:
        stream_id = http.post("/v1/streams", json={"source": "push"}).json()["id"]
        frame = png(small_frames(1)[0])
        http.post(
            f"/v1/streams/{stream_id}/frames", params={"t": 0}, content=frame, headers={"content-type": "image/png"}
        )
        if route == "questions":
            request = (
                "POST",
                f"/v1/streams/{stream_id}/questions",
                {"question": "Tell me all.", "max_new_tokens": 4000},
            )
        else:
            model = http.get("/v1/models").json()["data"][0]["id"]
            body = {"model": model, "messages": [{"role": "user", "content": "Tell me all."}], "stream": True}
            request = ("POST", "/v1/chat/completions", {**body, "stream_id": stream_id, "max_tokens": 4000})
        method, path, body = request
        with http.stream(method, path, json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data:")
                if seen == 3:
                    break  # leaving the block closes the connection mid-answer
        data = wait_for(
            lambda: (d := http.get(f"/v1/streams/{stream_id}").json())["answers"]["cancelled"] == 1 and d,
            "the answer to be cancelled",
            timeout=20,
        )
        assert data["answers"]["active"] == 0 and data["answers"]["completed"] == 0
        tokens = metric_samples(http.get("/metrics").text, "mukv_answer_tokens_total")[()]
        time.sleep(0.5)
        # Decoding stopped: no token was made after the cancellation, far fewer than asked for.
        assert metric_samples(http.get("/metrics").text, "mukv_answer_tokens_total")[()] == tokens < 1000
        assert app.state.mukv.worker.waiting() == {"question": 0, "encode": 0}
        assert http.get("/health/ready").status_code == 200
        http.delete(f"/v1/streams/{stream_id}")
    cancelled = metric_samples(http_get_metrics(url), "mukv_answers_total")
    assert cancelled[(("outcome", "cancelled"),)] >= 1


def ws_address(url: str, stream_id: str) -> str:
    return f"{url.replace('http://', 'ws://')}/v1/streams/{stream_id}/ws"


def test_a_message_naming_an_invalid_id_leaves_the_websocket_open(live_server):
    """Through uvicorn, which encodes each text message as UTF-8: an id that is no valid Unicode (a
    lone surrogate in JSON) is refused without being sent back, and the connection goes on."""
    from websockets.sync.client import connect

    url, _ = live_server
    with httpx.Client(base_url=url, timeout=DEADLINE) as http:
        stream_id = http.post("/v1/streams", json={"source": "push"}).json()["id"]
        try:
            with connect(ws_address(url, stream_id), open_timeout=DEADLINE, close_timeout=5) as ws:
                assert json.loads(ws.recv(timeout=DEADLINE))["type"] == "ready"
                for text in (
                    '{"type": "question", "id": "\\ud800", "question": "hi"}',
                    '{"type": "cancel", "id": "\\ud800"}',
                    '{"type": "dance", "id": "\\ud800", "note": "\\udfff"}',
                ):
                    ws.send(text)
                    message = ws_message(ws)
                    assert message["type"] == "error" and message["id"] is None and "ref" not in message, message
                ws.send('{"type": "question", "id": "ok", "question": "hi"}')
                message = ws_message(ws)  # still open: answered as any question before the first frame
                assert message["id"] == "ok" and message["error"]["code"] == "no_frames", message
        finally:
            http.delete(f"/v1/streams/{stream_id}")


def test_a_server_without_a_token_refuses_other_origins_with_a_response(live_server):
    """Through uvicorn: the handshake of a page of another origin is answered 403 with a JSON error
    that a client can read; the server's own page (its origin) and clients that send no origin connect."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url, _ = live_server
    with httpx.Client(base_url=url, timeout=DEADLINE) as http:
        stream_id = http.post("/v1/streams", json={"source": "push"}).json()["id"]
        try:
            address = ws_address(url, stream_id)
            with pytest.raises(InvalidStatus) as refused:
                connect(address, origin="http://evil.example", open_timeout=DEADLINE)
            response = refused.value.response
            assert response.status_code == 403 and response.headers["content-type"] == "application/json"
            assert json.loads(response.body)["error"]["code"] == "origin_not_allowed"
            for origin in (url, None):
                with connect(address, origin=origin, open_timeout=DEADLINE, close_timeout=5) as ws:
                    assert json.loads(ws.recv(timeout=DEADLINE))["type"] == "ready"
        finally:
            http.delete(f"/v1/streams/{stream_id}")


def test_a_token_the_page_cannot_send_is_warned_about(tiny_model_dir, caplog):
    """The page sends the token to a WebSocket as a subprotocol, which holds only an HTTP token's
    characters: a server whose token has others says so when it starts."""
    with caplog.at_level("WARNING", logger="mukv.serve.app"):
        create_app(ServeConfig(model=str(tiny_model_dir), token="token/with,other:chars"))
    assert any("subprotocol" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mukv.serve.app"):
        create_app(ServeConfig(model=str(tiny_model_dir), token="fine-Token_0123.456~"))
    assert not caplog.records


def http_get_metrics(url: str) -> str:
    with httpx.Client(base_url=url, timeout=DEADLINE) as http:
        return http.get("/metrics").text
