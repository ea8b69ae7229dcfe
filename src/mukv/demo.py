"""``mukv demo``: a self-contained, offline walk through the streaming pipeline.

Generates a short synthetic video of coloured shapes, builds a tiny random LLaVA-OneVision, and
asks questions at several times with each memory method. The tiny model is untrained, so its
answers are nonsense: the demo shows the pipeline (sampling, encoding, memory, retrieval,
timing), not answer quality. Real answers need a real checkpoint (``--model``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from mukv.video.synthetic import Scene, make_scenes, write_video

log = logging.getLogger(__name__)

DURATION = 48.0
SAMPLE_FPS = 0.5
QUESTION_TIMES = (16.0, 32.0, 48.0)


def _reference(scenes: list[Scene], time: float) -> str:
    last = [s for s in scenes if s.start <= time][-1]
    return f"{last.colour} {last.shape}"


def run_demo(workdir: Path, methods: list[str]) -> None:
    """Run the demo in ``workdir`` (model and video are built there once and reused)."""
    from mukv.backends import build_tiny_model, load_backend
    from mukv.engine import StreamSession
    from mukv.memory import available_methods
    from mukv.video import open_video

    unknown = [m for m in methods if m not in available_methods()]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown or methods}; available: {', '.join(available_methods())}")
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "tiny-model"
    if not (model_dir / "config.json").is_file():
        typer.echo(f"building a tiny random LLaVA-OneVision in {model_dir} ...")
        build_tiny_model(model_dir, seed=0)
    scenes = make_scenes(DURATION, scene_seconds=8.0, seed=0)
    video = write_video(workdir / "shapes.mp4", scenes)
    typer.echo(f"synthetic video: {video} ({DURATION:.0f} s, one coloured shape every 8 s)")
    typer.secho(
        "NOTE: the tiny model has random weights, so its answers are nonsense. This demo shows the\n"
        "streaming pipeline working offline; for real answers pass a real checkpoint, e.g.\n"
        "  mukv ask VIDEO -q 'What happened?' --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        fg=typer.colors.YELLOW,
    )
    backend = load_backend(model_dir)
    question = "What colour was the last shape?"
    for method in methods:
        typer.secho(f"\n== method: {method}", bold=True)
        session = StreamSession(backend, method)
        source = open_video(video, sample_fps=SAMPLE_FPS)
        for at in QUESTION_TIMES:
            session.ingest_source(source, until=at)
            answer = session.ask(question, max_new_tokens=12)
            spans = ", ".join(f"{b.start_time:.0f}-{b.end_time:.0f}s" for b in answer.retrieved[:6])
            typer.echo(
                f"t={answer.time:4.0f}s  frames={answer.frames_seen:3d}  reference: {_reference(scenes, at):16s}"
                f"  answer: {answer.text!r}"
            )
            first_ms = answer.timings.first_token * 1e3
            more = " ..." if len(answer.retrieved) > 6 else ""
            typer.secho(
                f"         {answer.context_tokens} cache tokens, first token {first_ms:.0f} ms, "
                f"memory {answer.memory.total_bytes / 1024:.0f} KiB, frames used: {spans}{more}",
                dim=True,
            )
    typer.echo("\nDone. See `mukv --help` for ask, chat and the other commands.")
