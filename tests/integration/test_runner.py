"""The evaluation runner on a synthetic benchmark with the tiny model (in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mukv.eval.runner import (
    VOLATILE_FIELDS,
    RunConfig,
    RunError,
    Shard,
    merge_predictions,
    read_predictions,
    run_benchmark,
)
from mukv.eval.synthetic import write_benchmark

TIMING = VOLATILE_FIELDS  # fields that vary between runs of the same answers


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write_benchmark(tmp_path_factory.mktemp("bench"), videos=3, duration=30.0, scene_seconds=6.0)


def config(bench: Path, model_dir: Path, method: str = "mukv", **kw) -> RunConfig:
    return RunConfig(
        benchmark="rvs-ego",
        annotation=str(bench),
        videos=str(bench.parent / "videos"),
        model=str(model_dir),
        method=method,
        npy_fps=2.0,
        max_new_tokens=3,
        **kw,
    )


def test_run_writes_every_question_with_the_protocol_fields(bench, tiny_model_dir, backend, tmp_path):
    summary = run_benchmark(config(bench, tiny_model_dir), tmp_path, backend=backend)
    records = read_predictions(tmp_path / "predictions.jsonl")
    annotations = json.loads(bench.read_text())
    assert summary.answered == len(records) == sum(len(v["conversations"]) for v in annotations)
    assert len({r["qid"] for r in records}) == len(records)
    for record in records:
        assert record["time"] <= max(record["evidence"])  # asked at end_time, never later
        assert all(block["end_time"] <= record["time"] for block in record["retrieved"])
        assert record["memory"]["total_bytes"] > 0 and record["context_tokens"] > 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["method"] == "mukv" and run["method_config"]["preset"] == "paper"
    assert {"mukv", "torch", "transformers"} <= set(run["versions"])


def test_resume_skips_answered_questions_and_repairs_a_torn_line(bench, tiny_model_dir, backend, tmp_path):
    cfg = config(bench, tiny_model_dir, method="full")
    run_benchmark(cfg, tmp_path, backend=backend, limit=4)
    path = tmp_path / "predictions.jsonl"
    first = read_predictions(path)
    assert len(first) == 4
    with path.open("a") as handle:
        handle.write('{"qid": "synthetic_000/9", "video_id": "synth')  # an interrupted write
    summary = run_benchmark(cfg, tmp_path, backend=backend)
    records = read_predictions(path)
    assert summary.skipped_done == 4
    assert records[:4] == first
    assert len({r["qid"] for r in records}) == len(records)
    full = tmp_path / "reference"
    run_benchmark(cfg, full, backend=backend)
    reference = {r["qid"]: strip(r) for r in read_predictions(full / "predictions.jsonl")}
    assert {r["qid"]: strip(r) for r in records} == reference


def test_shards_merged_equal_an_unsharded_run(bench, tiny_model_dir, backend, tmp_path):
    cfg = config(bench, tiny_model_dir, method="rekv", overrides={"retrieve_blocks": "2"})
    whole = tmp_path / "whole"
    run_benchmark(cfg, whole, backend=backend)
    sharded = tmp_path / "sharded"
    for index in range(2):
        run_benchmark(cfg, sharded, backend=backend, shard=Shard(index, 2))
    merged = read_predictions(merge_predictions(sharded))
    expected = read_predictions(whole / "predictions.jsonl")
    assert len(merged) == len(expected)
    assert {r["qid"]: strip(r) for r in merged} == {r["qid"]: strip(r) for r in expected}
    assert merge_predictions(sharded).read_text() == (sharded / "predictions.jsonl").read_text()  # pure


def test_a_run_directory_refuses_another_configuration(bench, tiny_model_dir, backend, tmp_path):
    run_benchmark(config(bench, tiny_model_dir, method="full"), tmp_path, backend=backend, limit=1)
    with pytest.raises(RunError, match="another configuration"):
        run_benchmark(config(bench, tiny_model_dir, method="uniform"), tmp_path, backend=backend, limit=1)


def test_a_run_started_before_a_storage_option_existed_resumes(bench, tiny_model_dir, backend, tmp_path):
    """A ``run.json`` written before some storage options existed (its method config lacks them)
    is the same configuration as their defaults, and still differs from another value of them."""
    cfg = config(bench, tiny_model_dir, method="rekv", overrides={"retrieve_blocks": "2"})
    run_benchmark(cfg, tmp_path, backend=backend, limit=1)
    path = tmp_path / "run.json"
    run = json.loads(path.read_text())
    for name in ("kv_keys", "kv_dtype", "memory_budget"):
        del run["identity"]["method_config"][name]
    path.write_text(json.dumps(run))
    summary = run_benchmark(cfg, tmp_path, backend=backend, limit=2)
    assert summary.skipped_done == 1
    other = config(bench, tiny_model_dir, method="rekv", overrides={"retrieve_blocks": "2", "kv_keys": "compact"})
    with pytest.raises(RunError, match="another configuration"):
        run_benchmark(other, tmp_path, backend=backend, limit=2)


def test_missing_videos_are_listed_before_anything_runs(bench, tiny_model_dir, backend, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "synthetic_000.mp4").write_bytes((bench.parent / "videos" / "synthetic_000.mp4").read_bytes())
    cfg = RunConfig(
        benchmark="rvs-ego", annotation=str(bench), videos=str(videos), model=str(tiny_model_dir), method="full"
    )
    with pytest.raises(RunError, match=r"2 of 3 videos not found.*synthetic_001.*synthetic_002"):
        run_benchmark(cfg, tmp_path / "out", backend=backend)
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
    summary = run_benchmark(cfg, tmp_path / "out", backend=backend, allow_missing=True, limit=2)
    assert summary.answered == 2 and summary.missing == ["synthetic_001", "synthetic_002"]


@pytest.mark.parametrize("text", ["3", "2/2", "a/b", "-1/2"])
def test_bad_shard_specs(text):
    with pytest.raises(ValueError, match="shard"):
        Shard.parse(text)


def prediction_record(qid: str = "v/0", prediction: str = "x", **changes) -> dict:
    """A complete predictions.jsonl record (as the runner writes it)."""
    video_id = qid.rpartition("/")[0]
    record = {
        "qid": qid, "video_id": video_id, "question": "What?", "answer": "A cat.", "prediction": prediction,
        "method": "full", "time": 4.0, "frames_seen": 3, "encode_seconds": 0.5, "vision_seconds": 0.2,
        "memory_seconds": 0.3, "prepare_seconds": 0.01, "first_token_seconds": 0.1, "total_seconds": 0.2,
        "context_tokens": 60, "generated_tokens": 2, "stop_reason": "eos", "retrieved": [],
        "memory": {"frames": 3, "blocks": {}, "tokens": {}, "bytes": {}, "total_bytes": 1000, "total_tokens": 60},
        "peak_rss_bytes": 1, "sample_period": 2.0, "frames_encoded": 3,
    }  # fmt: skip
    return record | changes


def test_merge_rejects_conflicting_duplicates(tmp_path):
    record = prediction_record()
    (tmp_path / "predictions.shard-0-of-2.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "predictions.shard-1-of-2.jsonl").write_text(json.dumps(record | {"prediction": "y"}) + "\n")
    with pytest.raises(RunError, match="answered differently"):
        merge_predictions(tmp_path)
