"""Frame preprocessing without torchvision.

Matches transformers' LLaVA-OneVision video processor: resize to the tower's square input with
antialiased bicubic interpolation, rescale to [0, 1], normalise with the checkpoint's mean/std.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Files that may carry video preprocessing parameters, most specific first: transformers 5.x
# writes ``video_preprocessor_config.json``, older releases a ``video_processor/`` folder, and
# every LLaVA-OneVision checkpoint has the image processor's ``preprocessor_config.json``.
PREPROCESSOR_FILES = (
    "video_preprocessor_config.json",
    "video_processor/preprocessor_config.json",
    "preprocessor_config.json",
)


def as_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate and wrap uint8 frames ``[T, H, W, 3]`` (a single ``[H, W, 3]`` frame is promoted)."""
    tensor = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"frames: expected a numpy array or tensor, got {type(frames).__name__}")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"frames: expected shape [T, H, W, 3], got {list(tensor.shape)}")
    if tensor.dtype != torch.uint8:
        raise ValueError(f"frames: expected uint8 RGB values, got {tensor.dtype}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ValueError(f"frames: empty frame array of shape {list(tensor.shape)}")
    return tensor


@dataclass(frozen=True, kw_only=True)
class FramePreprocessor:
    """Resize + normalise frames for a vision tower with a square input of ``size`` pixels."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size: must be >= 1, got {self.size}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: must be positive, got {self.std}")

    def __call__(
        self,
        frames: np.ndarray | torch.Tensor,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> normalised ``[T, 3, size, size]`` in ``dtype`` on ``device``."""
        x = as_frames(frames).to(device).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        x = x * self.rescale_factor
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)

    @classmethod
    def from_config_dict(cls, data: dict, *, tower_size: int) -> FramePreprocessor:
        """Build from a preprocessor config dict; the tower's input size wins if they disagree."""
        size = _size_from(data.get("size"), tower_size)
        if size != tower_size:
            log.warning(
                "preprocessor size %s differs from the vision tower's %s; using %s", size, tower_size, tower_size
            )
            size = tower_size
        if data.get("do_normalize", True):
            mean = _triple(data.get("image_mean", (0.5, 0.5, 0.5)), "image_mean")
            std = _triple(data.get("image_std", (0.5, 0.5, 0.5)), "image_std")
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        rescale = float(data.get("rescale_factor", 1 / 255)) if data.get("do_rescale", True) else 1.0
        return cls(size=size, mean=mean, std=std, rescale_factor=rescale)

    @classmethod
    def from_directory(cls, directory: Path, *, tower_size: int) -> FramePreprocessor:
        """Read the first preprocessing file present in ``directory`` (defaults if none)."""
        for name in PREPROCESSOR_FILES:
            path = directory / name
            if path.is_file():
                return cls.from_config_dict(json.loads(path.read_text()), tower_size=tower_size)
        log.info("no preprocessor config in %s; using size %d and mean = std = 0.5", directory, tower_size)
        return cls(size=tower_size)


def _size_from(size: object, default: int) -> int:
    if isinstance(size, dict):
        for key in ("height", "shortest_edge", "width"):
            if key in size:
                return int(size[key])
    if isinstance(size, int):
        return size
    return default


def _triple(values: Sequence[float] | float, name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3  # type: ignore[return-value]
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"{name}: expected 3 values, got {len(vals)}")
    return vals  # type: ignore[return-value]
