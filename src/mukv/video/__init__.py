"""Video sources and frame preprocessing."""

from mukv.video.preprocess import FramePreprocessor
from mukv.video.sources import FrameBatch, FrameStream, PushStream, from_array, open_npy, open_source, open_video

__all__ = [
    "FrameBatch",
    "FramePreprocessor",
    "FrameStream",
    "PushStream",
    "from_array",
    "open_npy",
    "open_source",
    "open_video",
]
