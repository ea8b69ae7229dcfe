"""``benchmarks/bench_serve.py`` end to end at tiny settings: it starts ``mukv serve`` on loopback,
loads it, checks its counts, and writes a record whose counts add up (into a temporary directory,
never into the repository's results)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_serve.py"
TINY = ["--streams", "2", "--fps", "1", "--duration", "6", "--question-every", "3", "--sample-every", "1"]


def bench(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_a_load_that_would_pass_the_request_cap_is_refused_before_anything_starts(tmp_path):
    result = bench(*TINY, "--max-requests", "10", "--out", str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "--max-requests 10: this load plans about" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_serve_benchmark_runs_end_to_end_and_its_counts_add_up(tmp_path):
    # Server start-up, 6 s of pushing, the drain and the final questions: about 35 s on an idle
    # 2-core CPU; the generous timeout is for a loaded one (the script has its own deadline).
    result = bench(*TINY, "--out", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all counts add up" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "serve.jsonl").read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert {"machine", "settings", "load", "server", "latency", "frames", "lag", "rss", "accuracy", "streams"} <= set(
        record
    )
    assert record["checks"] == {"passed": True, "failures": []}
    assert record["settings"] | {"streams": 2, "fps": 1.0, "duration_s": 6.0} == record["settings"]
    assert record["machine"]["command"].endswith(f"--out {tmp_path}")
    assert record["load"]["load_average_start"] and record["load"]["load_average_end"]

    # Every stream: 6 frames sent, accepted and received; encoded + dropped == received; drops as the
    # push responses said; the memory holds what was encoded; the final answers saw exactly that.
    assert len(record["streams"]) == 2
    for stream in record["streams"]:
        assert stream["sent"] == stream["accepted"] == stream["received"] == 6
        assert stream["encoded"] + stream["dropped"] == stream["received"]
        assert stream["dropped_by_reason"].get("queue_full", 0) == stream["push_dropped"]
        assert stream["memory_frames"] == stream["encoded"] and stream["memory_bytes"] > 0
        assert stream["push_errors"] == []
    frames = record["frames"]
    assert frames["sent"] == 12 and frames["encoded"] + frames["dropped"] == 12

    # One question while pushing per stream (at 3 s and 4.5 s), then each stream's two
    # ground-truth questions after the drain; every answer from its own stream's timeline.
    questions = record["questions"]
    assert [q["phase"] for q in questions].count("live") == 2
    assert [q["phase"] for q in questions].count("final") == 4
    by_index = {s["index"]: s for s in record["streams"]}
    for question in questions:
        assert question["error"] is None
        stream = by_index[question["stream"]]
        offset = stream["timeline_offset_s"]
        assert offset <= question["time"] <= offset + 5
        assert question["frames_seen"] <= question["done_at_frames"]
        assert all(
            offset <= span["start_time"] <= span["end_time"] <= question["time"] for span in question["retrieved"]
        )
        if question["phase"] == "final":
            assert question["frames_seen"] == stream["encoded"]
            assert question["expected"] is not None and question["correct"] is not None
        assert 0 < question["server_first_token"] <= question["server_total"] <= question["client_total"]
    latency = record["latency"]
    assert latency["client_first_token"]["n"] == latency["server_total"]["n"] == 6
    assert latency["push"]["n"] == 12
    assert record["accuracy"]["final"]["scored"] == 4
    assert record["rss"]["peak"] >= record["rss"]["ready"] > 0
    assert record["requests"]["total"] <= record["settings"]["max_requests"]

    markdown = (tmp_path / "serve.md").read_text()
    assert "all counts add up" in markdown and "| first token, client (s) | 6 |" in markdown
