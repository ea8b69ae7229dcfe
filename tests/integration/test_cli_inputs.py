"""The ``mukv`` command's answers to bad input and damaged run files, invoked in process (the
same entry point a user runs; the subprocess tests in tests/e2e cover what needs processes)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mukv.cli import app
from tests.e2e.test_eval_cli import eval_args
from tests.integration.test_runner import prediction_record


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def mukv(*args: str) -> Result:
    result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"mukv {shlex.join(args)} raised {result.exception!r}") from result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    from mukv.eval.synthetic import write_benchmark

    return write_benchmark(tmp_path_factory.mktemp("bench"), videos=2, duration=16.0).parent


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def question_count(bench: Path) -> int:
    return sum(len(v["conversations"]) for v in json.loads((bench / "annotations.json").read_text()))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def no_traceback(*results: Result) -> None:
    for result in results:
        assert "Traceback" not in result.stderr + result.stdout, result.stderr


def test_stale_judge_scores_are_never_shown_for_other_records(bench, model_dir, tmp_path):
    out = tmp_path / "run"
    assert mukv(*eval_args(bench, model_dir, out, "full"), "--limit", "3").returncode == 0
    # A judge score of those 3 records (as `mukv judge` with an endpoint writes it).
    scores = json.loads(mukv("judge", str(out), "--no-judge").stdout)
    scores["judge"] = {"accuracy": 0.5, "score": 2.5, "judge_model": "judge-x", "count": 3} | {
        "covers": scores["records"]
    }
    (out / "scores.json").write_text(json.dumps(scores))
    shown = mukv("report", str(out), "--out", str(tmp_path / "r1"))
    assert "50.0 / 2.50 (judge-x)" in shown.stdout  # it covers exactly these records
    assert mukv(*eval_args(bench, model_dir, out, "full")).returncode == 0  # the run grows
    rescored = mukv("judge", str(out), "--no-judge")
    assert rescored.returncode == 0, rescored.stderr
    data = json.loads((out / "scores.json").read_text())
    total = question_count(bench)
    assert data["judge"] is None and data["records"]["count"] == total
    assert data["judge_unjudged"]["count"] == data["judge_unjudged"]["of"] == total
    report = mukv("report", str(out), "--out", str(tmp_path / "r2"))
    assert report.returncode == 0 and "judge-x" not in report.stdout and f"{total} unjudged" in report.stdout


def test_report_of_runs_with_one_name_labels_them_by_path(bench, model_dir, tmp_path):
    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    for run, method in zip(runs, ("full", "recent"), strict=True):
        assert mukv(*eval_args(bench, model_dir, run, method), "--limit", "2").returncode == 0
    report = mukv("report", *map(str, runs), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert "| a/run | full" in report.stdout and "| b/run | recent" in report.stdout
    for plot in ("quality_vs_memory.png", "cost_vs_length.png"):
        assert (tmp_path / "report" / plot).stat().st_size > 1000
    unknown = mukv("report", str(runs[0]), "--out", str(tmp_path / "r2"), "--video", "nonexistent")
    assert unknown.returncode == 2 and "--video 'nonexistent'" in unknown.stderr and "synthetic_000" in unknown.stderr
    assert not (tmp_path / "r2" / "retrieval_nonexistent.png").exists()
    no_traceback(report, unknown)


def test_damaged_run_files_are_named(bench, model_dir, tmp_path):
    out = tmp_path / "run"
    assert mukv(*eval_args(bench, model_dir, out, "full"), "--limit", "2").returncode == 0
    results = []
    (out / "scores.json").write_text('{"records": {"cou')
    results.append(mukv("report", str(out), "--out", str(tmp_path / "r")))
    assert "scores.json: the run's scores is damaged or truncated" in results[-1].stderr
    (out / "scores.json").unlink()
    good = (out / "predictions.jsonl").read_bytes()
    for damage, message in [
        (b'"just a string"\n', "line 3 is not a prediction record"),
        (json.dumps({"qid": "x/1"}).encode() + b"\n", "line 3 is not a prediction record (field 'video_id'"),
        (b"\x00\x00\n", "line 3 holds NUL bytes"),
    ]:
        (out / "predictions.jsonl").write_bytes(good + damage)
        for command in (["report", str(out), "--out", str(tmp_path / "r")], ["judge", str(out), "--no-judge"]):
            results.append(mukv(*command))
            assert results[-1].returncode == 2 and message in results[-1].stderr, results[-1].stderr
    (out / "predictions.jsonl").write_bytes(good)
    (out / "run.json").write_text('{"identity": ')
    results.append(mukv("report", str(out), "--out", str(tmp_path / "r")))
    assert "run.json: the run's configuration is damaged or truncated" in results[-1].stderr
    results.append(mukv(*eval_args(bench, model_dir, out, "full")))
    assert "run.json: the run's configuration is damaged or truncated" in results[-1].stderr
    file = tmp_path / "a-file"
    file.write_text("x")
    results.append(mukv(*eval_args(bench, model_dir, file, "full")))
    assert results[-1].returncode == 2 and "exists and is not a directory" in results[-1].stderr
    results.append(mukv("report", str(tmp_path / "nope"), "--out", str(file)))
    assert results[-1].returncode == 2 and "exists and is not a directory" in results[-1].stderr
    assert all(r.returncode == 2 for r in results)
    no_traceback(*results)


def test_a_corrected_eval_command_is_accepted(bench, model_dir, tmp_path):
    out = tmp_path / "run"
    args = eval_args(bench, model_dir, out, "full")
    npy = list(args)
    del npy[npy.index("--npy-fps") : npy.index("--npy-fps") + 2]
    zero = list(args)
    zero[zero.index("--max-new-tokens") + 1] = "0"
    wrong_model = list(args)
    wrong_model[wrong_model.index("--model") + 1] = str(tmp_path / "no-model")
    failures = [mukv(*bad) for bad in (npy, zero, wrong_model)]
    assert [f.returncode for f in failures] == [2, 2, 2]
    assert "--npy-fps" in failures[0].stderr and "max_new_tokens" in failures[1].stderr
    assert not (out / "run.json").exists()
    fixed = mukv(*args, "--limit", "1")
    assert fixed.returncode == 0 and "1 answered" in fixed.stdout, fixed.stderr
    no_traceback(*failures, fixed)


def test_merge_of_answers_differing_only_in_timings(tmp_path):
    record = prediction_record()
    (tmp_path / "predictions.shard-0-of-2.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "predictions.shard-1-of-2.jsonl").write_text(json.dumps(record | {"total_seconds": 7.5}) + "\n")
    result = mukv("merge", str(tmp_path), "--allow-partial")
    assert result.returncode == 0, result.stderr
    assert lines(tmp_path / "predictions.jsonl") == [record]


def test_ask_checks_its_options_before_encoding(model_dir, tmp_path):
    from mukv.video.synthetic import make_scenes, write_video

    video = write_video(tmp_path / "clip.mp4", make_scenes(12.0, 4.0, seed=2))
    base = ["ask", str(video), "--model", str(model_dir)]
    cases = [
        (["-q", "What?", "--at", "inf"], "--at: must be a finite number of seconds"),
        (["-q", "What?", "--at", "nan"], "--at: must be a finite number of seconds"),
        (["-q", "What?", "--at", "-3"], "--at: must be a finite number of seconds"),
        (["-q", "What?", "--at", "500"], "--at: 500 s is after the end of clip.mp4 (12.0 s)"),
        (["-q", "What?", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
        (["-q", "What?", "-c", "red"], "choices: need at least 2 options"),
        (["-q", "What?", "-c", "red", "-c", " "], "choices: every option needs text"),
        (["-q", "What?", "--set", "top_k=0", "--method", "mukv"], "top_k: holds one value per patch, frame, segment"),
        (["-q", "x" * 600_000], "longer than the model's context"),
        # The same as the subprocess cases of tests/e2e/test_cli.py marked slow.
        (["-q", "What?", "--method", "nope"], "unknown 'nope'"),
        (["-q", "What?", "--set", "nope=1"], "nope: unknown field"),
        (["-q", "What?", "--dtype", "int4"], "dtype"),
        (["-q", "What?", "--method", "mukv", "--preset", "best"], "no preset 'best'"),
        (["-q", "What?", "--method", "mukv", "--set", "keep_ratio.patch=2"], "keep_ratio.patch"),
        (["-q", "What?", "--method", "mukv", "--set", "order=random"], "order: must be one of"),
    ]
    for extra, message in cases:
        result = mukv(*base, *extra)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)
        assert "encoding" not in result.stderr, "checked before encoding"
        no_traceback(result)


def test_merge_refuses_a_missing_shard_unless_told(bench, model_dir, tmp_path):
    out = tmp_path / "run"
    assert mukv(*eval_args(bench, model_dir, out, "full"), "--shard", "0/2").returncode == 0
    refused = mukv("merge", str(out))
    assert refused.returncode == 2 and "shard 1 of 2 is missing" in refused.stderr
    assert not (out / "predictions.jsonl").exists()
    partial = mukv("merge", str(out), "--allow-partial")
    assert partial.returncode == 0, partial.stderr
    no_traceback(refused, partial)
