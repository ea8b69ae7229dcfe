"""Time ``encode_frames`` and one ``ask`` at the real LLaVA-OneVision 0.5B sizes, with random weights.

What it measures
    The model is built from a config with the dimensions of ``llava-onevision-qwen2-0.5b-ov``
    (SigLIP 384 px / patch 14 / 26 layers / width 1152; Qwen2 24 layers / width 896 / 14 heads /
    2 KV heads; the full 151936-token vocabulary and an untied ``lm_head``), with random weights,
    so nothing is downloaded. Only speed and memory are meaningful; the answers are nonsense.

    1. ``backend.encode_frames`` on ``--frames-encode`` uint8 frames ``[T, 384, 384, 3]``:
       seconds per frame (vision tower + projector + pooling, 196 tokens per frame).
    2. For each scenario of :func:`scenarios` (``full``, and ``uniform`` over every frame): a
       :class:`mukv.StreamSession` ingests ``--frames-context`` frames (timestamps 0, 2, 4, ... s),
       then asks one open question with ``--max-new-tokens``. Reported: ingest time (split into
       vision encoding and the memory's own work, which for ``full`` is the language-model
       prefill of the visual tokens), the answer's ``timings`` (encode, prepare, first_token,
       total), context tokens, generated tokens, decode seconds per token, and the bytes the
       method stores. ``uniform`` samples all frames (``num_frames`` = ``--frames-context``), so
       both methods answer from the same context; ``full`` prefills it while ingesting,
       ``uniform`` when the question is asked.

    Every measurement follows a warm-up call; on CUDA the device is synchronised around each timed
    region. Peak RSS (and on CUDA peak allocated memory) is recorded.

Results
    A table is printed; one JSON record is appended to ``OUT/encode_ask.jsonl`` and
    ``OUT/encode_ask.md`` is re-rendered from all its records (``OUT`` is ``--out``, default
    ``benchmarks/results``).

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_encode_ask.py                      # CPU, float32
    .venv/bin/python benchmarks/bench_encode_ask.py --dtype bfloat16     # CPU, bfloat16
    python benchmarks/bench_encode_ask.py --device cuda --dtype bfloat16 # GPU
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mukv
from common import (
    RESULTS,
    LoadMonitor,
    fmt,
    fx,
    load_line,
    machine_info,
    machine_lines,
    markdown_table,
    mib,
    ratio,
    text_table,
    write_results,
)
from mukv.backends.llava_onevision import LlavaOnevisionBackend
from mukv.backends.registry import resolve_device, resolve_dtype
from synthetic import IMAGE_SIZE, QUESTION, build_backend, parameter_counts, synchronize

FRAME_INTERVAL_S = 2.0


def scenarios(frames_context: int) -> dict[str, tuple[str, dict[str, Any], str]]:
    """label -> (method, overrides, where the visual prefill happens: ``ingest`` or ``question``).
    ``uniform`` samples every frame, so both answer from the same context."""
    return {
        "full": ("full", {}, "ingest"),
        "uniform": ("uniform", {"num_frames": frames_context}, "question"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time encode_frames and one ask at LLaVA-OneVision 0.5B sizes (random weights).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--frames-encode", type=int, default=4, help="frames per timed encode_frames call")
    parser.add_argument("--frames-context", type=int, default=8, help="frames ingested before the question")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="decoding limit of the question")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--vision-batch-frames", type=int, default=16, help="frames per vision-tower call")
    parser.add_argument("--attn-implementation", default="sdpa", help="attention kernel of the model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and frames")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--render", action="store_true", help="only re-render OUT/encode_ask.md, run nothing")
    args = parser.parse_args(argv)
    for name in ("frames_encode", "frames_context", "max_new_tokens", "vision_batch_frames"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads: must be >= 1")
    return args


# --------------------------------------------------------------------------- timing


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def cuda_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def random_frames(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def time_encode(backend: LlavaOnevisionBackend, frames: np.ndarray) -> dict[str, Any]:
    device = backend.device
    backend.encode_frames(frames[:1])  # warm-up
    synchronize(device)
    reset_cuda_peak(device)
    start = time.perf_counter()
    tokens = backend.encode_frames(frames)
    synchronize(device)
    seconds = time.perf_counter() - start
    n = frames.shape[0]
    return {
        "frames": n,
        "seconds": seconds,
        "seconds_per_frame": seconds / n,
        "frames_per_second": n / seconds,
        "tokens_per_frame": backend.tokens_per_frame,
        "output_shape": list(tokens.shape),
        "cuda_peak_allocated_bytes": cuda_peak(device),
    }


def warm_up_ask(backend: LlavaOnevisionBackend, frames: np.ndarray) -> None:
    """One short question on one frame, so kernels and the system-prompt cache are ready."""
    session = mukv.StreamSession(backend, "full")
    session.ingest(frames[:1], [0.0])
    session.ask(QUESTION, max_new_tokens=2)


def time_method(
    backend: LlavaOnevisionBackend, scenario: tuple[str, dict[str, Any], str], frames: np.ndarray, max_new_tokens: int
) -> dict[str, Any]:
    device = backend.device
    n = frames.shape[0]
    method, overrides, prefill_at = scenario
    session = mukv.StreamSession(backend, method, overrides=overrides or None)
    timestamps = np.arange(n, dtype=np.float64) * FRAME_INTERVAL_S
    reset_cuda_peak(device)

    synchronize(device)
    start = time.perf_counter()
    session.ingest(frames, timestamps)
    synchronize(device)
    ingest_seconds = time.perf_counter() - start

    synchronize(device)
    start = time.perf_counter()
    answer = session.ask(QUESTION, max_new_tokens=max_new_tokens)
    synchronize(device)
    ask_seconds = time.perf_counter() - start

    t = answer.timings
    answer_tokens = len(answer.token_ids)  # end-of-sequence tokens are not part of token_ids
    eos = answer.stop_reason == "eos"
    generated = answer.generated_tokens
    decode_steps = generated - 1  # one forward per token after the first
    visual_tokens = n * backend.tokens_per_frame
    memory_seconds = t.memory
    # Where the language-model prefill of the visual tokens happens: while ingesting, or at the question.
    prefill_seconds = memory_seconds if prefill_at == "ingest" else t.prepare
    return {
        "method": method,
        "overrides": overrides,
        "frames": n,
        "ingest_seconds": ingest_seconds,
        "ingest_vision_seconds": t.vision,
        "ingest_memory_seconds": memory_seconds,
        "timings": t.to_dict(),
        "ask_wall_seconds": ask_seconds,
        "context_tokens": answer.context_tokens,
        "visual_tokens": visual_tokens,
        "visual_prefill_seconds": prefill_seconds,
        "visual_prefill_tokens_per_second": visual_tokens / prefill_seconds if prefill_seconds > 0 else None,
        "generated_tokens": generated,
        "answer_tokens": answer_tokens,
        "stopped_at_eos": eos,
        "decode_seconds_per_token": (t.total - t.first_token) / decode_steps if decode_steps > 0 else None,
        "stored_bytes": answer.memory.total_bytes,
        "stored_bytes_by_granularity": dict(answer.memory.bytes),
        "answer_text": answer.text,
        "cuda_peak_allocated_bytes": cuda_peak(device),
    }


# --------------------------------------------------------------------------- reporting


def method_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(metric, full, uniform, uniform/full) rows."""
    full, uni = results["full"], results["uniform"]
    specs: list[tuple[str, Any, str]] = [
        ("ingest, s (all frames)", lambda r: r["ingest_seconds"], "s"),
        ("  of which vision encode, s", lambda r: r["ingest_vision_seconds"], "s"),
        ("  of which memory ingest, s", lambda r: r["ingest_memory_seconds"], "s"),
        ("answer.timings.encode, s", lambda r: r["timings"]["encode"], "s"),
        ("answer.timings.prepare, s", lambda r: r["timings"]["prepare"], "s"),
        ("answer.timings.first_token, s", lambda r: r["timings"]["first_token"], "s"),
        ("answer.timings.total, s (per question)", lambda r: r["timings"]["total"], "s"),
        ("ingest + ask, s", lambda r: r["ingest_seconds"] + r["timings"]["total"], "s"),
        ("visual prefill, tokens/s", lambda r: r["visual_prefill_tokens_per_second"], "f1"),
        ("decode, s/token", lambda r: r["decode_seconds_per_token"], "s"),
        ("context tokens", lambda r: r["context_tokens"], "int"),
        ("generated tokens (incl. EOS)", lambda r: r["generated_tokens"], "int"),
        ("stored bytes", lambda r: r["stored_bytes"], "mib"),
        ("CUDA peak allocated", lambda r: r["cuda_peak_allocated_bytes"], "mib"),
    ]
    rows = []
    for label, get, kind in specs:
        a, b = get(full), get(uni)
        if kind == "int":
            cells = (str(a), str(b))
        elif kind == "mib":
            cells = (mib(a), mib(b))
        elif kind == "f1":
            cells = (fmt(a, 1), fmt(b, 1))
        else:
            cells = (fmt(a), fmt(b))
        rows.append((label, *cells, fx(ratio(b, a))))
    return rows


def encode_rows(enc: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("frames per call", str(enc["frames"])),
        ("seconds per call", fmt(enc["seconds"])),
        ("seconds per frame", fmt(enc["seconds_per_frame"])),
        ("frames per second", fmt(enc["frames_per_second"], 2)),
        ("visual tokens per frame", str(enc["tokens_per_frame"])),
        ("CUDA peak allocated", mib(enc["cuda_peak_allocated_bytes"])),
    ]


def markdown_section(record: dict[str, Any]) -> str:
    m = record["machine"]
    millions = {name: count / 1e6 for name, count in record["parameters"].items()}
    lines = [
        f"## {m['date_utc']} — {m['device_name']} ({m['device']}), {m['dtype']}",
        "",
        *machine_lines(m),
        f"- model: random weights, {millions['total']:.1f} M parameters (vision {millions['vision_tower']:.1f} M, "
        f"language model {millions['language_model']:.1f} M, lm_head {millions['lm_head']:.1f} M); "
        f"built in {record['build_seconds']:.1f} s",
        f"- load: {load_line(record['load'])}",
        f"- question: {QUESTION!r}, max_new_tokens={record['settings']['max_new_tokens']}",
        f"- peak RSS: {mib(record['peak_rss_bytes'])}; CUDA peak allocated: {mib(record['cuda_peak_allocated_bytes'])}",
        "",
        f"`encode_frames` ({record['encode']['frames']} frames of {IMAGE_SIZE}x{IMAGE_SIZE}, after a warm-up):",
        "",
        markdown_table(("metric", "value"), encode_rows(record["encode"])),
        "",
        f"One question after ingesting {record['settings']['frames_context']} frames "
        f"(uniform with num_frames={record['settings']['frames_context']}, i.e. every frame):",
        "",
        markdown_table(("metric", "full", "uniform", "uniform/full"), method_rows(record["methods"])),
        "",
    ]
    return "\n".join(lines) + "\n"


INTRO = (
    "# encode_frames and ask at LLaVA-OneVision 0.5B sizes (random weights)\n\n"
    "Rendered by `benchmarks/bench_encode_ask.py` from every record of `encode_ask.jsonl`, one section per "
    "run. Random weights: speed and memory only, the answers are nonsense.\n\n"
)


def render(records: list[dict[str, Any]]) -> str:
    return INTRO + "".join(markdown_section(r) for r in records)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        write_results(args.out, "encode_ask", [], render)
        print(f"re-rendered {args.out / 'encode_ask.md'}")
        return 0
    monitor = LoadMonitor()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    machine = machine_info(device, dtype, args.attn_implementation)
    print(f"device {machine['device_name']} ({device}), {machine['dtype']}, torch threads {machine['torch_threads']}")

    start = time.perf_counter()
    backend = build_backend(
        device,
        dtype,
        seed=args.seed,
        attn_implementation=args.attn_implementation,
        vision_batch_frames=args.vision_batch_frames,
    )
    synchronize(device)
    build_seconds = time.perf_counter() - start
    build_cuda_peak = cuda_peak(device)
    params = parameter_counts(backend)
    print(f"built random model: {params['total'] / 1e6:.1f} M parameters in {build_seconds:.1f} s")

    rng = np.random.default_rng(args.seed)
    frames = random_frames(rng, max(args.frames_encode, args.frames_context))

    encode = time_encode(backend, frames[: args.frames_encode])
    print(f"encode_frames: {encode['seconds_per_frame']:.3f} s/frame over {encode['frames']} frames")

    warm_up_ask(backend, frames)
    methods = {}
    for label, scenario in scenarios(args.frames_context).items():
        methods[label] = time_method(backend, scenario, frames[: args.frames_context], args.max_new_tokens)
        r = methods[label]
        print(
            f"{label}: ingest {r['ingest_seconds']:.2f} s, ask {r['timings']['total']:.2f} s, "
            f"{r['generated_tokens']} tokens generated"
        )

    record = {
        "benchmark": "encode_ask",
        "machine": machine,
        "settings": {
            "frames_encode": args.frames_encode,
            "frames_context": args.frames_context,
            "max_new_tokens": args.max_new_tokens,
            "vision_batch_frames": args.vision_batch_frames,
            "seed": args.seed,
            "question": QUESTION,
            "frame_interval_s": FRAME_INTERVAL_S,
            "image_size": IMAGE_SIZE,
        },
        "parameters": params,
        "build_seconds": build_seconds,
        "encode": encode,
        "methods": methods,
        "ratios_uniform_over_full": {
            "ask_total": methods["uniform"]["timings"]["total"] / methods["full"]["timings"]["total"],
            "first_token": methods["uniform"]["timings"]["first_token"] / methods["full"]["timings"]["first_token"],
            "ingest": methods["uniform"]["ingest_seconds"] / methods["full"]["ingest_seconds"],
            "stored_bytes": methods["uniform"]["stored_bytes"] / methods["full"]["stored_bytes"],
        },
        "load": monitor.report(),
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_peak_allocated_bytes": (
            max(
                build_cuda_peak,
                encode["cuda_peak_allocated_bytes"],
                *(r["cuda_peak_allocated_bytes"] for r in methods.values()),
            )
            if device.type == "cuda"
            else None
        ),
    }

    print()
    print(f"encode_frames ({encode['frames']} frames, {IMAGE_SIZE}px):")
    print(text_table(("metric", "value"), encode_rows(encode)))
    print()
    print(f"one question after {args.frames_context} frames:")
    print(text_table(("metric", "full", "uniform", "uniform/full"), method_rows(methods)))
    print()
    print(f"peak RSS {mib(record['peak_rss_bytes'])}, CUDA peak allocated {mib(record['cuda_peak_allocated_bytes'])}")
    print(load_line(record["load"]))
    jsonl, md = write_results(args.out, "encode_ask", [record], render)
    print(f"appended to {jsonl}, re-rendered {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
