"""Accuracy study: every memory method on synthetic streams whose evidence is known, with the
shipped ``mukv-tiny`` checkpoint, as streams grow from 16 to 1024 frames.

For each stream length T, streams are generated (``mukv.video.streams.make_stream``, seeds 0,
1, ...; two questions each, ``eval_kinds(seed)``: a large rare target asked about by a ``frame``
(even seeds) or ``order`` (odd seeds) question, and a small one by a ``patch`` question); every
configuration ingests the whole stream (frames straight from memory, 0.5 fps timestamps) and
then answers both questions, so questions are always asked after T frames. Recorded per
question: the answer and whether it is right (normalised exact match of the one-word answer),
the evidence recall of what the method put in the answering cache (``hit``: a retrieved block
covers an evidence frame; ``coverage``: share of the evidence frames covered; a patch block, or
a frame block keeping one token, counts for its frame), the distinct frames the cache touches (k
of that question's random baseline k/T: MuKV's 664 tokens touch up to 100 frames in pieces;
ReKV's retrieval is per layer and the union over layers is what is counted), answering tokens
(the cache the answer is decoded from, system prompt included), stored bytes and seconds.

Matched answering budgets: MuKV's paper preset places at most
``sum_g top_k_g * keep(tokens_g)`` visual tokens (at P = 16 tokens per frame: 20 x 1 + 32 x 1 +
12 x 51 = 664 tokens, 41.5 frames); ``uniform``, ``recent`` and ``rekv`` get the same number of
frames B = round(664 / 16) = 42 (``num_frames``, ``num_frames``, ``retrieve_blocks``), so every
method answers from about the same number of tokens; ``full`` keeps everything (the reference,
and at long T far beyond the clip lengths the model was trained on). ReKV's sliding window spans
the same number of frames as the release's 15,000 tokens at P = 196 (76 frames).

Run: ``.venv/bin/python benchmarks/bench_accuracy.py`` (defaults: lengths 16, 64, 256, 1024 with
60/40/24/12 streams, about 30 minutes on 2 CPU cores). Records go to
``benchmarks/results/accuracy.jsonl`` (resumable: streams with every question recorded for the
same model are skipped), the summary to ``accuracy.md`` and the plot to ``accuracy.png``.
``--summarise`` rebuilds the summary and plot from the records without running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import mukv
from bench_encode_ask import LoadMonitor, load_line, machine_info
from mukv.config import apply_overrides
from mukv.eval.metrics import exact_match
from mukv.memory.mukv_config import GRANULARITIES, MukvConfig
from mukv.video import from_array
from mukv.video.streams import KINDS, eval_kinds, make_stream

FPS = 0.5
# ReKV's window: 15,000 tokens at 196 tokens per frame in the release, about 76 frames.
REKV_WINDOW_FRAMES = 76


def configurations(
    budget_frames: int, tokens_per_frame: int, mukv_top_k: dict[str, int] | None = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Study name -> (method, overrides). ``mukv_top_k`` overrides MuKV's per-granularity
    ``top_k`` (a scaled budget); the other methods get ``budget_frames``."""
    window = REKV_WINDOW_FRAMES * tokens_per_frame
    mukv = {f"top_k.{g}": k for g, k in (mukv_top_k or {}).items()}
    return {
        "full": ("full", {}),
        "uniform": ("uniform", {"num_frames": budget_frames}),
        "recent": ("recent", {"num_frames": budget_frames}),
        "rekv": ("rekv", {"retrieve_blocks": budget_frames, "n_local": window}),
        "rekv layer_shared=true": (
            "rekv",
            {"retrieve_blocks": budget_frames, "n_local": window, "layer_shared": True},
        ),
        "mukv": ("mukv", {**mukv}),
        "mukv encode=shared": ("mukv", {**mukv, "encode": "shared"}),
        "mukv order=temporal": ("mukv", {**mukv, "order": "temporal"}),
        "mukv query=mean_query": ("mukv", {**mukv, "query": "mean_query"}),
    }


def scaled_mukv(scale: float) -> tuple[MukvConfig, dict[str, int] | None]:
    """The paper preset with every ``top_k`` multiplied by ``scale`` (rounded, at least 1)."""
    paper = MukvConfig()
    if scale == 1.0:
        return paper, None
    top_k = {g: max(1, round(paper.top_k.get(g) * scale)) for g in GRANULARITIES}
    return apply_overrides(paper, {f"top_k.{g}": k for g, k in top_k.items()}), top_k


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mukv-tiny")
    parser.add_argument("--lengths", default="16:60,64:40,256:24,1024:12", help="frames:streams, comma-separated")
    parser.add_argument("--configs", default=None, help="comma-separated study names (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="accuracy", help="file stem of the records, summary and plot")
    parser.add_argument("--summarise", action="store_true", help="only rebuild the summary and plot")
    parser.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply MuKV's top_k by this (the other methods' budget follows its answering tokens)",
    )
    return parser.parse_args(argv)


def evidence_recall(retrieved, first: int, last: int) -> tuple[float, float, int]:
    """(hit, coverage, frames touched): whether retrieved blocks (frame ranges) cover an evidence
    frame ``first..last``, the share of evidence frames covered, and how many distinct frames
    the blocks touch at all (the k of that question's random baseline k/T)."""
    touched: set[int] = set()
    for block in retrieved:
        touched.update(range(block.first_frame, block.last_frame + 1))
    covered = touched & set(range(first, last + 1))
    return float(bool(covered)), len(covered) / (last - first + 1), len(touched)


def run_stream(backend, model: str, name: str, method: str, overrides: dict, length: int, seed: int) -> list[dict]:
    stream = make_stream(length, seed=seed, fps=FPS, kinds=eval_kinds(seed))
    session = mukv.StreamSession(backend, method, overrides=overrides)
    started = time.perf_counter()
    session.ingest_source(from_array(stream.frames, timestamps=stream.timestamps))
    ingest_seconds = time.perf_counter() - started
    records = []
    for q in stream.questions:
        started = time.perf_counter()
        answer = session.ask(q.question, max_new_tokens=6)
        hit, coverage, touched = evidence_recall(answer.retrieved, q.first_frame, q.last_frame)
        records.append(
            {
                "model": model,
                "config": name,
                "method": method,
                "overrides": overrides,
                "length": length,
                "seed": seed,
                "kind": q.kind,
                "question": q.question,
                "reference": q.answer,
                "answer": answer.text,
                "correct": exact_match(answer.text, q.answer),
                "evidence_frames": [q.first_frame, q.last_frame],
                "hit": hit,
                "coverage": coverage,
                "frames_touched": touched,
                "questions_in_stream": len(stream.questions),
                "answer_tokens": answer.context_tokens,
                "retrieved_tokens": sum(b.tokens for b in answer.retrieved),
                "stored_bytes": answer.memory.total_bytes,
                "ingest_seconds": ingest_seconds,
                "ask_seconds": time.perf_counter() - started,
            }
        )
    return records


def load_records(path: Path, model: str) -> list[dict]:
    """Records of ``model`` from complete streams (every question answered), one per question:
    an interrupted run can leave a stream's records torn or partial, and that stream is redone."""
    if not path.is_file():
        return []
    streams: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line of an interrupted run
        if record.get("model") == model:
            streams[(record["config"], record["length"], record["seed"])][record["kind"]] = record
    return [r for by_kind in streams.values() for r in by_kind.values() if len(by_kind) == r["questions_in_stream"]]


def append(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarise(records: list[dict], meta: dict) -> tuple[str, dict]:
    """Markdown tables and the aggregated numbers (config -> length -> metrics)."""
    groups: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[r["config"]][r["length"]].append(r)
    lengths = sorted({r["length"] for r in records})
    budget = meta["budget_frames"]
    table: dict[str, dict[int, dict[str, float]]] = {}
    for config, by_length in groups.items():
        for length, rs in by_length.items():
            row = {
                "n": len(rs),
                "accuracy": _mean(r["correct"] for r in rs),
                **{f"acc_{k}": _mean(r["correct"] for r in rs if r["kind"] == k) for k in KINDS},
                "hit": _mean(r["hit"] for r in rs),
                "coverage": _mean(r["coverage"] for r in rs),
                "chance": _mean(min(1.0, r["frames_touched"] / r["length"]) for r in rs),
                "touched": _mean(r["frames_touched"] for r in rs),
                "answer_tokens": _mean(r["answer_tokens"] for r in rs),
                "stored_mib": _mean(r["stored_bytes"] for r in rs) / 2**20,
                "ingest_ms_per_frame": 1e3 * _mean(r["ingest_seconds"] / r["length"] for r in rs),
                "ask_seconds": _mean(r["ask_seconds"] for r in rs),
            }
            table.setdefault(config, {})[length] = row
    order = [c for c in meta["configs"] if c in table]

    def section(title: str, cell, extra: list[str] = ()) -> list[str]:
        rows = ["", title, "", "| config | " + " | ".join(f"T={t}" for t in lengths) + " |"]
        rows += ["|---|" + "---:|" * len(lengths), *extra]
        for c in order:
            rows.append(f"| {c} | " + " | ".join(cell(table[c][t]) if t in table[c] else "-" for t in lengths) + " |")
        return rows

    lines = [
        f"Budget: {meta['budget_tokens']} visual tokens (MuKV paper preset"
        + (f" with top_k {meta['mukv_top_k']}" if meta.get("mukv_top_k") else "")
        + f") = B = {budget} frames for uniform, "
        f"recent and rekv; P = {meta['tokens_per_frame']} tokens per frame."
    ]
    lines += section(
        "Answer accuracy (all kinds; n questions per cell in brackets):", lambda r: f"{r['accuracy']:.2f} ({r['n']})"
    )
    lines += section(
        "Accuracy by question kind (frame / patch / order):",
        lambda r: " / ".join(f"{r[f'acc_{k}']:.2f}" for k in KINDS),
    )
    lines += section(
        "Evidence recall: hit rate (evidence coverage) [random baseline k/T, k = distinct frames the method put "
        "in the answering cache, any granularity; for rekv the union over layers]:",
        lambda r: f"{r['hit']:.2f} ({r['coverage']:.2f}) [{r['chance']:.2f}]",
        ["| random, k = B | " + " | ".join(f"{min(1.0, budget / t):.2f}" for t in lengths) + " |"],
    )
    lines += section(
        "Answering tokens / stored MiB (fp32) / ingest ms per frame / s per question:",
        lambda r: (
            f"{r['answer_tokens']:.0f} / {r['stored_mib']:.1f} / {r['ingest_ms_per_frame']:.0f} / "
            f"{r['ask_seconds']:.2f}"
        ),
    )
    return "\n".join(lines) + "\n", table


def plot(table: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in meta["configs"] if c in table]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    panels = [("acc_frame", "frame"), ("acc_patch", "patch"), ("acc_order", "order")]
    for ax, (key, title) in zip(axes[:3], panels, strict=True):
        for c in configs:
            ts = sorted(table[c])
            ax.plot(ts, [table[c][t][key] for t in ts], marker="o", label=c)
        ax.set_title(f"accuracy: {title} questions")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("stream length T (frames)")
    ax = axes[3]
    for c in configs:
        ts = sorted(table[c])
        ax.plot(ts, [table[c][t]["hit"] for t in ts], marker="o", label=c)
    ts = sorted({t for c in configs for t in table[c]})
    ax.plot(ts, [min(1.0, meta["budget_frames"] / t) for t in ts], "k--", label="random k/T")
    ax.set_title("evidence recall (hit)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("stream length T (frames)")
    axes[0].set_ylabel("share of questions")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, frameon=False)
    fig.suptitle(f"{meta['model']}: accuracy and recall at a matched budget of {meta['budget_frames']} frames")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = []
    for item in args.lengths.split(","):
        length, streams = (int(x) for x in item.split(":"))
        plan.append((length, streams))
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / f"{args.name}.jsonl"
    meta_path = args.out / f"{args.name}.meta.json"
    backend = mukv.load_backend(args.model)
    p = backend.tokens_per_frame
    if args.budget_scale <= 0:
        sys.exit(f"--budget-scale: must be > 0, got {args.budget_scale}")
    mukv_config, mukv_top_k = scaled_mukv(args.budget_scale)
    budget_tokens = mukv_config.answer_tokens(p)
    budget_frames = max(1, round(budget_tokens / p))
    configs = configurations(budget_frames, p, mukv_top_k)
    chosen = list(configs) if args.configs is None else [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in chosen if c not in configs]
    if unknown:
        sys.exit(f"--configs: unknown {unknown}; known: {', '.join(configs)}")
    meta = {
        "model": args.model,
        "tokens_per_frame": p,
        "budget_tokens": budget_tokens,
        "budget_frames": budget_frames,
        "mukv_top_k": mukv_top_k,
        "configs": list(configs),
        "plan": plan,
    }
    if not args.summarise:
        monitor = LoadMonitor()
        done = {(r["config"], r["length"], r["seed"]) for r in load_records(records_path, args.model)}
        for length, streams in plan:
            for name in chosen:
                method, overrides = configs[name]
                for seed in range(streams):
                    if (name, length, seed) in done:
                        continue
                    started = time.perf_counter()
                    records = run_stream(backend, args.model, name, method, overrides, length, seed)
                    append(records_path, records)
                    right = sum(r["correct"] for r in records)
                    print(
                        f"T={length:5d} {name:24s} stream {seed:2d}: {right:.0f}/{len(records)} right, "
                        f"{time.perf_counter() - started:6.1f} s",
                        flush=True,
                    )
        load = monitor.report()
        runs = json.loads(meta_path.read_text()).get("runs", []) if meta_path.is_file() else []
        info = machine_info(
            argparse.Namespace(attn_implementation=backend.model.config._attn_implementation),
            backend.device,
            backend.dtype,
        )
        runs.append({"machine": info, "load": load, "load_line": load_line(load)})
        meta["runs"] = runs
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    elif meta_path.is_file():
        meta["runs"] = json.loads(meta_path.read_text()).get("runs", [])
    records = [r for r in load_records(records_path, args.model) if r["config"] in configs]
    text, table = summarise(records, meta)
    header = [f"# Accuracy study: {args.model} on synthetic streams", ""]
    for run in meta.get("runs", []):
        m = run["machine"]
        header.append(
            f"- {m['date_utc']}: `{m['command']}` on {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} "
            f"threads), torch {m['torch']}, transformers {m['transformers']}; {run['load_line']}"
        )
    (args.out / f"{args.name}.md").write_text("\n".join(header) + "\n\n" + text)
    plot(table, meta, args.out / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
