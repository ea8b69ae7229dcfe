"""A small synthetic benchmark in the RVS layout, with known evidence windows.

Each video is a sequence of scenes (one coloured shape per scene, see
:mod:`mukv.video.synthetic`). Questions ask about a past scene ("What colour was the circle
shown at 20 seconds?", evidence = that scene) or the current one ("What shape is on the screen
now?"). Videos are written as mp4 and, for every other video, as an ``.npy`` frame array, as
RVS-Movie distributes them. For tests and for trying the harness; not a quality benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mukv.video.synthetic import frames_of, make_scenes, write_video


def write_benchmark(
    directory: str | Path,
    *,
    videos: int = 2,
    duration: float = 120.0,
    scene_seconds: float = 10.0,
    fps: int = 2,
    width: int = 64,
    height: int = 48,
    seed: int = 0,
    npy_every: int = 2,
) -> Path:
    """Write ``annotations.json`` and ``videos/`` under ``directory``; return the annotation path.

    Video ``k`` is an mp4, or an ``.npy`` array ``[N, H, W, 3]`` at ``fps`` when
    ``k % npy_every == npy_every - 1``. ``video_path`` values point to a made-up original disk,
    as real annotation files do, so that runs must resolve them by file name.
    """
    root = Path(directory)
    video_dir = root / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    records = []
    rng = np.random.default_rng(seed)
    for k in range(videos):
        scenes = make_scenes(duration, scene_seconds, seed=seed * 1000 + k)
        video_id = f"synthetic_{k:03d}"
        if npy_every and k % npy_every == npy_every - 1:
            name = f"{video_id}.npy"
            np.save(video_dir / name, np.stack([image for image, _ in frames_of(scenes, fps, width, height)]))
        else:
            name = f"{video_id}.mp4"
            write_video(video_dir / name, scenes, fps=fps, width=width, height=height)
        conversations = []
        for i, scene in enumerate(scenes[:-1]):
            later = scenes[min(len(scenes) - 1, i + 1 + int(rng.integers(0, 3)))]
            asked = float(min(duration, later.start + scene_seconds / 2))
            conversations.append(
                {
                    "question": f"What colour was the {scene.shape} shown at {scene.start:.0f} seconds?",
                    "answer": scene.colour,
                    "start_time": scene.start,
                    "end_time": asked,
                    "evidence_end": scene.end,
                }
            )
            now = scene.start + scene_seconds / 2
            conversations.append(
                {
                    "question": "What shape is on the screen now?",
                    "answer": scene.shape,
                    "start_time": scene.start,
                    "end_time": now,
                    "evidence_end": now,
                }
            )
        records.append(
            {
                "video_id": video_id,
                "video_path": f"/data/original/disk/{name}",
                "duration": duration,
                "conversations": conversations,
            }
        )
    path = root / "annotations.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path
