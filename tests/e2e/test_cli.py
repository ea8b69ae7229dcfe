"""The ``mukv`` command as a user types it, in subprocesses, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mukv.video.synthetic import make_scenes, write_video

SCRIPT = Path(sys.executable).parent / "mukv"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mukv.cli"]
# Not in the default run (`make test-slow` runs these): a faster test covers the same path.
SLOW = pytest.mark.slow


def mukv(*args: str, input: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, input=input, timeout=timeout, env=env, check=False
    )


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "shapes.mp4", make_scenes(24.0, 6.0, seed=1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "tiny"
    result = mukv("tiny-model", str(directory))
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stdout
    return directory


def test_help_lists_the_commands():
    result = mukv("--help")
    assert result.returncode == 0
    for command in ("ask", "chat", "demo", "tiny-model", "methods"):
        assert command in result.stdout


def test_tiny_model_refuses_a_non_empty_directory(model_dir):
    result = mukv("tiny-model", str(model_dir))
    assert result.returncode == 2
    assert "not empty" in result.stderr


def test_ask_at_a_time_as_json(video, model_dir):
    result = mukv(
        "ask", str(video), "-q", "What colour?", "-q", "What shape?", "--at", "10", "--model", str(model_dir), "--json"
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in records] == ["What colour?", "What shape?"]
    for record in records:
        assert record["time"] <= 10.0 and record["frames_seen"] == 6
        assert record["method"] == "full"
        assert all(block["end_time"] <= 10.0 for block in record["retrieved"])


def test_ask_uniform_with_options_and_choices(video, model_dir):
    result = mukv(
        "ask", str(video), "-q", "Which colour?", "-c", "red", "-c", "blue",
        "--model", str(model_dir), "--method", "uniform", "--set", "num_frames=4", "--fps", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Q [23.0s, 24 frames]: Which colour?" in result.stdout
    assert "uniform: " in result.stdout and "A: " in result.stdout


def test_ask_mukv_with_preset_and_overrides(video, model_dir):
    result = mukv(
        "ask", str(video), "-q", "What colour?", "--model", str(model_dir), "--method", "mukv",
        "--preset", "paper", "--set", "keep_ratio.patch=0.5", "--set", "encode=shared", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["method"] == "mukv" and record["frames_seen"] == 12
    assert {b["granularity"] for b in record["retrieved"]} == {"patch", "frame", "segment"}
    assert all(b["score"] is not None for b in record["retrieved"])


# Slow: the same `ask --method --set --json` path as the mukv test above, one process each; every
# method's answers are tested in process (tests/contract, tests/integration/test_rekv.py).
@pytest.mark.slow
@pytest.mark.parametrize(("method", "option"), [("rekv", "retrieve_blocks=3"), ("recent", "num_frames=2")])
def test_ask_with_rekv_and_recent(video, model_dir, method, option):
    result = mukv(
        "ask", str(video), "-q", "What?", "--model", str(model_dir), "--method", method, "--set", option, "--json"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["method"] == method and record["frames_seen"] == 12
    if method == "recent":
        assert [b["first_frame"] for b in record["retrieved"]] == [10, 11]


def test_ask_npy_needs_and_uses_a_frame_rate(tmp_path, model_dir):
    array = np.random.default_rng(0).integers(0, 256, (20, 48, 64, 3), dtype=np.uint8)
    path = tmp_path / "clip.npy"
    np.save(path, array)
    missing = mukv("ask", str(path), "-q", "What?", "--model", str(model_dir))
    assert missing.returncode == 2 and "--npy-fps" in missing.stderr
    result = mukv("ask", str(path), "-q", "What?", "--model", str(model_dir), "--npy-fps", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["frames_seen"] == 5  # 10 s at 0.5 fps: t = 0, 2, 4, 6, 8


# The cases marked slow load the model before they fail (seconds each); each is also checked in
# process by tests/integration/test_cli_inputs.py, and `--method nope` stands for them here.
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "{missing}", "-q", "What?"], "video not found"),
        (["ask", "{corrupt}", "-q", "What?"], "cannot open as a video"),
        (["ask", "{video}", "-q", "  "], "question: must not be empty"),
        (["ask", "{video}", "-q", "What?", "--method", "nope"], "unknown 'nope'"),
        pytest.param(["ask", "{video}", "-q", "What?", "--set", "nope=1"], "nope: unknown field", marks=SLOW),
        (["ask", "{video}", "-q", "What?", "--fps", "0"], "sample_fps"),
        (["ask", "{video}", "-q", "What?", "--at", "-1"], "--at"),
        pytest.param(["ask", "{video}", "-q", "What?", "--dtype", "int4"], "dtype", marks=SLOW),
        pytest.param(
            ["ask", "{video}", "-q", "What?", "--method", "mukv", "--preset", "best"], "no preset 'best'", marks=SLOW
        ),
        pytest.param(
            ["ask", "{video}", "-q", "What?", "--method", "mukv", "--set", "keep_ratio.patch=2"],
            "keep_ratio.patch",
            marks=SLOW,
        ),
        pytest.param(
            ["ask", "{video}", "-q", "What?", "--method", "mukv", "--set", "order=random"],
            "order: must be one of",
            marks=SLOW,
        ),
    ],
)
def test_bad_input_gives_one_line_errors(tmp_path, video, model_dir, args, message):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"this is not a video" * 100)
    paths = {"missing": str(tmp_path / "nope.mp4"), "corrupt": str(corrupt), "video": str(video)}
    args = [a.format(**paths) for a in args]
    if "--model" not in args:
        args += ["--model", str(model_dir)]
    result = mukv(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# Slow: the message is load_backend's (tests/integration/test_backend.py), and the CLI's path for a
# model that does not load is taken by test_demo_refuses_unknown_methods_and_short_streams.
@pytest.mark.slow
def test_unknown_model_offline(video):
    result = mukv("ask", str(video), "-q", "What?", "--model", "no-such-org/no-such-model")
    assert result.returncode == 2
    assert "could not load model 'no-such-org/no-such-model'" in result.stderr


def test_chat_answers_typed_questions_while_streaming(video, model_dir):
    script = "/time\nWhat colour?\n\nWhat shape?\n/quit\n"
    result = mukv("chat", str(video), "--model", str(model_dir), "--speed", "50", "--max-new-tokens", "4", input=script)
    assert result.returncode == 0, result.stderr
    assert "stream time" in result.stdout
    answers = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(answers) == 2
    assert result.stdout.count("cache tokens") == 2


def test_methods_lists_options():
    result = mukv("methods")
    assert result.returncode == 0
    assert "num_frames=32" in result.stdout
    assert "mukv (presets: paper, release)" in result.stdout
    assert "keep_ratio.patch=0.1" in result.stdout


def test_demo_answers_with_the_shipped_model_offline(tmp_path):
    result = mukv("demo", "--workdir", str(tmp_path), "--methods", "mukv,full")
    assert result.returncode == 0, result.stderr
    assert "model: mukv-tiny" in result.stdout
    assert result.stdout.count("reference:") == 8  # 2 streams x 2 questions x 2 methods
    assert result.stdout.count("in the answering cache:") == 8
    # Measured when shipped: full 4/4, mukv 3/4 (its cache misses the order question's first frame).
    assert "full: 4/4 right" in result.stdout
    assert "mukv: 3/4 right" in result.stdout or "mukv: 4/4 right" in result.stdout
    assert len(list(tmp_path.glob("*.mp4"))) == 2


def test_demo_refuses_unknown_methods_and_short_streams(tmp_path):
    result = mukv("demo", "--workdir", str(tmp_path), "--methods", "mukv,nope")
    assert result.returncode != 0 and "nope" in result.stderr
    result = mukv("demo", "--workdir", str(tmp_path), "--frames", "3")
    assert result.returncode != 0 and "--frames" in result.stderr
    result = mukv("demo", "--workdir", str(tmp_path), "--model", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "could not load model" in result.stderr
    assert not list(tmp_path.glob("*.mp4"))  # nothing written before the model loaded
