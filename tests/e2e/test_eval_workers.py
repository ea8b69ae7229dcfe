"""``mukv eval --workers N`` as a user runs it: each command starts its own local Ray instance
(10-40 s on two busy cores), so these tests are few; the in-process ones are in
tests/integration/test_distributed_eval.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mukv.backends import load_backend
from mukv.eval.runner import VOLATILE_FIELDS, RunConfig, run_benchmark
from tests.e2e.test_cli import COMMAND, mukv
from tests.e2e.test_eval_cli import eval_args
from tests.integration.test_judge import MODEL, Reply, endpoint  # noqa: F401  (fixture)

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'mukv[ray]')"
)


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_qid(records: list[dict]) -> dict[str, dict]:
    qids = [r["qid"] for r in records]
    assert len(qids) == len(set(qids)), "duplicate records"
    return {r["qid"]: {k: v for k, v in r.items() if k not in VOLATILE_FIELDS} for r in records}


def questions_of(bench: Path) -> int:
    return sum(len(v["conversations"]) for v in json.loads((bench / "annotations.json").read_text()))


def test_worker_options_are_checked_before_anything_runs(bench, model_dir, tmp_path):
    out = tmp_path / "o"
    both = mukv(*eval_args(bench, model_dir, out, "full"), "--shard", "0/2", "--workers", "2")
    assert both.returncode == 2 and "--shard cannot be combined with --workers/--ray" in both.stderr
    none = mukv(*eval_args(bench, model_dir, out, "full"), "--workers", "0")
    assert none.returncode == 2 and "--workers: must be >= 1" in none.stderr
    assert "Traceback" not in both.stderr + none.stderr and not out.exists()


def test_without_ray_workers_say_how_to_install_it(bench, model_dir, tmp_path):
    hidden = tmp_path / "hide-ray" / "ray"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(hidden.parent)}
    result = subprocess.run(
        [*COMMAND, *eval_args(bench, model_dir, tmp_path / "o", "full"), "--workers", "2"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "pip install 'mukv[ray]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


# In the default run, tests/integration/test_distributed_eval.py's killed-worker test checks that
# two workers write the single process's records; this one adds the command line and the judge.
@pytest.mark.slow
@needs_ray
def test_two_workers_equal_one_process_and_the_judge_runs_concurrently(
    bench,
    model_dir,
    tmp_path,
    endpoint,  # noqa: F811
):
    workers = tmp_path / "workers"
    result = mukv(*eval_args(bench, model_dir, workers, "rekv"), "--workers", "2", timeout=400)
    assert result.returncode == 0, result.stderr
    assert f"{questions_of(bench)} answered" in result.stdout
    assert "videos 2/2" in result.stderr  # the whole run's progress bar
    # The reference: the same command's configuration run in this process (cheaper than another `mukv eval`).
    run = json.loads((workers / "run.json").read_text())["config"]
    single = tmp_path / "single"
    run_benchmark(RunConfig(**run), single, backend=load_backend(model_dir))
    assert by_qid(records_of(workers / "predictions.jsonl")) == by_qid(records_of(single / "predictions.jsonl"))
    endpoint.default = Reply(content="{'pred': 'no', 'score': 2}", delay=0.2)
    judged = mukv(
        "judge", str(workers), "--judge-url", endpoint.url, "--judge-model", MODEL, "--judge-concurrency", "3"
    )
    assert judged.returncode == 0, judged.stderr
    assert json.loads((workers / "scores.json").read_text())["judge"]["count"] == questions_of(bench)
    assert 1 < endpoint.peak <= 3 and "judging" in judged.stderr


@pytest.fixture(scope="module")
def long_bench(tmp_path_factory) -> Path:
    """Longer videos, so that a run is still answering when it is killed."""
    root = tmp_path_factory.mktemp("long-bench")
    result = mukv("make-benchmark", str(root), "--videos", "3", "--duration", "60")
    assert result.returncode == 0, result.stderr
    return root


# Slow (two `mukv eval --workers 2`, each starting Ray: 60-100 s on two busy cores). A distributed run
# resuming where it stopped is covered in process (tests/integration/test_distributed_eval.py), and
# a SIGKILLed single-process run in tests/e2e/test_eval_cli.py; this one adds the driver's death.
@pytest.mark.slow
@needs_ray
def test_a_killed_driver_resumes_without_loss_or_duplicates(long_bench, model_dir, tmp_path):
    out = tmp_path / "run"
    args = [*eval_args(long_bench, model_dir, out, "full"), "--workers", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([*COMMAND, *args], env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    path = out / "predictions.jsonl"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if path.exists() and len(path.read_bytes().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be interrupted"
        process.send_signal(signal.SIGKILL)  # the driver only: its workers lose their owner
    finally:
        process.wait(timeout=30)
    done = [json.loads(line) for line in path.read_bytes().splitlines() if line.endswith(b"}")]
    assert 3 <= len(done) < questions_of(long_bench)
    resumed = mukv(*args, timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} already done" in resumed.stdout
    records = records_of(path)
    assert len(by_qid(records)) == questions_of(long_bench)
    assert records[: len(done)] == done
