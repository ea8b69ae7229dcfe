"""``mukv demo``: a self-contained, offline walk through the streaming pipeline.

Generates two synthetic streams (coloured shapes; rare targets whose questions have known
answers and evidence frames), writes them as mp4 videos, plays them into a session for each
memory method and asks every question at its time. Answers are printed next to the reference, and the
time spans the method put in the answering cache next to the evidence span.

The default model is ``mukv-tiny``, the checkpoint shipped with the package and trained on such
streams, so the answers are meant to be right; any other checkpoint can be passed with
``--model`` (a random tiny model from ``mukv tiny-model`` answers nonsense).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import typer

from mukv.memory.base import RetrievedBlock
from mukv.video.streams import SyntheticStream, eval_kinds, make_stream, write_stream_video

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 64
MIN_FRAMES, MAX_FRAMES = 8, 4096
SAMPLE_FPS = 0.5
DEFAULT_MODEL = "mukv-tiny"


def merge_spans(blocks: Sequence[RetrievedBlock], period: float) -> list[tuple[float, float]]:
    """Time spans ``[(start, end)]`` covered by ``blocks``, where a frame at ``t`` covers
    ``[t, t + period)`` and touching spans are merged (sorted by start)."""
    spans = sorted((b.start_time, b.end_time + period) for b in blocks)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1] + 1e-6:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _format_spans(spans: list[tuple[float, float]], limit: int = 5) -> str:
    text = ", ".join(f"{s:.0f}-{e:.0f}s" for s, e in spans[:limit])
    return text + (f", ... ({len(spans)} spans)" if len(spans) > limit else "")


def _evidence_span(stream: SyntheticStream, first: int, last: int) -> tuple[float, float]:
    return float(stream.timestamps[first]), float(stream.timestamps[last]) + 1 / SAMPLE_FPS


def run_demo(
    workdir: Path, methods: list[str], *, model: str = DEFAULT_MODEL, frames: int = DEFAULT_FRAMES, seed: int = 0
) -> dict[str, int]:
    """Run the demo in ``workdir`` (the video is written there). Returns the number of right
    answers per method."""
    from mukv.backends import load_backend
    from mukv.engine import StreamSession
    from mukv.eval.metrics import exact_match
    from mukv.memory import available_methods
    from mukv.video import open_video

    available = available_methods()
    if not methods:
        raise ValueError(f"--methods: none given; available: {', '.join(available)}")
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; available: {', '.join(available)}")
    methods = list(dict.fromkeys(methods))  # each once, in the order given
    if not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise ValueError(f"--frames: must be in {MIN_FRAMES}..{MAX_FRAMES}, got {frames}")
    if seed < 0:
        raise ValueError(f"--seed: must be >= 0, got {seed}")
    backend = load_backend(model)  # before any work, so a bad --model fails first
    workdir.mkdir(parents=True, exist_ok=True)
    # Two streams, each with one large and one small rare target (eval_kinds), so that every
    # question kind is asked.
    seeds = (seed, seed + 1)
    streams = [make_stream(frames, seed=k, fps=SAMPLE_FPS, kinds=eval_kinds(k)) for k in seeds]
    videos = [write_stream_video(workdir / f"stream_{k}_{frames}.mp4", s) for k, s in zip(seeds, streams, strict=True)]
    count = sum(len(s.questions) for s in streams)
    typer.echo(
        f"synthetic streams: {', '.join(str(v) for v in videos)} ({frames} frames each at {SAMPLE_FPS} fps = "
        f"{frames / SAMPLE_FPS:.0f} s; {count} questions asked as the videos play)"
    )
    typer.echo(f"model: {backend.model_id}")
    right: dict[str, int] = {}
    for method in methods:
        typer.secho(f"\n== method: {method}", bold=True)
        right[method] = 0
        for number, (stream, video) in enumerate(zip(streams, videos, strict=True), start=1):
            source = open_video(video, sample_fps=SAMPLE_FPS)
            session = StreamSession(backend, method, fps=source.sample_fps)
            for q in sorted(stream.questions, key=lambda q: q.ask_frame):
                at = float(stream.timestamps[q.ask_frame])
                session.ingest_source(source, until=at)
                answer = session.ask(q.question, max_new_tokens=8)
                correct = exact_match(answer.text, q.answer) == 1.0
                right[method] += correct
                mark = typer.style(*(("right", typer.colors.GREEN) if correct else ("wrong", typer.colors.RED)))
                typer.echo(
                    f"stream {number} t={at:4.0f}s  [{q.kind:5s}] {q.question:50s} "
                    f"reference: {q.answer:7s} answer: {answer.text!r:10s} {mark}"
                )
                evidence = _evidence_span(stream, q.first_frame, q.last_frame)
                typer.secho(
                    f"{'':17s}evidence {evidence[0]:.0f}-{evidence[1]:.0f}s; in the answering cache: "
                    f"{_format_spans(merge_spans(answer.retrieved, 1 / SAMPLE_FPS))} "
                    f"({answer.context_tokens} tokens, first token {answer.timings.first_token * 1e3:.0f} ms)",
                    dim=True,
                )
        typer.echo(f"{method}: {right[method]}/{count} right")
    typer.echo("\nDone. See `mukv --help` for ask, chat, eval and the other commands.")
    return right
