"""ReKV and the recent-frames baseline side by side with MuKV and full, at LLaVA-OneVision 0.5B
sizes with random weights (no download). Speed and memory only: answers are nonsense.

Measured on the same machine and inputs, in one process:

1. encode cost of ``memory.ingest`` per frame (vision tower skipped: random visual tokens) and
   frames per second for ``full``, ``rekv`` (sliding window, every frame offloaded), ``recent``
   (rolling 16-frame window) and ``mukv`` (paper preset, independent encoding);
2. stored bytes per frame and per hour of video at 0.5 fps, in the run's dtype and at 2-byte K/V
   (ReKV at 0.5B: 196 tokens x 24 layers x 2 x 2 heads x 64 x 2 B = 2.41 MB per frame, 4.0 GiB/h);
3. tokens placed in the cache for answering (ReKV with r = 64: 64 x 196 = 12,544);
4. seconds per question at 10, 30 and 60 minutes of video (300, 900, 1800 frames): stores of
   the exact block sizes are filled synthetically (random K/V, real positions, random
   representatives), because encoding an hour of video is infeasible on a CPU; ``recent`` holds
   16 frames whatever the length, so it is measured once.

Run: ``.venv/bin/python benchmarks/bench_rekv.py`` (add ``--device cuda --dtype bfloat16`` on a
GPU). Results are appended to ``benchmarks/results/rekv.md`` and ``rekv.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import mukv
from bench_encode_ask import LoadMonitor, build_backend, load_line, machine_info, synchronize
from bench_memory import fill_mukv, generic_warmup, ingest_features, random_features, timestamps, warm_asks
from mukv.kv.blocks import BlockPayload

QUESTION = "What happened in the video?"
METHODS = ("full", "rekv", "recent", "mukv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--frames", type=int, default=8, help="frames per timed encode")
    parser.add_argument("--lengths-min", default="10,30,60", help="video lengths in minutes (0.5 fps)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed questions per state (median reported)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--vision-batch-frames", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args(argv)


def session_for(backend, method: str) -> mukv.StreamSession:
    # EOS off: every question decodes exactly max_new_tokens, so methods are compared on equal work.
    session = mukv.StreamSession(backend, method)
    session.backend.eos_token_ids = frozenset()
    return session


def encode_cost(backend, method: str, frames: int, seed: int) -> dict:
    """Seconds per frame of ``memory.ingest`` and bytes held per frame (excluding the prompt)."""
    warm = session_for(backend, method)
    ingest_features(warm, random_features(backend, 1, seed + 1), timestamps(0, 1, 2.0))
    session = session_for(backend, method)
    features = random_features(backend, frames, seed)
    synchronize(backend.device)
    start = time.perf_counter()
    ingest_features(session, features, timestamps(0, frames, 2.0))
    synchronize(backend.device)
    seconds = time.perf_counter() - start
    stats = session.memory.stats()
    return {**per_frame(stats.bytes, stats.tokens, frames), "seconds_per_frame": seconds / frames}


def per_frame(nbytes: dict, tokens: dict, frames: int) -> dict:
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


def fill_rekv(session: mukv.StreamSession, count: int, interval: float, seed: int) -> None:
    """``count`` frame blocks of ReKV's exact size (all P tokens kept) with random K/V at window
    positions and random per-layer representatives."""
    memory = session.memory
    backend = memory.backend
    spec = backend.text
    p = backend.tokens_per_frame
    g = torch.Generator().manual_seed(seed)
    for frame in range(count):
        kv = torch.randn(spec.num_layers, 2, spec.num_kv_heads, p, spec.head_dim, generator=g).to(backend.dtype)
        memory.store.add(
            granularity="frame",
            first_frame=frame,
            last_frame=frame,
            part=0,
            start_time=frame * interval,
            end_time=frame * interval,
            payload=BlockPayload(
                kv=kv,
                positions=torch.arange(memory.init_len, memory.init_len + p),
                kept=torch.arange(p),
                scores=torch.empty(0),
            ),
            representative=torch.randn(spec.num_layers, spec.num_kv_heads * spec.head_dim, generator=g),
        )
    memory._timestamps.extend(float(t) for t in timestamps(0, count, interval))


def question_cost(session: mukv.StreamSession, repeats: int, max_new_tokens: int) -> dict:
    warm_asks(session, 2)
    asks = []
    for _ in range(repeats):
        synchronize(session.backend.device)
        start = time.perf_counter()
        answer = session.ask(QUESTION, max_new_tokens=max_new_tokens)
        synchronize(session.backend.device)
        asks.append((time.perf_counter() - start, answer))
    init = session.backend.system_cache()[1]
    return {
        "total_seconds": statistics.median(wall for wall, _ in asks),
        "first_token_seconds": statistics.median(a.timings.first_token for _, a in asks),
        "prepare_seconds": statistics.median(a.timings.prepare for _, a in asks),
        "answer_tokens": asks[0][1].context_tokens - init,
        "stored_bytes": asks[0][1].memory.total_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    monitor = LoadMonitor()
    backend = build_backend(args, device, dtype)
    generic_warmup(backend)
    started = time.perf_counter()
    record: dict = {"machine": machine_info(args, device, dtype), "command": " ".join(sys.argv)}
    record["encode"] = {m: encode_cost(backend, m, args.frames, args.seed) for m in METHODS}
    for entry in record["encode"].values():
        entry["frames_per_second"] = 1 / entry["seconds_per_frame"]
    two_byte = 2 / torch.empty((), dtype=dtype).element_size()
    per_hour = 1800  # frames per hour at 0.5 fps
    for entry in record["encode"].values():
        entry["gib_per_hour"] = entry["bytes_per_frame"] * per_hour / 2**30
        entry["gib_per_hour_2byte"] = entry["gib_per_hour"] * two_byte
    lengths: dict = {}
    for minutes in (float(m) for m in args.lengths_min.split(",")):
        frames = int(minutes * 60 * 0.5)
        row = {}
        rekv = session_for(backend, "rekv")
        fill_rekv(rekv, frames, 2.0, args.seed)
        row["rekv"] = question_cost(rekv, args.repeats, args.max_new_tokens)
        del rekv
        mukv_session = session_for(backend, "mukv")
        fill_mukv(mukv_session, 0, frames - frames % 4, 2.0, args.seed)
        row["mukv"] = question_cost(mukv_session, args.repeats, args.max_new_tokens)
        del mukv_session
        lengths[str(int(minutes))] = row
    recent = session_for(backend, "recent")
    ingest_features(recent, random_features(backend, 16, args.seed + 7), timestamps(0, 16, 2.0))
    recent_cost = question_cost(recent, args.repeats, args.max_new_tokens)
    record["lengths"] = lengths
    record["recent"] = recent_cost
    record["seconds"] = time.perf_counter() - started
    record["load"] = monitor.report()
    write(args.out, record)
    return 0


def write(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "rekv.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    write_section(out, record)


def write_section(out: Path, record: dict) -> None:
    m = record["machine"]
    enc = record["encode"]
    lines = [
        f"\n## {m.get('date_utc', '')} — {m.get('cpu', m.get('device', ''))}, {m.get('dtype', '')}\n",
        f"- command: `{record['command']}`; run took {record['seconds']:.0f} s",
        f"- machine: {json.dumps({k: m[k] for k in m if k not in ('date',)})}",
        f"- load: {load_line(record['load'])} (timings only count where other processes' share is near 0%)\n",
        "Encode (memory.ingest only, random visual tokens), stored memory per frame and per hour at 0.5 fps:\n",
        "| method | s/frame | frames/s | ratio to full | tokens/frame | MB/frame | GiB/h | GiB/h at 2-byte K/V "
        "| sliding window MB (bounded) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in enc.items():
        lines.append(
            f"| {name} | {e['seconds_per_frame']:.3f} | {e['frames_per_second']:.2f} | "
            f"{e['seconds_per_frame'] / enc['full']['seconds_per_frame']:.2f}x | {e['tokens_per_frame']:.2f} | "
            f"{e['bytes_per_frame'] / 1e6:.3f} | {e['gib_per_hour']:.2f} | {e['gib_per_hour_2byte']:.2f} | "
            f"{e.get('window_bytes', 0) / 1e6:.1f} |"
        )
    lines += [
        "",
        "`recent` holds only its rolling window (16 frames at any length); ReKV's window (at most n_local tokens) "
        "is bounded too and reported apart from the per-frame blocks.",
        "",
        f"Seconds per question ({record['machine'].get('dtype')}, {len(record['lengths'])} lengths, EOS off, medians; "
        "synthetic stores of the exact block sizes):\n",
        "| minutes | frames | rekv answer tokens | rekv s/question | mukv answer tokens | mukv s/question | "
        "mukv/rekv | rekv first token s | mukv first token s | rekv stored GB | mukv stored GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for minutes, row in record["lengths"].items():
        r, k = row["rekv"], row["mukv"]
        lines.append(
            f"| {minutes} | {int(float(minutes) * 30)} | {r['answer_tokens']} | {r['total_seconds']:.2f} | "
            f"{k['answer_tokens']} | {k['total_seconds']:.2f} | {k['total_seconds'] / r['total_seconds']:.2f}x | "
            f"{r['first_token_seconds']:.2f} | {k['first_token_seconds']:.2f} | {r['stored_bytes'] / 1e9:.2f} | "
            f"{k['stored_bytes'] / 1e9:.2f} |"
        )
    rc = record["recent"]
    lines += [
        "",
        f"recent (16 frames, any length): {rc['answer_tokens']} answer tokens, "
        f"{rc['total_seconds']:.2f} s per question, first token {rc['first_token_seconds']:.2f} s.",
    ]
    with (out / "rekv.md").open("a") as handle:
        if handle.tell() == 0:
            handle.write(
                "# ReKV, recent, MuKV and full side by side at LLaVA-OneVision 0.5B sizes (random weights)\n\n"
                "Appended by `benchmarks/bench_rekv.py`; the same records are in `rekv.jsonl`.\n"
            )
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def rewrite_last(out: Path) -> None:
    """Recompute the derived columns of the last recorded run and append its section again."""
    records = [json.loads(line) for line in (out / "rekv.jsonl").read_text().splitlines()]
    record = records[-1]
    frames = 8
    for entry in record["encode"].values():
        tokens = {"frame": entry["tokens_per_frame"] * frames}
        entry.update(per_frame(entry["bytes_by_part"], tokens, frames))
        entry["frames_per_second"] = 1 / entry["seconds_per_frame"]
        two_byte = 2 / 4 if record["machine"].get("dtype") == "float32" else 1.0
        entry["gib_per_hour"] = entry["bytes_per_frame"] * 1800 / 2**30
        entry["gib_per_hour_2byte"] = entry["gib_per_hour"] * two_byte
    (out / "rekv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*records[:-1], record]))
    (out / "rekv.md").write_text("")
    write_section(out, record)


if __name__ == "__main__":
    raise SystemExit(main())
