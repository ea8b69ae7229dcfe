"""``mukv encode`` and ``mukv ask --memory`` invoked in process (the entry point a user runs; the
subprocess tests in tests/e2e/test_encode_cli.py add a real SIGKILL): an encode stopped by SIGTERM
resumes and ends with the memory an uninterrupted encode writes; a saved memory answers like the
session that encoded it; mismatched settings are refused before anything is encoded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from mukv.video.synthetic import make_scenes, write_video
from tests.integration.test_cli_inputs import mukv
from tests.integration.test_persist import assert_same_answer, assert_same_state

# 64 frames at 1 fps, a checkpoint every 8: a SIGTERM sent at the first checkpoint lands long before
# the last frame (with 16 frames the tiny model sometimes finished first).
FRAMES = 64
ENCODE = ("--fps", "1", "--set", "segment_frames=4", "--checkpoint-every", "8")


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "shapes.mp4", make_scenes(float(FRAMES), 4.0, seed=2))


@pytest.fixture(scope="module")
def whole(video, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "mem"
    result = mukv("encode", str(video), "-o", str(out), "--model", str(tiny_model_dir), *ENCODE)
    assert result.returncode == 0, result.stderr
    assert f"encoded {FRAMES} frames" in result.stdout
    return out


def test_sigterm_saves_and_the_same_command_resumes_to_the_uninterrupted_memory(
    video, tiny_model_dir, whole, backend, tmp_path
):
    out = tmp_path / "mem"
    args = ["encode", str(video), "-o", str(out), "--model", str(tiny_model_dir), *ENCODE]

    def terminate_at_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while not (out / "manifest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the command (it runs on this main thread)

    watcher = threading.Thread(target=terminate_at_first_checkpoint)
    watcher.start()
    stopped = mukv(*args)
    watcher.join()
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "run the same command to resume" in stopped.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["encode"]["complete"] is False
    assert 8 <= manifest["stream"]["frames"] < FRAMES
    resumed = mukv(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after {manifest['stream']['frames']} frames" in resumed.stderr
    from mukv import StreamSession

    one, two = StreamSession.load(backend, out), StreamSession.load(backend, whole)
    assert_same_state(one, two)
    assert_same_answer(one, two)
    assert f"already holds all of shapes.mp4 ({FRAMES} frames)" in mukv(*args).stdout


def test_an_encode_whose_save_was_cut_after_moving_the_memory_aside_resumes(video, tiny_model_dir, whole, tmp_path):
    # A crash between moving the memory aside and renaming the new one into place leaves no OUT,
    # only the aside copy: the same command finds it instead of encoding from the start.
    shutil.copytree(whole, tmp_path / ".mem.0123abcd.old")
    out = tmp_path / "mem"
    result = mukv("encode", str(video), "-o", str(out), "--model", str(tiny_model_dir), *ENCODE)
    assert result.returncode == 0, result.stderr
    assert f"already holds all of shapes.mp4 ({FRAMES} frames)" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mem.lock", "mem"]


def test_ask_from_a_memory_answers_like_the_video(video, tiny_model_dir, whole):
    question = ("-q", "What colour?", "--max-new-tokens", "3", "--json")
    from_memory = mukv("ask", "--memory", str(whole), *question)
    assert from_memory.returncode == 0, from_memory.stderr
    from_video = mukv("ask", str(video), "--model", str(tiny_model_dir), "--method", "mukv", *ENCODE[:4], *question)
    assert from_video.returncode == 0, from_video.stderr
    a, b = json.loads(from_memory.stdout), json.loads(from_video.stdout)
    assert a["text"] == b["text"] and a["token_ids"] == b["token_ids"] and a["retrieved"] == b["retrieved"]
    assert a["frames_seen"] == FRAMES


def test_mismatches_are_refused_before_encoding(video, tiny_model_dir, whole, tmp_path):
    result = mukv(
        "encode",
        str(video),
        "-o",
        str(whole),
        "--model",
        str(tiny_model_dir),
        "--fps",
        "1",
        "--set",
        "segment_frames=2",
    )
    assert result.returncode == 2 and "other settings (config differ)" in result.stderr
    other = write_video(tmp_path / "other.mp4", make_scenes(8.0, 4.0, seed=3))
    result = mukv("encode", str(other), "-o", str(whole), "--model", str(tiny_model_dir), *ENCODE)
    assert result.returncode == 2 and "an encode of another video" in result.stderr
    result = mukv("ask", "--memory", str(whole), "-q", "Which?", "--method", "rekv")
    assert result.returncode == 2 and "method 'mukv', not 'rekv'" in result.stderr
    result = mukv("ask", str(video), "--memory", str(whole), "-q", "Which?")
    assert result.returncode == 2 and "one of them" in result.stderr


def test_storage_options_from_the_command_line(video, tiny_model_dir, whole, tmp_path):
    out = tmp_path / "small.mem"
    unbounded = json.loads((whole / "manifest.json").read_text())
    options = ("--set", "kv_dtype=int4", "--set", "memory_budget=200KiB", "--set", "ram_budget=64KiB")
    result = mukv("encode", str(video), "-o", str(out), "--model", str(tiny_model_dir), *ENCODE, *options)
    assert result.returncode == 0, result.stderr
    assert "MiB on disk)" in result.stdout
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["method"]["config"]["kv_dtype"] == "int4"
    assert saved["method"]["config"]["memory_budget"] == 200 * 1024
    assert saved["stream"]["frames"] == unbounded["stream"]["frames"] == FRAMES  # no frame lost from the clock
    answer = mukv("ask", "--memory", str(out), "-q", "What colour?", "--max-new-tokens", "2", "--json")
    assert answer.returncode == 0, answer.stderr
    memory = json.loads(answer.stdout)["memory"]
    assert memory["consolidated"]["evicted.patch"] > 0
    bad = mukv("encode", str(video), "-o", str(tmp_path / "x"), "--set", "kv_dtype=int3")
    assert bad.returncode == 2 and "kv_dtype: must be one of native, int8, int4" in bad.stderr
