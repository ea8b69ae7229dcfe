"""``mukv encode`` and ``mukv ask --memory`` as a user types them, in subprocesses: an encode stopped
by SIGTERM and then killed outright resumes and ends with the memory an uninterrupted encode
writes; the saved memory answers without the video; a wrong model or a damaged file is refused in
one line with a non-zero exit status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mukv.video.synthetic import make_scenes, write_video
from tests.e2e.test_cli import COMMAND, SLOW, mukv

# 24 frames at 1 fps, a checkpoint every 8 (one encoding batch): stops land between checkpoints.
ENCODE = ("--fps", "1", "--set", "segment_frames=4", "--checkpoint-every", "8")


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "shapes.mp4", make_scenes(24.0, 6.0, seed=1))


@pytest.fixture(scope="module")
def whole(video, model_dir, tmp_path_factory) -> Path:
    """The memory of an uninterrupted encode."""
    out = tmp_path_factory.mktemp("whole") / "mem"
    result = mukv("encode", str(video), "-o", str(out), "--model", str(model_dir), *ENCODE)
    assert result.returncode == 0, result.stderr
    assert "encoded 24 frames" in result.stdout
    return out


def save_id(out: Path) -> str | None:
    try:
        return json.loads((out / "manifest.json").read_text())["save_id"]
    except (OSError, ValueError, KeyError):
        return None


def start_and_stop(args: list[str], out: Path, sig: int, after: str | None) -> subprocess.CompletedProcess:
    """Run ``mukv *args``; once ``out`` holds a checkpoint newer than ``after``, send ``sig``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen([*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 200
    while save_id(out) in (None, after) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def frames_in(out: Path) -> int:
    return json.loads((out / "manifest.json").read_text())["stream"]["frames"]


@SLOW  # five model loads in subprocesses; test_encode_command.py covers SIGTERM in process
def test_an_interrupted_encode_resumes_and_ends_as_an_uninterrupted_one(video, model_dir, whole, tmp_path):
    out = tmp_path / "mem"
    args = ["encode", str(video), "-o", str(out), "--model", str(model_dir), *ENCODE]
    # SIGTERM: the encode saves what it has between batches and says how to resume.
    stopped = start_and_stop(args, out, signal.SIGTERM, after=None)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "run the same command to resume" in stopped.stderr
    first = frames_in(out)
    assert 8 <= first < 24
    # SIGKILL right after the next checkpoint: nothing is saved then, the checkpoint stays whole.
    killed = start_and_stop(args, out, signal.SIGKILL, after=save_id(out))
    assert killed.returncode == -signal.SIGKILL
    assert "resuming after" in killed.stderr
    second = frames_in(out)
    assert first < second <= 24
    finished = mukv(*args)
    assert finished.returncode == 0, finished.stderr
    assert "encoded 24 frames" in finished.stdout
    # The same memory as an uninterrupted encode: blocks, clock and open state, and its answers.
    from mukv import StreamSession
    from mukv.backends import load_backend
    from tests.integration.test_persist import assert_same_answer, assert_same_state

    backend = load_backend(model_dir)
    resumed, reference = StreamSession.load(backend, out), StreamSession.load(backend, whole)
    assert_same_state(resumed, reference)
    assert_same_answer(resumed, reference)
    again = mukv(*args)
    assert again.returncode == 0 and "already holds all of shapes.mp4 (24 frames)" in again.stdout


def test_ask_from_a_memory_without_the_video(whole, model_dir):
    result = mukv("ask", "--memory", str(whole), "-q", "What colour?", "--max-new-tokens", "3", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["method"] == "mukv" and record["frames_seen"] == 24 and record["time"] == 23.0
    assert record["retrieved"] and all(block["end_time"] <= 23.0 for block in record["retrieved"])


def test_wrong_model_or_settings_are_refused_in_one_line(whole, video, model_dir, tmp_path):
    other = tmp_path / "other"
    assert mukv("tiny-model", str(other), "--seed", "1").returncode == 0
    result = mukv("ask", "--memory", str(whole), "-q", "What colour?", "--model", str(other))
    assert result.returncode == 2
    assert "error: " in result.stderr and "another model" in result.stderr and "Traceback" not in result.stderr
    # Resuming into a memory of other settings is refused before anything is encoded.
    result = mukv(
        "encode", str(video), "-o", str(whole), "--model", str(model_dir), "--fps", "1", "--set", "segment_frames=2"
    )
    assert result.returncode == 2 and "other settings (config differ)" in result.stderr


def test_a_damaged_memory_is_refused_in_one_line(whole, tmp_path):
    import shutil

    copy = Path(shutil.copytree(whole, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    chunk = copy / manifest["chunks"][-1]["file"]
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = mukv("ask", "--memory", str(copy), "-q", "What colour?")
    assert result.returncode == 2
    assert f"error: {chunk}: damaged" in result.stderr and "Traceback" not in result.stderr
    result = mukv("ask", "--memory", str(tmp_path / "nothing"), "-q", "What colour?")
    assert result.returncode == 2 and "no saved memory there" in result.stderr
