"""``mukv serve --memory-dir``: streams saved over HTTP and reopened by the next server started on
the same directory, as a user runs it (real server processes on a loopback port, the shipped
``mukv-tiny``, frames pushed as PNG, answers over Server-Sent Events). Every wait is bounded."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from mukv.memory.persist import read_manifest
from mukv.video.streams import eval_kinds, make_stream, write_stream_video
from tests.e2e.test_cli import COMMAND
from tests.e2e.test_serve import (
    FILE_SEED,
    PUSH_SEED,
    STARTUP_SECONDS,
    Server,
    ask,
    encoded,
    free_port,
    info,
    png,
    wait_for,
)


@contextmanager
def serving(memory_dir: Path | None, log: Path, allowed: Path | None = None) -> Iterator[Server]:
    """A ``mukv serve`` process (with ``--memory-dir memory_dir``), stopped as Ctrl-C stops it."""
    token = secrets.token_hex(16)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MUKV_SERVE_TOKEN": token}
    options = ["--memory-dir", str(memory_dir)] if memory_dir is not None else []
    options += ["--allow-dir", str(allowed)] if allowed is not None else []
    command = [*COMMAND, "serve", "--model", "mukv-tiny", "--host", "127.0.0.1", "--port", str(port), *options]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    running = Server(f"http://127.0.0.1:{port}", token, log.parent, log)

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
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def push_clip(http: httpx.Client, method: str, frames: int = 8) -> tuple[str, object]:
    """A push stream of ``method`` holding the first ``frames`` frames of the ``PUSH_SEED`` clip."""
    clip = make_stream(8, seed=PUSH_SEED, kinds=eval_kinds(PUSH_SEED))
    created = http.post("/v1/streams", json={"source": "push", "method": method})
    assert created.status_code == 201, created.text
    stream_id = created.json()["id"]
    for frame, t in zip(clip.frames[:frames], clip.timestamps[:frames], strict=True):
        url = f"/v1/streams/{stream_id}/frames"
        response = http.post(url, params={"t": t}, content=png(frame), headers={"content-type": "image/png"})
        assert response.status_code == 202, response.text
    return stream_id, clip


def error_code(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["code"]


def test_saved_streams_are_reopened_by_the_next_server(tmp_path):
    memory_dir = tmp_path / "memories"
    allowed = tmp_path / "videos"
    allowed.mkdir()
    file_clip = make_stream(8, seed=FILE_SEED, kinds=eval_kinds(FILE_SEED))
    video = write_stream_video(allowed / "clip.mp4", file_clip)
    with serving(memory_dir, tmp_path / "first.log", allowed) as server, server.client() as http:
        body = {"source": str(video), "method": "mukv", "fps": 0.5, "speed": 8}
        created = http.post("/v1/streams", json=body)
        assert created.status_code == 201, created.text
        played = created.json()["id"]
        wait_for(
            lambda: (d := info(http, played))["state"] == "ended" and d["frames"]["encoded"] == 8,
            "the file to play",
        )
        assert http.post(f"/v1/streams/{played}/save").status_code == 200
        kept, clip = push_clip(http, "mukv")
        question = clip.questions[0]
        encoded(http, kept, 8)
        _, before = ask(http, kept, question.question)
        assert before["answer"] == question.answer  # mukv-tiny answers this stream right
        # Saving encodes the frames received so far first: frames still queued are saved too.
        other, _ = push_clip(http, "rekv", frames=5)
        damaged, _ = push_clip(http, "mukv", frames=4)
        for stream_id, frames, time in ((kept, 8, clip.timestamps[7]), (other, 5, clip.timestamps[4])):
            response = http.post(f"/v1/streams/{stream_id}/save")
            assert response.status_code == 200, response.text
            saved = response.json()
            assert (saved["id"], saved["frames"], saved["time"]) == (stream_id, frames, time)
            assert saved["bytes"] == sum(p.stat().st_size for p in (memory_dir / stream_id).iterdir())
            assert saved["bytes"] > 0
        assert http.post(f"/v1/streams/{damaged}/save").status_code == 200
        # Saving again replaces the saved memory with the stream's newest state.
        assert http.post(f"/v1/streams/{kept}/save").status_code == 200
        manifest = read_manifest(memory_dir / kept)
        assert manifest["extra"]["serve"]["id"] == kept
        assert manifest["extra"]["serve"]["source"]["kind"] == "push"
    # Damage one saved memory (a block file's bytes), and leave a copy of another under a name that
    # is no stream id, and a file: neither is a stream.
    block_file = next((memory_dir / damaged).glob("blocks-*.safetensors"))
    data = bytearray(block_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    block_file.write_bytes(bytes(data))
    shutil.copytree(memory_dir / other, memory_dir / "copied-stream")
    (memory_dir / "notes.txt").write_text("not a memory")

    with serving(memory_dir, tmp_path / "second.log") as server, server.client() as http:
        listed = {stream["id"]: stream for stream in http.get("/v1/streams").json()["data"]}
        assert set(listed) == {kept, other, played}
        # A file stream comes back ended, answering from its memory; its file is not played again.
        data = info(http, played)
        assert (data["state"], data["source"]["kind"], data["fps"]) == ("ended", "file", 0.5)
        assert data["frames"]["encoded"] == 8 and data["encoded_time"] == file_clip.timestamps[-1]
        _, done = ask(http, played, file_clip.questions[0].question)
        assert done["answer"] == file_clip.questions[0].answer
        log = server.log.read_text()
        assert f"skipping {damaged}: " in log and "damaged" in log
        data = info(http, kept)
        assert (data["method"], data["state"], data["source"]) == ("mukv", "live", {"kind": "push"})
        assert data["frames"]["encoded"] == data["frames"]["received"] == 8
        assert data["time"] == data["encoded_time"] == clip.timestamps[7]
        assert info(http, other)["method"] == "rekv"
        assert info(http, other)["frames"]["encoded"] == 5
        _, after = ask(http, kept, question.question)
        assert after["answer"] == before["answer"]
        assert after["frames_seen"] == before["frames_seen"] == 8
        # The reopened stream goes on: a frame after its stream time is taken, one before is not.
        url = f"/v1/streams/{kept}/frames"
        headers = {"content-type": "image/png"}
        frame = png(clip.frames[0])
        assert error_code(http.post(url, params={"t": clip.timestamps[7]}, content=frame, headers=headers), 409)
        assert http.post(url, params={"t": clip.timestamps[7] + 1}, content=frame, headers=headers).status_code == 202
        encoded(http, kept, 9)
        # Deleting a stream removes its saved memory: it does not come back at the next start.
        assert http.delete(f"/v1/streams/{other}").status_code == 200
        # Nothing of it is left behind, its lock file included (removed last).
        wait_for(lambda: not (memory_dir / f".{other}.lock").exists(), "the saved memory to be removed")
        assert not (memory_dir / other).exists()
        assert (memory_dir / kept).is_dir() and (memory_dir / f".{kept}.lock").exists()
    assert (memory_dir / "copied-stream").is_dir()  # never touched


def test_saving_is_refused_clearly(tmp_path):
    memory_dir = tmp_path / "memories"
    with serving(memory_dir, tmp_path / "server.log") as server, server.client() as http:
        full, _ = push_clip(http, "full", frames=2)
        response = http.post(f"/v1/streams/{full}/save")
        assert error_code(response, 409) == "method_not_saveable"
        assert response.json()["error"]["field"] == "method"
        assert "full" in response.json()["error"]["message"]
        assert not (memory_dir / full).exists()
        assert error_code(http.post("/v1/streams/st_0123456789abcdef/save"), 404) == "stream_not_found"
        for hostile in ("..", "..%2F..%2Fescaped", "%2E%2E", "st_0123456789abcdef%2F.."):
            response = http.post(f"/v1/streams/{hostile}/save")
            assert response.status_code in (404, 405), response.text
            assert response.json()["error"]["code"] in ("stream_not_found", "not_found", "method_not_allowed")
        assert not (tmp_path / "escaped").exists() and list(memory_dir.iterdir()) == []
        # The server's token applies.
        anonymous = httpx.post(f"{server.url}/v1/streams/{full}/save", timeout=10, trust_env=False)
        assert error_code(anonymous, 401) == "unauthorized"
    with serving(None, tmp_path / "plain.log") as server, server.client() as http:
        stream_id, _ = push_clip(http, "mukv", frames=1)
        assert error_code(http.post(f"/v1/streams/{stream_id}/save"), 409) == "saving_disabled"
