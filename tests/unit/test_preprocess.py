"""Unit tests for :mod:`mukv.video.preprocess`: resize + rescale + normalise, and config loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mukv.video import preprocess
from mukv.video.preprocess import PREPROCESSOR_FILES, FramePreprocessor, as_frames

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def reference(
    frames: np.ndarray, size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), scale: float = 1 / 255
) -> torch.Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True)
    x = x / 255 if scale == 1 / 255 else x * scale
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --------------------------------------------------------------------------------------------
# FramePreprocessor.__call__


@pytest.mark.parametrize(("t", "h", "w"), [(1, 48, 64), (3, 112, 112), (2, 150, 200), (1, 7, 300)])
@pytest.mark.parametrize("size", [32, 112])
def test_output_shape_and_dtype(t, h, w, size):
    out = FramePreprocessor(size=size)(random_frames(t, h, w))
    assert out.shape == (t, 3, size, size)
    assert out.dtype == torch.float32
    assert out.device.type == "cpu"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_output_dtype_follows_argument(dtype):
    frames = random_frames(2, 40, 30)
    out = FramePreprocessor(size=16)(frames, dtype=dtype, device="cpu")
    assert out.dtype == dtype
    full = FramePreprocessor(size=16)(frames)
    torch.testing.assert_close(out.float(), full.to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("mean", "std", "scale"),
    [
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1 / 255),
        (CLIP_MEAN, CLIP_STD, 1 / 255),
        ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0),
        ((0.1, 0.2, 0.3), (0.7, 0.8, 0.9), 1 / 127.5),
    ],
)
@pytest.mark.parametrize(("h", "w", "size"), [(48, 64, 112), (150, 200, 112), (96, 128, 24), (30, 30, 31)])
def test_matches_hand_computation(mean, std, scale, h, w, size):
    frames = random_frames(3, h, w, seed=h + w + size)
    pre = FramePreprocessor(size=size, mean=mean, std=std, rescale_factor=scale)
    expected = reference(frames, size, mean, std, scale)
    out = pre(frames)
    assert out.shape == expected.shape
    # 1e-6 on normalised values; relative for the un-normalised [0, 255] case.
    tolerance = 1e-6 * max(1.0, float(expected.abs().max()))
    assert (out - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("size", [8, 112])
def test_identity_size_skips_resize(monkeypatch, size):
    def no_resize(*args, **kwargs):
        raise AssertionError("F.interpolate must not be called for frames already at the target size")

    monkeypatch.setattr(preprocess.F, "interpolate", no_resize)
    frames = random_frames(2, size, size, seed=3)
    out = FramePreprocessor(size=size, mean=CLIP_MEAN, std=CLIP_STD)(frames)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    expected = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # Other sizes do resize (and so hit the patched function).
    with pytest.raises(AssertionError, match="must not be called"):
        FramePreprocessor(size=size)(random_frames(1, size, size + 1))


def test_identity_size_output_range_is_exact():
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    frames[1] = 255
    out = FramePreprocessor(size=16)(frames)
    assert torch.equal(out[0], torch.full((3, 16, 16), -1.0))
    assert torch.equal(out[1], torch.full((3, 16, 16), 1.0))


@pytest.mark.parametrize("level", [0, 1, 64, 128, 200, 255])
@pytest.mark.parametrize(("h", "w"), [(48, 64), (300, 20)])
def test_constant_frames_map_to_normalised_level(level, h, w):
    frames = np.full((1, h, w, 3), level, np.uint8)
    out = FramePreprocessor(size=32)(frames)
    expected = (level / 255 - 0.5) / 0.5
    assert (out - expected).abs().max().item() < 1e-6
    assert -1.0 - 1e-6 <= out.min().item() <= out.max().item() <= 1.0 + 1e-6


def test_channels_stay_in_rgb_order():
    frames = np.zeros((1, 20, 20, 3), np.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 255, 0, 51
    out = FramePreprocessor(size=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(frames)
    assert out[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2], abs=1e-6)


def test_single_frame_is_promoted():
    frame = random_frames(1, 40, 50)[0]
    out = FramePreprocessor(size=20)(frame)
    assert out.shape == (1, 3, 20, 20)
    torch.testing.assert_close(out, reference(frame[None], 20), rtol=0, atol=1e-6)


def test_tensor_and_numpy_inputs_agree():
    frames = random_frames(2, 33, 47)
    pre = FramePreprocessor(size=28)
    torch.testing.assert_close(pre(torch.from_numpy(frames)), pre(frames), rtol=0, atol=0)


def test_non_contiguous_input():
    frames = random_frames(2, 40, 60)[:, ::2, ::3]
    assert not frames.flags.c_contiguous
    out = FramePreprocessor(size=16)(frames)
    torch.testing.assert_close(out, reference(np.ascontiguousarray(frames), 16), rtol=0, atol=1e-6)


def test_input_is_not_modified():
    frames = random_frames(2, 20, 20)
    copy = frames.copy()
    FramePreprocessor(size=20)(frames)
    FramePreprocessor(size=10)(frames)
    np.testing.assert_array_equal(frames, copy)


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"size": -3}])
def test_invalid_size(kwargs):
    with pytest.raises(ValueError, match="size: must be >= 1"):
        FramePreprocessor(**kwargs)


@pytest.mark.parametrize("std", [(0.5, 0.0, 0.5), (-1.0, 1.0, 1.0)])
def test_invalid_std(std):
    with pytest.raises(ValueError, match="std: must be positive"):
        FramePreprocessor(size=8, std=std)


# --------------------------------------------------------------------------------------------
# as_frames


def test_as_frames_wraps_uint8_frames():
    frames = random_frames(3, 5, 4)
    tensor = as_frames(frames)
    assert tensor.dtype == torch.uint8
    assert tensor.shape == (3, 5, 4, 3)
    assert np.array_equal(tensor.numpy(), frames)
    assert as_frames(frames[0]).shape == (1, 5, 4, 3)
    same = torch.from_numpy(frames)
    assert as_frames(same) is same


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 4, 4, 3), np.float32),
        np.zeros((2, 4, 4, 3), np.int16),
        np.zeros((4, 4, 3), np.float64),
        torch.zeros((2, 4, 4, 3), dtype=torch.float32),
        torch.zeros((2, 4, 4, 3), dtype=torch.int8),
    ],
    ids=["np-float32", "np-int16", "np-single-float64", "torch-float32", "torch-int8"],
)
def test_as_frames_wrong_dtype(frames):
    with pytest.raises(ValueError, match="expected uint8"):
        as_frames(frames)


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 4, 4), (2, 4, 4, 4), (2, 4, 4), (4, 4), (4,), (1, 2, 4, 4, 3)],
    ids=["channels-first", "rgba", "grey", "2d", "1d", "5d"],
)
def test_as_frames_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"expected shape \[T, H, W, 3\]"):
        as_frames(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("shape", [(0, 4, 4, 3), (1, 0, 4, 3), (1, 4, 0, 3), (0, 4, 3)])
def test_as_frames_empty(shape):
    with pytest.raises(ValueError, match="empty frame array"):
        as_frames(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("frames", [[[[[0, 0, 0]]]], "frames", None])
def test_as_frames_rejects_other_types(frames):
    with pytest.raises(ValueError, match="expected a numpy array or tensor"):
        as_frames(frames)


def test_preprocessor_call_validates_frames():
    with pytest.raises(ValueError, match="expected uint8"):
        FramePreprocessor(size=8)(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="empty frame array"):
        FramePreprocessor(size=8)(np.zeros((0, 8, 8, 3), np.uint8))


# --------------------------------------------------------------------------------------------
# from_config_dict


@pytest.mark.parametrize(
    "size",
    [{"height": 384, "width": 384}, {"shortest_edge": 384}, {"width": 384}, 384, None],
    ids=["height", "shortest_edge", "width", "int", "missing"],
)
def test_from_config_dict_reads_size(size, caplog):
    data = {} if size is None else {"size": size}
    with caplog.at_level(logging.WARNING, logger="mukv.video.preprocess"):
        pre = FramePreprocessor.from_config_dict(data, tower_size=384)
    assert pre.size == 384
    assert not caplog.records


@pytest.mark.parametrize(
    "size",
    [{"height": 384, "width": 384}, {"shortest_edge": 224}, 336],
    ids=["height", "shortest_edge", "int"],
)
def test_from_config_dict_tower_size_wins(size, caplog):
    with caplog.at_level(logging.WARNING, logger="mukv.video.preprocess"):
        pre = FramePreprocessor.from_config_dict({"size": size}, tower_size=112)
    assert pre.size == 112
    assert len(caplog.records) == 1
    assert "differs from the vision tower's 112" in caplog.records[0].getMessage()


def test_from_config_dict_height_is_preferred_over_shortest_edge(caplog):
    with caplog.at_level(logging.WARNING, logger="mukv.video.preprocess"):
        pre = FramePreprocessor.from_config_dict({"size": {"shortest_edge": 50, "height": 64}}, tower_size=64)
    assert pre.size == 64
    assert not caplog.records


def test_from_config_dict_reads_mean_std_and_rescale():
    data = {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "rescale_factor": 1 / 127.5}
    pre = FramePreprocessor.from_config_dict(data, tower_size=16)
    assert pre == FramePreprocessor(size=16, mean=CLIP_MEAN, std=CLIP_STD, rescale_factor=1 / 127.5)
    frames = random_frames(2, 20, 24)
    expected = reference(frames, 16, CLIP_MEAN, CLIP_STD, 1 / 127.5)
    assert (pre(frames) - expected).abs().max().item() < 1e-5


def test_from_config_dict_defaults():
    pre = FramePreprocessor.from_config_dict({}, tower_size=8)
    assert pre == FramePreprocessor(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale_factor=1 / 255)


def test_from_config_dict_scalar_mean_std():
    pre = FramePreprocessor.from_config_dict({"image_mean": 0.25, "image_std": 2}, tower_size=8)
    assert pre.mean == (0.25, 0.25, 0.25)
    assert pre.std == (2.0, 2.0, 2.0)


def test_from_config_dict_without_normalisation():
    data = {"do_normalize": False, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    pre = FramePreprocessor.from_config_dict(data, tower_size=8)
    assert pre.mean == (0.0, 0.0, 0.0)
    assert pre.std == (1.0, 1.0, 1.0)
    frames = np.full((1, 8, 8, 3), 51, np.uint8)
    assert pre(frames).flatten().tolist() == pytest.approx([0.2] * (3 * 8 * 8), abs=1e-7)


def test_from_config_dict_without_rescale():
    pre = FramePreprocessor.from_config_dict({"do_rescale": False, "rescale_factor": 0.5}, tower_size=8)
    assert pre.rescale_factor == 1.0
    frames = np.full((1, 8, 8, 3), 100, np.uint8)
    assert pre(frames).flatten().tolist() == pytest.approx([(100 - 0.5) / 0.5] * (3 * 8 * 8))


@pytest.mark.parametrize("key", ["image_mean", "image_std"])
def test_from_config_dict_rejects_wrong_length(key):
    with pytest.raises(ValueError, match=f"{key}: expected 3 values, got 2"):
        FramePreprocessor.from_config_dict({key: [0.5, 0.5]}, tower_size=8)


# --------------------------------------------------------------------------------------------
# from_directory


def write_config(directory: Path, name: str, mean: float) -> None:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"size": {"height": 32, "width": 32}, "image_mean": [mean] * 3, "image_std": [0.25] * 3})
    )


def test_preprocessor_files_order():
    assert PREPROCESSOR_FILES == (
        "video_preprocessor_config.json",
        "video_processor/preprocessor_config.json",
        "preprocessor_config.json",
    )


@pytest.mark.parametrize(
    ("present", "expected_mean"),
    [
        ((0, 1, 2), 0.1),
        ((0, 2), 0.1),
        ((0, 1), 0.1),
        ((0,), 0.1),
        ((1, 2), 0.2),
        ((1,), 0.2),
        ((2,), 0.3),
    ],
)
def test_from_directory_picks_most_specific_file(tmp_path, present, expected_mean):
    means = (0.1, 0.2, 0.3)
    for i in present:
        write_config(tmp_path, PREPROCESSOR_FILES[i], means[i])
    pre = FramePreprocessor.from_directory(tmp_path, tower_size=32)
    assert pre == FramePreprocessor(size=32, mean=(expected_mean,) * 3, std=(0.25,) * 3)


def test_from_directory_defaults_when_no_file(tmp_path):
    (tmp_path / "video_processor").mkdir()  # a folder without the file does not count
    (tmp_path / "config.json").write_text("{}")
    pre = FramePreprocessor.from_directory(tmp_path, tower_size=48)
    assert pre == FramePreprocessor(size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale_factor=1 / 255)


def test_from_directory_tower_size_wins(tmp_path):
    write_config(tmp_path, "preprocessor_config.json", 0.3)
    assert FramePreprocessor.from_directory(tmp_path, tower_size=24).size == 24


def test_legacy_checkpoint_preprocessing(legacy_dir, caplog):
    tower_size = json.loads((legacy_dir / "config.json").read_text())["vision_config"]["image_size"]
    assert tower_size == 112
    with caplog.at_level(logging.WARNING, logger="mukv.video.preprocess"):
        pre = FramePreprocessor.from_directory(legacy_dir, tower_size=tower_size)
    assert not caplog.records  # the file's own size agrees with the tower
    assert pre == FramePreprocessor(size=112, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale_factor=1 / 255)
    # The legacy layout keeps the video parameters in video_processor/preprocessor_config.json.
    assert not (legacy_dir / PREPROCESSOR_FILES[0]).exists()
    assert (legacy_dir / PREPROCESSOR_FILES[1]).is_file()
    frames = random_frames(2, 90, 160)
    torch.testing.assert_close(pre(frames), reference(frames, 112), rtol=0, atol=1e-6)
