"""Memory methods side by side at the real LLaVA-OneVision 0.5B sizes, with random weights.

What it measures
    The model is the one ``bench_encode_ask.py`` builds (the dimensions of
    ``llava-onevision-qwen2-0.5b-ov``, random weights, nothing downloaded). The vision tower is not
    run: random visual features ``[T, 196, 896]`` in the model dtype go straight to
    ``session.memory.ingest``, so only the memory methods' own work is timed. Every part runs in
    its own child process (a fresh process per method for the encode part), so peak-memory figures
    do not leak from one method into another.

    1. ``encode``: seconds per frame of ``memory.ingest`` for ``full`` (plain prefill), ``mukv``
       with ``encode=independent`` (paper preset) and ``mukv`` with ``encode=shared``, on
       ``--frames`` frames (default 8 = 2 segments), ingested in batches of
       ``SessionConfig.encode_batch_frames``. The first (cold) pass measures memory and warms up;
       the second pass, in a fresh session, is timed. Ratios mukv-independent/full and
       mukv-shared/full.
    2. ``encode`` (same runs): peak memory of the cold pass: on CPU the rise of the process's peak
       RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the pass, after
       ``malloc_trim``), on CUDA ``torch.cuda.max_memory_allocated`` after a reset; and what stays
       held afterwards.
    3. Stored tokens and bytes per frame by granularity (``session.memory.stats()``) for every run,
       next to method.md section 4's expectation (MuKV paper preset 191.75 tokens/frame = patch 16
       + frame 19 + segment 156.75 at P = 196; full/ReKV-like 196), and bytes per hour of video at
       ``--fps`` (0.5 fps = 1800 frames/h), in the measured dtype and with 2-byte K/V elements.
    4. ``answer``: MuKV (paper preset) really encodes ``--answer-frames`` frames (default 48 =
       12 segments, enough for all 20/32/12 blocks), then answers one question: the tokens placed
       in the cache (``answer.context_tokens`` minus the system prompt; paper: 20*4 + 32*19 +
       12*627 = 8212). The same question is then asked of a synthetically filled store with the
       same frame count, to check that the synthetic state of part 5 costs what the real one does.
    5. ``lengths``: seconds per question at ``--lengths-min`` minutes of video (default 10, 30,
       60 = 300, 900, 1800 frames at 0.5 fps) for ``mukv``, ``full`` and ``uniform``. Encoding that
       many frames is infeasible on a CPU, so the state is filled synthetically with the right
       shapes and counts: MuKV blocks of the exact kept sizes (patch 4, frame 19, segment 627
       tokens in the paper preset) with random K/V, real positions, random representatives and the
       right frame spans and timestamps; ``full`` a random K/V cache of ``init + frames * 196``
       tokens; ``uniform`` random visual features (it re-prefills ``num_frames`` = 32 sampled
       frames at every question, so its cost does not depend on the length). Then, after
       ``--warmup-asks`` untimed two-token questions, ``session.ask`` is timed ``--repeats`` times
       (retrieval + assembly + answer prefill + decoding). A ``full`` length whose cache (held
       three times over while decoding: the stored cache, plus the old and new copy of each
       ``DynamicCache`` concatenation) does not fit in ``--memory-headroom`` of the
       free memory is skipped, and the reason recorded.

    End-of-sequence is disabled (``backend.eos_token_ids`` emptied) unless ``--keep-eos``, so every
    answer decodes exactly ``--max-new-tokens`` tokens and the methods are compared on equal work.
    Random weights: only speed and memory are meaningful.

Results
    Tables are printed; one JSON record is appended to ``OUT/memory.jsonl`` and one Markdown
    section to ``OUT/memory.md`` (``OUT`` is ``--out``, default ``benchmarks/results``).

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
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

import mukv
from bench_encode_ask import (
    MODEL_ID,
    append_results,
    build_backend,
    busy_cpu_seconds,
    fmt,
    load_line,
    machine_info,
    markdown_table,
    mib,
    parameter_counts,
    synchronize,
    text_table,
)
from mukv.backends.llava_onevision import LlavaOnevisionBackend, resolve_device, resolve_dtype
from mukv.compress.scorers import keep_count
from mukv.config import SessionConfig, config_to_dict
from mukv.kv.blocks import BlockPayload
from mukv.memory import mukv as mukv_module
from mukv.memory.mukv import patch_token_indices

QUESTION = "What happened in the video?"
GRANULARITIES = ("patch", "frame", "segment")
ENCODE_RUNS = (  # label, method, overrides
    ("full", "full", {}),
    ("mukv-independent", "mukv", {"encode": "independent"}),
    ("mukv-shared", "mukv", {"encode": "shared"}),
)
LENGTH_METHODS = ("mukv", "full", "uniform")
BF16_BYTES = 2
# Method.md section 4 and 8, for the record next to the measured numbers.
PAPER_TOKENS_PER_FRAME = {"full": 196.0, "mukv": 191.75}
PAPER_CONTEXT_TOKENS = 8212  # 20 * 4 + 32 * 19 + 12 * 627


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
    parser.add_argument("--length-methods", default=",".join(LENGTH_METHODS), help="methods of part 5, comma-separated")
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
        "--memory-headroom", type=float, default=0.9, help="fraction of free memory a synthetic full cache may take"
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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results directory")
    parser.add_argument("--child-task", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
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


def frame_interval(args: argparse.Namespace) -> float:
    return 1.0 / args.fps


def frames_for_minutes(minutes: float, fps: float) -> int:
    """Frames in ``minutes`` of video, rounded to whole segments (4 frames) so no segment is partial."""
    frames = round(minutes * 60 * fps)
    return max(4, 4 * round(frames / 4))


def timestamps(first: int, count: int, interval: float) -> np.ndarray:
    return np.arange(first, first + count, dtype=np.float64) * interval


def random_features(backend: LlavaOnevisionBackend, count: int, seed: int) -> torch.Tensor:
    """Random visual tokens ``[count, P, d]`` in the model dtype, on the model device."""
    g = torch.Generator().manual_seed(seed)
    p, d = backend.tokens_per_frame, backend.text.hidden_size
    return torch.randn(count, p, d, generator=g).to(device=backend.device, dtype=backend.dtype)


def ingest_features(session: mukv.StreamSession, features: torch.Tensor, times: np.ndarray) -> None:
    """``memory.ingest`` in batches of ``SessionConfig.encode_batch_frames``, as ``ingest_source``
    hands frames to the memory (which keeps the stream's clock)."""
    batch = session.config.encode_batch_frames
    for start in range(0, features.shape[0], batch):
        session.memory.ingest(features[start : start + batch], times[start : start + batch])


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


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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


def stats_dict(stats: Any) -> dict[str, Any]:
    return {
        "frames": stats.frames,
        "blocks": dict(stats.blocks),
        "tokens": dict(stats.tokens),
        "bytes": dict(stats.bytes),
        "total_bytes": stats.total_bytes,
    }


def generic_warmup(backend: LlavaOnevisionBackend) -> None:
    """One small language-model prefill after the system prompt, so kernels are initialised
    before any measured region (common to every method)."""
    cache, init_len = backend.system_cache()
    embeds = random_features(backend, 1, seed=12345).reshape(1, -1, backend.text.hidden_size)
    positions = torch.arange(init_len, init_len + embeds.shape[1], device=backend.device).unsqueeze(0)
    backend.forward(embeds, cache, positions, logits="last")
    synchronize(backend.device)


def answer_dict(answer: Any, init_len: int, wall: float) -> dict[str, Any]:
    t = answer.timings
    by_g: dict[str, dict[str, int]] = {}
    for block in answer.retrieved:
        entry = by_g.setdefault(block.granularity, {"blocks": 0, "tokens": 0})
        entry["blocks"] += 1
        entry["tokens"] += block.tokens
    decode_steps = answer.generated_tokens - 1
    return {
        "timings": t.to_dict(),
        "ask_wall_seconds": wall,
        "context_tokens": answer.context_tokens,
        "visual_context_tokens": answer.context_tokens - init_len,
        "retrieved": by_g,
        "generated_tokens": answer.generated_tokens,
        "stop_reason": answer.stop_reason,
        "decode_seconds_per_token": (t.total - t.first_token) / decode_steps if decode_steps > 0 else None,
    }


def timed_ask(session: mukv.StreamSession, max_new_tokens: int, init_len: int) -> dict[str, Any]:
    synchronize(session.backend.device)
    start = time.perf_counter()
    answer = session.ask(QUESTION, max_new_tokens=max_new_tokens)
    synchronize(session.backend.device)
    return answer_dict(answer, init_len, time.perf_counter() - start)


def warm_asks(session: mukv.StreamSession, count: int) -> None:
    """Untimed short questions on a freshly filled state: the first questions after a large fill
    pay one-off allocator and page-fault costs (measured here: MuKV's assembly 1.3-1.7 s instead
    of about 0.2 s for the first two questions) that a long-running stream has long paid."""
    for _ in range(count):
        session.ask(QUESTION, max_new_tokens=2)


def summarize_asks(asks: list[dict[str, Any]]) -> dict[str, Any]:
    """The first ask's record, plus every ask and the medians over all of them."""
    out = dict(asks[0])
    out["asks"] = asks
    out["median"] = {
        key: statistics.median(a["timings"][key] for a in asks) for key in ("prepare", "first_token", "total")
    }
    steps = [a["decode_seconds_per_token"] for a in asks if a["decode_seconds_per_token"] is not None]
    out["median"]["decode_seconds_per_token"] = statistics.median(steps) if steps else None
    return out


class PrepareProfiler:
    """Splits MuKV's ``prepare`` into query vector, eligibility index, ranking and assembly by
    wrapping those calls of one memory instance (and the module's ``retrieve``)."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory
        self.seconds: dict[str, float] = {}
        self._retrieve = mukv_module.retrieve
        device = memory.backend.device

        def wrap(name: str, fn: Any) -> Any:
            def timed(*a: Any, **kw: Any) -> Any:
                synchronize(device)
                start = time.perf_counter()
                out = fn(*a, **kw)
                synchronize(device)
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                return out

            return timed

        memory.query_vector = wrap("query_vector", memory.query_vector)
        memory._eligible_index = wrap("eligible_index", memory._eligible_index)
        memory._assemble = wrap("assemble", memory._assemble)
        self._wrapped_retrieve = wrap("rank", self._retrieve)

    def __enter__(self) -> PrepareProfiler:
        self.seconds = {}
        mukv_module.retrieve = self._wrapped_retrieve
        return self

    def __exit__(self, *exc: object) -> None:
        mukv_module.retrieve = self._retrieve


# --------------------------------------------------------------------------- synthetic state


def mukv_block_shapes(backend: LlavaOnevisionBackend, config: Any) -> dict[str, tuple[int, int]]:
    """``granularity -> (tokens before pruning, kept tokens)`` for the config's keep ratios."""
    p, f = backend.tokens_per_frame, config.segment_frames
    patch = len(patch_token_indices(p, config.patch_layout)[0])
    return {
        "patch": (patch, keep_count(patch, config.keep_ratio.patch)),
        "frame": (p, keep_count(p, config.keep_ratio.frame)),
        "segment": (f * p, keep_count(f * p, config.keep_ratio.segment)),
    }


def fill_mukv(session: mukv.StreamSession, first: int, count: int, interval: float, seed: int) -> None:
    """Add frames ``first .. first+count-1`` to a MuKV store as an ``independent``-encoded stream
    would: per frame four patch blocks and a frame block, per ``segment_frames`` frames a segment
    block, each with random K/V of the exact kept size, the positions independent encoding bakes in
    (``init_len + kept index``), random kept indices, scores and representative."""
    memory = session.memory
    backend = memory.backend
    cfg = memory.config
    f = cfg.segment_frames
    if first % f or count % f:
        raise ValueError("fill_mukv: whole segments only")
    shapes = mukv_block_shapes(backend, cfg)
    spec = backend.text
    g = torch.Generator().manual_seed(seed + first)
    reps = spec.num_kv_heads * spec.head_dim

    def add(granularity: str, first_frame: int, last_frame: int, part: int) -> None:
        n, keep = shapes[granularity]
        kv = torch.randn(spec.num_layers, 2, spec.num_kv_heads, keep, spec.head_dim, generator=g, dtype=torch.float32)
        kept = torch.randperm(n, generator=g)[:keep].sort().values
        memory.store.add(
            granularity=granularity,
            first_frame=first_frame,
            last_frame=last_frame,
            part=part,
            start_time=first_frame * interval,
            end_time=last_frame * interval,
            payload=BlockPayload(
                kv=kv.to(backend.dtype), positions=kept + memory._init_len, kept=kept, scores=torch.rand(n, generator=g)
            ),
            representative=torch.randn(reps, generator=g),
        )

    for segment_start in range(first, first + count, f):
        for frame in range(segment_start, segment_start + f):
            if cfg.granularities.frame:
                add("frame", frame, frame, 0)
            if cfg.granularities.patch:
                for part in range(4):
                    add("patch", frame, frame, part)
        if cfg.granularities.segment:
            add("segment", segment_start, segment_start + f - 1, 0)
    memory._timestamps.extend(float(t) for t in timestamps(first, count, interval))


def fill_full(session: mukv.StreamSession, count: int, interval: float, seed: int) -> None:
    """Replace a fresh ``full`` memory's cache by ``[init | count * P random tokens]``."""
    memory = session.memory
    backend = memory.backend
    spec = backend.text
    init = memory._init_len
    length = init + count * backend.tokens_per_frame
    g = torch.Generator(device=backend.device).manual_seed(seed)
    layers = []
    for layer in memory._cache.layers:
        pair = []
        for src in (layer.keys, layer.values):
            t = torch.empty(1, spec.num_kv_heads, length, spec.head_dim, device=backend.device, dtype=backend.dtype)
            t[:, :, :init] = src
            t[:, :, init:].normal_(generator=g)
            pair.append(t)
        layers.append(tuple(pair))
    memory._cache = DynamicCache(ddp_cache_data=layers)
    memory._length = length
    memory._timestamps = [float(t) for t in timestamps(0, count, interval)]


def fill_uniform(session: mukv.StreamSession, first: int, count: int, interval: float, seed: int) -> None:
    backend = session.memory.backend
    for start in range(first, first + count, 64):
        n = min(64, first + count - start)
        ingest_features(session, random_features(backend, n, seed + start), timestamps(start, n, interval))


def full_cache_fits(backend: LlavaOnevisionBackend, frames: int, headroom: float) -> tuple[bool, int, int | None]:
    """Whether a ``full`` cache of ``frames`` frames can be held three times over (stored cache +
    the old and new copy of each decoding step's concatenation) in ``headroom`` of free memory."""
    tokens = frames * backend.tokens_per_frame
    need = 3 * tokens * backend.text.kv_bytes_per_token(backend.dtype)
    free = torch.cuda.mem_get_info(backend.device)[0] if backend.device.type == "cuda" else available_memory_bytes()
    return (free is None or need <= headroom * free), need, free


# --------------------------------------------------------------------------- child tasks


def child_encode(backend: LlavaOnevisionBackend, args: argparse.Namespace, task: dict[str, Any]) -> dict[str, Any]:
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


def child_answer(backend: LlavaOnevisionBackend, args: argparse.Namespace, task: dict[str, Any]) -> dict[str, Any]:
    """Part 4: MuKV paper preset really encodes ``--answer-frames`` frames, then one question; then
    the same question on a synthetic store of the same size."""
    device = backend.device
    n, interval = args.answer_frames, frame_interval(args)
    init_len = backend.system_cache()[1]
    features = random_features(backend, n, args.seed)
    times = timestamps(0, n, interval)

    warm = mukv.StreamSession(backend, "mukv")
    ingest_features(warm, features[:4], times[:4])
    warm.ask(QUESTION, max_new_tokens=2)
    del warm

    session = mukv.StreamSession(backend, "mukv")
    synchronize(device)
    start = time.perf_counter()
    ingest_features(session, features, times)
    synchronize(device)
    encode_seconds = time.perf_counter() - start
    print(f"  mukv encoded {n} frames in {encode_seconds:.1f} s", flush=True)
    warm_asks(session, args.warmup_asks)
    real = summarize_asks([timed_ask(session, args.max_new_tokens, init_len) for _ in range(args.repeats)])
    real["stats"] = stats_dict(session.stats())
    config = config_to_dict(session.memory.config)
    del session
    gc.collect()

    synthetic = mukv.StreamSession(backend, "mukv")
    fill_mukv(synthetic, 0, n - n % synthetic.memory.config.segment_frames, interval, args.seed)
    warm_asks(synthetic, args.warmup_asks)
    synth = summarize_asks([timed_ask(synthetic, args.max_new_tokens, init_len) for _ in range(args.repeats)])
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


def child_lengths(backend: LlavaOnevisionBackend, args: argparse.Namespace, task: dict[str, Any], emit) -> None:
    """Part 5 for one method: fill the state synthetically for each length, time the questions."""
    method = task["method"]
    interval = frame_interval(args)
    init_len = backend.system_cache()[1]
    lengths = sorted(args.lengths)
    frames = [frames_for_minutes(m, args.fps) for m in lengths]
    overrides = {"num_frames": args.uniform_frames} if method == "uniform" else None

    # Warm-up on a small state.
    warm = mukv.StreamSession(backend, method, overrides=overrides)
    if method == "mukv":
        fill_mukv(warm, 0, 48, interval, args.seed)
    elif method == "full":
        fill_full(warm, 8, interval, args.seed)
    else:
        fill_uniform(warm, 0, args.uniform_frames, interval, args.seed)  # the prefill shapes of every question
    warm.ask(QUESTION, max_new_tokens=2)
    del warm
    gc.collect()

    session = mukv.StreamSession(backend, method, overrides=overrides) if method != "full" else None
    profiler = PrepareProfiler(session.memory) if method == "mukv" else None
    filled = 0
    for minutes, count in zip(lengths, frames, strict=True):
        result: dict[str, Any] = {"minutes": minutes, "frames": count, "method": method}
        start = time.perf_counter()
        if method == "full":
            session = None
            gc.collect()
            malloc_trim()
            fits, need, free = full_cache_fits(backend, count, args.memory_headroom)
            result.update(kv_tokens=init_len + count * backend.tokens_per_frame, need_bytes=need, free_bytes=free)
            if not fits:
                result["skipped"] = (
                    f"a full cache of {count} frames needs about {need / 1e9:.1f} GB while answering "
                    f"(3 x {count * backend.tokens_per_frame} tokens x "
                    f"{backend.text.kv_bytes_per_token(backend.dtype)} B), "
                    f"more than {args.memory_headroom:.0%} of the {free / 1e9:.1f} GB free"
                )
                print(f"  full {minutes:g} min: skipped ({result['skipped']})", flush=True)
                emit({"kind": "lengths", **result})
                continue
            session = mukv.StreamSession(backend, "full")
            fill_full(session, count, interval, args.seed)
        elif method == "mukv":
            fill_mukv(session, filled, count - filled, interval, args.seed)
        else:
            fill_uniform(session, filled, count - filled, interval, args.seed)
        filled = count
        result["fill_seconds"] = time.perf_counter() - start
        result["over_max_positions"] = (
            method == "full" and init_len + count * backend.tokens_per_frame > backend.text.max_positions
        )
        warm_asks(session, args.warmup_asks)
        asks, breakdowns = [], []
        for _ in range(args.repeats):
            if profiler is not None:
                with profiler:
                    asks.append(timed_ask(session, args.max_new_tokens, init_len))
                breakdowns.append(dict(profiler.seconds))
            else:
                asks.append(timed_ask(session, args.max_new_tokens, init_len))
        result.update(summarize_asks(asks))
        if breakdowns:
            result["prepare_breakdown"] = breakdowns
        result["stats"] = stats_dict(session.stats())
        result["rss_bytes"] = rss_bytes()
        totals = ", ".join(f"{a['timings']['total']:.2f}" for a in asks)
        print(f"  {method} {minutes:g} min ({count} frames): ask total {totals} s", flush=True)
        emit({"kind": "lengths", **result})


def child_main(args: argparse.Namespace) -> int:
    task = json.loads(args.child_task)
    result_path = Path(args.child_result)

    def emit(record: dict[str, Any]) -> None:
        with result_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    backend = build_backend(args, device, dtype)
    synchronize(device)
    build_seconds = time.perf_counter() - start
    if not args.keep_eos:
        backend.eos_token_ids = frozenset()
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


# --------------------------------------------------------------------------- parent


def child_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """This script's own arguments, for a child (the child flags are appended by the caller)."""
    return [sys.executable, str(Path(__file__).resolve()), *argv]


def wait_idle(limit: float, window: float = 5.0, threshold: float = 0.1) -> tuple[float, float | None]:
    """Wait (at most ``limit`` s) until the whole machine was under ``threshold`` busy over ``window`` s.

    Returns (seconds waited, busy fraction of the last window)."""
    start = time.perf_counter()
    cores = os.cpu_count() or 1
    busy = None
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(window)
        b1 = busy_cpu_seconds()
        if b0 is None or b1 is None:
            return time.perf_counter() - start, None
        busy = (b1 - b0) / (window * cores)
        if busy < threshold or time.perf_counter() - start >= limit:
            return time.perf_counter() - start, busy


def run_child(args: argparse.Namespace, argv: list[str], task: dict[str, Any]) -> dict[str, Any]:
    """Run one task in a fresh process; return its records (and the failure, if any)."""
    waited = busy = None
    if args.wait_idle > 0:
        waited, busy = wait_idle(args.wait_idle)
        print(f"  waited {waited:.0f} s for an idle machine (last 5 s: {100 * (busy or 0):.0f}% busy)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.jsonl"
        cmd = [*child_argv(args, argv), "--child-task", json.dumps(task), "--child-result", str(result)]
        monitor = TreeLoadMonitor()
        proc = subprocess.run(cmd, check=False)
        load = monitor.report()
        wall = load["wall_seconds"]
        records = [json.loads(line) for line in result.read_text().splitlines()] if result.exists() else []
    info = next((r for r in records if r["kind"] == "info"), {})
    done = next((r for r in records if r["kind"] == "done"), {})
    out = {
        "task": task,
        "returncode": proc.returncode,
        "wall_seconds": wall,
        "other_cpu_fraction": load["other_cpu_fraction"],
        "load": load | {"waited_idle_seconds": waited, "busy_before": busy},
        "info": info,
        "peak_rss_bytes": done.get("peak_rss_bytes"),
        "records": [r for r in records if r["kind"] not in ("info", "done")],
    }
    if proc.returncode != 0:
        out["error"] = f"child exited with {proc.returncode}" + (
            " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        )
        print(f"  {task}: {out['error']}", flush=True)
    return out


def steal_cpu_seconds() -> float | None:
    """CPU seconds the hypervisor gave to other guests since boot (``/proc/stat``), else ``None``."""
    try:
        return int(Path("/proc/stat").read_text().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class TreeLoadMonitor:
    """Like ``bench_encode_ask.LoadMonitor``, counting this process and its waited-for children as
    own; ``steal`` (time the hypervisor gave elsewhere) is part of "other" and also reported alone."""

    def __init__(self) -> None:
        self.start_wall = time.perf_counter()
        self.start_busy = busy_cpu_seconds()
        self.start_steal = steal_cpu_seconds()
        self.start_own = self.own()
        self.start_load = os.getloadavg() if hasattr(os, "getloadavg") else None

    @staticmethod
    def own() -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def report(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.start_wall
        busy = busy_cpu_seconds()
        own = self.own() - self.start_own
        other = None if busy is None or self.start_busy is None else max(0.0, busy - self.start_busy - own)
        cores = os.cpu_count() or 1
        steal = steal_cpu_seconds()
        return {
            "wall_seconds": wall,
            "own_cpu_seconds": own,
            "other_cpu_seconds": other,
            "other_cpu_fraction": None if other is None else other / (wall * cores),
            "steal_cpu_seconds": None if steal is None or self.start_steal is None else steal - self.start_steal,
            "load_average_start": list(self.start_load) if self.start_load else None,
            "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }


# --------------------------------------------------------------------------- reporting


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fx(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


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


def length_table(lengths: dict[str, list[dict[str, Any]]]) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(per-method rows, ratio rows)."""
    rows = []
    by_key: dict[tuple[float, str], dict[str, Any]] = {}
    for method, records in lengths.items():
        for r in records:
            by_key[(r["minutes"], method)] = r
            if "skipped" in r or "error" in r:
                why = "skipped: does not fit (see notes)" if "skipped" in r else f"failed: {r['error']}"
                rows.append((f"{r['minutes']:g}", str(r.get("frames", "")), method, why))
                continue
            med = r["median"]
            breakdown = ""
            if r.get("prepare_breakdown"):
                parts = r["prepare_breakdown"][0].keys()
                breakdown = ", ".join(
                    f"{k} {statistics.median(b.get(k, 0.0) for b in r['prepare_breakdown']):.3f}" for k in parts
                )
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
    ratio_rows = []
    for minutes in sorted({k[0] for k in by_key}):

        def med(method: str, key: str, minutes: float = minutes) -> float | None:
            r = by_key.get((minutes, method))
            return None if r is None or "median" not in r else r["median"][key]

        ratio_rows.append(
            (
                f"{minutes:g}",
                fx(ratio(med("mukv", "total"), med("full", "total"))),
                fx(ratio(med("mukv", "total"), med("uniform", "total"))),
                fx(ratio(med("mukv", "first_token"), med("full", "first_token"))),
                fx(ratio(med("mukv", "first_token"), med("uniform", "first_token"))),
            )
        )
    return rows, ratio_rows


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
    "mukv prepare breakdown, s",
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


def collect(record: dict[str, Any]) -> dict[str, Any]:
    """Tables of a run record: name -> (header, rows)."""
    tables: dict[str, Any] = {}
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
        rows, ratio_rows = length_table(record["lengths"])
        tables["lengths"] = (LENGTH_HEADER, pad(rows, len(LENGTH_HEADER)))
        tables["ratios"] = (RATIO_HEADER, ratio_rows)
    return tables


TABLE_TITLES = {
    "encode": "Encode (memory.ingest only, vision tower skipped), {frames} frames; peak memory of the cold pass "
    "in a fresh process",
    "storage": "Stored tokens and bytes per frame (init excluded), per hour at {fps:g} fps",
    "answer": "MuKV paper preset, a question after {answer_frames} frames (tokens exclude the {init} system-prompt "
    "tokens; medians of {repeats} questions)",
    "lengths": "Seconds per question by video length (synthetic state, {max_new_tokens} new tokens, EOS {eos}; "
    "medians of {repeats} questions)",
    "ratios": "Ratios per length (medians)",
}


def task_name(task: dict[str, Any]) -> str:
    return " ".join(
        str(task[k]) for k in ("part", "label", "method") if k in task and not (k == "method" and "label" in task)
    )


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
        f"- command: `{m['command']}`",
        f"- CPU: {m['cpu']}, {m['cpu_cores']} cores, torch threads {info.get('torch_threads', m['torch_threads'])} "
        f"(interop {m['torch_interop_threads']})",
        f"- torch {m['torch']}, transformers {m['transformers']}, mukv {m['mukv']}, Python {m['python']}, "
        f"attention {m['attn_implementation']}",
        f"- model: {MODEL_ID}, random weights, {params.get('total', 0) / 1e6:.1f} M parameters; each part in a "
        f"fresh process (model build {fmt(info.get('build_seconds'), 1)} s, RSS after build "
        f"{mib(info.get('model_rss_bytes'))})",
        f"- load: {load_line(record['load'])}; steal {fmt(record['load'].get('steal_cpu_seconds'), 1)} CPU s",
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


def write_results(out: Path, record: dict[str, Any], tables: dict[str, Any]) -> tuple[Path, Path]:
    intro = (
        "# Memory methods side by side at LLaVA-OneVision 0.5B sizes (random weights)\n\n"
        "Appended by `benchmarks/bench_memory.py`, one section per run; the same records are in "
        "`memory.jsonl`. Random weights and random visual features: speed and memory only.\n\n"
    )
    return append_results(out, "memory", intro, record, markdown_section(record, tables))


def notes(record: dict[str, Any]) -> list[str]:
    out = []
    info = record.get("info") or {}
    if record.get("lengths", {}).get("full"):
        over = [r for r in record["lengths"]["full"] if r.get("over_max_positions")]
        if over:
            out.append(
                f"full: {', '.join(str(r['kv_tokens']) for r in over)}-token caches exceed the model's "
                f"{info.get('max_positions')} trained positions; with real weights the answers would degrade. "
                "The timings are what a plain full cache costs."
            )
        for r in record["lengths"]["full"]:
            if "skipped" in r:
                out.append(f"full {r['minutes']:g} min not run: {r['skipped']}.")
    if record.get("lengths"):
        out.append(
            "Synthetic state: MuKV blocks of the exact kept sizes with random K/V, positions, scores and "
            "representatives; full a random K/V cache; uniform random features. Part 4 compares a real and a "
            "synthetic MuKV store of the same size."
        )
    return out


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    if args.child_task is not None:
        return child_main(args)
    monitor = TreeLoadMonitor()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    machine = machine_info(args, device, dtype)
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
        out = run_child(args, raw, task)
        record["children"].append(
            {k: out[k] for k in ("task", "returncode", "wall_seconds", "load", "peak_rss_bytes") if k in out}
            | ({"error": out["error"]} if "error" in out else {})
        )
        if out["info"]:
            record.setdefault("info", out["info"])
        other = out["other_cpu_fraction"]
        print(
            f"  ({task_name(task)}: {out['wall_seconds']:.0f} s"
            + ("" if other is None else f", other processes used {100 * other:.0f}% of the machine")
            + ")",
            flush=True,
        )
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
        full = record["encode"].get("full", {}).get("seconds_per_frame")
        record["encode_ratios_to_full"] = {
            label: ratio(rec.get("seconds_per_frame"), full) for label, rec in record["encode"].items()
        }

    if not args.skip_answer:
        print(f"answer: mukv, {args.answer_frames} frames", flush=True)
        out = child({"part": "answer"})
        rec = next((r for r in out["records"] if r["kind"] == "answer"), None)
        record["answer"] = rec if rec is not None else {"error": out.get("error", "no result")}

    if not args.skip_lengths:
        record["lengths"] = {}
        for method in args.methods_lengths:
            print(f"lengths: {method} at {args.lengths_min} min", flush=True)
            out = child({"part": "lengths", "method": method})
            records = [r for r in out["records"] if r["kind"] == "lengths"]
            done = {r["minutes"] for r in records}
            for minutes in sorted(args.lengths):
                if minutes not in done:
                    records.append(
                        {
                            "minutes": minutes,
                            "frames": frames_for_minutes(minutes, args.fps),
                            "error": out.get("error", "no result"),
                        }
                    )
            record["lengths"][method] = records

    record["load"] = monitor.report()
    record["notes"] = notes(record)
    tables = collect(record)
    fill = {
        "frames": args.frames,
        "fps": args.fps,
        "answer_frames": args.answer_frames,
        "init": (record.get("info") or {}).get("init_tokens", "?"),
        "max_new_tokens": args.max_new_tokens,
        "eos": "kept" if args.keep_eos else "disabled",
        "repeats": args.repeats,
    }
    for name, (header, rows) in tables.items():
        print()
        print(TABLE_TITLES[name].format(**fill) + ":")
        print(text_table(header, rows))
    for note in record["notes"]:
        print(f"- {note}")
    print(load_line(record["load"]))
    jsonl, md = write_results(args.out, record, tables)
    print(f"appended to {jsonl} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
