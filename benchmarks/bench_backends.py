"""The three backends side by side at real sizes, with random weights: vision, ingest, storage, questions.

What it measures
    For each model of ``--models`` (default: LLaVA-OneVision 0.5B, Qwen2.5-VL-3B, Qwen3-VL-2B, built
    by ``synthetic.REAL_MODELS`` with the real checkpoints' dimensions and random weights; nothing is
    downloaded), in one fresh child process per model, one after the other (the three do not fit in
    memory together), all in one run:

    1. ``vision``: seconds per frame of ``backend.encode_frames`` on random uint8 frames already at
       the backend's input resolution (so the resize is not timed), after one warm-up call; the
       median of ``--vision-repeats`` calls of ``--vision-frames`` frames.
    2. ``ingest``: seconds per frame of ``memory.ingest`` for ``full`` (one plain prefill of every
       visual token) and ``mukv`` (paper preset: independent encoding, every visual token prefilled
       once per granularity) on random visual features of ``--ingest-segments`` MuKV segments
       (``segment_frames`` units; a unit is a frame on LLaVA-OneVision, a pair of frames on Qwen-VL),
       one timed pass each after a one-unit warm-up prefill. At 3B sizes a pass takes minutes.
    3. ``storage``: what the ingested ``full`` and ``mukv`` stores hold (``memory.stats()``), as
       tokens and bytes per frame by granularity, and per hour of video at ``--fps`` (0.5 fps:
       1800 frames an hour) with 2-byte K/V elements (bf16/fp16 weights), next to the measured dtype.
    4. ``lengths``: seconds per question with ``--lengths-min`` minutes of video in memory (default
       10, 30, 60). MuKV's store is the one of part 2 extended by copies of its real blocks
       (``synthetic.clone_groups``: shifted frames and times, a random representative per copy, the
       K/V shared with the original, so an hour of Qwen3-VL-2B blocks, ~150 GB in float32, costs
       the process one segment's memory); ``stats()`` counts every copy. ``full`` gets a random
       cache of the length (``synthetic.fill_full``) where it fits in memory (held three times
       over while answering) and is skipped with the reason otherwise. Per length: one untimed
       two-token question per state, then ``--repeats`` rounds ask each state one question of
       ``--max-new-tokens`` tokens (EOS disabled, so every answer decodes that many), interleaved.

    Ratios between models (Qwen to LLaVA-OneVision) and between methods (``mukv`` to ``full``) are
    taken within the run. Random weights: speed and memory only.

Results
    One JSON record per run appended to ``OUT/backends.jsonl``; ``OUT/backends.md`` re-rendered from
    all records (summary over runs per machine, then one section per run).

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_backends.py                       # CPU, float32 (about 50 min on 2 cores)
    .venv/bin/python benchmarks/bench_backends.py --models qwen3-vl-2b  # one model
    .venv/bin/python benchmarks/bench_backends.py --render              # re-render results/backends.md
    python benchmarks/bench_backends.py --device cuda --dtype bfloat16  # GPU

Memory: the float32 weights take 4.2 GB (LLaVA-OneVision 0.5B), 15.0 GB (Qwen2.5-VL-3B) and 8.5 GB
(Qwen3-VL-2B); MuKV's answering cache adds up to 2.3 GB (Qwen2.5-VL-3B) and 7.0 GB (Qwen3-VL-2B,
eight K/V heads) in float32: 24 GB of RAM is enough for one model at a time.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mukv
from common import (
    RESULTS,
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
    other_share,
    ratio,
    render_results,
    run_child,
    text_table,
    write_results,
)
from mukv.backends.registry import resolve_device, resolve_dtype
from mukv.memory.mukv_config import paper_preset
from synthetic import (
    REAL_MODELS,
    clone_groups,
    disable_eos,
    fill_full,
    frame_shape,
    free_memory_bytes,
    full_cache_need,
    generic_warmup,
    ingest_features,
    parameter_counts,
    random_features,
    stats_dict,
    stored_blocks,
    synchronize,
    timed_ask,
    warm_asks,
)

NAME = "backends"
BASE_MODEL = "llava-onevision-0.5b"  # the model the others are compared to
GRANULARITIES = ("patch", "frame", "segment")
INGEST_METHODS = ("full", "mukv")
KV_ELEMENT_BYTES = 2  # bf16 / fp16 K/V, the dtype the models are served in


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default=",".join(REAL_MODELS), help="comma-separated, from: " + ", ".join(REAL_MODELS)
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--fps", type=float, default=0.5, help="sampling rate of the stream (frames per second)")
    parser.add_argument("--vision-frames", type=int, default=4, help="frames per timed encode_frames call")
    parser.add_argument("--vision-repeats", type=int, default=2)
    parser.add_argument("--ingest-segments", type=int, default=1, help="MuKV segments ingested per method")
    parser.add_argument("--lengths-min", default="10,30,60", help="minutes of video in memory, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed questions per state and length")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--skip-full-lengths", action="store_true", help="answer only from MuKV at each length")
    parser.add_argument(
        "--full-max-minutes",
        type=float,
        default=10.0,
        help="longest video `full` answers from (its cost grows with it)",
    )
    parser.add_argument("--memory-headroom", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--vision-batch-frames", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-idle", type=float, default=0.0, help="before each model, wait up to this long")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only re-render the Markdown from the records")
    add_child_arguments(parser)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in REAL_MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(REAL_MODELS)}")
    args.model_list = models
    try:
        args.length_list = [float(v) for v in args.lengths_min.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--lengths-min: comma-separated numbers, got {args.lengths_min!r}")
    for name in ("vision_frames", "vision_repeats", "ingest_segments", "repeats", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if not args.fps > 0 or any(m <= 0 for m in args.length_list):
        parser.error("--fps and --lengths-min: must be positive")
    return args


# --------------------------------------------------------------------------- child


def unit_times(backend: Any, first: int, count: int, fps: float) -> np.ndarray:
    """Timestamps of units ``first .. first+count-1`` of a stream sampled at ``fps``: a unit is at its
    last frame's time (``memory.ingest``'s convention)."""
    per_unit = backend.layout.frames_per_unit
    return (np.arange(first, first + count, dtype=np.float64) * per_unit + per_unit - 1) / fps


def child_vision(backend: Any, args: argparse.Namespace) -> dict[str, Any]:
    per_unit = backend.layout.frames_per_unit
    frames = max(per_unit, args.vision_frames - args.vision_frames % per_unit)
    h, w = frame_shape(backend)
    rng = np.random.default_rng(args.seed)
    backend.encode_frames(rng.integers(0, 256, (per_unit, h, w, 3), dtype=np.uint8))  # warm-up
    seconds = []
    for _ in range(args.vision_repeats):
        batch = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
        synchronize(backend.device)
        start = time.perf_counter()
        backend.encode_frames(batch)
        synchronize(backend.device)
        seconds.append((time.perf_counter() - start) / frames)
    return {"frames_per_call": frames, "seconds_per_frame": seconds, "median": statistics.median(seconds)}


def child_ingest(backend: Any, args: argparse.Namespace, method: str) -> tuple[mukv.StreamSession, dict[str, Any]]:
    session = mukv.StreamSession(backend, method, fps=args.fps)
    units = paper_preset().segment_frames * args.ingest_segments
    features = random_features(backend, units, seed=args.seed + 1)
    times = unit_times(backend, 0, units, args.fps)
    synchronize(backend.device)
    start = time.perf_counter()
    ingest_features(session, features, times)
    synchronize(backend.device)
    seconds = time.perf_counter() - start
    frames = units * backend.layout.frames_per_unit
    return session, {
        "method": method,
        "units": units,
        "frames": frames,
        "seconds": seconds,
        "seconds_per_frame": seconds / frames,
        "stats": stats_dict(session.memory.stats()),
    }


def units_for_minutes(minutes: float, fps: float, per_unit: int, group: int) -> int:
    """Units in ``minutes`` of video at ``fps``, rounded to whole groups of ``group`` units."""
    units = minutes * 60 * fps / per_unit
    return max(group, group * round(units / group))


def child_lengths(backend: Any, args: argparse.Namespace, mukv_session: mukv.StreamSession, emit) -> None:
    """Part 4: MuKV's store grown by copies of its real blocks, ``full`` filled where it fits."""
    memory = mukv_session.memory
    group = memory.frames
    template = stored_blocks(mukv_session)
    per_unit = backend.layout.frames_per_unit
    interval = per_unit / args.fps
    for minutes in sorted(args.length_list):
        units = units_for_minutes(minutes, args.fps, per_unit, group)
        if units > memory.frames:
            clone_groups(mukv_session, template, group, (units - memory.frames) // group, interval, args.seed)
        states: dict[str, mukv.StreamSession] = {"mukv": mukv_session}
        skipped: dict[str, str] = {}
        full = None
        if minutes > args.full_max_minutes:
            skipped["full"] = f"longer than --full-max-minutes {args.full_max_minutes:g}"
        elif not args.skip_full_lengths:
            need = full_cache_need(backend, units)
            free = free_memory_bytes(backend)
            if free is not None and need > args.memory_headroom * free:
                skipped["full"] = (
                    f"needs {need / 1e9:.1f} GB while answering (its cache three times over), "
                    f"{free / 1e9:.1f} GB available"
                )
            else:
                try:
                    full = mukv.StreamSession(backend, "full", fps=args.fps)
                    fill_full(full, 0, units, interval, args.seed)
                    states["full"] = full
                except (ValueError, RuntimeError) as exc:  # a backend whose full cache cannot be adopted
                    skipped["full"] = f"{type(exc).__name__}: {exc}"
                    full = None
        for name, session in list(states.items()):
            try:
                warm_asks(session, 1)
            except ValueError as exc:  # e.g. a context longer than the model admits
                skipped[name] = f"{type(exc).__name__}: {exc}"
                del states[name]
        asks: dict[str, list[dict[str, Any]]] = {name: [] for name in states}
        for _ in range(args.repeats):
            for name, session in states.items():
                asks[name].append(timed_ask(session, args.max_new_tokens))
        for name, records in asks.items():
            emit(
                {
                    "kind": "length",
                    "minutes": minutes,
                    "units": units,
                    "frames": units * per_unit,
                    "method": name,
                    "asks": records,
                    "stored_bytes": states[name].memory.stats().total_bytes,
                }
            )
        for name, reason in skipped.items():
            emit({"kind": "length", "minutes": minutes, "units": units, "method": name, "skipped": reason})
        del full, states
        gc.collect()


def child_main(args: argparse.Namespace) -> int:
    task = child_task(args)
    assert task is not None
    emit = child_emitter(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    backend = REAL_MODELS[task["model"]](
        device,
        dtype,
        seed=args.seed,
        attn_implementation=args.attn_implementation,
        vision_batch_frames=args.vision_batch_frames,
    )
    synchronize(device)
    build_seconds = time.perf_counter() - start
    disable_eos(backend)
    emit(
        {
            "kind": "info",
            "model": task["model"],
            "build_seconds": build_seconds,
            "parameters": parameter_counts(backend),
            "torch_threads": torch.get_num_threads(),
            "frame_shape": list(frame_shape(backend)),
            "frames_per_unit": backend.layout.frames_per_unit,
            "tokens_per_unit": backend.tokens_per_frame,
            "init_tokens": backend.system_cache()[1],
            "kv_bytes_per_token": backend.text.kv_bytes_per_token(dtype),
            "kv_bytes_per_token_2byte": backend.text.kv_bytes_per_token(torch.bfloat16),
            "layers": backend.text.num_layers,
            "kv_heads": backend.text.num_kv_heads,
            "head_dim": backend.text.head_dim,
        }
    )
    with torch.inference_mode():
        generic_warmup(backend)
        emit({"kind": "vision", **child_vision(backend, args)})
        sessions = {}
        for method in INGEST_METHODS:
            sessions[method], record = child_ingest(backend, args, method)
            emit({"kind": "ingest", **record})
        del sessions["full"]
        gc.collect()
        child_lengths(backend, args, sessions["mukv"], emit)
    emit({"kind": "done", "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    return 0


# --------------------------------------------------------------------------- collecting


def collect(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``model -> {info, vision, ingest: {method: rec}, lengths: [rec], load, error?}`` of one run."""
    out: dict[str, dict[str, Any]] = {}
    for child in record["children"]:
        model = child["task"]["model"]
        entry = out.setdefault(model, {"ingest": {}, "lengths": [], "load": child.get("load")})
        if child.get("error"):
            entry["error"] = child["error"]
        for rec in child["records"]:
            kind = rec["kind"]
            if kind == "ingest":
                entry["ingest"][rec["method"]] = rec
            elif kind == "length":
                entry["lengths"].append(rec)
            else:
                entry[kind] = rec
    return out


def per_frame(entry: dict[str, Any], method: str) -> dict[str, Any] | None:
    """Stored tokens and 2-byte K/V bytes per frame, by granularity (the system prompt left out)."""
    rec = entry["ingest"].get(method)
    info = entry.get("info")
    if rec is None or info is None:
        return None
    frames = rec["frames"]
    scale = info["kv_bytes_per_token_2byte"] / info["kv_bytes_per_token"]
    tokens = {g: n / frames for g, n in rec["stats"]["tokens"].items() if g != "init"}
    measured = {g: n / frames for g, n in rec["stats"]["bytes"].items() if g != "init"}
    return {
        "tokens": tokens,
        "bytes_measured": measured,
        # Stored bytes scaled from the measured dtype to 2-byte elements; block metadata (positions,
        # kept indices, scores: a few bytes per token, under 0.3% of the total) is scaled with them.
        "bytes_2byte": {g: b * scale for g, b in measured.items()},
    }


def question_seconds(length: dict[str, Any]) -> list[float]:
    return [a["timings"]["total"] for a in length.get("asks", [])]


def model_order(tables: dict[str, dict[str, Any]]) -> list[str]:
    return [m for m in REAL_MODELS if m in tables]


def summary_rows(tables: dict[str, dict[str, Any]], fps: float) -> list[tuple[str, ...]]:
    """Per model: sizes, vision and ingest per frame, storage per hour, with ratios to the base model."""
    base = tables.get(BASE_MODEL, {})
    base_vision = (base.get("vision") or {}).get("median")
    rows = []
    for model in model_order(tables):
        entry = tables[model]
        info = entry.get("info")
        if info is None:
            rows.append((model, entry.get("error", "no record"), *[""] * 9))
            continue
        vision = (entry.get("vision") or {}).get("median")
        ing = {m: (entry["ingest"].get(m) or {}).get("seconds_per_frame") for m in INGEST_METHODS}
        frames_per_hour = 3600 * fps
        hourly = {}
        for method in INGEST_METHODS:
            pf = per_frame(entry, method)
            hourly[method] = None if pf is None else sum(pf["bytes_2byte"].values()) * frames_per_hour
        p = info["parameters"]
        rows.append(
            (
                model,
                f"{p['total'] / 1e9:.2f} B ({p['vision'] / 1e9:.2f} vision)",
                f"{info['tokens_per_unit']} / {info['frames_per_unit']}",
                fmt(vision),
                fx(ratio(vision, base_vision)),
                fmt(ing["full"]),
                fmt(ing["mukv"]),
                fx(ratio(ing["mukv"], ing["full"])),
                gb(hourly["full"]),
                gb(hourly["mukv"]),
            )
        )
    return rows


SUMMARY_HEADER = (
    "model",
    "parameters",
    "visual tokens / frames per unit",
    "vision s/frame",
    "vision vs LLaVA-OV",
    "ingest full s/frame",
    "ingest mukv s/frame",
    "mukv/full",
    "full per hour (2-byte K/V)",
    "mukv per hour (2-byte K/V)",
)


def storage_rows(tables: dict[str, dict[str, Any]], fps: float) -> list[tuple[str, ...]]:
    rows = []
    for model in model_order(tables):
        entry = tables[model]
        for method in INGEST_METHODS:
            pf = per_frame(entry, method)
            if pf is None:
                continue
            names = [g for g in GRANULARITIES if g in pf["tokens"]] or sorted(pf["tokens"])
            tok = " + ".join(f"{g} {pf['tokens'][g]:.2f}" for g in names)
            per_hour = " + ".join(f"{g} {gb(pf['bytes_2byte'][g] * 3600 * fps)}" for g in names)
            rows.append(
                (
                    model,
                    method,
                    tok,
                    f"{sum(pf['tokens'].values()):.2f}",
                    gb(sum(pf["bytes_measured"].values()) * 3600 * fps),
                    per_hour,
                    gb(sum(pf["bytes_2byte"].values()) * 3600 * fps),
                )
            )
    return rows


STORAGE_HEADER = (
    "model",
    "method",
    "tokens per frame by granularity",
    "total tokens/frame",
    "per hour (measured dtype)",
    "per hour by granularity (2-byte K/V)",
    "per hour (2-byte K/V)",
)


def length_rows(tables: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    base = {r["minutes"]: r for r in tables.get(BASE_MODEL, {}).get("lengths", []) if r["method"] == "mukv"}
    rows = []
    for model in model_order(tables):
        lengths = tables[model]["lengths"]
        fulls = {r["minutes"]: r for r in lengths if r["method"] == "full"}
        for rec in sorted((r for r in lengths if r["method"] == "mukv"), key=lambda r: r["minutes"]):
            secs = question_seconds(rec)
            stat = median_range(secs)
            full = fulls.get(rec["minutes"], {})
            full_stat = median_range(question_seconds(full))
            base_stat = median_range(question_seconds(base.get(rec["minutes"], {})))
            asks = rec["asks"]
            stages = {}
            for key in ("query", "rank", "assemble"):
                stages[key] = statistics.median(a["timings"].get("stages", {}).get(key, 0.0) for a in asks)
            rows.append(
                (
                    model,
                    f"{rec['minutes']:g}",
                    str(rec["frames"]),
                    gb(rec["stored_bytes"]),
                    str(statistics.median(a["visual_context_tokens"] for a in asks)),
                    fmt_median_range(stat, 2, suffix=""),
                    f"{stages['query']:.2f} / {stages['rank']:.2f} / {stages['assemble']:.2f}",
                    fmt(statistics.median(a["decode_seconds_per_token"] or 0.0 for a in asks)),
                    "skipped" if full.get("skipped") else fmt_median_range(full_stat, 2),
                    fx(ratio(stat and stat[0], full_stat and full_stat[0])),
                    fx(ratio(stat and stat[0], base_stat and base_stat[0])),
                )
            )
    return rows


LENGTH_HEADER = (
    "model",
    "minutes",
    "frames",
    "mukv stored (as counted)",
    "visual tokens placed",
    "mukv s/question (median, range)",
    "query / rank / assemble, s",
    "decode s/token",
    "full s/question",
    "mukv/full",
    "mukv vs LLaVA-OV",
)


def skip_notes(tables: dict[str, dict[str, Any]]) -> list[str]:
    notes = []
    for model in model_order(tables):
        for rec in tables[model]["lengths"]:
            if rec.get("skipped"):
                notes.append(f"- {model}, {rec['minutes']:g} min, `{rec['method']}` skipped: {rec['skipped']}")
        if tables[model].get("error"):
            notes.append(f"- {model}: {tables[model]['error']}")
    return notes


def model_lines(tables: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for model in model_order(tables):
        entry = tables[model]
        info = entry.get("info")
        if info is None:
            lines.append(f"- {model}: {entry.get('error', 'no record')}")
            continue
        h, w = info["frame_shape"]
        wall = (entry.get("load") or {}).get("wall_seconds")
        peak = (entry.get("done") or {}).get("peak_rss_bytes")
        lines.append(
            f"- {model}: {info['layers']} layers x {info['kv_heads']} K/V heads x {info['head_dim']}, "
            f"frames {h} x {w} px, system prompt {info['init_tokens']} tokens, built in "
            f"{fmt(info['build_seconds'], 1)} s; child process {fmt(wall, 0)} s, "
            f"{other_share(entry.get('load')) or 'load not measured'}, peak RSS {gb(peak)}"
        )
    return lines


def markdown_section(record: dict[str, Any]) -> str:
    m = record["machine"]
    tables = collect(record)
    fps = record["settings"]["fps"]
    s = record["settings"]
    lines = [
        f"## {m['date_utc']} — {machine_key(m)}",
        "",
        *machine_lines(m),
        f"- load: {load_line(record['load'])}",
        f"- settings: {fps:g} fps, vision {s['vision_frames']} frames x {s['vision_repeats']} calls, ingest "
        f"{s['ingest_segments']} MuKV segment(s) per method, lengths {s['lengths_min']} min, "
        f"{s['repeats']} questions of {s['max_new_tokens']} tokens per state (EOS disabled)",
        *model_lines(tables),
        "",
        "Per model (vision: median of the timed calls; ingest: one pass):",
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(tables, fps)),
        "",
        f"Stored per frame and per hour at {fps:g} fps (`memory.stats()` after the ingest; system prompt excluded):",
        "",
        markdown_table(STORAGE_HEADER, storage_rows(tables, fps)),
        "",
        "Seconds per question by video length (MuKV's store grown by copies of its real blocks, K/V shared; "
        "`full` a random cache where it fits):",
        "",
        markdown_table(LENGTH_HEADER, length_rows(tables)),
        "",
        *skip_notes(tables),
        "",
    ]
    return "\n".join(lines)


def summary(records: list[dict[str, Any]]) -> str:
    """Medians over runs per machine of the headline numbers, each with its range and run count."""
    by_machine: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_machine.setdefault(machine_key(record["machine"]), []).append(record)
    out = []
    for key, runs in by_machine.items():
        rows = []
        for model in REAL_MODELS:
            values: dict[str, list[float | None]] = {}
            for record in runs:
                entry = collect(record).get(model)
                if not entry or "info" not in entry:
                    continue
                fps = record["settings"]["fps"]
                values.setdefault("vision", []).append((entry.get("vision") or {}).get("median"))
                for method in INGEST_METHODS:
                    values.setdefault(f"ingest_{method}", []).append(
                        (entry["ingest"].get(method) or {}).get("seconds_per_frame")
                    )
                    pf = per_frame(entry, method)
                    values.setdefault(f"hour_{method}", []).append(
                        None if pf is None else sum(pf["bytes_2byte"].values()) * 3600 * fps / 1e9
                    )
                for rec in entry["lengths"]:
                    if rec["method"] == "mukv" and rec.get("asks"):
                        values.setdefault(f"q{rec['minutes']:g}", []).append(statistics.median(question_seconds(rec)))
            if not values:
                continue
            rows.append(
                (
                    model,
                    fmt_median_range(median_range(values.get("vision", [])), 3),
                    fmt_median_range(median_range(values.get("ingest_full", [])), 3),
                    fmt_median_range(median_range(values.get("ingest_mukv", [])), 3),
                    fmt_median_range(median_range(values.get("hour_mukv", [])), 2, " GB"),
                    *(fmt_median_range(median_range(values.get(f"q{m}", [])), 2) for m in ("10", "30", "60")),
                )
            )
        dates = ", ".join(f"{r['machine']['date_utc']} ({other_share(r['load']) or 'load n/a'})" for r in runs)
        out += [
            f"{key}, runs {dates}:",
            "",
            markdown_table(
                (
                    "model",
                    "vision s/frame",
                    "ingest full s/frame",
                    "ingest mukv s/frame",
                    "mukv stored per hour, 2-byte K/V",
                    "mukv s/question, 10 min",
                    "30 min",
                    "60 min",
                ),
                rows,
            ),
            "",
        ]
    return "\n".join(out)


INTRO = (
    "# Backends side by side at real sizes (random weights)\n\n"
    "Rendered by `benchmarks/bench_backends.py` from every record of `backends.jsonl`: a summary over runs, "
    "then one section per run. Random weights and random visual features: speed and memory only. "
    "Each model runs in its own child process, one after the other, in one run.\n"
)


def render(records: list[dict[str, Any]]) -> str:
    parts = [INTRO, "## Summary over recorded runs\n", "Medians over runs, with the range and the number of runs.\n"]
    parts.append(summary(records))
    parts += [markdown_section(r) for r in reversed(records)]
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def child_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "--device", args.device, "--dtype", args.dtype, "--fps", str(args.fps),
        "--vision-frames", str(args.vision_frames), "--vision-repeats", str(args.vision_repeats),
        "--ingest-segments", str(args.ingest_segments), "--lengths-min", args.lengths_min,
        "--repeats", str(args.repeats), "--max-new-tokens", str(args.max_new_tokens),
        "--memory-headroom", str(args.memory_headroom), "--attn-implementation", args.attn_implementation,
        "--vision-batch-frames", str(args.vision_batch_frames), "--seed", str(args.seed),
    ]  # fmt: skip
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.skip_full_lengths:
        argv.append("--skip-full-lengths")
    argv += ["--full-max-minutes", str(args.full_max_minutes)]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if child_task(args) is not None:
        return child_main(args)
    if args.render:
        print(render_results(args.out, NAME, render))
        return 0
    from common import LoadMonitor

    device = resolve_device(args.device)
    machine = machine_info(device, resolve_dtype(args.dtype, device), args.attn_implementation)
    monitor = LoadMonitor()
    children = []
    for model in args.model_list:
        print(f"{model}: building and measuring in a fresh process ...", flush=True)
        children.append(run_child(__file__, child_argv(args), {"model": model}, wait=args.wait_idle))
    record = {
        "machine": machine,
        "load": monitor.report(),
        "settings": {
            key: getattr(args, key)
            for key in (
                "fps",
                "vision_frames",
                "vision_repeats",
                "ingest_segments",
                "lengths_min",
                "repeats",
                "max_new_tokens",
                "skip_full_lengths",
                "full_max_minutes",
                "seed",
            )
        },
        "children": children,
    }
    tables = collect(record)
    print(text_table(SUMMARY_HEADER, summary_rows(tables, args.fps)))
    print(text_table(STORAGE_HEADER, storage_rows(tables, args.fps)))
    print(text_table(LENGTH_HEADER, length_rows(tables)))
    for note in skip_notes(tables):
        print(note)
    jsonl, md = write_results(args.out, NAME, [record], render)
    print(f"results: {jsonl}, {md}")
    return 0 if all(not c.get("error") for c in children) else 1


if __name__ == "__main__":
    sys.exit(main())
