"""Scoring a run directory: ``mukv judge RUN_DIR``.

Writes ``scores.json`` (multiple-choice accuracy overall and per task, judge-free exact match and
token F1, retrieval recall, and, with a judge endpoint, the judge's yes-share and mean 0-5 score
with the judge model's name) and ``judgments.jsonl`` (one verdict per open-ended question).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mukv.eval.judge import Judge, score_open_ended
from mukv.eval.report import SCORES_FILE, compute_scores, load_predictions
from mukv.eval.runner import RUN_FILE, RunError

JUDGMENTS_FILE = "judgments.jsonl"


def score_run(run_dir: Path, judge: Judge | None) -> dict[str, Any]:
    """Score ``run_dir``'s predictions (judge verdicts come from the judge's cache when known)."""
    if not (run_dir / RUN_FILE).is_file():
        raise RunError(f"{run_dir}: not a run directory (no {RUN_FILE})")
    records = load_predictions(run_dir)
    if not records:
        raise RunError(f"{run_dir}: no predictions to score")
    scores: dict[str, Any] = compute_scores(records)
    previous = run_dir / SCORES_FILE
    # Scoring without a judge keeps an earlier judge result (its cache makes re-judging free anyway).
    scores["judge"] = json.loads(previous.read_text()).get("judge") if previous.exists() else None
    open_ended = [r for r in records if not r.get("choices")]
    if judge is not None and open_ended:
        scores["judge"] = score_open_ended(open_ended, judge)
        lines = []
        for record in open_ended:
            verdict = judge.judge(record["question"], record["answer"], record["prediction"], qid=record["qid"])
            lines.append(
                json.dumps(
                    {"qid": record["qid"], "pred": verdict.pred, "score": verdict.score, "judge_model": verdict.model}
                )
            )
        (run_dir / JUDGMENTS_FILE).write_text("\n".join(lines) + "\n")
    (run_dir / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n")
    return scores
