"""``mukv eval`` / ``merge`` / ``report`` as a user runs them, on a synthetic benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mukv.memory import available_methods
from tests.e2e.test_cli import COMMAND, mukv
from tests.integration.test_judge import MODEL, Reply, endpoint  # noqa: F401  (fixture)

SMALL = {"uniform": "num_frames=4", "recent": "num_frames=4", "rekv": "retrieve_blocks=3", "mukv": "top_k.frame=4"}


def eval_args(bench: Path, model_dir: Path, out: Path, method: str) -> list[str]:
    args = ["eval", "rvs-ego", "--anno", str(bench / "annotations.json"), "--videos", str(bench / "videos")]
    args += [
        "--model",
        str(model_dir),
        "--method",
        method,
        "--out",
        str(out),
        "--npy-fps",
        "2",
        "--max-new-tokens",
        "3",
    ]
    if method in SMALL:
        args += ["--set", SMALL[method]]
    return args


# Slow: five `mukv eval` processes. Every method answers in process in tests/contract and the runner
# tests; `eval`, `report` and its plots through the CLI are covered by the tests below and by
# tests/integration/test_cli_inputs.py.
@pytest.mark.slow
def test_every_method_runs_and_reports(bench, model_dir, tmp_path):
    questions = sum(len(v["conversations"]) for v in json.loads((bench / "annotations.json").read_text()))
    runs = []
    for method in available_methods():
        out = tmp_path / method
        result = mukv(*eval_args(bench, model_dir, out, method))
        assert result.returncode == 0, result.stderr
        lines = (out / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == questions
        assert {json.loads(line)["method"] for line in lines} == {method}
        runs.append(str(out))
    report = mukv("report", *runs, "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    for method in available_methods():
        assert f"| {method}" in text
    assert (tmp_path / "report" / "quality_vs_memory.png").stat().st_size > 1000
    assert (tmp_path / "report" / "cost_vs_length.png").stat().st_size > 1000


def test_killed_run_resumes_without_loss_or_duplicates(bench, model_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [*COMMAND, *eval_args(bench, model_dir, out, "full")], env=env, stderr=subprocess.DEVNULL
    )
    path = out / "predictions.jsonl"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if path.exists() and len(path.read_bytes().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be interrupted"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    done = [json.loads(line) for line in path.read_bytes().splitlines() if line.endswith(b"}")]
    assert len(done) >= 3
    resumed = mukv(*eval_args(bench, model_dir, out, "full"))
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stdout
    records = [json.loads(line) for line in path.read_text().splitlines()]
    qids = [r["qid"] for r in records]
    questions = sum(len(v["conversations"]) for v in json.loads((bench / "annotations.json").read_text()))
    assert len(qids) == len(set(qids)) == questions
    assert records[: len(done)] == done


# Slow: three processes. `eval --shard` and `merge` run in process in tests/integration/
# test_cli_inputs.py, and merged shards equal an unsharded run in tests/integration/test_runner.py.
@pytest.mark.slow
def test_shards_and_merge_through_the_cli(bench, model_dir, tmp_path):
    out = tmp_path / "sharded"
    for shard in ("0/2", "1/2"):
        result = mukv(*eval_args(bench, model_dir, out, "uniform"), "--shard", shard)
        assert result.returncode == 0, result.stderr
    merged = mukv("merge", str(out))
    assert merged.returncode == 0, merged.stderr
    assert len((out / "predictions.jsonl").read_text().splitlines()) == sum(
        len(v["conversations"]) for v in json.loads((bench / "annotations.json").read_text())
    )


def test_eval_errors_are_one_line(bench, model_dir, tmp_path):
    missing = mukv("eval", "rvs-ego", "--anno", str(tmp_path / "nope.json"), "--videos", str(bench / "videos"),
                   "--model", str(model_dir), "--out", str(tmp_path / "o"))  # fmt: skip
    assert missing.returncode == 2 and "nope.json" in missing.stderr
    unknown = mukv("eval", "nope", "--anno", str(bench / "annotations.json"), "--videos", str(bench / "videos"),
                   "--model", str(model_dir), "--out", str(tmp_path / "o"))  # fmt: skip
    assert unknown.returncode == 2 and "rvs-ego" in unknown.stderr
    no_videos = mukv("eval", "rvs-ego", "--anno", str(bench / "annotations.json"), "--videos", str(tmp_path),
                     "--model", str(model_dir), "--out", str(tmp_path / "o"))  # fmt: skip
    assert no_videos.returncode == 2 and "not found" in no_videos.stderr
    assert "Traceback" not in missing.stderr + unknown.stderr + no_videos.stderr
    assert sys.executable


def test_judge_scores_a_run_through_a_local_endpoint(bench, model_dir, tmp_path, endpoint):  # noqa: F811
    out = tmp_path / "run"
    assert mukv(*eval_args(bench, model_dir, out, "recent")).returncode == 0
    endpoint.default = Reply(content="{'pred': 'yes', 'score': 4}")
    args = ["judge", str(out), "--judge-url", endpoint.url, "--judge-model", MODEL]
    first = mukv(*args)
    assert first.returncode == 0, first.stderr
    scores = json.loads((out / "scores.json").read_text())
    questions = len((out / "predictions.jsonl").read_text().splitlines())
    judge = {"accuracy": 1.0, "score": 4.0, "judge_model": MODEL, "count": questions}
    assert scores["judge"] == judge | {"covers": scores["records"]}  # every open-ended record is judged
    assert scores["recall"]["count"] == questions and scores["judge_free"]["count"] == questions
    assert len(endpoint.requests) == questions
    assert mukv(*args).returncode == 0
    assert len(endpoint.requests) == questions, "re-scoring must come from the cache"
    verdicts = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert {v["judge_model"] for v in verdicts} == {MODEL} and len(verdicts) == questions
    report = mukv("report", str(out), "--out", str(tmp_path / "report"))
    assert report.returncode == 0 and f"100.0 / 4.00 ({MODEL})" in report.stdout


def test_judge_without_an_endpoint_reports_judge_free_metrics(bench, model_dir, tmp_path, monkeypatch):
    for name in ("MUKV_JUDGE_BASE_URL", "MUKV_JUDGE_MODEL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    assert mukv(*eval_args(bench, model_dir, out, "recent")).returncode == 0
    result = mukv("judge", str(out))
    assert result.returncode == 0, result.stderr
    assert "judge-free metrics only" in result.stderr
    assert json.loads((out / "scores.json").read_text())["judge"] is None
