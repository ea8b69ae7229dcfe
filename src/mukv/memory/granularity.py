"""Block granularities as data.

A :class:`GranularitySpec` says how many consecutive frames a block spans and into how many
token subsets (``parts``) each frame is split. MuKV's three granularities are three specs;
another granularity (say, two-frame clips, or 3x3 tiles) is one more spec, handled by the same
encoding, scoring, storing and retrieval code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GranularitySpec:
    """Blocks of ``frames`` consecutive frames (global index // frames), ``parts`` per group.

    Part ``j`` of a group holds, for every frame of the group in order, that frame's token
    subset ``j`` (see :func:`part_indices`); ``parts == 1`` means whole frames.
    """

    name: str
    frames: int = 1
    parts: int = 1

    def __post_init__(self) -> None:
        if self.frames < 1 or self.parts < 1:
            raise ValueError(f"granularity {self.name}: frames and parts must be >= 1")


def mukv_specs(segment_frames: int) -> tuple[GranularitySpec, ...]:
    """MuKV's granularities (method.md section 2): patch (P/4 tokens), frame, segment (F frames)."""
    return (
        GranularitySpec("patch", frames=1, parts=4),
        GranularitySpec("frame", frames=1, parts=1),
        GranularitySpec("segment", frames=segment_frames, parts=1),
    )


def part_indices(tokens_per_frame: int, parts: int, layout: str = "raster") -> list[torch.Tensor]:
    """Token indices of a frame's ``parts`` subsets, each ascending, together covering every token once.

    ``raster``: consecutive runs in row-major order (the release's patches: 3.5-row strips at
    P = 196). ``quadrant`` (``parts == 4``): the 2x2 spatial quadrants of the square token grid,
    top-left, top-right, bottom-left, bottom-right, row-major inside each (the paper's figure).
    """
    if parts == 1:
        return [torch.arange(tokens_per_frame)]
    if layout == "raster":
        return list(torch.arange(tokens_per_frame).tensor_split(parts))
    if layout != "quadrant" or parts != 4:
        raise ValueError(f"patch_layout: {layout!r} with {parts} parts is not supported")
    side = math.isqrt(tokens_per_frame)
    if side * side != tokens_per_frame:
        raise ValueError(f"patch_layout: quadrant needs a square token grid, got {tokens_per_frame} tokens")
    half = (side + 1) // 2
    grid = torch.arange(tokens_per_frame).reshape(side, side)
    halves = (slice(0, half), slice(half, side))
    return [grid[rows, cols].reshape(-1) for rows in halves for cols in halves]


def patch_token_indices(tokens_per_frame: int, layout: str) -> list[torch.Tensor]:
    """The four patch subsets of a frame (method.md section 2)."""
    return part_indices(tokens_per_frame, 4, layout)
