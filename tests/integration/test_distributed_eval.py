"""The evaluation on Ray workers (``mukv.eval.distributed``), in process, on a real local Ray
instance (one per module: starting Ray on two busy cores takes 10-40 s) with the tiny model.

The reference is a single-process run of the same benchmark: the workers must give the same
records (timings aside), one per question, also when a worker process dies mid-video (the
test-only ``MUKV_TEST_WORKER_EXIT`` makes it ``os._exit`` after its k-th answer).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from mukv.eval.distributed import (
    TEST_EXIT_VARIABLE,
    Progress,
    VideoTask,
    _Driver,
    plan_workers,
    require_ray,
    run_distributed,
)
from mukv.eval.runner import RunConfig, RunError, read_failures, read_predictions, run_benchmark
from mukv.eval.schema import Question, VideoItem
from mukv.eval.synthetic import write_benchmark
from tests.integration.test_runner import strip


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mukv[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write_benchmark(tmp_path_factory.mktemp("bench"), videos=3, duration=16.0, scene_seconds=4.0)


def config(bench: Path, model_dir: Path, **kw) -> RunConfig:
    values = {"method": "rekv", "overrides": {"retrieve_blocks": "2"}, "npy_fps": 2.0, "max_new_tokens": 3} | kw
    return RunConfig(
        benchmark="rvs-ego", annotation=str(bench), videos=str(bench.parent / "videos"), model=str(model_dir), **values
    )


@pytest.fixture(scope="module")
def reference(bench, tiny_model_dir, backend, tmp_path_factory) -> dict[str, dict]:
    """The single-process records by question id, timings aside."""
    out = tmp_path_factory.mktemp("single")
    run_benchmark(config(bench, tiny_model_dir), out, backend=backend)
    return {r["qid"]: strip(r) for r in read_predictions(out / "predictions.jsonl")}


def by_qid(records: list[dict]) -> dict[str, dict]:
    qids = [r["qid"] for r in records]
    assert len(qids) == len(set(qids)), f"duplicate records: {sorted(q for q in qids if qids.count(q) > 1)}"
    return {r["qid"]: strip(r) for r in records}


# The CLI's --workers 2 run (tests/e2e/test_eval_workers.py) checks the same records in the default run.
@pytest.mark.slow
def test_two_workers_write_the_single_process_records(ray_session, bench, tiny_model_dir, reference, tmp_path):
    states: list[Progress] = []
    summary = run_distributed(config(bench, tiny_model_dir), tmp_path, workers=2, progress=states.append)
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert by_qid(records) == reference
    assert summary.answered == len(reference) and summary.videos == 3
    assert not summary.failed and not summary.worker_failed
    # Each video's answers arrive in its time order, whichever worker answered it.
    for video in {r["video_id"] for r in records}:
        times = [r["time"] for r in records if r["video_id"] == video]
        assert times == sorted(times)
    final = states[-1]
    assert (final.videos_done, final.questions_done) == (final.videos_total, final.questions_total) == (3, 18)
    assert [s.questions_done for s in states] == sorted(s.questions_done for s in states)
    assert json.loads((tmp_path / "run.json").read_text())["config"]["method"] == "rekv"
    again = run_distributed(config(bench, tiny_model_dir), tmp_path, workers=2)  # resumes: nothing left to do
    assert again.answered == 0 and again.skipped_done == len(reference)
    assert read_predictions(tmp_path / "predictions.jsonl") == records


def test_a_worker_killed_mid_video_leaves_a_complete_run(
    ray_session, bench, tiny_model_dir, reference, tmp_path, monkeypatch, caplog
):
    # The worker on synthetic_001's first attempt exits its process after its 2nd answer of 6.
    monkeypatch.setenv(TEST_EXIT_VARIABLE, "synthetic_001:2")
    with caplog.at_level(logging.WARNING, logger="mukv"):
        summary = run_distributed(config(bench, tiny_model_dir), tmp_path, workers=2)
    assert "synthetic_001: attempt 1 of 3 failed: the worker died" in caplog.text
    assert by_qid(read_predictions(tmp_path / "predictions.jsonl")) == reference
    assert not summary.failed and not summary.worker_failed
    assert summary.answered == len(reference)


# Its retry path runs in the default run through the killed-worker test.
@pytest.mark.slow
def test_a_video_whose_worker_dies_on_every_attempt_is_reported_and_can_be_retried(
    ray_session, bench, tiny_model_dir, reference, tmp_path, monkeypatch
):
    monkeypatch.setenv(TEST_EXIT_VARIABLE, "synthetic_002:1")
    summary = run_distributed(config(bench, tiny_model_dir), tmp_path, workers=2, max_attempts=1)
    assert summary.worker_failed == ["synthetic_002"]
    failures = read_failures(tmp_path / "failures.jsonl")
    assert failures["synthetic_002"]["stage"] == "worker" and "died" in failures["synthetic_002"]["reason"]
    written = {r["qid"] for r in read_predictions(tmp_path / "predictions.jsonl")}
    # The failure lists exactly the questions without a record: the first answer may have arrived.
    expected = {q for q in reference if q.startswith("synthetic_002/")} - written
    assert set(failures["synthetic_002"]["qids"]) == expected and expected
    assert {q for q in reference if not q.startswith("synthetic_002/")} <= written
    monkeypatch.delenv(TEST_EXIT_VARIABLE)
    skipped = run_distributed(config(bench, tiny_model_dir), tmp_path, workers=2)  # failed videos wait for a retry
    assert skipped.answered == 0 and skipped.skipped_failed == len(expected)
    retried = run_distributed(config(bench, tiny_model_dir), tmp_path, workers=1, retry_failed=True)
    assert retried.answered == len(expected) and not retried.failed
    assert by_qid(read_predictions(tmp_path / "predictions.jsonl")) == reference
    assert read_failures(tmp_path / "failures.jsonl") == {}


def test_a_model_that_does_not_load_is_named(ray_session, bench, tmp_path):
    with pytest.raises(RunError, match="did not load in a worker"):
        run_distributed(config(bench, tmp_path / "no-such-model"), tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "run.json").exists()  # nothing written before everything is checked


def test_longest_video_first():
    def task(video_id: str, duration: float | None, questions: int) -> VideoTask:
        qs = [
            Question(qid=f"{video_id}/{i}", video_id=video_id, question="q?", answer="a", time=i)
            for i in range(questions)
        ]
        video = VideoItem(video_id=video_id, path=f"{video_id}.mp4", duration=duration, questions=qs)
        return VideoTask(video=video, pending=qs, take=questions, file="", attempt=0, too_long={})

    driver = _Driver(None, None, None, None, None, 3, None)
    for t in (task("short", 10.0, 9), task("unknown", None, 2), task("long", 60.0, 1), task("mid", 30.0, 3)):
        driver._put(t)
    assert [driver._next().video.video_id for _ in range(4)] == ["long", "mid", "short", "unknown"]


def test_worker_plans():
    cpu = plan_workers(2, "cpu", {"CPU": 2.0}, [{"CPU": 2.0}])
    assert (cpu.count, cpu.num_cpus, cpu.num_gpus, cpu.threads) == (2, 1, 0, 1)
    shared = plan_workers(4, "cpu", {"CPU": 2.0}, [{"CPU": 2.0}])
    assert (shared.num_cpus, shared.threads) == (0.5, 1)  # more workers than cores share them
    per_node = plan_workers(None, "cpu", {"CPU": 16.0}, [{"CPU": 8.0}, {"CPU": 8.0}])
    assert (per_node.count, per_node.num_cpus, per_node.threads) == (2, 8, 8)
    gpus = plan_workers(None, "cuda", {"CPU": 16.0, "GPU": 4.0}, [{"CPU": 16.0, "GPU": 4.0}])
    assert (gpus.count, gpus.num_gpus) == (4, 1)
    with pytest.raises(RunError, match=r"--workers 3: --device cuda needs one GPU per worker.*has 2"):
        plan_workers(3, "cuda", {"GPU": 2.0}, [{"GPU": 2.0}])
    with pytest.raises(ValueError, match=r"--device cuda:1.*pass --device cuda"):
        plan_workers(2, "cuda:1", {"GPU": 2.0}, [{"GPU": 2.0}])
    with pytest.raises(ValueError, match="--device mps"):
        plan_workers(2, "mps", {"CPU": 2.0}, [{"CPU": 2.0}])
    with pytest.raises(ValueError, match="--workers: must be >= 1"):
        plan_workers(0, "cpu", {"CPU": 2.0}, [{"CPU": 2.0}])


def test_without_ray_the_message_says_how_to_install_it(monkeypatch, bench, tiny_model_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'mukv\[ray\]'"):
        require_ray()
    with pytest.raises(ImportError, match=r"pip install 'mukv\[ray\]'"):
        run_distributed(config(bench, tiny_model_dir), tmp_path, workers=2)
    assert not any(tmp_path.iterdir())
