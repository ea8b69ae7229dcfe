"""Video sources and frame preprocessing (names load on first use: sources need no torch)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FramePreprocessor": "mukv.video.preprocess",
    "FrameBatch": "mukv.video.sources",
    "FrameStream": "mukv.video.sources",
    "PushStream": "mukv.video.sources",
    "from_array": "mukv.video.sources",
    "open_npy": "mukv.video.sources",
    "open_source": "mukv.video.sources",
    "open_video": "mukv.video.sources",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mukv.video' has no attribute {name!r}")
