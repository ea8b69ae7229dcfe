"""Evaluation on Ray workers: ``mukv eval --workers 2`` against ``--workers 1`` (and the
single-process run) on the same synthetic benchmark, through the public command line.

A synthetic benchmark (``mukv make-benchmark``: V videos of D seconds) is answered by the shipped
``mukv-tiny`` model, by default with the ``full`` method, in three configurations: one process
(no option), ``--workers 1`` and ``--workers 2``; each configuration runs R times, interleaved
(1, 2, single, 1, 2, single, ...) so that a change of load meanwhile touches them alike, each run
into a fresh run directory. Per run it records:

- ``wall_seconds``: the whole command, Ray's start and the model loads included;
- ``answer_seconds``: from the first answer written to the last (the predictions file is watched
  every 20 ms), i.e. the answering once the workers are up: what more workers speed up;
- the load: CPU seconds other processes used meanwhile, 1-minute load average before and after.

The speed-up of 2 workers over 1 is the ratio of the medians (and of the paired runs of each
repeat). Every run appends to ``benchmarks/results/eval_workers.jsonl``; ``eval_workers.md`` is
re-rendered from all records. ``--render`` only re-renders.

Run: ``.venv/bin/python benchmarks/bench_eval_workers.py`` (defaults: 6 videos of 90 s, 3 repeats).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    LoadMonitor,
    fmt_median_range,
    load_line,
    machine_info,
    machine_lines,
    markdown_table,
    median_range,
    render_results,
    write_results,
)

NAME = "eval_workers"
CONFIGS = {"1 process": [], "--workers 1": ["--workers", "1"], "--workers 2": ["--workers", "2"]}


def mukv_cli() -> list[str]:
    """The ``mukv`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("mukv")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from mukv.cli import main; main()"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=6, help="synthetic videos [6]")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds per video [90]")
    parser.add_argument("--method", default="full", help="memory method [full]")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length [8]")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration [3]")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory [benchmarks/results]")
    parser.add_argument("--render", action="store_true", help="only re-render the Markdown")
    return parser.parse_args(argv)


def timed_eval(command: list[str], predictions: Path) -> dict[str, Any]:
    """Run one ``mukv eval``; its wall time, and the times of its first and last answer."""
    first: list[float] = []
    last: list[float] = []
    lines = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal lines
        while not done.wait(0.02):
            count = predictions.read_bytes().count(b"\n") if predictions.exists() else 0
            if count > lines:
                now = time.perf_counter()
                if not first:
                    first.append(now)
                last[:] = [now]
                lines = count

    monitor = LoadMonitor()
    start = time.perf_counter()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return {
        "wall_seconds": wall,
        "answer_seconds": (last[0] - first[0]) if first else None,
        "startup_seconds": (first[0] - start) if first else None,
        "answers": predictions.read_bytes().count(b"\n"),
        "load": monitor.report(),
    }


def render(records: list[dict[str, Any]]) -> str:
    runs = [r for r in records if r.get("kind") == "run"]
    lines = [
        "# Evaluation on Ray workers: `mukv eval --workers 2` vs `--workers 1` vs one process",
        "",
        "Rendered by `benchmarks/bench_eval_workers.py` from every record of `eval_workers.jsonl`.",
        "`answer` = first answer written to last (the workers are up); `wall` = the whole command",
        "(Ray's start and the model loads included). Medians (range, runs). Speed-up = median of",
        "`--workers 1` / median of `--workers 2`, and per repeat (paired runs). On a machine shared with",
        "other jobs the load changes between runs: the paired ratio of a quiet repeat is the better guide.",
        "",
    ]
    sessions: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        sessions.setdefault(run["session"], []).append(run)
    for session, items in sessions.items():
        head = items[0]
        lines += [f"## {session}: {head['benchmark']}", ""]
        lines += machine_lines(head["machine"])
        loads = [r["load"]["load_average_start"][0] for r in items if r["load"].get("load_average_start")]
        others = [r["load"]["other_cpu_fraction"] for r in items if r["load"].get("other_cpu_fraction") is not None]
        if loads:
            lines.append(
                f"- load while measured: 1-min load average {min(loads):.2f}-{max(loads):.2f} at run starts; "
                f"other processes used {100 * min(others):.0f}-{100 * max(others):.0f}% of the machine "
                f"({head['machine']['cpu_cores']} cores shared with other jobs; for the Ray runs this share includes "
                "the workers themselves, which are not children of the timed command)"
            )
        lines.append("")
        rows = []
        stats: dict[str, dict[str, Any]] = {}
        for config in CONFIGS:
            mine = [r for r in items if r["config"] == config]
            if not mine:
                continue
            stats[config] = {
                key: median_range(r[key] for r in mine) for key in ("answer_seconds", "wall_seconds", "startup_seconds")
            }
            rows.append(
                [
                    config,
                    fmt_median_range(stats[config]["answer_seconds"], 1, " s"),
                    fmt_median_range(stats[config]["wall_seconds"], 1, " s"),
                    fmt_median_range(stats[config]["startup_seconds"], 1, " s"),
                    str(mine[0]["answers"]),
                ]
            )
        lines.append(markdown_table(["configuration", "answer", "wall", "to first answer", "answers"], rows))
        one, two = stats.get("--workers 1"), stats.get("--workers 2")
        if one and two and one["answer_seconds"] and two["answer_seconds"]:
            paired = []
            for repeat in sorted({r["repeat"] for r in items}):
                a = [r for r in items if r["repeat"] == repeat and r["config"] == "--workers 1"]
                b = [r for r in items if r["repeat"] == repeat and r["config"] == "--workers 2"]
                if a and b and b[0]["answer_seconds"]:
                    paired.append(a[0]["answer_seconds"] / b[0]["answer_seconds"])
            lines += [
                "",
                f"Speed-up of 2 workers over 1, answering: {one['answer_seconds'][0] / two['answer_seconds'][0]:.2f}x "
                f"(per repeat: {', '.join(f'{p:.2f}x' for p in paired)}); whole command: "
                f"{one['wall_seconds'][0] / two['wall_seconds'][0]:.2f}x.",
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render_results(args.out, NAME, render).read_text())
        return 0
    session = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = machine_info()
    benchmark = f"{args.videos} videos x {args.duration:g} s, {args.method}, max {args.max_new_tokens} new tokens"
    with tempfile.TemporaryDirectory(prefix="bench-eval-workers-") as tmp:
        root = Path(tmp)
        subprocess.run([*mukv_cli(), "make-benchmark", str(root / "bench"), "--videos", str(args.videos),
                        "--duration", str(args.duration)], check=True, capture_output=True)  # fmt: skip
        records = []
        for repeat in range(args.repeats):
            for config, options in CONFIGS.items():
                out = root / "runs" / f"{repeat}-{config.replace(' ', '').replace('-', '')}"
                command = [
                    *mukv_cli(), "eval", "rvs-ego", "--anno", str(root / "bench" / "annotations.json"),
                    "--videos", str(root / "bench" / "videos"), "--model", "mukv-tiny", "--method", args.method,
                    "--npy-fps", "2", "--max-new-tokens", str(args.max_new_tokens), "--out", str(out), *options,
                ]  # fmt: skip
                result = timed_eval(command, out / "predictions.jsonl")
                shutil.rmtree(out, ignore_errors=True)
                shown = " ".join(["mukv", *command[len(mukv_cli()) :]]).replace(str(root), "$TMP")
                record = {"kind": "run", "session": session, "benchmark": benchmark, "config": config,
                          "repeat": repeat, "command": shown, "machine": machine, **result}  # fmt: skip
                answer = result["answer_seconds"]
                print(
                    f"{config:>12} #{repeat}: answer {answer:.1f} s, wall {result['wall_seconds']:.1f} s; "
                    f"{load_line(result['load'])}",
                    flush=True,
                )
                records.append(record)
                write_results(args.out, NAME, [record])  # kept at once: an interrupted study loses no run
    render_results(args.out, NAME, render)
    one = [r["answer_seconds"] for r in records if r["config"] == "--workers 1"]
    two = [r["answer_seconds"] for r in records if r["config"] == "--workers 2"]
    print(f"speed-up of 2 workers over 1 (answering, medians): {statistics.median(one) / statistics.median(two):.2f}x")
    print(f"re-rendered {args.out / (NAME + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
