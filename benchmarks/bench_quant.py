"""Quantized block payloads (``kv_dtype``): bytes per hour at real sizes, and the error on real K/V.

What it measures
    1. ``bytes``: stored bytes per frame and per hour of video at ``--fps`` (0.5 fps = 1800
       frames/h) of MuKV (the paper preset) and ReKV at the real LLaVA-OneVision 0.5B sizes
       (``synthetic.build_backend``: 24 layers, 2 KV heads, D 64, 196 tokens per frame; weights
       left uninitialised, nothing downloaded) in ``--dtype`` (default bfloat16: 2-byte native K/V), for
       ``native``, ``int8`` and ``int4`` at ``kv_group`` 32, 64 and 128 (and ``kv_keys=compact`` at
       int4 g64/g128 and int8 g64). The stores are filled
       synthetically once per method (``synthetic.fill_mukv`` / ``fill_rekv``: native blocks of the
       exact kept sizes adopted with ``BlockMemory.restore``) over ``--frames`` frames; each form's
       bytes are those records' bytes (positions, kept indices, scores, representatives) with the
       K/V replaced by what ``quantize_kv`` holds for them (codes, scales, minimums), so per-frame
       figures are exact. That accounting is checked against ``stats()`` of stores filled at int4,
       group 64, with both ``kv_keys`` (the store quantizing on its own).
    2. ``error``: the relative dequantization error ``||x - dq(q(x))|| / ||x||`` (Frobenius, keys
       and values apart, summed over blocks) on the real K/V that the shipped trained checkpoint
       ``mukv-tiny`` stores for a synthetic stream (``mukv.video.streams``, ``--error-frames``
       frames): MuKV's stored blocks (paper preset; small patch blocks) and ReKV's (whole frames).
       ``KIVI`` is the default split; ``kv_keys=compact`` keeps the keys of blocks shorter than a
       group per token; ``keys per token`` (no KIVI split) groups every block's keys per token.
    3. ``answers``: the same stream's questions asked of MuKV with native, int8 and int4 stores on
       ``mukv-tiny`` at the end of the stream: how many answers equal the native store's, and how
       many are correct.

Results
    Tables are printed; one JSON record is appended to ``OUT/quant.jsonl`` and ``OUT/quant.md`` is
    re-rendered from all records (``OUT``: ``--out``, default ``benchmarks/results``).

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_quant.py
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.initialization import no_init_weights

import mukv
from common import (
    RESULTS,
    LoadMonitor,
    load_line,
    machine_info,
    machine_lines,
    markdown_table,
    text_table,
    write_results,
)
from mukv.kv.quant import QUANT_BITS, quantize_kv
from synthetic import build_backend, fill_mukv, fill_rekv

# (kv_dtype, kv_group, kv_keys): KIVI's split at three group sizes, and compact keys (short blocks'
# keys per token) where they change the bytes.
KV_CONFIGS: list[tuple[str, int | None, str]] = [
    ("native", None, "channel"),
    *((dtype, group, "channel") for dtype in ("int8", "int4") for group in (32, 64, 128)),
    *(("int4", group, "compact") for group in (64, 128)),
    ("int8", 64, "compact"),
]


def label(dtype: str, group: int | None, keys: str | None = "channel") -> str:
    name = dtype if group is None else f"{dtype} g{group}"
    return name if keys in (None, "channel") else f"{name} kv_keys={keys}"


def _granularity_bytes(
    session: mukv.StreamSession, kv_dtype: str, group: int | None, keys: str = "channel"
) -> dict[str, int]:
    """Stored bytes by granularity of ``session``'s native blocks held as ``kv_dtype``: each
    record's bytes with its K/V replaced by what :func:`quantize_kv` holds for it (what the store
    holds when it quantizes them itself; checked once in :func:`measure_bytes`)."""
    store = session.memory.store
    out: dict[str, int] = {}
    for record in store.records():
        kv = store.payload(record.block_id).kv
        held = kv.nbytes if group is None else quantize_kv(kv, QUANT_BITS[kv_dtype], group, keys=keys).nbytes
        out[record.granularity] = out.get(record.granularity, 0) + record.nbytes - kv.nbytes + held
    return out


def measure_bytes(dtype: torch.dtype, frames: int, fps: float) -> list[dict[str, Any]]:
    # Stored bytes depend on block shapes only (the stores are filled with random K/V), so the
    # weights are left uninitialised: initialising 0.9B random parameters costs minutes of CPU.
    with no_init_weights():
        backend = build_backend(torch.device("cpu"), dtype)
    interval = 1 / fps
    rows = []
    for method, fill in (("mukv", fill_mukv), ("rekv", fill_rekv)):
        session = mukv.StreamSession(backend, method, fps=fps)
        fill(session, 0, frames, interval, seed=0)
        tokens = sum(r.tokens for r in session.memory.store.records())
        # The store's own accounting: stores filled at int4, group 64, with each key grouping.
        for keys in ("channel", "compact"):
            overrides = {"kv_dtype": "int4", "kv_group": 64, "kv_keys": keys}
            check = mukv.StreamSession(backend, method, overrides=overrides, fps=fps)
            fill(check, 0, frames, interval, seed=0)
            reported = check.memory.stats().bytes
            computed = _granularity_bytes(session, "int4", 64, keys)
            if any(reported[g] != b for g, b in computed.items()):
                raise AssertionError(f"{method} {keys}: stats() reports {reported}, computed {computed}")
        for kv_dtype, group, keys in KV_CONFIGS:
            by_granularity = _granularity_bytes(session, kv_dtype, group, keys)
            stored = sum(by_granularity.values())
            rows.append(
                {
                    "method": method,
                    "kv_dtype": kv_dtype,
                    "kv_group": group,
                    "keys": keys,
                    "frames": frames,
                    "tokens_per_frame": tokens / frames,
                    "bytes_per_frame": stored / frames,
                    "bytes_per_frame_by_granularity": {g: b / frames for g, b in by_granularity.items()},
                    "bytes_per_hour": stored / frames * fps * 3600,
                }
            )
            print(f"  {method} {label(kv_dtype, group, keys)}: {rows[-1]['bytes_per_hour'] / 1e9:.3f} GB/h", flush=True)
    return rows


# Key groupings compared (``quantize_kv``'s ``keys``): KIVI's split, compact keys (``kv_keys``), and
# every block's keys per token (no split).
SPLITS = {"KIVI": "channel", "KIVI, kv_keys=compact": "compact", "keys per token": "token"}


def _relative(blocks: list[torch.Tensor], bits: int, group: int, *, keys: str) -> dict[str, float]:
    """Relative Frobenius error of keys and values over ``blocks`` ``[L, 2, Hkv, n, D]`` with the
    key grouping ``keys``."""
    err = {"keys": 0.0, "values": 0.0}
    norm = {"keys": 0.0, "values": 0.0}
    for kv in blocks:
        dq = quantize_kv(kv, bits, group, keys=keys).dequantize()
        for i, name in enumerate(("keys", "values")):
            err[name] += float((dq[:, i].double() - kv[:, i].double()).pow(2).sum())
            norm[name] += float(kv[:, i].double().pow(2).sum())
    return {name: (err[name] / norm[name]) ** 0.5 for name in err}


def measure_error(frames: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from mukv.backends import load_backend
    from mukv.video.streams import make_stream

    backend = load_backend("mukv-tiny")
    stream = make_stream(frames, seed=1)
    errors = []
    stored: dict[str, list[torch.Tensor]] = {}
    for method in ("mukv", "rekv"):
        session = mukv.StreamSession(backend, method, fps=0.5)
        session.ingest(stream.frames, stream.timestamps)
        store = session.memory.store
        stored[method] = [store.payload(r.block_id).dense() for r in store.records()]
        sizes = [kv.shape[3] for kv in stored[method]]
        for bits in (8, 4):
            for split, keys in SPLITS.items():
                for group in (32, 64, 128) if keys == "channel" else (64,):
                    errors.append(
                        {
                            "method": method,
                            "bits": bits,
                            "kv_group": group,
                            "split": split,
                            "blocks": len(sizes),
                            "mean_tokens": float(np.mean(sizes)),
                            **_relative(stored[method], bits, group, keys=keys),
                        }
                    )
    answers = []
    reference: dict[str, str] = {}
    for kv_dtype in ("native", "int8", "int4"):
        session = mukv.StreamSession(backend, "mukv", overrides={"kv_dtype": kv_dtype}, fps=0.5)
        session.ingest(stream.frames, stream.timestamps)
        same = correct = 0
        for q in stream.questions:
            # Every question at the end of the stream (a session answers at or after its newest frame).
            text = session.ask(q.question, max_new_tokens=4).text
            if kv_dtype == "native":
                reference[q.question] = text
            same += text == reference[q.question]
            correct += text.strip().lower().startswith(q.answer)
        answers.append({"kv_dtype": kv_dtype, "questions": len(stream.questions), "same": same, "correct": correct})
    return errors, answers


def render(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Quantized block payloads (`kv_dtype`)",
        "",
        "Written by `benchmarks/bench_quant.py`; see its docstring.",
        "",
    ]
    for record in reversed(records):
        m = record["machine"]
        lines += [f"## Run {m['date_utc']}", "", *machine_lines(m), f"- load: {load_line(record['load'])}", ""]
        if record.get("bytes"):
            lines += _bytes_section(record)
        if record.get("error"):
            lines += _error_section(record)
    return "\n".join(lines)


def _bytes_section(record: dict[str, Any]) -> list[str]:
    m = record["machine"]
    lines: list[str] = [
        f"### Stored bytes, LLaVA-OV 0.5B sizes, {m['dtype']} native K/V, {record['fps']} fps "
        f"({record['bytes'][0]['frames']} frames filled)",
        "",
    ]
    rows = []
    for row in record["bytes"]:
        parts = ", ".join(f"{g} {b / 1e3:.1f}" for g, b in row["bytes_per_frame_by_granularity"].items())
        rows.append(
            [
                row["method"],
                label(row["kv_dtype"], row["kv_group"], row.get("keys")),
                f"{row['tokens_per_frame']:.2f}",
                f"{row['bytes_per_frame'] / 1e3:.1f}",
                parts,
                f"{row['bytes_per_hour'] / 1e9:.3f}",
            ]
        )
    header = ["method", "kv_dtype", "tokens/frame", "kB/frame", "kB/frame by granularity", "GB/hour"]
    lines += [markdown_table(header, rows), ""]
    return lines


def _error_section(record: dict[str, Any]) -> list[str]:
    lines: list[str] = ["### Relative dequantization error on `mukv-tiny`'s stored K/V", ""]
    rows = [
        [
            e["method"],
            f"int{e['bits']}",
            str(e["kv_group"]),
            e["split"],
            f"{e['blocks']} ({e['mean_tokens']:.1f})",
            f"{e['keys']:.4f}",
            # Older records' "keys per token" row left the values unquantized (error exactly 0).
            "(not quantized)" if e["split"] == "keys per token" and e["values"] == 0 else f"{e['values']:.4f}",
        ]
        for e in record["error"]
    ]
    header = ["method", "bits", "kv_group", "grouping", "blocks (mean tokens)", "keys", "values"]
    lines += [markdown_table(header, rows), ""]
    lines += ["### Answers of MuKV on `mukv-tiny` (synthetic stream)", ""]
    rows = [[a["kv_dtype"], str(a["questions"]), str(a["same"]), str(a["correct"])] for a in record["answers"]]
    lines += [markdown_table(["kv_dtype", "questions", "same as native", "correct"], rows), ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--part", choices=["bytes", "error", "all"], default="all", help="what to measure")
    parser.add_argument("--frames", type=int, default=4, help="frames filled per store (whole segments)")
    parser.add_argument("--error-frames", type=int, default=12)
    parser.add_argument("--fps", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    dtype = getattr(torch, args.dtype)
    monitor = LoadMonitor()
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    if args.part in ("bytes", "all"):
        print("bytes at LLaVA-OV 0.5B sizes", flush=True)
        rows = measure_bytes(dtype, args.frames, args.fps)
    if args.part in ("error", "all"):
        print("error and answers on mukv-tiny", flush=True)
        errors, answers = measure_error(args.error_frames)
    record = {
        "machine": machine_info("cpu", dtype),
        "fps": args.fps,
        "bytes": rows,
        "error": errors,
        "answers": answers,
        "load": monitor.report(),
    }
    header = ["method", "kv_dtype", "kB/frame", "GB/hour"]
    table = [
        [
            r["method"],
            label(r["kv_dtype"], r["kv_group"], r["keys"]),
            f"{r['bytes_per_frame'] / 1e3:.1f}",
            f"{r['bytes_per_hour'] / 1e9:.3f}",
        ]
        for r in rows
    ]
    print(text_table(header, table))
    table = [
        [e["method"], f"int{e['bits']}", str(e["kv_group"]), e["split"], f"{e['keys']:.4f}", f"{e['values']:.4f}"]
        for e in errors
    ]
    print(text_table(["method", "bits", "group", "grouping", "keys", "values"], table))
    print(text_table(["kv_dtype", "questions", "same", "correct"], [[str(v) for v in a.values()] for a in answers]))
    print(load_line(record["load"]))
    write_results(args.out, "quant", [record], render)


if __name__ == "__main__":
    main()
