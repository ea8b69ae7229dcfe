"""Seconds per question with every stored payload in RAM vs. most of them on the disk tier (and
vs. quantized payloads in RAM).

What it measures
    The model is the one ``synthetic.build_backend`` builds (the dimensions of
    ``llava-onevision-qwen2-0.5b-ov``, random weights, nothing downloaded). Two MuKV (paper preset)
    states of ``--minutes`` of video at ``--fps`` (default 60 min at 0.5 fps = 1800 frames) are
    filled synthetically as ``bench_memory.py`` part 5 does (``synthetic.fill_mukv``: blocks of the
    exact kept sizes, random K/V, adopted with ``BlockMemory.restore``), with the same seed, so
    both hold the same blocks and every question retrieves the same ones:

    - ``ram``: every payload in RAM (no ``ram_budget``);
    - ``disk``: ``ram_budget`` = ``--ram-fraction`` (default 10%) of the ``ram`` state's payload
      bytes, so the oldest ~90% of the payloads live in memory-mapped chunk files (``disk_dir`` =
      ``--disk-dir``, default a temporary directory);
    - one state per ``--kv-dtypes`` entry (default ``int4``): every payload in RAM, quantized
      (``kv_dtype``; retrieval reads the float representatives, so it picks the same blocks), so the
      dequantization a question pays at assembly is timed next to the others. All states are held
      at once: one is skipped (and the record says so) when the memory left besides the disk
      state's mapped pages is short of half the native payload bytes plus 2 GiB, as at 60 minutes
      in float32 on a 24 GB machine (use ``--minutes 30`` there).

    After ``--warmup-asks`` untimed questions per state, ``--repeats`` rounds each ask, interleaved
    (same load): ``ram``; ``disk-warm`` (the disk state, its pages in the page cache and mapped:
    what a stream asked about repeatedly sees); ``disk-cold`` (the disk state right after
    ``DiskTier.drop_cache``: its pages unmapped and dropped from the page cache with
    ``posix_fadvise(DONTNEED)``, so retrieved blocks are read from the disk; on a virtual disk the
    host may still cache them). Dropping the whole page cache (``/proc/sys/vm/drop_caches``) is
    tried once and whether it worked is recorded; it is not used for the cold asks (it would also
    drop the model's and other processes' pages). ``answer.timings.stages["assemble"]`` is where
    the disk tier's reads happen.

    End-of-sequence is disabled, so every answer decodes exactly ``--max-new-tokens`` tokens.
    Random weights: only speed is meaningful.

Results
    A table is printed; one JSON record (settings, machine, load, every ask) is appended to
    ``OUT/tiers.jsonl`` and ``OUT/tiers.md`` is re-rendered from all records (``OUT``: ``--out``,
    default ``benchmarks/results``).

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_tiers.py                      # CPU, float32, 60 min
    .venv/bin/python benchmarks/bench_tiers.py --repeats 3 --minutes 30
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

import mukv
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
    other_share,
    text_table,
    write_results,
)
from mukv.backends.registry import resolve_device, resolve_dtype
from synthetic import (
    MODEL_ID,
    available_memory_bytes,
    build_backend,
    disable_eos,
    fill_mukv,
    meminfo_bytes,
    stats_dict,
    timed_ask,
    warm_asks,
)

SCENARIOS = ("ram", "disk-warm", "disk-cold")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Seconds per question, payloads in RAM vs. on the disk tier (LLaVA-OV 0.5B sizes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--fps", type=float, default=0.5)
    parser.add_argument("--ram-fraction", type=float, default=0.1, help="ram_budget as a share of the payload bytes")
    parser.add_argument(
        "--kv-dtypes", default="int4", help="comma-separated quantized kv_dtype states, all in RAM ('' for none)"
    )
    parser.add_argument("--disk-dir", default=None, help="disk_dir of the disk state (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-asks", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--try-drop-caches", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def frames_for(minutes: float, fps: float) -> int:
    """Frames in ``minutes`` of video, in whole segments of 4 (the paper preset)."""
    return max(4, 4 * round(minutes * 60 * fps / 4))


def try_drop_caches() -> str:
    """Try to drop the whole page cache once; what happened, in words."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        return f"not permitted ({exc.strerror or exc})"
    return "worked (page cache dropped once before filling)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    frames = frames_for(args.minutes, args.fps)
    interval = 1.0 / args.fps
    record: dict[str, Any] = {
        "settings": {
            "minutes": args.minutes,
            "fps": args.fps,
            "frames": frames,
            "ram_fraction": args.ram_fraction,
            "disk_dir": args.disk_dir,
            "repeats": args.repeats,
            "warmup_asks": args.warmup_asks,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "model": MODEL_ID,
            "method": "mukv (paper preset)",
        },
        "machine": machine_info(device, dtype),
        "available_bytes_before": available_memory_bytes(),
    }
    record["drop_caches"] = try_drop_caches() if args.try_drop_caches else "not tried"
    print(f"drop_caches: {record['drop_caches']}", flush=True)
    monitor = LoadMonitor()
    backend = build_backend(device, dtype, seed=args.seed)
    disable_eos(backend)
    with torch.inference_mode():
        ram = mukv.StreamSession(backend, "mukv")
        start = time.perf_counter()
        fill_mukv(ram, 0, frames, interval, args.seed)
        record["fill_seconds"] = {"ram": time.perf_counter() - start}
        payload_bytes = ram.memory.store.ram_nbytes
        budget = max(1, int(args.ram_fraction * payload_bytes))
        overrides: dict[str, Any] = {"ram_budget": budget}
        if args.disk_dir is not None:
            overrides["disk_dir"] = args.disk_dir
        disk = mukv.StreamSession(backend, "mukv", overrides=overrides)
        start = time.perf_counter()
        fill_mukv(disk, 0, frames, interval, args.seed)
        record["fill_seconds"]["disk"] = time.perf_counter() - start
        store = disk.memory.store
        assert store.disk is not None
        record["storage"] = {
            "payload_bytes": payload_bytes,
            "ram_budget": budget,
            "disk_ram_payload_bytes": store.ram_nbytes,
            "disk_payload_bytes": store.disk_nbytes,
            "chunk_files": len(store.disk.chunk_files()),
            "stats_ram": stats_dict(ram.stats()),
            "stats_disk": stats_dict(disk.stats()) | {"disk_bytes": disk.stats().disk_bytes},
        }
        print(
            f"{frames} frames: payloads {payload_bytes / 1e9:.2f} GB; disk state holds "
            f"{store.ram_nbytes / 1e9:.2f} GB in RAM (budget {budget / 1e9:.2f} GB), "
            f"{store.disk_nbytes / 1e9:.2f} GB in {len(store.disk.chunk_files())} chunk files",
            flush=True,
        )
        quantized: dict[str, mukv.StreamSession] = {}
        for kv_dtype in [d.strip() for d in args.kv_dtypes.split(",") if d.strip()]:
            # Room for a quantized state (a fifth of the native bytes at int4 in float32, more at
            # int8) and its fill, besides the disk state's mapped chunk pages, which MemAvailable
            # counts as free but the warm asks need: at 60 minutes in float32 a 24 GB machine has
            # none left (the run swaps), so skip rather than swap.
            available = available_memory_bytes()
            if available is not None and available - store.disk_nbytes < payload_bytes // 2 + (2 << 30):
                record.setdefault("skipped", []).append(kv_dtype)
                print(f"{kv_dtype} state skipped: {available / 1e9:.1f} GB available", flush=True)
                continue
            session = mukv.StreamSession(backend, "mukv", overrides={"kv_dtype": kv_dtype})
            start = time.perf_counter()
            fill_mukv(session, 0, frames, interval, args.seed)
            record["fill_seconds"][kv_dtype] = time.perf_counter() - start
            record["storage"][f"{kv_dtype}_payload_bytes"] = session.memory.store.ram_nbytes
            quantized[kv_dtype] = session
            print(f"{kv_dtype} state: payloads {session.memory.store.ram_nbytes / 1e9:.2f} GB", flush=True)
        warm_asks(ram, args.warmup_asks)
        warm_asks(disk, args.warmup_asks)
        for session in quantized.values():
            warm_asks(session, args.warmup_asks)
        names = [*SCENARIOS, *quantized]
        asks: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_ in range(args.repeats):
            asks["ram"].append(timed_ask(ram, args.max_new_tokens))
            for kv_dtype, session in quantized.items():
                asks[kv_dtype].append(timed_ask(session, args.max_new_tokens))
            asks["disk-warm"].append(timed_ask(disk, args.max_new_tokens))
            cached = meminfo_bytes("Cached")
            dropped = store.disk.drop_cache()
            after = meminfo_bytes("Cached")
            cold = timed_ask(disk, args.max_new_tokens)
            cold["drop_cache_accepted"] = dropped
            cold["page_cache_dropped_bytes"] = None if cached is None or after is None else cached - after
            asks["disk-cold"].append(cold)
            line = ", ".join(f"{name} {asks[name][-1]['timings']['total']:.2f}" for name in names)
            print(f"  round {round_ + 1}: ask total s: {line}", flush=True)
        same = {a["retrieved"].__repr__() for name in names for a in asks[name]}
        record["same_retrieval"] = len(same) == 1
        record["asks"] = asks
        disk.memory.close()
        quantized.clear()
        del ram, disk
        gc.collect()
    record["load"] = monitor.report()
    return record


def stat(asks: list[dict[str, Any]], key: str) -> tuple[float, float, float, int] | None:
    if key == "assemble":
        return median_range(a["timings"].get("stages", {}).get("assemble") for a in asks)
    return median_range(a["timings"][key] for a in asks)


def rows(record: dict[str, Any]) -> list[tuple[str, ...]]:
    out = []
    ram_total = median_range(a["timings"]["total"] for a in record["asks"]["ram"])
    for name, asks in record["asks"].items():  # older records: the three scenarios only
        total = stat(asks, "total")
        ratio = "1.00x" if name == "ram" or not (ram_total and total) else f"{total[0] / ram_total[0]:.2f}x"
        out.append(
            (
                name,
                fmt_median_range(stat(asks, "prepare")),
                fmt_median_range(stat(asks, "assemble")),
                fmt_median_range(stat(asks, "first_token")),
                fmt_median_range(total),
                ratio,
            )
        )
    return out


HEADER = ("state", "prepare s", "assemble s", "first token s", "total s", "total / ram")


def section(record: dict[str, Any]) -> str:
    s, m, st = record["settings"], record["machine"], record["storage"]
    lines = [
        f"## {m['date_utc']} — {machine_key(m)}",
        "",
        *machine_lines(m),
        f"- load: {load_line(record['load'])}",
        f"- memory available before the run: {(record.get('available_bytes_before') or 0) / 1e9:.1f} GB",
        f"- settings: {s['method']}, {s['minutes']:g} min at {s['fps']:g} fps = {s['frames']} frames, "
        f"{s['repeats']} interleaved rounds after {s['warmup_asks']} untimed question(s) per state, "
        f"max_new_tokens {s['max_new_tokens']}, EOS disabled",
        f"- storage: payloads {st['payload_bytes'] / 1e9:.2f} GB; disk state: ram_budget "
        f"{st['ram_budget'] / 1e9:.2f} GB ({s['ram_fraction']:.0%}), {st['disk_ram_payload_bytes'] / 1e9:.2f} GB "
        f"in RAM, {st['disk_payload_bytes'] / 1e9:.2f} GB in {st['chunk_files']} chunk files",
        f"- page cache: `/proc/sys/vm/drop_caches` {record['drop_caches']}; cold asks after "
        "`DiskTier.drop_cache` (accepted: "
        + ", ".join(str(a.get("drop_cache_accepted")) for a in record["asks"]["disk-cold"])
        + "; page cache shrank by "
        + ", ".join(f"{(a.get('page_cache_dropped_bytes') or 0) / 1e9:.2f}" for a in record["asks"]["disk-cold"])
        + " GB)",
        *(f"- {name} state: skipped (not enough memory available)" for name in record.get("skipped", [])),
        *(
            f"- {name} state: payloads {st[f'{name}_payload_bytes'] / 1e9:.2f} GB, all in RAM"
            for name in record["asks"]
            if f"{name}_payload_bytes" in st
        ),
        "- fill: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in record["fill_seconds"].items()) + "; "
        f"every ask retrieved the same blocks: {record['same_retrieval']}",
        "",
        "Seconds per question, median (range, asks):",
        "",
        markdown_table(HEADER, rows(record)),
        "",
    ]
    return "\n".join(lines)


def render(records: list[dict[str, Any]]) -> str:
    head = [
        "# Seconds per question: payloads in RAM vs. on the disk tier or quantized (LLaVA-OneVision 0.5B sizes)",
        "",
        "Rendered by `benchmarks/bench_tiers.py` from every record of `tiers.jsonl`, one section per run "
        "(newest first). `disk-warm`: the disk state with its pages cached and mapped; `disk-cold`: right "
        "after its pages were dropped from RAM (`DiskTier.drop_cache`); `int8` / `int4`: every payload "
        "in RAM, quantized (`kv_dtype`; newer runs). Random weights: only speed is "
        "meaningful. Runs' load (other processes' share of the machine): "
        + ", ".join(f"{r['machine']['date_utc']} ({other_share(r['load']) or 'n/a'})" for r in records),
        "",
    ]
    return "\n".join(head + [section(r) for r in reversed(records)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    available = available_memory_bytes()
    print(f"available memory: {(available or 0) / 1e9:.1f} GB", flush=True)
    record = run(args)
    print(text_table(HEADER, rows(record)))
    print(load_line(record["load"]))
    jsonl, md = write_results(args.out, "tiers", [record], render)
    print(f"wrote {jsonl} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
