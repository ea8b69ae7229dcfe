"""Scoring a run directory: ``mukv judge RUN_DIR``.

Writes ``scores.json`` (multiple-choice accuracy overall and per task, judge-free exact match and
token F1, retrieval recall, and, with a judge endpoint, the judge's yes-share and mean 0-5 score
with the judge model's name) and ``judgments.jsonl`` (one verdict per open-ended question).

Every score names the records it covers (``records`` / ``judge.covers``: their count and a
digest of their ids and answers). Scoring again without a judge keeps an earlier judge score
only while it covers exactly the current records; otherwise the judge score is dropped and
``judge_unjudged`` lists the open-ended questions no verdict covers, so a run that grew, or
whose answers changed, never shows a score of another set of records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mukv.eval.judge import Judge, judge_records, summarise_verdicts
from mukv.eval.report import (
    SCORES_FILE,
    answer_fingerprint,
    compute_scores,
    current_judge,
    load_predictions,
    open_ended,
    records_digest,
)
from mukv.eval.runner import RUN_FILE, RunError, read_json_file, read_jsonl_lines, write_atomic

JUDGMENTS_FILE = "judgments.jsonl"


def _judged(run_dir: Path) -> dict[str, str]:
    """Answer fingerprints by question id of the verdicts in ``judgments.jsonl``."""
    judged = {}
    for _, entry in read_jsonl_lines(run_dir / JUDGMENTS_FILE, repair=False):
        if isinstance(entry, dict) and isinstance(entry.get("qid"), str) and isinstance(entry.get("answer_sha"), str):
            judged[entry["qid"]] = entry["answer_sha"]
    return judged


def score_run(
    run_dir: Path,
    judge: Judge | None,
    *,
    concurrency: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score ``run_dir``'s predictions (judge verdicts come from the judge's cache when known).

    ``concurrency``: judge requests in flight at once; ``progress(done, total)`` is called as
    open-ended answers are judged (see :meth:`Judge.judge_many`)."""
    if not (run_dir / RUN_FILE).is_file():
        raise RunError(f"{run_dir}: not a run directory (no {RUN_FILE})")
    records = load_predictions(run_dir)
    if not records:
        raise RunError(f"{run_dir}: no predictions to score")
    scores: dict[str, Any] = compute_scores(records)
    previous_path = run_dir / SCORES_FILE
    previous = read_json_file(previous_path, "the run's scores") if previous_path.exists() else {}
    open_records = open_ended(records)
    # Scoring without a judge keeps an earlier judge result while it covers exactly these records
    # (its cache makes re-judging free anyway).
    scores["judge"] = current_judge(previous if isinstance(previous, dict) else {}, records)
    if judge is not None and open_records:
        verdicts = judge_records(open_records, judge, concurrency=concurrency, progress=progress)
        summary = summarise_verdicts([verdict for _, verdict in verdicts], judge.model)
        scores["judge"] = summary | {"covers": records_digest(open_records)}
        lines = []
        for record, verdict in verdicts:
            lines.append(
                json.dumps(
                    {
                        "qid": record["qid"],
                        "pred": verdict.pred,
                        "score": verdict.score,
                        "judge_model": verdict.model,
                        "answer_sha": answer_fingerprint(record),
                    }
                )
                + "\n"
            )
        write_atomic(run_dir / JUDGMENTS_FILE, "".join(lines))
    if scores["judge"] is None and open_records:
        judged = _judged(run_dir)
        missing = [r["qid"] for r in open_records if judged.get(r["qid"]) != answer_fingerprint(r)]
        scores["judge_unjudged"] = {"count": len(missing), "of": len(open_records), "qids": missing}
    write_atomic(previous_path, json.dumps(scores, indent=2) + "\n")
    return scores
