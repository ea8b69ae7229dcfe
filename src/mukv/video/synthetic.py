"""Synthetic videos of coloured shapes with known content, for the demo and tests.

Each scene shows one shape of one colour at a fixed place for ``scene_seconds``; the scene list
is the ground truth (what was visible when), so questions about the video have known answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (30, 30, 30)


@dataclass(frozen=True)
class Scene:
    """One shape shown from ``start`` to ``end`` seconds, centred at (``x``, ``y``) in [0, 1]."""

    start: float
    end: float
    colour: str
    shape: str
    x: float
    y: float

    def contains(self, time: float) -> bool:
        return self.start <= time < self.end


def make_scenes(duration: float, scene_seconds: float = 8.0, seed: int = 0) -> list[Scene]:
    """Consecutive scenes covering ``[0, duration)``; consecutive scenes differ in colour."""
    if duration <= 0 or scene_seconds <= 0:
        raise ValueError("duration and scene_seconds must be positive")
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    scenes: list[Scene] = []
    start = 0.0
    previous = None
    while start < duration:
        colour = colours[int(rng.integers(len(colours)))]
        while colour == previous:
            colour = colours[int(rng.integers(len(colours)))]
        previous = colour
        end = min(duration, start + scene_seconds)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        scenes.append(Scene(start, end, colour, shape, float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))))
        start = end
    return scenes


def render(scene: Scene, width: int, height: int) -> np.ndarray:
    """uint8 RGB frame ``[height, width, 3]`` showing ``scene``'s shape."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = BACKGROUND
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = scene.x * width, scene.y * height
    r = 0.25 * min(width, height)
    if scene.shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    elif scene.shape == "square":
        mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    else:  # triangle pointing up
        mask = (yy <= cy + r) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
    frame[mask] = COLOURS[scene.colour]
    return frame


def frames_of(scenes: list[Scene], fps: float, width: int, height: int) -> Iterator[tuple[np.ndarray, float]]:
    """Frames at ``fps`` over the scenes' duration, with their timestamps."""
    duration = scenes[-1].end
    count = round(duration * fps)
    index = 0
    for i in range(count):
        t = i / fps
        while not scenes[index].contains(t) and index + 1 < len(scenes):
            index += 1
        yield render(scenes[index], width, height), t


def write_frames(path: str | Path, frames: Iterator[np.ndarray], *, fps: int, width: int, height: int) -> Path:
    """Encode uint8 RGB frames ``[height, width, 3]`` at ``fps`` to an H.264 (or MPEG-4) video."""
    import av

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def write_video(path: str | Path, scenes: list[Scene], *, fps: int = 4, width: int = 160, height: int = 120) -> Path:
    """Encode the scenes to a video at ``path`` (see :func:`write_frames`)."""
    images = (image for image, _ in frames_of(scenes, fps, width, height))
    return write_frames(path, images, fps=fps, width=width, height=height)
