"""Accuracy study: every memory method on synthetic streams whose evidence is known, with the
shipped ``mukv-tiny`` checkpoint, as streams grow from 16 to 1024 frames, run through the
evaluation harness (``mukv eval generic`` + ``mukv report``).

For each stream length T, S streams are generated (``mukv.video.streams.make_stream``, seeds 0 ..
S-1; two questions each, ``eval_kinds(seed)``: a large rare target asked about by a ``frame`` (even
seeds) or ``order`` (odd seeds) question, and a small one by a ``patch`` question) and written as a
benchmark in the harness's ``generic`` format (:func:`write_dataset`): one ``.npy`` frame array per
stream (exact frames, read at 0.5 fps), every question asked after the last frame, the question
kind as its ``task``, the evidence frames as its ``evidence`` window. Each configuration is one
``mukv eval generic`` run per length (resumable, one process owning its run directory), and
``mukv report`` compares the configurations of a length (EM, retrieval recall, memory, seconds).

What the harness does not report, and this script adds from its predictions (:func:`study_records`):
accuracy per question kind, and retrieval recall against chance: the harness's
``retrieval_recall`` over the sampled spans of the retrieved blocks (``hit``, ``coverage``), next to
the random baseline k/T, k being the distinct frames the method put in the answering cache (MuKV's
664 tokens touch up to 100 frames in pieces; ReKV's retrieval is per layer and the union over layers
is counted). Evidence windows lie strictly inside the evidence frames' sampling periods, so a
neighbouring frame's sampled span never touches them and time-based recall equals frame-based
recall.

Matched answering budgets: MuKV's paper preset places at most ``sum_g top_k_g * keep(tokens_g)``
visual tokens (at P = 16 tokens per frame: 20 x 1 + 32 x 1 + 12 x 51 = 664 tokens, 41.5 frames);
``uniform``, ``recent`` and ``rekv`` get the same number of frames B = round(664 / 16) = 42
(``num_frames``, ``num_frames``, ``retrieve_blocks``), so every method answers from about the same
number of tokens; ``full`` keeps everything (the reference, and at long T far beyond the clip lengths
the model was trained on). ReKV's sliding window spans the same number of frames as the release's
15,000 tokens at P = 196 (76 frames).

The ``oracle`` line is the ceiling at that budget (:class:`mukv.eval.oracle.OracleMemory`): B frames,
the question's evidence frames (the stream's ground truth) plus fillers spread evenly over the rest,
each encoded on its own and re-positioned one after another, as retrieval-based methods assemble
their caches. Its retrieval recall is 1.0 by construction; its accuracy separates "found the
evidence" from "could read what it found". It needs the ground truth, so it is not a method the
harness can name: :func:`run_oracle` streams the same benchmark files through a
:class:`mukv.engine.StreamSession` in this process (same frames, questions, question times, decoding
and record format as ``mukv eval generic``) and writes a run directory ``mukv report`` reads.

Run: ``.venv/bin/python benchmarks/bench_accuracy.py`` (defaults: lengths 16, 64, 256, 1024 with
60/40/24/12 streams, hours on 2 CPU cores). Benchmark files, harness runs and reports go to
``--work`` (default ``benchmarks/work/NAME``, not tracked); one record per question, plus one record per
invocation (machine, command, load, settings), is appended to ``benchmarks/results/NAME.jsonl``
(questions already recorded are skipped), and ``NAME.md`` (tables) and ``NAME.png`` (plot) are
re-rendered from all of its records. ``--summarise`` only re-renders them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mukv
from common import RESULTS, LoadMonitor, load_line, machine_info, read_records, render_results, write_results
from mukv.config import apply_overrides
from mukv.eval.metrics import exact_match, retrieval_recall
from mukv.eval.oracle import OracleConfig, OracleMemory
from mukv.eval.report import load_predictions, sampled_spans
from mukv.memory.mukv_config import GRANULARITIES, MukvConfig
from mukv.memory.persist import model_fingerprint
from mukv.video.streams import KINDS, eval_kinds, make_stream

FPS = 0.5
MAX_NEW_TOKENS = 6
# ReKV's window: 15,000 tokens at 196 tokens per frame in the release, about 76 frames.
REKV_WINDOW_FRAMES = 76
WORK = Path(__file__).resolve().parent / "work"
ORACLE = "oracle"
# Byte budgets of the study's MuKV runs: the tiny model stores about 77 KB per frame in float32
# (19 tokens of 4 KB), so 16 MB holds about 210 frames unconsolidated and 4 MB about 50.
STUDY_BUDGETS = ("16MB", "4MB")


def configurations(
    budget_frames: int, tokens_per_frame: int, mukv_top_k: dict[str, int] | None = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Study name -> (method, overrides). ``mukv_top_k`` overrides MuKV's per-granularity
    ``top_k`` (a scaled budget); the other methods get ``budget_frames``."""
    window = REKV_WINDOW_FRAMES * tokens_per_frame
    mukv = {f"top_k.{g}": k for g, k in (mukv_top_k or {}).items()}
    return {
        # The ceiling at the budget; not a registered method: run in this process by ``run_oracle``.
        ORACLE: (ORACLE, {"budget_frames": budget_frames}),
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
        # Bounded by construction: at most B frames' tokens, compressed to three quarters of them
        # each time the cap is reached (the release's 24 of 32).
        "infinipot": ("infinipot", {"max_units": budget_frames, "keep_units": round(0.75 * budget_frames)}),
        # Storage options: what quantized payloads and a byte budget cost in accuracy.
        "mukv kv_dtype=int8": ("mukv", {**mukv, "kv_dtype": "int8"}),
        "mukv kv_dtype=int4": ("mukv", {**mukv, "kv_dtype": "int4"}),
        "mukv kv_dtype=int4 kv_keys=compact": ("mukv", {**mukv, "kv_dtype": "int4", "kv_keys": "compact"}),
        "rekv kv_dtype=int4": ("rekv", {"retrieve_blocks": budget_frames, "n_local": window, "kv_dtype": "int4"}),
        **{f"mukv memory_budget={size}": ("mukv", {**mukv, "memory_budget": size}) for size in STUDY_BUDGETS},
    }


def scaled_mukv(scale: float) -> tuple[MukvConfig, dict[str, int] | None]:
    """The paper preset with every ``top_k`` multiplied by ``scale`` (rounded, at least 1)."""
    paper = MukvConfig()
    if scale == 1.0:
        return paper, None
    top_k = {g: max(1, round(paper.top_k.get(g) * scale)) for g in GRANULARITIES}
    return apply_overrides(paper, {f"top_k.{g}": k for g, k in top_k.items()}), top_k


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Accuracy study of every memory method on synthetic streams, through the eval harness.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="mukv-tiny", help="model of `mukv eval --model`")
    parser.add_argument("--lengths", default="16:60,64:40,256:24,1024:12", help="frames:streams, comma-separated")
    parser.add_argument("--configs", default=None, help="comma-separated study names (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the harness runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--name", default="accuracy", help="file stem of the records, summary and plot")
    parser.add_argument("--work", type=Path, default=None, help="benchmark files and harness runs (WORK/NAME)")
    parser.add_argument("--summarise", action="store_true", help="only re-render the summary and plot")
    parser.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply MuKV's top_k by this (the other methods' budget follows its answering tokens)",
    )
    args = parser.parse_args(argv)
    if args.budget_scale <= 0:
        parser.error(f"--budget-scale: must be > 0, got {args.budget_scale}")
    try:
        args.plan = [tuple(int(x) for x in item.split(":")) for item in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths: expected frames:streams pairs, got {args.lengths!r}")
    if any(len(p) != 2 or p[0] < 2 or p[1] < 1 for p in args.plan):
        parser.error("--lengths: frames >= 2 and streams >= 1")
    args.work = args.work or WORK / args.name
    return args


# --------------------------------------------------------------------------- the benchmark files


def video_id(seed: int) -> str:
    return f"stream_{seed:04d}"


def write_dataset(root: Path, length: int, streams: int) -> Path:
    """Streams ``0 .. streams-1`` of ``length`` frames as a ``generic`` benchmark under ``root``
    (``annotations.json`` and ``videos/*.npy``); returns the annotation path. Existing files are kept."""
    anno = root / "annotations.json"
    if anno.is_file():
        return anno
    period = 1 / FPS
    (root / "videos").mkdir(parents=True, exist_ok=True)
    videos = []
    for seed in range(streams):
        stream = make_stream(length, seed=seed, fps=FPS, kinds=eval_kinds(seed))
        np.save(root / "videos" / f"{video_id(seed)}.npy", stream.frames)
        ask = float(stream.timestamps[-1]) + 0.75 * period  # after the last frame, within its period
        questions = [
            {
                "question": q.question,
                "answer": q.answer,
                "time": ask,
                # Inside the evidence frames' sampling periods: no neighbouring frame's span touches it.
                "evidence": [
                    float(stream.timestamps[q.first_frame]) + 0.25 * period,
                    float(stream.timestamps[q.last_frame]) + 0.75 * period,
                ],
                "task": q.kind,
            }
            for q in stream.questions
        ]
        videos.append(
            {
                "video_id": video_id(seed),
                "video": f"videos/{video_id(seed)}.npy",
                "duration": length * period,
                "questions": questions,
            }
        )
    tmp = anno.with_suffix(".tmp")
    tmp.write_text(json.dumps(videos, indent=1) + "\n")
    tmp.replace(anno)
    return anno


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def mukv_cli() -> list[str]:
    """The ``mukv`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("mukv")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from mukv.cli import main; main()"]


def harness(args: argparse.Namespace, *command: str) -> None:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    subprocess.run([*mukv_cli(), *command], check=True, env=env)


def run_config(args: argparse.Namespace, anno: Path, run_dir: Path, method: str, overrides: dict[str, Any]) -> None:
    """One ``mukv eval generic`` run (resumes where an earlier one stopped)."""
    text = {True: "true", False: "false"}
    sets = [item for key, value in overrides.items() for item in ("--set", f"{key}={text.get(value, value)}")]
    harness(
        args,
        "eval",
        "generic",
        "--anno",
        str(anno),
        "--videos",
        str(anno.parent / "videos"),
        "--out",
        str(run_dir),
        "--model",
        args.model,
        "--method",
        method,
        *sets,
        "--fps",
        str(FPS),
        "--npy-fps",
        str(FPS),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
    )


def oracle_streams(anno: Path, length: int) -> dict[str, Any]:
    """The synthetic stream of every video of ``anno`` (written by :func:`write_dataset`), regenerated
    from its seed for its ground truth, checked against the frames the harness reads."""
    streams = {}
    for video in json.loads(anno.read_text()):
        seed = int(video["video_id"].rsplit("_", 1)[1])
        stream = make_stream(length, seed=seed, fps=FPS, kinds=eval_kinds(seed))
        if not np.array_equal(np.load(anno.parent / video["video"]), stream.frames):
            raise RuntimeError(f"{anno}: {video['video_id']} is not make_stream({length}, seed={seed})")
        streams[video["video_id"]] = stream
    return streams


def run_oracle(args: argparse.Namespace, anno: Path, run_dir: Path, length: int, overrides: dict[str, Any]) -> None:
    """The oracle over the benchmark ``anno`` as a run directory of ``mukv eval generic``'s format
    (``run.json``, ``predictions.jsonl``), resumable: answered questions are skipped.

    Each video is streamed as the harness streams it (frames from its ``.npy`` at ``FPS``, every
    frame up to a question's time ingested before it is asked, greedy decoding of
    ``MAX_NEW_TOKENS``) into a session whose memory is an :class:`OracleMemory` holding that
    stream's ground truth."""
    from mukv.engine import StreamSession
    from mukv.eval.datasets import load_benchmark
    from mukv.eval.runner import (
        MERGED_FILE,
        PredictionWriter,
        RunConfig,
        RunLock,
        prediction_record,
        read_predictions,
        write_run_file,
    )
    from mukv.video import open_source

    if args.threads:
        torch.set_num_threads(args.threads)
    config = OracleConfig(**overrides)
    run = RunConfig(
        benchmark="generic",
        annotation=str(anno),
        videos=str(anno.parent / "videos"),
        model=args.model,
        method=ORACLE,
        overrides={k: str(v) for k, v in overrides.items()},
        sample_fps=FPS,
        npy_fps=FPS,
        device="cpu",
        dtype="float32",
        max_new_tokens=MAX_NEW_TOKENS,
    )
    write_run_file(run_dir, run, config)
    path = run_dir / MERGED_FILE
    streams = oracle_streams(anno, length)
    backend = mukv.load_backend(args.model, device="cpu", dtype="float32")
    period = 1 / FPS
    # One writer per predictions file, as in the harness.
    with RunLock(path):
        done = {r["qid"] for r in read_predictions(path, repair=True)}
        writer = PredictionWriter(path)
        try:
            for video in load_benchmark("generic", anno):
                pending = [q for q in video.questions if q.qid not in done]
                if not pending:
                    continue
                memory = OracleMemory.for_stream(backend, streams[video.video_id], config, fps=FPS)
                session = StreamSession(backend, memory, fps=FPS)
                source = open_source(anno.parent / video.path, sample_fps=FPS, npy_fps=FPS)
                try:
                    for q in sorted(video.questions, key=lambda q: q.time):
                        session.ingest_source(source, until=q.time)
                        if q.qid in done:
                            continue
                        answer = session.ask(q.question, max_new_tokens=MAX_NEW_TOKENS, at=q.time)
                        writer.write(prediction_record(q, answer, backend, period))
                finally:
                    source.close()
        finally:
            writer.close()


# --------------------------------------------------------------------------- records


def study_records(predictions: list[dict[str, Any]], model: str, config: str, method: str, overrides, length: int):
    """One study record per harness prediction: exact match, the harness's retrieval recall (hit,
    coverage) over the sampled spans, and the distinct frames the answering cache touches."""
    by_video: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in predictions:
        by_video[p["video_id"]].append(p)
    out = []
    for vid, records in by_video.items():
        ingest = sum(p["encode_seconds"] for p in records)  # the stream's ingest, split over its questions
        for p in records:
            recall = retrieval_recall(sampled_spans(p), p["evidence"])
            touched: set[int] = set()
            for block in p["retrieved"]:
                touched.update(range(block["first_frame"], block["last_frame"] + 1))
            out.append(
                {
                    "record": "question",
                    "model": model,
                    "config": config,
                    "method": method,
                    "overrides": overrides,
                    "length": length,
                    "seed": int(vid.rsplit("_", 1)[1]),
                    "qid": p["qid"],
                    "kind": p["task"],
                    "question": p["question"],
                    "reference": p["answer"],
                    "answer": p["prediction"],
                    "correct": exact_match(p["prediction"], p["answer"]),
                    "evidence": p["evidence"],
                    "hit": recall["hit"],
                    "coverage": recall["coverage"],
                    "frames_touched": len(touched),
                    "frames_seen": p["frames_seen"],
                    "questions_in_stream": len(records),
                    "answer_tokens": p["context_tokens"],
                    "retrieved_tokens": sum(b["tokens"] for b in p["retrieved"]),
                    "stored_bytes": p["memory"]["total_bytes"],
                    "ingest_seconds": ingest,
                    "ask_seconds": p["total_seconds"],
                }
            )
    return out


def question_records(records: list[dict[str, Any]], model: str, weights: str | None) -> list[dict[str, Any]]:
    """The question records of ``model`` with the checkpoint whose weights hash is ``weights``
    (records of earlier versions of this script carry no ``record`` key, and no ``weights`` key:
    they were made with the checkpoint before the one that introduced it, ``None``)."""
    return [
        r
        for r in records
        if r.get("record", "question") == "question" and r.get("model") == model and r.get("weights") == weights
    ]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarise(records: list[dict], settings: dict) -> tuple[str, dict]:
    """Markdown tables and the aggregated numbers (config -> length -> metrics)."""
    groups: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[r["config"]][r["length"]].append(r)
    lengths = sorted({r["length"] for r in records})
    budget = settings["budget_frames"]
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
    order = [c for c in settings["configs"] if c in table]

    def section(title: str, cell, extra: list[str] = ()) -> list[str]:
        rows = ["", title, "", "| config | " + " | ".join(f"T={t}" for t in lengths) + " |"]
        rows += ["|---|" + "---:|" * len(lengths), *extra]
        for c in order:
            rows.append(f"| {c} | " + " | ".join(cell(table[c][t]) if t in table[c] else "-" for t in lengths) + " |")
        return rows

    lines = [
        f"Budget: {settings['budget_tokens']} visual tokens (MuKV paper preset"
        + (f" with top_k {settings['mukv_top_k']}" if settings.get("mukv_top_k") else "")
        + f") = B = {budget} frames for uniform, "
        f"recent and rekv; P = {settings['tokens_per_frame']} tokens per frame."
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
        "in the answering cache, any granularity; for rekv the union over layers; the oracle's recall is 1.0 by "
        "construction]:",
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


def plot(table: dict, settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in settings["configs"] if c in table]
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
    ax.plot(ts, [min(1.0, settings["budget_frames"] / t) for t in ts], "k--", label="random k/T")
    ax.set_title("evidence recall (hit)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("stream length T (frames)")
    axes[0].set_ylabel("share of questions")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, frameon=False)
    fig.suptitle(f"{settings['model']}: accuracy and recall at a matched budget of {settings['budget_frames']} frames")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes(table: dict, settings: dict, path: Path) -> None:
    """Accuracy against the memory each configuration holds after T frames (one panel per T of
    256 frames or more), the cost-and-keep view of the storage options."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in settings["configs"] if c in table]
    lengths = sorted({t for c in configs for t in table[c] if t >= 256}) or sorted(
        {t for c in configs for t in table[c]}
    )
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.6), squeeze=False)
    markers = "os^vD<>pPX*h"
    for ax, t in zip(axes[0], lengths, strict=True):
        for i, c in enumerate(configs):
            if t in table[c]:
                row = table[c][t]
                ax.scatter(row["stored_mib"], row["accuracy"], marker=markers[i % len(markers)], s=46, label=c)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(f"memory held after {t} frames (MiB, fp32)")
        ax.set_title(f"T = {t} frames")
    axes[0][0].set_ylabel("answer accuracy")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(f"{settings['model']}: accuracy against stored memory (budget {settings['budget_frames']} frames)")
    fig.tight_layout(rect=(0, 0.2, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def renderer(model: str, out: Path, name: str):
    """``render(records)`` for :func:`common.write_results`: the run lines, the tables (and, as a
    side effect, the plot ``out/name.png``) from every record."""

    def render(records: list[dict[str, Any]]) -> str:
        runs = [r for r in records if r.get("record") == "run" and r["settings"]["model"] == model]
        if not runs:
            return f"# Accuracy study: {model} on synthetic streams\n\nNo runs recorded.\n"
        # The latest run's checkpoint: a retrained model starts a new study in the same file.
        settings = runs[-1]["settings"]
        weights = settings.get("weights")
        runs = [r for r in runs if r["settings"].get("weights") == weights]
        questions = [r for r in question_records(records, model, weights) if r["config"] in settings["configs"]]
        text, table = summarise(questions, settings)
        header = [f"# Accuracy study: {model} on synthetic streams", ""]
        header.append(f"Rendered by `benchmarks/bench_accuracy.py` from every record of `{name}.jsonl`. Runs:")
        header.append("")
        for run in runs:
            m = run["machine"]
            via = f" (harness runs and reports: `{run['work']}`)" if run.get("work") else ""
            header.append(
                f"- {m['date_utc']}: `{m['command']}` on {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} "
                f"threads), torch {m['torch']}, transformers {m['transformers']}; {load_line(run['load'])}{via}"
            )
        plot(table, settings, out / f"{name}.png")
        plot_bytes(table, settings, out / f"{name}_bytes.png")
        return "\n".join(header) + "\n\n" + text

    return render


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records_path = args.out / f"{args.name}.jsonl"
    render = renderer(args.model, args.out, args.name)
    if args.summarise:
        print(render_results(args.out, args.name, render).read_text())
        return 0
    backend = mukv.load_backend(args.model)
    # Records are kept per checkpoint: a retrained model of the same name does not reuse answers.
    weights = model_fingerprint(backend)["weights_sha256"]
    p = backend.tokens_per_frame
    mukv_config, mukv_top_k = scaled_mukv(args.budget_scale)
    budget_tokens = mukv_config.answer_tokens(p)
    budget_frames = max(1, round(budget_tokens / p))
    configs = configurations(budget_frames, p, mukv_top_k)
    chosen = list(configs) if args.configs is None else [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in chosen if c not in configs]
    if unknown:
        sys.exit(f"--configs: unknown {unknown}; known: {', '.join(configs)}")
    monitor = LoadMonitor()
    done = {
        (r["config"], r["length"], r["seed"], r["kind"])
        for r in question_records(read_records(records_path), args.model, weights)
    }
    reports = []
    for length, streams in args.plan:
        data = args.work / "data" / f"T{length}-S{streams}"
        anno = write_dataset(data, length, streams)
        run_dirs = []
        for name in chosen:
            method, overrides = configs[name]
            # Per checkpoint: the harness resumes a run directory, and must not resume another model's.
            run_dir = args.work / "runs" / weights[:12] / f"T{length}-S{streams}" / slug(name)
            print(f"T={length} ({streams} streams): {name}", flush=True)
            if method == ORACLE:
                run_oracle(args, anno, run_dir, length, overrides)
            else:
                run_config(args, anno, run_dir, method, overrides)
            run_dirs.append(run_dir)
            new = [
                {**r, "weights": weights}
                for r in study_records(load_predictions(run_dir), args.model, name, method, overrides, length)
                if (r["config"], r["length"], r["seed"], r["kind"]) not in done
            ]
            done.update((r["config"], r["length"], r["seed"], r["kind"]) for r in new)
            write_results(args.out, args.name, new)  # recorded at once; the tables are rendered at the end
            right = sum(r["correct"] for r in new)
            print(f"  {right:.0f}/{len(new)} new answers right", flush=True)
        report_dir = args.work / "report" / weights[:12] / f"T{length}-S{streams}"
        harness(args, "report", *map(str, run_dirs), "--out", str(report_dir))
        reports.append(str(report_dir / "report.md"))
    machine = machine_info("cpu", torch.float32)  # the harness runs: --device cpu --dtype float32
    run = {
        "record": "run",
        "machine": machine,
        "load": monitor.report(),
        "work": os.path.relpath(args.work),
        "reports": reports,
        "settings": {
            "model": args.model,
            "weights": weights,
            "tokens_per_frame": p,
            "budget_tokens": budget_tokens,
            "budget_frames": budget_frames,
            "mukv_top_k": mukv_top_k,
            "configs": list(configs),
            "chosen": chosen,
            "plan": args.plan,
            "fps": FPS,
            "max_new_tokens": MAX_NEW_TOKENS,
        },
    }
    jsonl, md = write_results(args.out, args.name, [run], render)
    print(md.read_text())
    print(f"appended to {jsonl}, re-rendered {md} and {args.out / (args.name + '.png')}; reports: {', '.join(reports)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
