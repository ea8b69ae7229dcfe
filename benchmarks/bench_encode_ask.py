"""Time ``encode_frames`` and one ``ask`` at the real LLaVA-OneVision 0.5B sizes, with random weights.

What it measures
    The model is built from a config with the dimensions of ``llava-onevision-qwen2-0.5b-ov``
    (SigLIP 384 px / patch 14 / 26 layers / width 1152; Qwen2 24 layers / width 896 / 14 heads /
    2 KV heads; the full 151936-token vocabulary and an untied ``lm_head``), with random weights,
    so nothing is downloaded. Only speed and memory are meaningful; the answers are nonsense.

    1. ``backend.encode_frames`` on ``--frames-encode`` uint8 frames ``[T, 384, 384, 3]``:
       seconds per frame (vision tower + projector + pooling, 196 tokens per frame).
    2. For the methods ``full`` and ``uniform``: a :class:`mukv.StreamSession` ingests
       ``--frames-context`` frames (timestamps 0, 2, 4, ... s), then asks one open question with
       ``--max-new-tokens``. Reported: ingest time (split into vision encoding and the memory's own
       work, which for ``full`` is the language-model prefill of the visual tokens), the answer's
       ``timings`` (encode, prepare, first_token, total), context tokens, generated tokens,
       decode seconds per token, and the bytes the method stores. ``uniform`` samples all frames
       (``num_frames`` = ``--frames-context``), so both methods answer from the same context;
       ``full`` prefills it while ingesting, ``uniform`` when the question is asked.

    Every measurement follows a warm-up call; on CUDA the device is synchronised around each timed
    region. Peak RSS (and on CUDA peak allocated memory) is recorded.

Results
    A table is printed; one JSON record is appended to ``OUT/encode_ask.jsonl`` and one Markdown
    section to ``OUT/encode_ask.md`` (``OUT`` is ``--out``, default ``benchmarks/results``).

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_encode_ask.py                      # CPU, float32
    .venv/bin/python benchmarks/bench_encode_ask.py --dtype bfloat16     # CPU, bfloat16
    python benchmarks/bench_encode_ask.py --device cuda --dtype bfloat16 # GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

import mukv
from mukv.backends.llava_onevision import LlavaOnevisionBackend, resolve_device, resolve_dtype
from mukv.backends.tiny import build_tokenizer
from mukv.video.preprocess import FramePreprocessor

MODEL_ID = "random-llava-onevision-0.5b"
QUESTION = "What happened in the video?"
METHODS = ("full", "uniform")
IMAGE_SIZE = 384
FRAME_INTERVAL_S = 2.0


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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results directory")
    args = parser.parse_args(argv)
    for name in ("frames_encode", "frames_context", "max_new_tokens", "vision_batch_frames"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads: must be >= 1")
    return args


# --------------------------------------------------------------------------- model


def build_config(tokenizer) -> LlavaOnevisionConfig:
    """The llava-onevision-qwen2-0.5b-ov architecture, with the package's tiny tokenizer's special ids."""
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=IMAGE_SIZE,
        patch_size=14,
    )
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = Qwen2Config(
        vocab_size=151936,  # the real vocabulary, so embedding and lm_head cost what they really cost
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )


def build_backend(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> LlavaOnevisionBackend:
    """Random weights built directly in ``dtype`` on ``device``, wrapped as the loader would wrap them."""
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=args.attn_implementation
        )
    if not isinstance(model, LlavaOnevisionForConditionalGeneration):
        raise TypeError(f"expected LlavaOnevisionForConditionalGeneration, got {type(model).__name__}")
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return LlavaOnevisionBackend(
        model,
        tokenizer,
        FramePreprocessor(size=IMAGE_SIZE),
        model_id=MODEL_ID,
        vision_batch_frames=args.vision_batch_frames,
    )


def parameter_counts(backend: LlavaOnevisionBackend) -> dict[str, int]:
    model = backend.model

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "total": count(model),
        "vision_tower": count(model.model.vision_tower),
        "projector": count(model.model.multi_modal_projector),
        "language_model": count(model.model.language_model),
        "lm_head": count(model.lm_head),
    }


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def time_method(backend: LlavaOnevisionBackend, method: str, frames: np.ndarray, max_new_tokens: int) -> dict[str, Any]:
    device = backend.device
    n = frames.shape[0]
    overrides = {"num_frames": n} if method == "uniform" else None
    session = mukv.StreamSession(backend, method, overrides=overrides)
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
    # Language-model prefill of the visual tokens happens at ingest for full, at question time for uniform.
    prefill_seconds = memory_seconds if method == "full" else t.prepare
    return {
        "method": method,
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


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have been busy since boot (Linux ``/proc/stat``), else ``None``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadMonitor:
    """How busy the machine was with other work during the run: timings on a shared CPU are only
    comparable when ``other_cpu_fraction`` is near zero."""

    def __init__(self) -> None:
        self.start_wall = time.perf_counter()
        self.start_busy = busy_cpu_seconds()
        self.start_own = own_cpu_seconds()
        self.start_load = os.getloadavg() if hasattr(os, "getloadavg") else None

    def report(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.start_wall
        busy = busy_cpu_seconds()
        own = own_cpu_seconds() - self.start_own
        other = None if busy is None or self.start_busy is None else max(0.0, busy - self.start_busy - own)
        cores = os.cpu_count() or 1
        return {
            "wall_seconds": wall,
            "own_cpu_seconds": own,
            "other_cpu_seconds": other,
            "other_cpu_fraction": None if other is None else other / (wall * cores),
            "load_average_start": list(self.start_load) if self.start_load else None,
            "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    executable = os.path.relpath(sys.executable)
    if executable.startswith(".."):
        executable = sys.executable
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join([executable, *sys.argv]),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mukv": mukv.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": args.attn_implementation,
    }


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


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
        rows.append((label, *cells, ratio(b, a)))
    return rows


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def encode_rows(enc: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("frames per call", str(enc["frames"])),
        ("seconds per call", fmt(enc["seconds"])),
        ("seconds per frame", fmt(enc["seconds_per_frame"])),
        ("frames per second", fmt(enc["frames_per_second"], 2)),
        ("visual tokens per frame", str(enc["tokens_per_frame"])),
        ("CUDA peak allocated", mib(enc["cuda_peak_allocated_bytes"])),
    ]


def load_line(load: dict[str, Any]) -> str:
    other = load["other_cpu_seconds"]
    line = f"run took {load['wall_seconds']:.1f} s wall, {load['own_cpu_seconds']:.1f} CPU s in this process"
    if other is not None:
        line += f"; other processes used {other:.1f} CPU s ({100 * load['other_cpu_fraction']:.0f}% of the machine)"
    if load["load_average_start"] and load["load_average_end"]:
        line += f"; 1-min load average {load['load_average_start'][0]:.2f} -> {load['load_average_end'][0]:.2f}"
    return line


def markdown_section(record: dict[str, Any]) -> str:
    m = record["machine"]
    millions = {name: count / 1e6 for name, count in record["parameters"].items()}
    lines = [
        f"## {m['date_utc']} — {m['device_name']} ({m['device']}), {m['dtype']}",
        "",
        f"- command: `{m['command']}`",
        f"- CPU: {m['cpu']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']} "
        f"(interop {m['torch_interop_threads']})",
        f"- torch {m['torch']}, transformers {m['transformers']}, mukv {m['mukv']}, Python {m['python']}, "
        f"attention {m['attn_implementation']}",
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


def append_results(out: Path, stem: str, intro: str, record: dict[str, Any], section: str) -> tuple[Path, Path]:
    """Append ``record`` to ``out/stem.jsonl`` and ``section`` to ``out/stem.md`` (which starts
    with ``intro`` when it is new)."""
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md = out / f"{stem}.jsonl", out / f"{stem}.md"
    with jsonl.open("a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
    header = "" if md.exists() else intro  # decided before opening, which creates the file
    with md.open("a") as fh:
        fh.write(header + section)
    return jsonl, md


def write_results(out: Path, record: dict[str, Any]) -> tuple[Path, Path]:
    intro = (
        "# encode_frames and ask at LLaVA-OneVision 0.5B sizes (random weights)\n\n"
        "Appended by `benchmarks/bench_encode_ask.py`, one section per run; the same records are in "
        "`encode_ask.jsonl`. Random weights: speed and memory only, the answers are nonsense.\n\n"
    )
    return append_results(out, "encode_ask", intro, record, markdown_section(record))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    monitor = LoadMonitor()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    machine = machine_info(args, device, dtype)
    print(f"device {machine['device_name']} ({device}), {machine['dtype']}, torch threads {machine['torch_threads']}")

    start = time.perf_counter()
    backend = build_backend(args, device, dtype)
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
    for method in METHODS:
        methods[method] = time_method(backend, method, frames[: args.frames_context], args.max_new_tokens)
        r = methods[method]
        print(
            f"{method}: ingest {r['ingest_seconds']:.2f} s, ask {r['timings']['total']:.2f} s, "
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
    jsonl, md = write_results(args.out, record)
    print(f"appended to {jsonl} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
