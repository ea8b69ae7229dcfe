"""The byte budget (``memory_budget``) over a multi-hour stream at the real LLaVA-OneVision 0.5B sizes.

What it measures
    The model is the one ``synthetic.build_backend`` builds (the dimensions of
    ``llava-onevision-qwen2-0.5b-ov``, random weights, nothing downloaded), in ``--dtype`` (bfloat16
    by default: 2-byte K/V, as on an accelerator). Encoding hours of frames is out of reach on a CPU,
    so the MuKV store (paper preset) is filled synthetically, as ``bench_memory.py`` does: blocks of
    the exact kept sizes with random K/V and scores, adopted ``--chunk-min`` simulated minutes at a
    time with ``BlockMemory.restore`` (``synthetic.fill_mukv``), which enforces the budget exactly
    as an ingest does. After every chunk, and after ``malloc_trim`` (glibc keeps freed pages
    otherwise, see ``memory/rekv.py``), it samples the process's resident memory (``VmRSS`` of
    ``/proc/self/status``), the bytes of the stored blocks (``BlockMemory.stored_bytes``, what the
    budget bounds), ``stats().total_bytes`` and what the budget consolidated so far.

    The runs (``--budgets``; ``none`` = unbounded) share one child process and one model (building
    the random 0.5B model takes minutes on a loaded CPU), one after another: a run's store is
    dropped and the heap trimmed before the next, and each run's resident memory is also reported
    as growth over its own start. Block K/V content does not matter here, so every block's K/V is a
    copy of a slice of one random pool (``synthetic._random_kv`` replaced in the child: filling
    hours takes seconds instead of minutes; every byte is still written). The unbounded run grows
    by about 4.3 GB per hour at 2 bytes per element: it stops once its resident memory passes
    ``--stop-fraction`` of the memory available when the benchmark started. At the end of each
    bounded run one question of ``--ask-tokens`` tokens is asked (answers are still produced over
    the consolidated store) and timed. Random weights: only memory and speed are meaningful.

Results
    A table is printed; one JSON record (samples of every run, machine, date, command, load) is
    appended to ``OUT/budget.jsonl`` and ``OUT/budget.md`` re-rendered from all its records.

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_budget.py                            # 3 h at 0.5 fps, 1 GB vs unbounded
    .venv/bin/python benchmarks/bench_budget.py --hours 1 --budgets 500MB,none
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mukv
from common import (
    LoadMonitor,
    add_child_arguments,
    child_emitter,
    child_task,
    fmt,
    load_line,
    machine_info,
    markdown_table,
    run_child,
    text_table,
    write_results,
)
from mukv.kv.options import parse_bytes
from synthetic import available_memory_bytes, build_backend, disable_eos, fill_mukv

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="MuKV's byte budget over hours of synthetic stream (random weights at 0.5B sizes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--hours", type=float, default=3.0, help="simulated stream length")
    parser.add_argument("--fps", type=float, default=0.5, help="frame sampling rate of the stream")
    parser.add_argument("--chunk-min", type=float, default=10.0, help="simulated minutes per fill and sample")
    parser.add_argument("--budgets", default="1GB,none", help="memory_budget of each run, comma-separated")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    parser.add_argument("--stop-fraction", type=float, default=0.5, help="of the memory available at the start")
    parser.add_argument("--ask-tokens", type=int, default=2, help="tokens of the question asked at the end (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--render", action="store_true", help="only re-render OUT/budget.md from OUT/budget.jsonl")
    add_child_arguments(parser)
    args = parser.parse_args(argv)
    args.budget_list = [
        None if b.strip().lower() == "none" else parse_bytes(b.strip(), "--budgets") for b in args.budgets.split(",")
    ]
    return args


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def trim_heap() -> None:
    """glibc's ``malloc_trim``: freed pages go back to the system, so RSS shows what is held."""
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):
        trim = None
    if trim is not None:
        trim(0)


def pooled_kv(dtype: torch.dtype, seed: int):
    """A stand-in for ``synthetic._random_kv``: ``[L, 2, Hkv, n, D]`` copied from one random pool."""
    pools: dict[tuple, torch.Tensor] = {}

    def make(spec: Any, tokens: int, kv_dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
        key = (spec.num_layers, spec.num_kv_heads, spec.head_dim, kv_dtype)
        pool = pools.get(key)
        if pool is None or pool.shape[3] < tokens:
            g0 = torch.Generator().manual_seed(seed)
            shape = (spec.num_layers, 2, spec.num_kv_heads, max(tokens, 1024), spec.head_dim)
            pool = pools[key] = torch.randn(shape, generator=g0).to(kv_dtype)
        return pool[:, :, :, :tokens].clone()

    return make


def run_all(args: argparse.Namespace, task: dict[str, Any]) -> None:
    """Child: build the model once, then fill one store per budget, chunk by chunk."""
    import synthetic

    emit = child_emitter(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    backend = build_backend(torch.device("cpu"), dtype, seed=args.seed)
    disable_eos(backend)
    emit({"kind": "model", "build_seconds": time.perf_counter() - started})
    synthetic._random_kv = pooled_kv(dtype, args.seed)
    for budget in task["budgets"]:
        run_one(args, backend, budget, task["stop_bytes"], emit)
        gc.collect()
        trim_heap()


def run_one(args: argparse.Namespace, backend: Any, budget: int | None, stop_bytes: int, emit) -> None:
    """Fill one store chunk by chunk, emitting a sample after each."""
    name = run_name(budget)
    overrides = {} if budget is None else {"memory_budget": budget}
    session = mukv.StreamSession(backend, "mukv", overrides=overrides)
    memory = session.memory
    interval = 1 / args.fps
    f = memory.config.segment_frames
    chunk = max(f, round(args.chunk_min * 60 * args.fps) // f * f)
    total = round(args.hours * 3600 * args.fps) // chunk * chunk
    trim_heap()
    emit({"kind": "start", "run": name, "rss_bytes": rss_bytes(), "chunk_frames": chunk})
    stopped = None
    with torch.inference_mode():
        for first in range(0, total, chunk):
            started = time.perf_counter()
            fill_mukv(session, first, chunk, interval, args.seed)
            seconds = time.perf_counter() - started
            trim_heap()
            stats = memory.stats()
            sample = {
                "kind": "sample",
                "run": name,
                "minutes": (first + chunk) * interval / 60,
                "frames": memory.frames,
                "stored_bytes": memory.stored_bytes(),
                "total_bytes": stats.total_bytes,
                "rss_bytes": rss_bytes(),
                "blocks": dict(stats.blocks),
                "consolidated": stats.consolidated,
                "fill_seconds": seconds,
            }
            emit(sample)
            print(
                f"  {name}: {sample['minutes']:.0f} min, stored {sample['stored_bytes'] / 1e9:.2f} GB, "
                f"RSS {sample['rss_bytes'] / 1e9:.2f} GB, {seconds:.1f} s",
                flush=True,
            )
            if sample["rss_bytes"] > stop_bytes:
                stopped = f"RSS passed {stop_bytes / 1e9:.1f} GB"
                break
        asked = None
        if args.ask_tokens > 0 and budget is not None:
            started = time.perf_counter()
            answer = session.ask("What happened at the start?", max_new_tokens=args.ask_tokens)
            asked = {
                "seconds": time.perf_counter() - started,
                "generated_tokens": answer.generated_tokens,
                "context_tokens": answer.context_tokens,
                "retrieved": len(answer.retrieved),
            }
    emit({"kind": "end", "run": name, "stopped": stopped, "ask": asked})


def run_name(budget: int | None) -> str:
    return "unbounded" if budget is None else f"budget {budget / 1e9:g} GB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    task = child_task(args)
    if task is not None:
        run_all(args, task)
        return 0
    if args.render:
        write_results(args.out, "budget", [], render)
        print(f"re-rendered {args.out / 'budget.md'}")
        return 0
    monitor = LoadMonitor()
    machine = machine_info("cpu", DTYPES[args.dtype])
    available = available_memory_bytes() or 8 * 2**30
    stop_bytes = int(args.stop_fraction * available)
    child = run_child(
        __file__,
        list(argv if argv is not None else sys.argv[1:]),
        {"budgets": args.budget_list, "stop_bytes": stop_bytes},
    )
    records = child["records"]
    runs = []
    for budget in args.budget_list:
        name = run_name(budget)
        mine = [r for r in records if r.get("run") == name]
        runs.append(
            {
                "name": name,
                "budget": budget,
                "samples": [r for r in mine if r.get("kind") == "sample"],
                "start": next((r for r in mine if r.get("kind") == "start"), None),
                "end": next((r for r in mine if r.get("kind") == "end"), None),
            }
        )
    record = {
        "benchmark": "budget",
        "machine": machine,
        "command": machine["command"],
        "settings": {
            "hours": args.hours,
            "fps": args.fps,
            "chunk_min": args.chunk_min,
            "dtype": args.dtype,
            "available_bytes": available,
            "stop_bytes": stop_bytes,
        },
        "runs": runs,
        "model": next((r for r in records if r.get("kind") == "model"), None),
        "error": child.get("error"),
        "load": monitor.report(),
    }
    print(run_table(record, text_table))
    jsonl, md = write_results(args.out, "budget", [record], render)
    print(f"wrote {jsonl} and {md}")
    return 0


def run_table(record: dict[str, Any], table) -> str:
    """Stored bytes and RSS per sampled minute, runs side by side."""
    runs = record["runs"]
    minutes = sorted({s["minutes"] for run in runs for s in run["samples"]})
    header = ["minutes"]
    for run in runs:
        header += [f"{run['name']}: stored GB", f"{run['name']}: RSS GB", f"{run['name']}: RSS growth GB"]
    rows = []
    for m in minutes:
        row = [f"{m:g}"]
        for run in runs:
            sample = next((s for s in run["samples"] if s["minutes"] == m), None)
            base = (run.get("start") or {}).get("rss_bytes", 0)
            if sample is None:
                row += ["-", "-", "-"]
            else:
                gbs = (sample["stored_bytes"], sample["rss_bytes"], sample["rss_bytes"] - base)
                row += [fmt(v / 1e9, 2) for v in gbs]
        rows.append(row)
    return table(header, rows)


def render(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Byte budget over hours of stream at LLaVA-OneVision 0.5B sizes (random weights)",
        "",
        "Rendered by `benchmarks/bench_budget.py` from every record of `budget.jsonl`, newest first. MuKV paper "
        "preset, stores filled synthetically (`synthetic.fill_mukv`, `BlockMemory.restore`) in chunks of simulated "
        "minutes; after each chunk, `malloc_trim` then the process's RSS and the stored blocks' bytes "
        "(`BlockMemory.stored_bytes`, what `memory_budget` bounds). Each run is its own process; the unbounded run "
        "stops once its RSS passes a share of the memory available at the start.",
        "",
    ]
    for record in reversed(records):
        machine, settings = record["machine"], record["settings"]
        lines += [
            f"## {machine['date_utc']}",
            "",
            f"- command: `{record['command']}`",
            f"- machine: {machine['cpu']}, {machine['cpu_cores']} cores, torch threads {machine['torch_threads']}, "
            f"{settings['dtype']}, code {machine.get('code')}",
            f"- stream: {settings['hours']:g} h at {settings['fps']:g} fps, sampled every {settings['chunk_min']:g} "
            f"simulated minutes; stop at RSS {settings['stop_bytes'] / 1e9:.1f} GB "
            f"(of {settings['available_bytes'] / 1e9:.1f} GB available)",
            f"- load: {load_line(record['load'])}",
            "",
            run_table(record, markdown_table),
            "",
        ]
        for run in record["runs"]:
            end = run.get("end") or {}
            samples = run["samples"]
            last = samples[-1] if samples else {}
            start_rss = (run.get("start") or {}).get("rss_bytes")
            parts = [f"**{run['name']}**"]
            if start_rss is not None:
                parts.append(f"RSS before filling {start_rss / 1e9:.2f} GB (model and runtime)")
            if samples:
                fills = [s["fill_seconds"] for s in samples]
                parts.append(f"fill {sum(fills) / len(fills):.1f} s per chunk (consolidation included)")
            if end.get("stopped"):
                parts.append(f"stopped early at {last.get('minutes', 0):g} min: {end['stopped']}")
            if last.get("consolidated"):
                parts.append(f"consolidated at the end: `{last['consolidated']}`")
            if end.get("ask"):
                ask = end["ask"]
                parts.append(
                    f"a question at the end: {ask['generated_tokens']} tokens over {ask['context_tokens']} context "
                    f"tokens from {ask['retrieved']} blocks in {ask['seconds']:.1f} s"
                )
            lines += ["- " + "; ".join(parts), ""]
        if record.get("model"):
            lines += [f"- building the model took {record['model']['build_seconds']:.0f} s", ""]
        if record.get("error"):
            lines += [f"- error: {record['error']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
