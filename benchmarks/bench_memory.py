"""Memory methods side by side at the real LLaVA-OneVision 0.5B sizes, with random weights.

What it measures
    The model is the one ``synthetic.build_backend`` builds (the dimensions of
    ``llava-onevision-qwen2-0.5b-ov``, random weights, nothing downloaded). The vision tower is not
    run: random visual features ``[T, 196, 896]`` in the model dtype go straight to
    ``session.memory.ingest``, so only the memory methods' own work is timed. Every part runs in
    its own child process (``common.run_child``; a fresh process per method for the encode part),
    so peak-memory figures do not leak from one method into another. All parts of one invocation
    are one run: its ratios compare methods measured side by side, on the same machine and inputs.

    1. ``encode``: seconds per frame of ``memory.ingest`` for each of :data:`ENCODE_RUNS` (``full``,
       plain prefill; ``mukv`` with ``encode=independent``, the paper preset; ``mukv`` with
       ``encode=shared``), on ``--frames`` frames (default 8 = 2 segments), ingested in batches of
       ``SessionConfig.encode_batch_frames``. The first (cold) pass measures memory and warms up;
       ``--encode-repeats`` passes in fresh sessions are timed. Ratios to ``full``.
    2. ``encode`` (same runs): peak memory of the cold pass: on CPU the rise of the process's peak
       RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the pass, after
       ``malloc_trim``), on CUDA ``torch.cuda.max_memory_allocated`` after a reset; and what stays
       held afterwards.
    3. Stored tokens and bytes per frame by granularity (``session.memory.stats()``) for every run,
       next to method.md section 4's expectation (MuKV paper preset 191.75 tokens/frame = patch 16
       + frame 19 + segment 156.75 at P = 196; full/ReKV-like 196), and bytes per hour of video at
       ``--fps`` (0.5 fps = 1800 frames/h), in the measured dtype and with 2-byte K/V elements.
    4. ``answer``: MuKV (paper preset) really encodes ``--answer-frames`` frames (default 48 =
       12 segments, enough for all 20/32/12 blocks), then answers ``--repeats`` questions: the
       tokens placed in the cache (``answer.context_tokens`` minus the system prompt; paper: 20*4 +
       32*19 + 12*627 = 8212). The same questions are then asked of a synthetic store with the
       same frame count, to check that the synthetic state of part 5 costs what the real one does.
    5. ``lengths``: seconds per question at ``--lengths-min`` minutes of video (default 10, 30,
       60 = 300, 900, 1800 frames at 0.5 fps) for each scenario of :func:`length_scenarios`
       (``mukv``, ``full``, ``uniform``), one loop over that data. Encoding that many frames is out
       of reach on a CPU, so each state is filled synthetically through the package's public API
       (``synthetic.py``): MuKV blocks of the exact kept sizes adopted with
       ``BlockMemory.restore``; ``full`` a random K/V cache adopted with ``FullMemory.restore``;
       ``uniform`` random visual features through its own ingest (it re-prefills ``num_frames`` =
       32 sampled frames at every question, so its cost does not depend on the length). All
       scenarios run in one child process: per length, every state is filled and gets
       ``--warmup-asks`` untimed two-token questions, then ``--repeats`` rounds ask each scenario
       one timed question (interleaved, so they share the machine's load alike); the states are
       dropped before the next length. MuKV's ``answer.timings.stages`` split its ``prepare`` into
       eligibility, query vector, ranking and assembly. A state that does not fit in
       ``--memory-headroom`` of the memory left next to the others while answering (``full``: held
       three times over, the stored cache plus the old and new copy of each ``DynamicCache``
       concatenation) is skipped and the reason recorded.

    End-of-sequence is disabled unless ``--keep-eos``, so every answer decodes exactly
    ``--max-new-tokens`` tokens and the methods are compared on equal work. Random weights: only
    speed and memory are meaningful.

Results
    Tables are printed; one JSON record (every number, the ratios of this run, and each child's
    records and load) is appended to ``OUT/memory.jsonl``, and ``OUT/memory.md`` is re-rendered
    from all its records: a summary over recorded runs (medians with range) and one section per
    run (``OUT`` is ``--out``, default ``benchmarks/results``).

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_memory.py                                  # CPU, float32, all parts
    .venv/bin/python benchmarks/bench_memory.py --skip-answer --skip-lengths     # parts 1-3 only
    python benchmarks/bench_memory.py --device cuda --dtype bfloat16             # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import mukv
from common import (
    RESULTS,
    LoadMonitor,
    add_child_arguments,
    child_emitter,
    child_task,
    fmt,
    fmt_median_range,
    fx,
    gb,
    load_line,
    machine_info,
    machine_key,
    machine_lines,
    markdown_table,
    median_range,
    mib,
    other_share,
    ratio,
    run_child,
    text_table,
    write_results,
)
from mukv.backends.registry import resolve_device, resolve_dtype
from mukv.config import SessionConfig, config_to_dict
from synthetic import (
    MODEL_ID,
    QUESTION,
    TRAINED_POSITIONS,
    Scenario,
    build_backend,
    disable_eos,
    fill_full,
    fill_ingest,
    fill_mukv,
    free_memory_bytes,
    full_cache_need,
    generic_warmup,
    ingest_features,
    parameter_counts,
    random_features,
    stats_dict,
    summarize_asks,
    synchronize,
    timed_ask,
    timestamps,
    warm_asks,
)

GRANULARITIES = ("patch", "frame", "segment")
ENCODE_RUNS = (  # label, method, overrides
    ("full", "full", {}),
    ("mukv-independent", "mukv", {"encode": "independent"}),
    ("mukv-shared", "mukv", {"encode": "shared"}),
)
LENGTH_METHODS = ("mukv", "full", "uniform")
WARM_FRAMES = 8  # the small state every scenario first warms its kernels on (whole segments)
BF16_BYTES = 2
# Method.md section 4 and 8, for the record next to the measured numbers.
PAPER_TOKENS_PER_FRAME = {"full": 196.0, "mukv": 191.75}
PAPER_CONTEXT_TOKENS = 8212  # 20 * 4 + 32 * 19 + 12 * 627


def length_scenarios(uniform_frames: int) -> dict[str, Scenario]:
    """The configurations of part 5, by name (see the module docstring)."""
    return {
        "mukv": Scenario("mukv", "mukv", fill_mukv),
        "full": Scenario("full", "full", fill_full, need=full_cache_need),
        "uniform": Scenario("uniform", "uniform", fill_ingest, overrides={"num_frames": uniform_frames}),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Memory methods side by side at LLaVA-OneVision 0.5B sizes (random weights).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--frames", type=int, default=8, help="frames of the timed encode (part 1-3)")
    parser.add_argument(
        "--answer-frames", type=int, default=48, help="frames MuKV really encodes before part 4's question"
    )
    parser.add_argument("--lengths-min", default="10,30,60", help="video lengths of part 5, minutes, comma-separated")
    parser.add_argument(
        "--length-methods", default=",".join(LENGTH_METHODS), help="scenarios of part 5, comma-separated"
    )
    parser.add_argument("--fps", type=float, default=0.5, help="frame sampling rate of the stream")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="decoding limit of every question")
    parser.add_argument("--repeats", type=int, default=3, help="timed questions per state in parts 4 and 5")
    parser.add_argument(
        "--warmup-asks",
        type=int,
        default=2,
        help="untimed questions (2 new tokens) on each state before the timed ones (parts 4 and 5)",
    )
    parser.add_argument("--encode-repeats", type=int, default=2, help="timed encode passes per method (part 1)")
    parser.add_argument("--uniform-frames", type=int, default=32, help="num_frames of the uniform baseline")
    parser.add_argument("--keep-eos", action="store_true", help="let answers stop at end-of-sequence")
    parser.add_argument("--skip-encode", action="store_true", help="skip parts 1-3 (encode cost, peak memory)")
    parser.add_argument("--skip-answer", action="store_true", help="skip part 4 (real MuKV encode + question)")
    parser.add_argument("--skip-lengths", action="store_true", help="skip part 5 (seconds per question by length)")
    parser.add_argument(
        "--memory-headroom", type=float, default=0.9, help="fraction of free memory a synthetic state may take"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each part, wait up to this many seconds for the machine to be idle (< 10%% busy over 5 s)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--vision-batch-frames", type=int, default=16, help="frames per vision-tower call (unused)")
    parser.add_argument("--attn-implementation", default="sdpa", help="attention kernel of the model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and features")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--render", action="store_true", help="only re-render OUT/memory.md from OUT/memory.jsonl, run nothing"
    )
    add_child_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("frames", "answer_frames", "max_new_tokens", "repeats", "encode_repeats", "uniform_frames"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.warmup_asks < 0:
        parser.error("--warmup-asks: must be >= 0")
    if args.fps <= 0:
        parser.error("--fps: must be > 0")
    try:
        args.lengths = [float(v) for v in args.lengths_min.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--lengths-min: expected numbers, got {args.lengths_min!r}")
    if any(v <= 0 for v in args.lengths):
        parser.error("--lengths-min: must be > 0")
    args.methods_lengths = [m.strip() for m in args.length_methods.split(",") if m.strip()]
    unknown = set(args.methods_lengths) - set(LENGTH_METHODS)
    if unknown:
        parser.error(f"--length-methods: unknown {sorted(unknown)}; choose from {', '.join(LENGTH_METHODS)}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads: must be >= 1")
    return args


# --------------------------------------------------------------------------- helpers


def max_positions(args: argparse.Namespace) -> int:
    """The context the random model admits: the real 32,768 positions, or enough for a ``full``
    cache of the longest length (``synthetic.build_config``: no weight or cost changes)."""
    longest = 0 if args.skip_lengths else frames_for_minutes(max(args.lengths), args.fps)
    return max(TRAINED_POSITIONS, 196 * longest + 1024)


def frame_interval(args: argparse.Namespace) -> float:
    return 1.0 / args.fps


def frames_for_minutes(minutes: float, fps: float) -> int:
    """Frames in ``minutes`` of video, rounded to whole segments (4 frames) so no segment is partial."""
    frames = round(minutes * 60 * fps)
    return max(4, 4 * round(frames / 4))


def proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    kib = proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak and retained memory of one region: RSS high-water mark (reset via ``clear_refs``, else
    ``ru_maxrss``, which may then be a lower bound) and, on CUDA, allocated device memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        gc.collect()
        malloc_trim()
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_before = torch.cuda.memory_allocated(self.device)
        self.rss_before = rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        hwm = proc_status_kib("VmHWM")
        if self.hwm_reset and hwm is not None:
            peak = hwm * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.result = {
            "rss_before_bytes": self.rss_before,
            "rss_peak_bytes": peak,
            "rss_peak_increase_bytes": None if self.rss_before is None else peak - self.rss_before,
            "rss_retained_increase_bytes": None if self.rss_before is None else rss_bytes() - self.rss_before,
            "rss_peak_method": "VmHWM after clear_refs" if self.hwm_reset else "ru_maxrss (not reset: lower bound)",
            "cuda_peak_increase_bytes": None,
            "cuda_retained_increase_bytes": None,
        }
        if self.device.type == "cuda":
            self.result["cuda_peak_increase_bytes"] = torch.cuda.max_memory_allocated(self.device) - self.cuda_before
            self.result["cuda_retained_increase_bytes"] = torch.cuda.memory_allocated(self.device) - self.cuda_before


# --------------------------------------------------------------------------- child tasks


def child_encode(backend: Any, args: argparse.Namespace, task: dict[str, Any]) -> dict[str, Any]:
    """Parts 1-3 for one method: a cold pass measuring memory, then a timed pass."""
    device = backend.device
    method, overrides = task["method"], task["overrides"]
    n, interval = args.frames, frame_interval(args)
    init_len = backend.system_cache()[1]
    generic_warmup(backend)
    features = random_features(backend, n, args.seed)
    times = timestamps(0, n, interval)

    session = mukv.StreamSession(backend, method, overrides=overrides)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        ingest_features(session, features, times)
        synchronize(device)
        cold_seconds = time.perf_counter() - start
    cold_stats = stats_dict(session.stats())
    config = config_to_dict(session.memory.config)
    del session
    gc.collect()

    passes = []
    for _ in range(args.encode_repeats):
        session = mukv.StreamSession(backend, method, overrides=overrides)
        synchronize(device)
        start = time.perf_counter()
        ingest_features(session, features, times)
        synchronize(device)
        passes.append(time.perf_counter() - start)
        stats = stats_dict(session.stats())
        assert stats["tokens"] == cold_stats["tokens"]
        del session
        gc.collect()
    seconds = statistics.median(passes)
    return {
        "frames": n,
        "init_tokens": init_len,
        "seconds": seconds,
        "seconds_passes": passes,
        "seconds_per_frame": seconds / n,
        "cold_seconds": cold_seconds,
        "memory": peak.result,
        "stats": stats,
        "config": config,
    }


def child_answer(backend: Any, args: argparse.Namespace, task: dict[str, Any]) -> dict[str, Any]:
    """Part 4: MuKV paper preset really encodes ``--answer-frames`` frames, then one question; then
    the same question on a synthetic store of the same size."""
    device = backend.device
    n, interval = args.answer_frames, frame_interval(args)
    init_len = backend.system_cache()[1]
    features = random_features(backend, n, args.seed)
    times = timestamps(0, n, interval)

    warm = mukv.StreamSession(backend, "mukv")
    ingest_features(warm, features[:4], times[:4])
    warm_asks(warm, 1)
    del warm

    session = mukv.StreamSession(backend, "mukv")
    synchronize(device)
    start = time.perf_counter()
    ingest_features(session, features, times)
    synchronize(device)
    encode_seconds = time.perf_counter() - start
    print(f"  mukv encoded {n} frames in {encode_seconds:.1f} s", flush=True)
    warm_asks(session, args.warmup_asks)
    real = summarize_asks([timed_ask(session, args.max_new_tokens) for _ in range(args.repeats)])
    real["stats"] = stats_dict(session.stats())
    config = config_to_dict(session.memory.config)
    del session
    gc.collect()

    synthetic = mukv.StreamSession(backend, "mukv")
    fill_mukv(synthetic, 0, n - n % synthetic.memory.config.segment_frames, interval, args.seed)
    warm_asks(synthetic, args.warmup_asks)
    synth = summarize_asks([timed_ask(synthetic, args.max_new_tokens) for _ in range(args.repeats)])
    synth["stats"] = stats_dict(synthetic.stats())
    return {
        "frames": n,
        "init_tokens": init_len,
        "encode_seconds": encode_seconds,
        "encode_seconds_per_frame": encode_seconds / n,
        "real": real,
        "synthetic": synth,
        "config": config,
    }


def child_lengths(backend: Any, args: argparse.Namespace, task: dict[str, Any], emit) -> None:
    """Part 5: for each length, fill every scenario's state synthetically, then ask the questions
    in rounds (one question per scenario per round), so that the scenarios are timed interleaved,
    under the same load; states are dropped before the next length."""
    scenarios = [length_scenarios(args.uniform_frames)[name] for name in task["scenarios"]]
    interval = frame_interval(args)
    for scenario in scenarios:  # kernels and allocator warmed on a small state of each scenario
        warm = scenario.session(backend)
        scenario.fill(warm, 0, WARM_FRAMES, interval, args.seed)
        warm_asks(warm, 1)
        del warm
    gc.collect()

    for minutes in sorted(args.lengths):
        count = frames_for_minutes(minutes, args.fps)
        sessions: dict[str, mukv.StreamSession] = {}
        results: dict[str, dict[str, Any]] = {}
        for scenario in scenarios:
            result: dict[str, Any] = {"minutes": minutes, "frames": count, "method": scenario.method}
            results[scenario.name] = result
            if scenario.need is not None:
                gc.collect()
                malloc_trim()
                need = scenario.need(backend, count)
                free = free_memory_bytes(backend)
                result.update(need_bytes=need, free_bytes=free)
                if free is not None and need > args.memory_headroom * free:
                    result["skipped"] = (
                        f"its state of {count} frames needs about {need / 1e9:.1f} GB while answering, more than "
                        f"{args.memory_headroom:.0%} of the {free / 1e9:.1f} GB free next to the other states"
                    )
                    print(f"  {scenario.name} {minutes:g} min: skipped ({result['skipped']})", flush=True)
                    continue
            session = scenario.session(backend)
            start = time.perf_counter()
            scenario.fill(session, 0, count, interval, args.seed)
            result["fill_seconds"] = time.perf_counter() - start
            warm_asks(session, args.warmup_asks)
            sessions[scenario.name] = session
        asks: dict[str, list[dict[str, Any]]] = {name: [] for name in sessions}
        for _ in range(args.repeats):
            for name, session in sessions.items():
                asks[name].append(timed_ask(session, args.max_new_tokens))
        rss = rss_bytes()
        for name, result in results.items():
            result["rss_bytes"] = rss
            if name in sessions:
                result.update(summarize_asks(asks[name]))
                result["over_max_positions"] = result["context_tokens"] > TRAINED_POSITIONS
                result["stats"] = stats_dict(sessions[name].stats())
                totals = ", ".join(f"{a['timings']['total']:.2f}" for a in asks[name])
                print(f"  {name} {minutes:g} min ({count} frames): ask total {totals} s", flush=True)
            emit({"kind": "lengths", "scenario": name, **result})
        del sessions
        gc.collect()
        malloc_trim()


def child_main(args: argparse.Namespace) -> int:
    task = child_task(args)
    assert task is not None
    emit = child_emitter(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    backend = build_backend(
        device,
        dtype,
        seed=args.seed,
        attn_implementation=args.attn_implementation,
        vision_batch_frames=args.vision_batch_frames,
        max_positions=max_positions(args),
    )
    synchronize(device)
    build_seconds = time.perf_counter() - start
    if not args.keep_eos:
        disable_eos(backend)
    emit(
        {
            "kind": "info",
            "build_seconds": build_seconds,
            "parameters": parameter_counts(backend),
            "torch_threads": torch.get_num_threads(),
            "init_tokens": backend.system_cache()[1],
            "kv_bytes_per_token": backend.text.kv_bytes_per_token(dtype),
            "tokens_per_frame": backend.tokens_per_frame,
            "max_positions": backend.text.max_positions,
            "trained_positions": TRAINED_POSITIONS,
            "model_rss_bytes": rss_bytes(),
        }
    )
    with torch.inference_mode():
        if task["part"] == "encode":
            emit({"kind": "encode", "label": task["label"], **child_encode(backend, args, task)})
        elif task["part"] == "answer":
            emit({"kind": "answer", **child_answer(backend, args, task)})
        else:
            child_lengths(backend, args, task, emit)
    emit({"kind": "done", "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    return 0


# --------------------------------------------------------------------------- reporting


def encode_rows(encode: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    full = encode.get("full", {}).get("seconds_per_frame")
    rows = []
    for label, rec in encode.items():
        if "error" in rec:
            rows.append((label, rec["error"], "", "", "", "", ""))
            continue
        m = rec["memory"]
        peak = (
            m["cuda_peak_increase_bytes"] if m["cuda_peak_increase_bytes"] is not None else m["rss_peak_increase_bytes"]
        )
        held = (
            m["cuda_retained_increase_bytes"]
            if m["cuda_retained_increase_bytes"] is not None
            else m["rss_retained_increase_bytes"]
        )
        rows.append(
            (
                label,
                fmt(rec["seconds_per_frame"]),
                fmt(rec["cold_seconds"] / rec["frames"]),
                fx(ratio(rec["seconds_per_frame"], full)),
                mib(peak),
                mib(held),
                mib(rec["stats"]["total_bytes"]),
            )
        )
    return rows


ENCODE_HEADER = (
    "method",
    "s/frame (timed)",
    "s/frame (cold pass)",
    "ratio to full",
    "peak memory increase",
    "held after",
    "stats().total_bytes",
)


def storage_rows(
    sources: list[tuple[str, str, dict[str, Any], int]],
    kv_bytes: int,
    dtype_bytes: int,
    frames_per_hour: float,
) -> list[tuple[str, ...]]:
    """One row per (source, method family, stats, frames)."""
    kv_bytes_2 = kv_bytes // dtype_bytes * BF16_BYTES
    rows = []
    for label, family, stats, frames in sources:
        tokens = {g: stats["tokens"].get(g, 0) / frames for g in GRANULARITIES}
        total_tokens = sum(tokens.values())
        stored = sum(v for g, v in stats["bytes"].items() if g in GRANULARITIES) / frames
        if family == "uniform":  # visual features, not K/V: all of it scales with the dtype
            as_2byte = stored * BF16_BYTES / dtype_bytes
        else:  # metadata (positions, kept indices, scores, representatives) does not scale with the dtype
            as_2byte = stored - total_tokens * kv_bytes + total_tokens * kv_bytes_2
        expected = PAPER_TOKENS_PER_FRAME.get(family)
        rows.append(
            (
                label,
                fmt(tokens["patch"], 2),
                fmt(tokens["frame"], 2),
                fmt(tokens["segment"], 2),
                fmt(total_tokens, 2),
                "n/a" if expected is None else f"{expected:g}",
                f"{stored / 1e6:.3f} MB",
                gb(stored * frames_per_hour),
                gb(as_2byte * frames_per_hour),
                gb(expected * kv_bytes_2 * frames_per_hour) if expected is not None else "n/a",
            )
        )
    return rows


STORAGE_HEADER = (
    "source",
    "patch tok/frame",
    "frame tok/frame",
    "segment tok/frame",
    "total tok/frame",
    "expected tok/frame",
    "stored/frame (measured dtype)",
    "per hour (measured dtype)",
    "per hour, 2-byte K/V",
    "expected per hour, 2-byte K/V",
)


def answer_rows(answer: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for label in ("real", "synthetic"):
        a = answer[label]
        retrieved = ", ".join(
            f"{g} {a['retrieved'][g]['blocks']}x = {a['retrieved'][g]['tokens']}"
            for g in GRANULARITIES
            if g in a["retrieved"]
        )
        t = a["median"]
        rows.append(
            (
                label,
                str(a["visual_context_tokens"]),
                str(PAPER_CONTEXT_TOKENS),
                retrieved,
                fmt(t["prepare"]),
                fmt(t["first_token"]),
                fmt(t["total"]),
                fmt(t["decode_seconds_per_token"]),
            )
        )
    return rows


ANSWER_HEADER = (
    "state",
    "visual tokens in cache",
    "paper",
    "blocks retrieved (tokens)",
    "prepare, s",
    "first token, s",
    "total, s",
    "decode s/token",
)


RATIO_PAIRS = (("mukv", "full"), ("mukv", "uniform"))


def stage_medians(r: dict[str, Any]) -> dict[str, float]:
    """Median seconds of each named part of ``prepare``: ``answer.timings.stages`` (recorded as
    ``median_stages``), or the older runs' ``prepare_breakdown``."""
    if r.get("median_stages"):
        return r["median_stages"]
    breakdowns = r.get("prepare_breakdown") or []
    if not breakdowns:
        return {}
    return {k: statistics.median(b.get(k, 0.0) for b in breakdowns) for k in breakdowns[0]}


def length_ratios(lengths: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``minutes -> "a/b" -> {total, first_token}``: ratios of medians between methods of one run."""
    by_key = {(r["minutes"], method): r for method, records in lengths.items() for r in records}

    def med(minutes: float, method: str, key: str) -> float | None:
        r = by_key.get((minutes, method))
        return None if r is None or "median" not in r else r["median"][key]

    return {
        f"{minutes:g}": {
            f"{a}/{b}": {key: ratio(med(minutes, a, key), med(minutes, b, key)) for key in ("total", "first_token")}
            for a, b in RATIO_PAIRS
        }
        for minutes in sorted({k[0] for k in by_key})
    }


def length_table(lengths: dict[str, list[dict[str, Any]]]) -> list[tuple[str, ...]]:
    """One row per (method, length)."""
    rows = []
    for method, records in lengths.items():
        for r in records:
            if "skipped" in r or "error" in r:
                why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['error']}"
                rows.append((f"{r['minutes']:g}", str(r.get("frames", "")), method, why))
                continue
            med = r["median"]
            breakdown = ", ".join(f"{k} {v:.3f}" for k, v in stage_medians(r).items())
            rows.append(
                (
                    f"{r['minutes']:g}",
                    str(r["frames"]),
                    method,
                    str(r["context_tokens"]),
                    fmt(med["prepare"]),
                    fmt(med["first_token"]),
                    fmt(med["total"]),
                    fmt(r["timings"]["total"]),
                    fmt(med["decode_seconds_per_token"]),
                    gb(r["stats"]["total_bytes"]),
                    breakdown,
                )
            )
    return rows


def ratio_rows(ratios: dict[str, dict[str, dict[str, float | None]]]) -> list[tuple[str, ...]]:
    pairs = [f"{a}/{b}" for a, b in RATIO_PAIRS]
    return [
        (minutes, *(fx(by_pair.get(p, {}).get(key)) for key in ("total", "first_token") for p in pairs))
        for minutes, by_pair in ratios.items()
    ]


LENGTH_HEADER = (
    "minutes",
    "frames",
    "method",
    "context tokens",
    "prepare, s",
    "first token, s",
    "total, s",
    "total, s (1st ask only)",
    "decode s/token",
    "stored",
    "prepare stages (answer.timings.stages), s",
)
RATIO_HEADER = (
    "minutes",
    "mukv/full total",
    "mukv/uniform total",
    "mukv/full first token",
    "mukv/uniform first token",
)


def pad(rows: list[tuple[str, ...]], width: int) -> list[tuple[str, ...]]:
    return [tuple(row) + ("",) * (width - len(row)) for row in rows]


def in_run_order(record: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The record's lengths results in the order the run measured them (older records were written
    with sorted keys)."""
    lengths = record.get("lengths") or {}
    order = [m for m in record["settings"].get("length_methods", []) if m in lengths]
    return {m: lengths[m] for m in [*order, *(m for m in lengths if m not in order)]}


def collect(record: dict[str, Any]) -> dict[str, Any]:
    """Tables of a run record: name -> (header, rows)."""
    tables: dict[str, Any] = {}
    record = record | {"lengths": in_run_order(record)}
    info = record.get("info") or {}
    kv_bytes = info.get("kv_bytes_per_token")
    frames_per_hour = 3600 * record["settings"]["fps"]
    if record.get("encode"):
        tables["encode"] = (ENCODE_HEADER, pad(encode_rows(record["encode"]), len(ENCODE_HEADER)))
    if kv_bytes:
        sources = []
        for label, rec in (record.get("encode") or {}).items():
            if "stats" in rec:
                family = "full" if label == "full" else "mukv"
                sources.append((f"encode {label} ({rec['frames']} frames)", family, rec["stats"], rec["frames"]))
        answer = record.get("answer") or {}
        if "real" in answer:
            sources.append(
                (f"answer mukv ({answer['frames']} frames)", "mukv", answer["real"]["stats"], answer["frames"])
            )
        for method, records in (record.get("lengths") or {}).items():
            valid = [r for r in records if "stats" in r]
            if valid:
                r = valid[-1]
                sources.append((f"synthetic {method} ({r['frames']} frames)", method, r["stats"], r["stats"]["frames"]))
        if sources:
            tables["storage"] = (
                STORAGE_HEADER,
                storage_rows(sources, kv_bytes, record["dtype_bytes"], frames_per_hour),
            )
    if record.get("answer") and "real" in record["answer"]:
        tables["answer"] = (ANSWER_HEADER, answer_rows(record["answer"]))
    if record.get("lengths"):
        tables["lengths"] = (LENGTH_HEADER, pad(length_table(record["lengths"]), len(LENGTH_HEADER)))
        ratios = (record.get("ratios") or {}).get("lengths") or length_ratios(record["lengths"])
        tables["ratios"] = (RATIO_HEADER, ratio_rows(ratios))
    return tables


TABLE_TITLES = {
    "encode": "Encode (memory.ingest only, vision tower skipped), {frames} frames; peak memory of the cold pass "
    "in a fresh process",
    "storage": "Stored tokens and bytes per frame (init excluded), per hour at {fps:g} fps",
    "answer": "MuKV paper preset, a question after {answer_frames} frames (tokens exclude the {init} system-prompt "
    "tokens; medians of {repeats} questions)",
    "lengths": "Seconds per question by video length (synthetic state, {max_new_tokens} new tokens, EOS {eos}; "
    "medians of {repeats} questions)",
    "ratios": "Ratios per length (medians of this run's questions)",
}


def task_name(task: dict[str, Any]) -> str:
    names = [str(task[k]) for k in ("label", "scenario") if k in task] or [
        str(task[k]) for k in ("method",) if k in task
    ]
    return " ".join([task["part"], *names])


def parts_line(record: dict[str, Any]) -> str:
    items = []
    for c in record.get("children", []):
        other = c.get("load", {}).get("other_cpu_fraction")
        share = "" if other is None else f", other processes {100 * other:.0f}%"
        failed = f", {c['error']}" if "error" in c else ""
        items.append(f"{task_name(c['task'])} {c['wall_seconds']:.0f} s{share}{failed}")
    return "; ".join(items) or "none"


def markdown_section(record: dict[str, Any], tables: dict[str, Any]) -> str:
    m = record["machine"]
    s = record["settings"]
    info = record.get("info") or {}
    params = info.get("parameters") or {}
    lines = [
        f"## {m['date_utc']} — {m['device_name']} ({m['device']}), {m['dtype']}",
        "",
        *machine_lines(m),
        f"- model: {MODEL_ID}, random weights, {params.get('total', 0) / 1e6:.1f} M parameters; each part in a "
        f"fresh process (model build {fmt(info.get('build_seconds'), 1)} s, RSS after build "
        f"{mib(info.get('model_rss_bytes'))})",
        f"- load: {load_line(record['load'])}",
        f"- parts (each a fresh process): {parts_line(record)}",
        f"- settings: frames {s['frames']}, answer frames {s['answer_frames']}, lengths {s['lengths_min']} min at "
        f"{s['fps']:g} fps, max_new_tokens {s['max_new_tokens']}, repeats {s['repeats']} after "
        f"{s.get('warmup_asks', 0)} untimed warm-up questions per state, encode passes {s.get('encode_repeats', 1)}, "
        f"uniform num_frames "
        f"{s['uniform_frames']}, EOS {'kept' if s['keep_eos'] else 'disabled'}, question {QUESTION!r}",
        f"- K/V bytes per token in {m['dtype']}: {info.get('kv_bytes_per_token', 'n/a')}; system prompt "
        f"{info.get('init_tokens', 'n/a')} tokens (the package's tiny tokenizer)",
    ]
    if record.get("skipped_parts"):
        lines.append(f"- parts skipped: {', '.join(record['skipped_parts'])}")
    lines.append("")
    fill = {
        "frames": s["frames"],
        "fps": s["fps"],
        "answer_frames": s["answer_frames"],
        "init": info.get("init_tokens", "?"),
        "max_new_tokens": s["max_new_tokens"],
        "eos": "kept" if s["keep_eos"] else "disabled",
        "repeats": s["repeats"],
    }
    for name, (header, rows) in tables.items():
        lines += [TABLE_TITLES[name].format(**fill) + ":", "", markdown_table(header, rows), ""]
    for note in record.get("notes", []):
        lines.append(f"- {note}")
    if record.get("notes"):
        lines.append("")
    return "\n".join(lines) + "\n"


def notes(record: dict[str, Any]) -> list[str]:
    out = []
    info = record.get("info") or {}
    for method, records in (record.get("lengths") or {}).items():
        over = [r for r in records if r.get("over_max_positions")]
        if over:
            tokens = ", ".join(str(r.get("kv_tokens", r.get("context_tokens"))) for r in over)
            out.append(
                f"{method}: {tokens}-token caches exceed the model's "
                f"{info.get('trained_positions', info.get('max_positions'))} trained positions (the random model "
                f"admits {info.get('max_positions')}); with real weights the answers would degrade. The timings are "
                "what such a cache costs."
            )
    if record.get("lengths"):
        out.append(
            "Synthetic state: MuKV blocks of the exact kept sizes with random K/V, positions, scores and "
            "representatives; full a random K/V cache; uniform random features. Part 4 compares a real and a "
            "synthetic MuKV store of the same size."
        )
    return out


# --------------------------------------------------------------------------- summary over runs


def quiet(load: dict[str, Any] | None) -> str:
    return other_share(load) or "load n/a"


def part_load(record: dict[str, Any], part: str) -> str:
    """The other processes' share of the machine during each child of ``part``."""
    parts = [c for c in record.get("children", []) if c["task"]["part"] == part]
    return ", ".join(f"{task_name(c['task'])}: {quiet(c.get('load'))}" for c in parts)


def summary(records: list[dict[str, Any]]) -> str:
    """Medians with range over the recorded runs, per machine: encode seconds per frame and ratio
    to ``full``; seconds per question and the ratios of each run (runs that record the per-stage
    timings ``answer.timings.stages``, i.e. with the synthetic state built through the public API)."""
    lines = ["## Summary over recorded runs", ""]
    lines.append(
        "Medians with the range over runs and the number of runs (each run's parts, with the share of the "
        "machine other processes used, are in its section below). Ratios are taken within each run, then "
        "summarised."
    )
    lines.append("")
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(machine_key(record["machine"]), []).append(record)
    for key, runs in groups.items():
        encode_runs = [r for r in runs if r.get("encode")]
        if encode_runs:
            labels = list(dict.fromkeys(label for r in encode_runs for label in r["encode"]))
            rows = []
            for label in labels:
                spf = [r["encode"].get(label, {}).get("seconds_per_frame") for r in encode_runs]
                full = [r["encode"].get("full", {}).get("seconds_per_frame") for r in encode_runs]
                rows.append(
                    (
                        label,
                        fmt_median_range(median_range(spf), 3),
                        fmt_median_range(median_range(ratio(a, b) for a, b in zip(spf, full, strict=True)), 2, "x"),
                    )
                )
            dates = "; ".join(f"{r['machine']['date_utc']} ({part_load(r, 'encode')})" for r in encode_runs)
            lines += [
                f"{key}, encode (memory.ingest only), runs {dates}:",
                "",
                markdown_table(("method", "s/frame", "ratio to full (same run)"), rows),
                "",
            ]
        answer_runs = [r for r in runs if (r.get("answer") or {}).get("real")]
        if answer_runs:
            real = [r["answer"]["real"]["median"]["total"] for r in answer_runs]
            synth = [r["answer"]["synthetic"]["median"]["total"] for r in answer_runs]
            tokens = sorted({r["answer"]["real"]["visual_context_tokens"] for r in answer_runs})
            rows = [
                ("visual tokens in the answering cache", ", ".join(map(str, tokens))),
                ("real store, s/question", fmt_median_range(median_range(real), 2)),
                ("synthetic store, s/question", fmt_median_range(median_range(synth), 2)),
                (
                    "synthetic/real (same run)",
                    fmt_median_range(median_range(ratio(a, b) for a, b in zip(synth, real, strict=True)), 2, "x"),
                ),
            ]
            dates = ", ".join(f"{r['machine']['date_utc']} ({part_load(r, 'answer')})" for r in answer_runs)
            lines += [
                f"{key}, MuKV paper preset answering after {answer_runs[0]['answer']['frames']} real frames, runs "
                f"{dates}:",
                "",
                markdown_table(("", "median (range, runs)"), rows),
                "",
            ]
        length_runs = [
            r
            for r in runs
            if any(x.get("median_stages") is not None for recs in (r.get("lengths") or {}).values() for x in recs)
        ]
        if length_runs:
            per_run = [(r, (r.get("ratios") or {}).get("lengths") or length_ratios(r["lengths"])) for r in length_runs]
            methods = list(dict.fromkeys(m for r in length_runs for m in r["lengths"]))
            minutes = sorted({x["minutes"] for r in length_runs for recs in r["lengths"].values() for x in recs})
            rows = []
            for minute in minutes:
                cells = []
                for method in methods:
                    values = [
                        x["median"]["total"]
                        for r in length_runs
                        for x in r["lengths"].get(method, [])
                        if x["minutes"] == minute and "median" in x
                    ]
                    cells.append(fmt_median_range(median_range(values), 2))
                for a, b in RATIO_PAIRS:
                    values = [ratios.get(f"{minute:g}", {}).get(f"{a}/{b}", {}).get("total") for _, ratios in per_run]
                    cells.append(fmt_median_range(median_range(values), 2, "x"))
                mukv = [x for r in length_runs for x in r["lengths"].get("mukv", []) if x["minutes"] == minute]
                for key in ("prepare", "assemble"):
                    values = [
                        x["median"]["prepare"] if key == "prepare" else stage_medians(x).get(key)
                        for x in mukv
                        if "median" in x
                    ]
                    cells.append(fmt_median_range(median_range(values), 2))
                rows.append((f"{minute:g}", *cells))
            header = (
                "minutes",
                *(f"{m} s/question" for m in methods),
                *(f"{a}/{b}" for a, b in RATIO_PAIRS),
                "mukv prepare, s",
                "of which assemble, s",
            )
            dates = "; ".join(f"{r['machine']['date_utc']} ({part_load(r, 'lengths')})" for r in length_runs)
            lines += [
                f"{key}, seconds per question by video length (total per question, medians of each run's "
                f"questions, then over runs), runs: {dates}:",
                "",
                markdown_table(header, rows),
                "",
            ]
    return "\n".join(lines) + "\n"


INTRO = (
    "# Memory methods side by side at LLaVA-OneVision 0.5B sizes (random weights)\n\n"
    "Rendered by `benchmarks/bench_memory.py` from every record of `memory.jsonl`: a summary over runs, then one "
    "section per run. Random weights and random visual features: speed and memory only.\n\n"
)


def render(records: list[dict[str, Any]]) -> str:
    sections = [markdown_section(r, collect(r)) for r in records]
    return INTRO + summary(records) + "\n" + "".join(sections)


# --------------------------------------------------------------------------- parent


def table_fill(record: dict[str, Any]) -> dict[str, Any]:
    s = record["settings"]
    return {
        "frames": s["frames"],
        "fps": s["fps"],
        "answer_frames": s["answer_frames"],
        "init": (record.get("info") or {}).get("init_tokens", "?"),
        "max_new_tokens": s["max_new_tokens"],
        "eos": "kept" if s["keep_eos"] else "disabled",
        "repeats": s["repeats"],
    }


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    if child_task(args) is not None:
        return child_main(args)
    if args.render:
        write_results(args.out, "memory", [], render)
        print(f"re-rendered {args.out / 'memory.md'}")
        return 0
    monitor = LoadMonitor()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    machine = machine_info(device, dtype, args.attn_implementation)
    print(f"device {machine['device_name']} ({device}), {machine['dtype']}, torch threads {machine['torch_threads']}")

    record: dict[str, Any] = {
        "benchmark": "memory",
        "machine": machine,
        "settings": {
            "frames": args.frames,
            "answer_frames": args.answer_frames,
            "lengths_min": args.lengths_min,
            "length_methods": args.methods_lengths,
            "fps": args.fps,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "warmup_asks": args.warmup_asks,
            "encode_repeats": args.encode_repeats,
            "uniform_frames": args.uniform_frames,
            "keep_eos": args.keep_eos,
            "memory_headroom": args.memory_headroom,
            "seed": args.seed,
            "question": QUESTION,
            "encode_batch_frames": SessionConfig().encode_batch_frames,
        },
        "dtype_bytes": torch.empty((), dtype=dtype).element_size(),
        "skipped_parts": [
            name
            for name, skip in (
                ("encode", args.skip_encode),
                ("answer", args.skip_answer),
                ("lengths", args.skip_lengths),
            )
            if skip
        ],
        "children": [],
    }

    def child(task: dict[str, Any]) -> dict[str, Any]:
        out = run_child(__file__, raw, task, wait=args.wait_idle)
        info = next((r for r in out["records"] if r["kind"] == "info"), None)
        done = next((r for r in out["records"] if r["kind"] == "done"), {})
        record["children"].append(
            {k: out[k] for k in ("task", "returncode", "wall_seconds", "load") if k in out}
            | {"peak_rss_bytes": done.get("peak_rss_bytes")}
            | ({"error": out["error"]} if "error" in out else {})
        )
        if info:
            record.setdefault("info", info)
        share = other_share(out["load"])
        print(f"  ({task_name(task)}: {out['wall_seconds']:.0f} s" + (f", {share}" if share else "") + ")", flush=True)
        return out

    if not args.skip_encode:
        record["encode"] = {}
        for label, method, overrides in ENCODE_RUNS:
            print(f"encode: {label} ({args.frames} frames)", flush=True)
            out = child({"part": "encode", "label": label, "method": method, "overrides": overrides})
            rec = next((r for r in out["records"] if r["kind"] == "encode"), None)
            record["encode"][label] = rec if rec is not None else {"error": out.get("error", "no result")}
            if rec is not None:
                print(f"  {fmt(rec['seconds_per_frame'])} s/frame", flush=True)

    if not args.skip_answer:
        print(f"answer: mukv, {args.answer_frames} frames", flush=True)
        out = child({"part": "answer"})
        rec = next((r for r in out["records"] if r["kind"] == "answer"), None)
        record["answer"] = rec if rec is not None else {"error": out.get("error", "no result")}

    if not args.skip_lengths:
        record["lengths"] = {}
        print(f"lengths: {', '.join(args.methods_lengths)} at {args.lengths_min} min, interleaved", flush=True)
        out = child({"part": "lengths", "scenarios": args.methods_lengths})
        for name in args.methods_lengths:
            records = [r for r in out["records"] if r["kind"] == "lengths" and r["scenario"] == name]
            done = {r["minutes"] for r in records}
            for minutes in sorted(args.lengths):
                if minutes not in done:
                    frames = frames_for_minutes(minutes, args.fps)
                    records.append({"minutes": minutes, "frames": frames, "error": out.get("error", "no result")})
            record["lengths"][name] = records

    full = (record.get("encode") or {}).get("full", {}).get("seconds_per_frame")
    record["ratios"] = {
        "encode_to_full": {
            label: ratio(rec.get("seconds_per_frame"), full) for label, rec in (record.get("encode") or {}).items()
        },
        "lengths": length_ratios(record.get("lengths") or {}),
    }
    record["encode_ratios_to_full"] = record["ratios"]["encode_to_full"]  # the name older records use
    record["load"] = monitor.report()
    record["notes"] = notes(record)
    tables = collect(record)
    fill = table_fill(record)
    for name, (header, rows) in tables.items():
        print()
        print(TABLE_TITLES[name].format(**fill) + ":")
        print(text_table(header, rows))
    for note in record["notes"]:
        print(f"- {note}")
    print(load_line(record["load"]))
    jsonl, md = write_results(args.out, "memory", [record], render)
    print(f"appended to {jsonl}, re-rendered {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
