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

from mukv.backends.positions import FrameLayout


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


def part_indices(layout: FrameLayout | int, parts: int, patch_layout: str = "raster") -> list[torch.Tensor]:
    """Token indices of a unit's ``parts`` subsets, each ascending, together covering every token once.

    ``layout`` is the backend's frame layout (an int means a square grid of that many tokens).
    ``raster``: consecutive runs in row-major order (the release's patches: 3.5-row strips at
    P = 196). ``quadrant`` (``parts == 4``): the 2x2 spatial quadrants of the token grid, top-left,
    top-right, bottom-left, bottom-right, row-major inside each (the paper's figure).
    """
    if isinstance(layout, int):
        if patch_layout == "quadrant" and parts == 4 and math.isqrt(layout) ** 2 != layout:
            raise ValueError(f"patch_layout: quadrant needs a square token grid, got {layout} tokens")
        layout = FrameLayout.square(layout) if patch_layout == "quadrant" else FrameLayout((1, layout))
    tokens = layout.tokens
    if parts == 1:
        return [torch.arange(tokens)]
    if patch_layout == "raster":
        return list(torch.arange(tokens).tensor_split(parts))
    if patch_layout != "quadrant" or parts != 4:
        raise ValueError(f"patch_layout: {patch_layout!r} with {parts} parts is not supported")
    rows, cols = layout.grid
    if rows < 2 or cols < 2:
        raise ValueError(f"patch_layout: quadrant needs a token grid of at least 2x2, got {rows}x{cols}")
    grid = torch.arange(tokens).reshape(rows, cols)
    row_halves = (slice(0, (rows + 1) // 2), slice((rows + 1) // 2, rows))
    col_halves = (slice(0, (cols + 1) // 2), slice((cols + 1) // 2, cols))
    return [grid[r, c].reshape(-1) for r in row_halves for c in col_halves]


def patch_token_indices(layout: FrameLayout | int, patch_layout: str) -> list[torch.Tensor]:
    """The four patch subsets of a unit (method.md section 2)."""
    return part_indices(layout, 4, patch_layout)
