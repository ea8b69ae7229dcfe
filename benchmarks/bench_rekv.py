"""ReKV and the recent-frames baseline side by side with MuKV and full, at LLaVA-OneVision 0.5B
sizes with random weights (no download). Speed and memory only: answers are nonsense.

Measured on the same machine and inputs, in one process (one run, so every ratio is between
methods measured side by side):

1. encode cost of ``memory.ingest`` per frame (vision tower skipped: random visual tokens) and
   frames per second for each of :data:`ENCODE_METHODS`: ``full``, ``rekv`` (sliding window, every
   frame offloaded), ``recent`` (rolling 16-frame window) and ``mukv`` (paper preset, independent
   encoding); ratios to ``full``;
2. stored bytes per frame and per hour of video at ``--fps``, in the run's dtype and at 2-byte K/V
   (ReKV at 0.5B: 196 tokens x 24 layers x 2 x 2 heads x 64 x 2 B = 2.41 MB per frame, 4.0 GiB/h);
   ReKV's bounded sliding window is reported apart;
3. tokens placed in the cache for answering (ReKV with r = 64: 64 x 196 = 12,544);
4. seconds per question at ``--lengths-min`` minutes of video (default 10, 30, 60 = 300, 900,
   1800 frames) for each scenario of :data:`LENGTH_SCENARIOS` (``rekv``, ``mukv``), one loop over
   that data: stores of the exact block sizes are adopted through ``BlockMemory.restore`` with
   random K/V, the positions the backend's scheme gives and random representatives
   (``synthetic.py``), because encoding an hour of video is out of reach on a CPU; ``recent`` holds
   16 frames whatever the length, so it is measured once after ingesting 16 frames. Ratio
   mukv/rekv per length. EOS is disabled, so every question decodes ``--max-new-tokens`` tokens.

Run: ``.venv/bin/python benchmarks/bench_rekv.py`` (add ``--device cuda --dtype bfloat16`` on a
GPU). One JSON record is appended to ``benchmarks/results/rekv.jsonl`` and ``rekv.md`` is
re-rendered from all of its records (a summary over runs, then one section per run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from common import (
    RESULTS,
    LoadMonitor,
    fmt_median_range,
    load_line,
    machine_info,
    machine_key,
    machine_lines,
    markdown_table,
    median_range,
    ratio,
    wait_idle,
    write_results,
)
from mukv.backends.registry import resolve_device, resolve_dtype
from synthetic import (
    Scenario,
    build_backend,
    disable_eos,
    fill_ingest,
    fill_mukv,
    fill_rekv,
    generic_warmup,
    ingest_features,
    random_features,
    summarize_asks,
    synchronize,
    timed_ask,
    timestamps,
    warm_asks,
)

ENCODE_METHODS = ("full", "rekv", "recent", "mukv")
LENGTH_SCENARIOS = (
    Scenario("rekv", "rekv", fill_rekv),
    Scenario("mukv", "mukv", fill_mukv),
)
RECENT = Scenario("recent", "recent", fill_ingest)
RECENT_FRAMES = 16
RATIO = ("mukv", "rekv")  # numerator, denominator of the per-length ratio


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="ReKV and recent side by side with MuKV and full (random weights at 0.5B sizes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--frames", type=int, default=8, help="frames per timed encode")
    parser.add_argument("--lengths-min", default="10,30,60", help="video lengths in minutes, comma-separated")
    parser.add_argument("--fps", type=float, default=0.5, help="frame sampling rate of the stream")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="decoding limit of every question")
    parser.add_argument("--repeats", type=int, default=2, help="timed questions per state (median reported)")
    parser.add_argument("--warmup-asks", type=int, default=2, help="untimed 2-token questions per state first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic state")
    parser.add_argument("--attn-implementation", default="sdpa", help="attention kernel of the model")
    parser.add_argument("--vision-batch-frames", type=int, default=16, help="frames per vision-tower call (unused)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--render", action="store_true", help="only re-render OUT/rekv.md from OUT/rekv.jsonl")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="first wait up to this many seconds for the machine to be idle (< 10%% busy over 5 s)",
    )
    args = parser.parse_args(argv)
    try:
        args.lengths = [float(v) for v in args.lengths_min.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--lengths-min: expected numbers, got {args.lengths_min!r}")
    if any(v <= 0 for v in args.lengths) or args.fps <= 0:
        parser.error("--lengths-min and --fps: must be > 0")
    for name in ("frames", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    return args


def frames_for_minutes(minutes: float, fps: float) -> int:
    """Frames in ``minutes`` of video, rounded to whole MuKV segments (4 frames)."""
    return max(4, 4 * round(minutes * 60 * fps / 4))


# --------------------------------------------------------------------------- measurements


def encode_cost(backend: Any, method: str, frames: int, interval: float, seed: int) -> dict[str, Any]:
    """Seconds per frame of ``memory.ingest`` (after a one-frame warm-up session) and bytes held."""
    warm = Scenario(method, method, fill_ingest).session(backend)
    ingest_features(warm, random_features(backend, 1, seed + 1), timestamps(0, 1, interval))
    session = Scenario(method, method, fill_ingest).session(backend)
    features = random_features(backend, frames, seed)
    synchronize(backend.device)
    start = time.perf_counter()
    ingest_features(session, features, timestamps(0, frames, interval))
    synchronize(backend.device)
    seconds = time.perf_counter() - start
    stats = session.stats()
    return {**per_frame(stats.bytes, stats.tokens, frames), "seconds_per_frame": seconds / frames}


def per_frame(nbytes: dict[str, int], tokens: dict[str, int], frames: int) -> dict[str, Any]:
    """Bytes that grow with the video, per frame; the sliding window (bounded by ``n_local``,
    the same at any length) and the system prompt are reported apart."""
    held = sum(v for k, v in nbytes.items() if k not in ("init", "window", "pending"))
    visual = sum(v for k, v in tokens.items() if k != "init")
    return {
        "bytes_per_frame": held / frames,
        "tokens_per_frame": visual / frames,
        "window_bytes": nbytes.get("window", 0),
        "bytes_by_part": dict(nbytes),
    }


def question_cost(session: Any, warmup: int, repeats: int, max_new_tokens: int) -> dict[str, Any]:
    warm_asks(session, warmup)
    summary = summarize_asks([timed_ask(session, max_new_tokens) for _ in range(repeats)])
    return {
        "total_seconds": summary["median"]["total"],
        "first_token_seconds": summary["median"]["first_token"],
        "prepare_seconds": summary["median"]["prepare"],
        "decode_seconds_per_token": summary["median"]["decode_seconds_per_token"],
        "stages": summary["median_stages"],
        "answer_tokens": summary["visual_context_tokens"],
        "stored_bytes": summary["stored_bytes"],
        "asks": summary["asks"],
    }


# --------------------------------------------------------------------------- report


def run_ratios(record: dict[str, Any]) -> dict[str, Any]:
    """The ratios of one run: encode seconds per frame to ``full``, and mukv/rekv per length."""
    if record.get("ratios"):
        return record["ratios"]
    enc = record["encode"]
    a, b = RATIO
    return {
        "encode_to_full": {m: ratio(e["seconds_per_frame"], enc["full"]["seconds_per_frame"]) for m, e in enc.items()},
        "lengths": {
            minutes: {
                f"{a}/{b}": {key: ratio(row[a][key], row[b][key]) for key in ("total_seconds", "first_token_seconds")}
            }
            for minutes, row in record["lengths"].items()
        },
    }


def section(record: dict[str, Any]) -> str:
    m = record["machine"]
    enc = record["encode"]
    ratios = run_ratios(record)
    a, b = RATIO
    fps = record.get("settings", {}).get("fps", 0.5)
    lines = [
        f"## {m.get('date_utc', '')} — {m.get('cpu', m.get('device', ''))}, {m.get('dtype', '')}",
        "",
        *machine_lines(m),
        f"- load: {load_line(record['load'])} (timings only count where other processes' share is near 0%)",
        "",
        f"Encode (memory.ingest only, random visual tokens), stored memory per frame and per hour at {fps:g} fps:",
        "",
    ]
    rows = [
        (
            name,
            f"{e['seconds_per_frame']:.3f}",
            f"{e['frames_per_second']:.2f}",
            f"{ratios['encode_to_full'][name]:.2f}x",
            f"{e['tokens_per_frame']:.2f}",
            f"{e['bytes_per_frame'] / 1e6:.3f}",
            f"{e['gib_per_hour']:.2f}",
            f"{e['gib_per_hour_2byte']:.2f}",
            f"{e.get('window_bytes', 0) / 1e6:.1f}",
        )
        for name, e in enc.items()
    ]
    header = (
        "method",
        "s/frame",
        "frames/s",
        "ratio to full",
        "tokens/frame",
        "MB/frame",
        "GiB/h",
        "GiB/h at 2-byte K/V",
        "sliding window MB (bounded)",
    )
    lines += [markdown_table(header, rows), ""]
    lines += [
        "`recent` holds only its rolling window (16 frames at any length); ReKV's window (at most n_local tokens) "
        "is bounded too and reported apart from the per-frame blocks.",
        "",
        f"Seconds per question ({m.get('dtype')}, {len(record['lengths'])} lengths, EOS off, medians; "
        "synthetic stores of the exact block sizes):",
        "",
    ]
    rows = []
    for minutes, row in record["lengths"].items():
        r, k = row["rekv"], row["mukv"]
        frames = r.get("frames", int(float(minutes) * 60 * fps))
        rows.append(
            (
                minutes,
                str(frames),
                str(r["answer_tokens"]),
                f"{r['total_seconds']:.2f}",
                str(k["answer_tokens"]),
                f"{k['total_seconds']:.2f}",
                f"{ratios['lengths'][minutes][f'{a}/{b}']['total_seconds']:.2f}x",
                f"{r['first_token_seconds']:.2f}",
                f"{k['first_token_seconds']:.2f}",
                f"{r['stored_bytes'] / 1e9:.2f}",
                f"{k['stored_bytes'] / 1e9:.2f}",
            )
        )
    header = (
        "minutes",
        "frames",
        "rekv answer tokens",
        "rekv s/question",
        "mukv answer tokens",
        "mukv s/question",
        "mukv/rekv",
        "rekv first token s",
        "mukv first token s",
        "rekv stored GB",
        "mukv stored GB",
    )
    lines += [markdown_table(header, rows), ""]
    rc = record["recent"]
    lines += [
        f"recent (16 frames, any length): {rc['answer_tokens']} answer tokens, "
        f"{rc['total_seconds']:.2f} s per question, first token {rc['first_token_seconds']:.2f} s.",
        "",
    ]
    return "\n".join(lines) + "\n"


def summary(records: list[dict[str, Any]]) -> str:
    """Per machine: medians with range over runs of the ratios each run measured side by side."""
    a, b = RATIO
    lines = [
        "## Summary over recorded runs",
        "",
        "Ratios are taken within each run (methods side by side, same machine and inputs), then summarised as "
        "median (range, number of runs). Each run's load is in its section below.",
        "",
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(machine_key(record["machine"]), []).append(record)
    for key, runs in groups.items():
        ratios = [run_ratios(r) for r in runs]
        methods = list(dict.fromkeys(m for r in ratios for m in r["encode_to_full"]))
        minutes = list(dict.fromkeys(mm for r in ratios for mm in r["lengths"]))
        rows = [
            (
                f"{m}/full, encode s per frame",
                fmt_median_range(median_range(r["encode_to_full"].get(m) for r in ratios), 2, "x"),
            )
            for m in methods
            if m != "full"
        ]
        rows += [
            (
                f"{a}/{b} s/question at {mm} min",
                fmt_median_range(
                    median_range(r["lengths"].get(mm, {}).get(f"{a}/{b}", {}).get("total_seconds") for r in ratios),
                    2,
                    "x",
                ),
            )
            for mm in minutes
        ]
        dates = ", ".join(f"{r['machine']['date_utc']} ({100 * r['load']['other_cpu_fraction']:.0f}%)" for r in runs)
        lines += [
            f"{key}; runs (other processes' share of the machine): {dates}:",
            "",
            markdown_table(("ratio", "median (range, runs)"), rows),
            "",
        ]
    return "\n".join(lines) + "\n"


INTRO = (
    "# ReKV, recent, MuKV and full side by side at LLaVA-OneVision 0.5B sizes (random weights)\n\n"
    "Rendered by `benchmarks/bench_rekv.py` from every record of `rekv.jsonl`: a summary over runs, then one "
    "section per run.\n\n"
)


def render(records: list[dict[str, Any]]) -> str:
    return INTRO + summary(records) + "\n" + "".join(section(r) for r in records)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        write_results(args.out, "rekv", [], render)
        print(f"re-rendered {args.out / 'rekv.md'}")
        return 0
    waited = busy = None
    if args.wait_idle > 0:
        waited, busy = wait_idle(args.wait_idle)
        print(f"waited {waited:.0f} s for an idle machine (last 5 s: {100 * (busy or 0):.0f}% busy)", flush=True)
    monitor = LoadMonitor()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    machine = machine_info(device, dtype, args.attn_implementation)
    backend = build_backend(
        device,
        dtype,
        seed=args.seed,
        attn_implementation=args.attn_implementation,
        vision_batch_frames=args.vision_batch_frames,
    )
    disable_eos(backend)
    interval = 1 / args.fps
    started = time.perf_counter()
    with torch.inference_mode():
        generic_warmup(backend)
        encode = {}
        for method in ENCODE_METHODS:
            encode[method] = encode_cost(backend, method, args.frames, interval, args.seed)
            print(f"encode {method}: {encode[method]['seconds_per_frame']:.3f} s/frame", flush=True)
        two_byte = 2 / torch.empty((), dtype=dtype).element_size()
        per_hour = 3600 * args.fps
        for entry in encode.values():
            entry["frames_per_second"] = 1 / entry["seconds_per_frame"]
            entry["gib_per_hour"] = entry["bytes_per_frame"] * per_hour / 2**30
            entry["gib_per_hour_2byte"] = entry["gib_per_hour"] * two_byte

        lengths: dict[str, dict[str, Any]] = {}
        for minutes in args.lengths:
            frames = frames_for_minutes(minutes, args.fps)
            row = {}
            for scenario in LENGTH_SCENARIOS:
                session = scenario.session(backend)
                scenario.fill(session, 0, frames, interval, args.seed)
                row[scenario.name] = {
                    "frames": frames,
                    **question_cost(session, args.warmup_asks, args.repeats, args.max_new_tokens),
                }
                del session
                print(f"{minutes:g} min, {scenario.name}: {row[scenario.name]['total_seconds']:.2f} s", flush=True)
            lengths[f"{minutes:g}"] = row

        recent = RECENT.session(backend)
        RECENT.fill(recent, 0, RECENT_FRAMES, interval, args.seed + 7)
        recent_cost = question_cost(recent, args.warmup_asks, args.repeats, args.max_new_tokens)
    record: dict[str, Any] = {
        "benchmark": "rekv",
        "machine": machine,
        "command": machine["command"],
        "settings": {
            "frames": args.frames,
            "lengths_min": args.lengths_min,
            "fps": args.fps,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "warmup_asks": args.warmup_asks,
            "seed": args.seed,
            "recent_frames": RECENT_FRAMES,
        },
        "encode": encode,
        "lengths": lengths,
        "recent": recent_cost,
        "seconds": time.perf_counter() - started,
        "load": monitor.report() | {"waited_idle_seconds": waited, "busy_before": busy},
    }
    record["ratios"] = run_ratios(record)
    print(section(record))
    jsonl, md = write_results(args.out, "rekv", [record], render)
    print(f"appended to {jsonl}, re-rendered {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
