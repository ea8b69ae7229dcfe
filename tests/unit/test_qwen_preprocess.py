"""Qwen-VL frame preprocessing and prompt pieces, checked against transformers' own processor code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as transformers_smart_resize

from mukv.backends.qwen_vl import QwenFramePreprocessor, smart_resize, square_frame_shape


@pytest.mark.parametrize(("height", "width"), [(96, 128), (480, 854), (30, 30), (2000, 1000)])
def test_smart_resize_is_the_processors_rule(height, width):
    for budget in (56 * 56, 28 * 28 * 256, 28 * 28 * 768):
        assert smart_resize(height, width, 28, 56 * 56, budget) == transformers_smart_resize(
            height, width, 28, 56 * 56, budget
        )


def test_square_frame_shape_at_the_video_processor_default():
    # 28 * 28 * 768 pixels: 27 x 27 merged tokens per temporal group.
    assert square_frame_shape(28 * 28 * 768, 28) == (756, 756)
    assert square_frame_shape(448 * 448, 28) == (448, 448)


def test_patch_layout_equals_the_image_processor_on_a_still_frame():
    """A temporal group of one frame repeated is what the image processor builds from one image:
    same patch order and flattening (``pixel_values [h * w, C * tp * p * p]``)."""
    frame = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=56 * 84
    )
    expected = processor(images=[frame], return_tensors="pt")
    assert expected["image_grid_thw"].tolist() == [[1, 4, 6]]
    mine = QwenFramePreprocessor(shape=(56, 84), patch_size=14, merge_size=2, temporal_patch_size=2)
    patches = mine(np.stack([frame, frame]))
    assert patches.shape == expected["pixel_values"].shape
    # Same size: no resampling on either side, only rescale/normalise and the layout.
    assert torch.allclose(patches, expected["pixel_values"].float(), atol=1e-5)


def test_frames_must_fill_whole_groups_and_shapes_fit_the_patch_grid():
    mine = QwenFramePreprocessor(shape=(56, 84), patch_size=14, merge_size=2, temporal_patch_size=2)
    with pytest.raises(ValueError, match="whole groups"):
        mine(np.zeros((3, 56, 84, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="multiple of 28"):
        QwenFramePreprocessor(shape=(50, 84), patch_size=14, merge_size=2, temporal_patch_size=2)
