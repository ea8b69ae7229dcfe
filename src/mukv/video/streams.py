"""Synthetic video streams whose questions have known answers and evidence frames.

Every frame shows one large *common* object (circle, square or triangle in one of six colours)
on a noisy background. A few frames carry a question target: a *rare* large shape (star, cross,
diamond) that appears once in the stream, or a small rare shape in one quadrant of the frame.
Questions and their evidence:

- ``frame``: "What colour was the star?" (one frame);
- ``patch``: "What colour was the small cross?" (a quarter of one frame);
- ``order``: "What colour was the shape right after the diamond?" (two consecutive frames).

Answers are one word. Everything is numpy and deterministic by seed; a 1024-frame stream of
112 px frames renders in well under a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mukv.video.synthetic import write_frames

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "purple": (160, 60, 210),
}
COMMON_SHAPES = ("circle", "square", "triangle")
RARE_SHAPES = ("star", "cross", "diamond")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
KINDS = ("frame", "patch", "order")


@dataclass(frozen=True)
class Thing:
    """A drawn object: ``shape`` in ``colour``, centred at (``x``, ``y``) in [0, 1], ``size`` in [0, 1]."""

    shape: str
    colour: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class StreamQuestion:
    """A question with its one-word answer, evidence frames ``first_frame..last_frame`` and the
    frame index ``ask_frame`` at which it is asked (never before the evidence)."""

    kind: str
    question: str
    answer: str
    first_frame: int
    last_frame: int
    ask_frame: int


@dataclass
class SyntheticStream:
    """Frames ``[T, S, S, 3]`` uint8 at ``timestamps [T]`` seconds, what each frame shows, and questions."""

    frames: np.ndarray
    timestamps: np.ndarray
    main: list[Thing]
    small: list[Thing | None]
    questions: list[StreamQuestion]


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        return ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r))
    if shape == "star":
        angle = np.arctan2(dy, dx)
        radius = np.sqrt(dx**2 + dy**2)
        return radius <= r * (0.55 + 0.45 * np.cos(5 * angle) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(main: Thing, small: Thing | None, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 frame ``[size, size, 3]``."""
    frame = rng.integers(10, 50, size=(size, size, 3), dtype=np.uint8)
    for thing in (main, small):
        if thing is None:
            continue
        mask = _mask(thing.shape, size, thing.x * size, thing.y * size, thing.size * size / 2)
        frame[mask] = COLOURS[thing.colour]
    return frame


def _quadrant_centre(quadrant: int, rng: np.random.Generator) -> tuple[float, float]:
    x = 0.2 if quadrant % 2 == 0 else 0.8
    y = 0.2 if quadrant < 2 else 0.8
    return x + float(rng.uniform(-0.04, 0.04)), y + float(rng.uniform(-0.04, 0.04))


def make_stream(
    num_frames: int,
    *,
    seed: int = 0,
    size: int = 112,
    fps: float = 0.5,
    kinds: tuple[str, ...] = KINDS,
) -> SyntheticStream:
    """A stream of ``num_frames`` frames with up to one question per rare shape and kind.

    Rare shapes appear once each (as a large object or as a small one), so every question has one
    answer. ``order`` questions need two frames, ``patch`` and ``frame`` questions one.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames: need at least 2, got {num_frames}")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"kinds: unknown {sorted(unknown)}; valid: {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    main: list[Thing] = []
    for _ in range(num_frames):
        main.append(
            Thing(
                shape=COMMON_SHAPES[int(rng.integers(len(COMMON_SHAPES)))],
                colour=colours[int(rng.integers(len(colours)))],
                x=float(rng.uniform(0.4, 0.6)),
                y=float(rng.uniform(0.4, 0.6)),
                size=float(rng.uniform(0.35, 0.5)),
            )
        )
    small: list[Thing | None] = [None] * num_frames
    questions: list[StreamQuestion] = []
    rare = list(RARE_SHAPES)
    rng.shuffle(rare)
    # Distinct evidence frames for the targets, leaving room for the frame after an order target.
    slots = rng.permutation(num_frames - 1)[: len(kinds)].tolist()
    for kind, shape, frame in zip(kinds, rare, slots, strict=False):
        colour = colours[int(rng.integers(len(colours)))]
        ask = int(rng.integers(frame + (1 if kind == "order" else 0), num_frames))
        if kind == "frame":
            main[frame] = Thing(shape, colour, main[frame].x, main[frame].y, main[frame].size)
            questions.append(StreamQuestion(kind, f"What colour was the {shape}?", colour, frame, frame, ask))
        elif kind == "patch":
            quadrant = int(rng.integers(4))
            x, y = _quadrant_centre(quadrant, rng)
            # Keep the large object away from the small one's quadrant.
            base = main[frame]
            main[frame] = Thing(base.shape, base.colour, 0.5, 0.5, 0.3)
            small[frame] = Thing(shape, colour, x, y, 0.22)
            questions.append(StreamQuestion(kind, f"What colour was the small {shape}?", colour, frame, frame, ask))
        else:
            main[frame] = Thing(shape, colour, main[frame].x, main[frame].y, main[frame].size)
            # The answer is read once every target is placed (below): a later ``frame`` target may
            # take the slot right after this one and recolour it.
            questions.append(
                StreamQuestion(kind, f"What colour was the shape right after the {shape}?", "", frame, frame + 1, ask)
            )
    questions = [replace(q, answer=main[q.last_frame].colour) if q.kind == "order" else q for q in questions]
    frames = np.stack([render(m, s, size, rng) for m, s in zip(main, small, strict=True)])
    timestamps = np.arange(num_frames, dtype=np.float64) / fps
    return SyntheticStream(frames, timestamps, main, small, questions)


def eval_kinds(seed: int) -> tuple[str, str]:
    """Question kinds of the evaluation stream ``seed`` (demo, tests, accuracy study): one large
    rare target (``frame`` for even seeds, ``order`` for odd ones) and one small (``patch``).

    ``mukv-tiny`` tells a large rare shape from a small one, but confuses two large rare shapes
    in the same stream (see its model card), so evaluation streams hold one of each.
    """
    return ("frame" if seed % 2 == 0 else "order", "patch")


VIDEO_FPS = 2


def write_stream_video(path: str | Path, stream: SyntheticStream) -> Path:
    """Encode ``stream`` as a ``VIDEO_FPS`` mp4 with each stream frame held for its period, so
    that sampling the video at the stream's rate returns the stream's frames at its timestamps."""
    period = float(stream.timestamps[1] - stream.timestamps[0]) if len(stream.timestamps) > 1 else 2.0
    repeat = round(VIDEO_FPS * period)
    if repeat < 1 or abs(repeat - VIDEO_FPS * period) > 1e-9:
        raise ValueError(f"fps: must divide {VIDEO_FPS}, got {1 / period}")
    side = stream.frames.shape[1]
    held = (image for image in stream.frames for _ in range(repeat))
    return write_frames(path, held, fps=VIDEO_FPS, width=side, height=side)


def write_stream_benchmark(
    directory: str | Path, *, streams: int = 4, num_frames: int = 64, seed: int = 0, fps: float = 0.5
) -> Path:
    """Write streams as 2 fps mp4 videos (each stream frame held for ``1/fps`` seconds) plus an
    RVS-layout ``annotations.json``: questions asked at the ask frame's time, evidence window
    from the first evidence frame, and the evidence frames and question kind as extra fields.

    Returns the annotation path; run it with ``mukv eval rvs-ego --anno ... --fps <fps>``.
    """
    repeat = round(VIDEO_FPS / fps)
    if repeat < 1 or abs(repeat * fps - VIDEO_FPS) > 1e-9:
        raise ValueError(f"fps: must divide {VIDEO_FPS}, got {fps}")
    root = Path(directory)
    records = []
    for k in range(streams):
        stream = make_stream(num_frames, seed=seed * 10_000 + k, fps=fps)
        video_id = f"stream_{k:03d}"
        write_stream_video(root / "videos" / f"{video_id}.mp4", stream)
        conversations = [
            {
                "question": q.question,
                "answer": q.answer,
                "start_time": float(stream.timestamps[q.first_frame]),
                "end_time": float(stream.timestamps[q.ask_frame]),
                "kind": q.kind,
                "evidence_frames": [q.first_frame, q.last_frame],
            }
            for q in stream.questions
        ]
        records.append(
            {
                "video_id": video_id,
                "video_path": f"/original/{video_id}.mp4",
                "duration": float(stream.timestamps[-1] + 1 / fps),
                "conversations": conversations,
            }
        )
    path = root / "annotations.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path
