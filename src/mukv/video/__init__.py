"""Video sources and frame preprocessing (names load on first use: sources need no torch)."""

from __future__ import annotations

from mukv._lazy import lazy_exports

_EXPORTS = {
    "FramePreprocessor": "mukv.video.preprocess",
    "FrameBatch": "mukv.video.sources",
    "FrameStream": "mukv.video.sources",
    "LiveStream": "mukv.video.live",
    "PushStream": "mukv.video.sources",
    "from_array": "mukv.video.sources",
    "open_live": "mukv.video.live",
    "open_npy": "mukv.video.sources",
    "open_source": "mukv.video.sources",
    "open_video": "mukv.video.sources",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
