"""Reliability of the ``mukv`` command as a user meets it: concurrent runs, damaged files, hostile
input, clean output. Each test runs the real command in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_cli import COMMAND, mukv
from tests.e2e.test_eval_cli import eval_args
from tests.integration.test_run_reliability import damage_middle


def question_count(bench: Path) -> int:
    return sum(len(v["conversations"]) for v in json.loads((bench / "annotations.json").read_text()))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def no_traceback(*results: subprocess.CompletedProcess) -> None:
    for result in results:
        assert "Traceback" not in result.stderr + result.stdout, result.stderr


# Slow: the run lock's refusal and its message are tested in process (tests/integration/
# test_run_reliability.py: a second writer refused naming the owner, shards and the run-file lock).
@pytest.mark.slow
def test_two_evals_on_one_directory_keep_one_record_per_question(bench, model_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [*COMMAND, *eval_args(bench, model_dir, out, "full")]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append((process.wait(timeout=240), *process.communicate(timeout=10)))
    finally:
        for process in processes:
            process.kill()
    codes = sorted(code for code, _, _ in outputs)
    refused = [err for code, _, err in outputs if code == 2]
    assert codes == [0, 2], outputs
    assert "is being written by another process (pid" in refused[0] and "mukv" in refused[0]
    qids = [r["qid"] for r in lines(out / "predictions.jsonl")]
    assert len(qids) == len(set(qids)) == question_count(bench)


def test_a_damaged_video_is_reported_and_retried(bench, model_dir, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for source in (bench / "videos").iterdir():
        (videos / source.name).write_bytes(source.read_bytes())
    damage_middle(videos / "synthetic_000.mp4")
    args = eval_args(bench, model_dir, tmp_path / "run", "full")
    args[args.index("--videos") + 1] = str(videos)
    first = mukv(*args)
    assert first.returncode == 0, first.stderr
    assert "failed: synthetic_000 (decode" in first.stderr and "questions failed (1 videos)" in first.stdout
    again = mukv(*args)
    assert again.returncode == 0 and "0 answered" in again.stdout and "use --retry-failed" in again.stdout
    report = mukv("report", str(tmp_path / "run"), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "## Failed videos and questions" in report.stdout and "synthetic_000 (decode" in report.stdout
    (videos / "synthetic_000.mp4").write_bytes((bench / "videos" / "synthetic_000.mp4").read_bytes())
    retried = mukv(*args, "--retry-failed")
    assert retried.returncode == 0 and "failed" not in retried.stdout
    qids = [r["qid"] for r in lines(tmp_path / "run" / "predictions.jsonl")]
    assert len(qids) == len(set(qids)) == question_count(bench)
    no_traceback(first, again, report, retried)


def test_undecodable_questions_are_clear_errors(model_dir, tmp_path):
    from mukv.video.synthetic import make_scenes, write_video

    video = write_video(tmp_path / "clip.mp4", make_scenes(8.0, 4.0, seed=3))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [*COMMAND, "ask", str(video), "--model", str(model_dir)]
    asked = subprocess.run(
        [os.fsencode(a) for a in argv] + [b"-q", b"caf\xe9?"], capture_output=True, env=env, timeout=240, check=False
    )
    assert asked.returncode == 2 and b"question: not valid UTF-8 text" in asked.stderr, asked.stderr
    assert b"Traceback" not in asked.stderr
    chat = subprocess.run(
        [*COMMAND, "chat", str(video), "--model", str(model_dir), "--speed", "100", "--max-new-tokens", "2"],
        input=b"caf\xe9?\nWhat colour?\n/quit\n",
        capture_output=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert chat.returncode == 0, chat.stderr
    assert b"not UTF-8 text" in chat.stderr and b"Traceback" not in chat.stderr
    assert b"cache tokens" in chat.stdout  # the next question was answered


def test_ask_output_reads_cleanly(model_dir, tmp_path):
    from mukv.video.synthetic import make_scenes, write_video

    video = write_video(tmp_path / "clip.mp4", make_scenes(8.0, 4.0, seed=4))
    started = time.monotonic()
    result = mukv("ask", str(video), "-q", "What colour?", "--model", str(model_dir), "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 240
    assert "Loading weights" not in result.stderr and "Warning" not in result.stderr  # third-party output stays out
    bar = [line for line in result.stderr.split("\n") if "encoding" in line]
    assert bar and bar[-1].rstrip().endswith("]") and "100%" in bar[-1]  # the bar finished on its own line
    assert result.stdout.startswith("Q [")  # the answer starts a line of its own
    verbose = mukv(
        "--verbose", "ask", str(video), "-q", "What colour?", "--model", str(model_dir), "--max-new-tokens", "2"
    )
    assert verbose.returncode == 0 and "Loading weights" in verbose.stderr
