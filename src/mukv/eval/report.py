"""Comparison of runs: a Markdown table and plots (evaluation.md, "Comparisons worth reporting").

Reads each run directory's ``run.json``, its predictions (merged file, or the shard files) and,
when ``mukv judge`` has run, its ``scores.json``. Scores of different judge models are never
mixed: the table names the judge model next to every judge score.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mukv.eval.runner import (
    FAILURES_FILE,
    MERGED_FILE,
    RUN_FILE,
    RunError,
    read_failures,
    read_json_file,
    read_predictions,
)

SCORES_FILE = "scores.json"


def answer_fingerprint(record: dict[str, Any]) -> str:
    """SHA-256 of what a judgement depends on: the question, the reference and the prediction."""
    payload = json.dumps([record.get("question"), record.get("answer"), record.get("prediction")], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def records_digest(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Which records a score covers: their count and a SHA-256 over their question ids and
    answer fingerprints (order-independent). A score is shown only next to the records it covers."""
    digest = hashlib.sha256()
    for qid, fingerprint in sorted((str(r["qid"]), answer_fingerprint(r)) for r in records):
        digest.update(f"{qid}\t{fingerprint}\n".encode())
    return {"count": len(records), "digest": digest.hexdigest()}


def open_ended(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r.get("choices")]


def current_judge(scores: dict[str, Any] | None, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The judge score of ``scores`` if it covers exactly the open-ended ``records``, else ``None``."""
    judge = (scores or {}).get("judge")
    if not isinstance(judge, dict) or judge.get("covers") != records_digest(open_ended(records)):
        return None
    return judge


@dataclass
class RunData:
    """One run directory, loaded."""

    path: Path
    name: str
    info: dict[str, Any]
    records: list[dict[str, Any]]
    scores: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.info.get("config", {}).get("method", "?")

    failures: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        preset = self.info.get("config", {}).get("preset")
        return f"{self.name} ({self.method}{'/' + preset if preset else ''})"

    @property
    def judge(self) -> dict[str, Any] | None:
        """The judge score, when it covers exactly this run's open-ended records."""
        return current_judge(self.scores, self.records)

    @property
    def failed_questions(self) -> int:
        answered = {r["qid"] for r in self.records}
        return len({qid for f in self.failures.values() for qid in f["qids"]} - answered)


def load_predictions(run_dir: Path) -> list[dict[str, Any]]:
    """The run's predictions: every record of the merged file and of the shard files, one per
    question (the merged file's first), so that no record in any of them is left out."""
    records: dict[str, dict[str, Any]] = {}
    for path in [run_dir / MERGED_FILE, *sorted(run_dir.glob("predictions.shard-*-of-*.jsonl"))]:
        for record in read_predictions(path):
            records.setdefault(record["qid"], record)
    return list(records.values())


def load_failures(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Outstanding failures of a run: every shard's (they are kept up to date by retries), or the
    run's own failures file when it has no shards."""
    failures: dict[str, dict[str, Any]] = {}
    paths = sorted(run_dir.glob("failures.shard-*-of-*.jsonl")) or [run_dir / FAILURES_FILE]
    for path in paths:
        failures.update(read_failures(path))
    return failures


def load_run(run_dir: Path) -> RunData:
    if not (run_dir / RUN_FILE).is_file():
        raise RunError(f"{run_dir}: not a run directory (no {RUN_FILE})")
    info = read_json_file(run_dir / RUN_FILE, "the run's configuration")
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise RunError(f"{run_dir / RUN_FILE}: not a run configuration written by mukv eval")
    records = load_predictions(run_dir)
    if not records:
        raise RunError(f"{run_dir}: no predictions yet")
    scores_path = run_dir / SCORES_FILE
    scores = read_json_file(scores_path, "the run's scores") if scores_path.exists() else {}
    if not isinstance(scores, dict):
        raise RunError(f"{scores_path}: not a scores file written by mukv judge")
    return RunData(run_dir, run_dir.name, info, records, scores, load_failures(run_dir))


def label_runs(runs: list[RunData]) -> None:
    """Name each run by its directory, or by as much of its path as tells it from the others."""
    names = [run.path.name for run in runs]
    for run in runs:
        if names.count(run.path.name) > 1:
            parts = run.path.resolve().parts
            for depth in range(2, len(parts) + 1):
                candidate = "/".join(parts[-depth:])
                others = ["/".join(o.path.resolve().parts[-depth:]) for o in runs if o is not run]
                if candidate not in others:
                    break
            run.name = candidate


def sampled_spans(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Retrieved blocks with each span extended by the sampling period, up to the question time:
    a sampled frame stands for the video until the next sample (without a recorded period,
    spans are kept as they are)."""
    period = record.get("sample_period") or 0.0
    return [
        block | {"end_time": max(block["end_time"], min(block["end_time"] + period, record["time"]))}
        for block in record["retrieved"]
    ]


def compute_scores(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Judge-free scores of a run: multiple-choice accuracy, exact match / token F1 (labelled
    judge-free), and retrieval recall against evidence windows."""
    from mukv.eval.metrics import judge_free_scores, multiple_choice_accuracy, recall_scores

    choice = [r for r in records if r.get("choices")]
    open_ended = [r for r in records if not r.get("choices")]
    with_evidence = [r | {"retrieved": sampled_spans(r)} for r in records if r.get("evidence")]
    return {
        "records": records_digest(records),
        "multiple_choice": multiple_choice_accuracy(choice) if choice else None,
        "judge_free": judge_free_scores(open_ended) if open_ended else None,
        "recall": recall_scores(with_evidence) if with_evidence else None,
    }


def efficiency(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Memory bytes per hour of video, mean answering tokens, encode frames/s, seconds per question."""
    last: dict[str, dict[str, Any]] = {}
    for record in records:
        current = last.get(record["video_id"])
        if current is None or record["time"] >= current["time"]:
            last[record["video_id"]] = record
    # n sampled frames stand for n sampling periods of video (older records: the last frame's time).
    hours = sum(r["frames_seen"] * r["sample_period"] if r.get("sample_period") else r["time"] for r in last.values())
    hours /= 3600
    stored = sum(r["memory"]["total_bytes"] for r in last.values())
    # Frames encoded per record count re-encoding after a resume with its time; older records
    # without the count fall back to the frames seen.
    if all("frames_encoded" in r for r in records):
        frames = sum(r["frames_encoded"] for r in records)
    else:
        frames = sum(r["frames_seen"] for r in last.values())
    encode = sum(r["encode_seconds"] for r in records)
    n = len(records)
    return {
        "bytes_per_hour": stored / hours if hours > 0 else None,
        "answer_tokens": sum(r["context_tokens"] for r in records) / n,
        "encode_fps": frames / encode if encode > 0 else None,
        "seconds_per_question": sum(r["total_seconds"] for r in records) / n,
        "first_token_seconds": sum(r["first_token_seconds"] for r in records) / n,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(runs: list[RunData]) -> str:
    """The comparison table; judge scores carry their judge model."""
    header = (
        "| run | method | questions | failed | judge acc / score (judge) | MC acc | EM* | F1* | recall hit / cover "
        "| memory GB/h | answer tokens | encode frames/s | s/question | first token s |"
    )
    lines = [header, "|" + "|".join(["---"] * 14) + "|"]
    for run in runs:
        computed = compute_scores(run.records)
        judge = run.judge
        scores = run.scores or {}
        if judge:
            judge_cell = f"{judge['accuracy'] * 100:.1f} / {judge['score']:.2f} ({judge['judge_model']})"
        elif (scores.get("judge") or scores.get("judge_unjudged")) and open_ended(run.records):
            # A score of another set of records is never shown: say how many are unjudged instead.
            unjudged = scores.get("judge_unjudged") or {}
            current = scores.get("records") == records_digest(run.records)  # scored on exactly these records
            count = unjudged.get("count") if current else None
            judge_cell = f"— ({count if count is not None else len(open_ended(run.records))} unjudged: run mukv judge)"
        else:
            judge_cell = "—"
        mc = computed["multiple_choice"]
        free = computed["judge_free"]
        recall = computed["recall"]
        eff = efficiency(run.records)
        hit = _fmt(recall and recall["hit"] * 100, ".1f")
        recall_cell = f"{hit} / {_fmt(recall and recall['coverage'] * 100, '.1f')}"
        lines.append(
            "| "
            + " | ".join(
                [
                    run.name,
                    run.method + (f"/{run.info['config'].get('preset')}" if run.info["config"].get("preset") else ""),
                    str(len(run.records)),
                    str(run.failed_questions),
                    judge_cell,
                    _fmt(mc and mc["overall"] * 100, ".1f"),
                    _fmt(free and free["exact_match"] * 100, ".1f"),
                    _fmt(free and free["token_f1"] * 100, ".1f"),
                    recall_cell,
                    _fmt(eff["bytes_per_hour"] and eff["bytes_per_hour"] / 1e9, ".2f"),
                    _fmt(eff["answer_tokens"], ".0f"),
                    _fmt(eff["encode_fps"], ".2f"),
                    _fmt(eff["seconds_per_question"], ".2f"),
                    _fmt(eff["first_token_seconds"], ".2f"),
                ]
            )
            + " |"
        )
    lines.append("")
    lines.append(
        "*EM and F1 are judge-free (normalised exact match, token F1 against the reference); they are not the "
        "papers' judge-based metric. Memory is what the method holds at the last question of each video, per hour "
        "of video seen. Failed: questions left unanswered by videos or questions that failed (failures.jsonl); "
        "the scores are over the answered questions only."
    )
    return "\n".join(lines) + "\n"


def _quality(run: RunData) -> tuple[float | None, str]:
    judge = run.judge
    if judge:
        return judge["accuracy"] * 100, f"judge accuracy ({judge['judge_model']})"
    computed = compute_scores(run.records)
    if computed["multiple_choice"]:
        return computed["multiple_choice"]["overall"] * 100, "multiple-choice accuracy"
    if computed["judge_free"]:
        return computed["judge_free"]["token_f1"] * 100, "token F1 (judge-free)"
    return None, "quality"


def plot_runs(runs: list[RunData], out: Path, video: str | None = None) -> list[Path]:
    """Write the comparison plots as PNG files into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = set()
    for run in runs:
        quality, label = _quality(run)
        memory = efficiency(run.records)["bytes_per_hour"]
        if quality is None or memory is None:
            continue
        labels.add(label)
        ax.scatter(memory / 1e9, quality)
        ax.annotate(run.label, (memory / 1e9, quality), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("memory held, GB per hour of video")
    ax.set_ylabel(" / ".join(sorted(labels)) or "quality")
    ax.set_title("Quality vs memory")
    fig.tight_layout()
    written.append(out / "quality_vs_memory.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for run in runs:
        ordered = sorted(run.records, key=lambda r: r["time"])
        minutes = [r["time"] / 60 for r in ordered]
        top.plot(minutes, [r["total_seconds"] for r in ordered], ".", label=run.label, alpha=0.7)
        bottom.plot(minutes, [r["memory"]["total_bytes"] / 1e9 for r in ordered], ".", label=run.label, alpha=0.7)
    top.set_ylabel("seconds per question")
    bottom.set_ylabel("memory held, GB")
    bottom.set_xlabel("question time, minutes into the video")
    top.legend(fontsize=7)
    top.set_title("Cost as the video grows")
    fig.tight_layout()
    written.append(out / "cost_vs_length.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    videos = sorted({r["video_id"] for run in runs for r in run.records if r.get("evidence")})
    if video is not None and video not in videos:
        listed = ", ".join(videos[:20]) + (f" and {len(videos) - 20} more" if len(videos) > 20 else "")
        raise ValueError(
            f"--video {video!r}: no answered question of that video has an evidence window; videos: {listed or 'none'}"
        )
    chosen = video or (videos[0] if videos else None)
    if chosen is not None:
        fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.2 * len(runs) + 0.6), sharex=True, squeeze=False)
        for ax, run in zip(axes[:, 0], runs, strict=True):
            records = sorted((r for r in run.records if r["video_id"] == chosen), key=lambda r: r["time"])
            for y, record in enumerate(records):
                if record.get("evidence"):
                    start, end = record["evidence"]
                    ax.plot([start, end], [y, y], color="tab:green", linewidth=6, alpha=0.35, solid_capstyle="butt")
                for block in sampled_spans(record):
                    ax.plot([block["start_time"], block["end_time"]], [y, y], color="tab:blue", linewidth=2)
                ax.plot([record["time"]], [y], marker="|", color="tab:red", markersize=10)
            ax.set_ylabel(run.label, fontsize=7)
        axes[-1, 0].set_xlabel(f"seconds into {chosen} (green: evidence, blue: retrieved, red: question time)")
        fig.tight_layout()
        written.append(out / f"retrieval_{chosen.replace('/', '_')}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write_report(run_dirs: list[Path], out: Path, video: str | None = None) -> Path:
    """Write ``report.md`` and the plots into ``out``; returns the Markdown path."""
    if not run_dirs:
        raise ValueError("report: give at least one run directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    label_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_runs(runs, out, video)
    models = sorted({run.info.get("config", {}).get("model", "?") for run in runs})
    benchmarks = sorted({run.info.get("config", {}).get("benchmark", "?") for run in runs})
    parts = [
        "# Comparison of runs\n",
        f"Benchmark: {', '.join(benchmarks)}. Model: {', '.join(models)}.\n",
        markdown_table(runs),
    ]
    failed = [(run, f) for run in runs for f in run.failures.values()]
    if failed:
        parts.append("## Failed videos and questions\n")
        parts.extend(
            f"- {run.name}: {f['video_id']} ({f['stage']}, {len(f['qids'])} question(s)): {f['reason']}"
            for run, f in failed
        )
        parts.append("")
    parts.extend(f"![{plot.stem}]({plot.name})\n" for plot in plots)
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path
