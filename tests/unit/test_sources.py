"""Unit tests for :mod:`mukv.video.sources`: files, arrays and live pushes become frame streams."""

from __future__ import annotations

import math
import re
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mukv.errors import VideoError
from mukv.video.sources import (
    FrameBatch,
    FrameStream,
    PushStream,
    from_array,
    open_npy,
    open_source,
    open_video,
)

NATIVE_FPS = 10
NUM_FRAMES = 60  # 6 s at 10 fps
WIDTH, HEIGHT = 64, 48
LEVEL = 4  # frame i is a solid grey of brightness LEVEL * i


# --------------------------------------------------------------------------------------------
# helpers


def write_video(path: Path, codec: str, n: int = NUM_FRAMES, fps: int = NATIVE_FPS) -> Path:
    """A small mp4 whose frame ``i`` is a solid grey of brightness ``LEVEL * i``."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0", "preset": "ultrafast"}
        else:
            stream.bit_rate = 4_000_000
        for i in range(n):
            image = np.full((HEIGHT, WIDTH, 3), LEVEL * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_index(image: np.ndarray) -> int:
    """The index encoded in a decoded solid-grey frame (colour conversion is off by at most 1)."""
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert image.dtype == np.uint8
    assert int(image.max()) - int(image.min()) <= 2, "frame is not a solid grey"
    return round(float(image.mean()) / LEVEL)


def drain(stream: FrameStream, max_frames: int = 1000) -> tuple[list[float], list[np.ndarray]]:
    times: list[float] = []
    images: list[np.ndarray] = []
    while (batch := stream.next_batch(max_frames)) is not None:
        assert isinstance(batch, FrameBatch)
        assert 1 <= len(batch) <= max_frames
        assert batch.frames.shape[0] == batch.timestamps.shape[0] == len(batch)
        assert batch.timestamps.dtype == np.float64
        times.extend(batch.timestamps.tolist())
        images.extend(batch.frames)
    return times, images


def indexed_frames(n: int, height: int = 6, width: int = 5) -> np.ndarray:
    """uint8 frames [n, H, W, 3] where frame i is filled with the value i."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, height, width, 3)).copy()


def path_pattern(path: Path) -> str:
    return re.escape(str(path))


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", params=["libx264", "mpeg4"])
def video_path(request, tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / f"clip_{request.param}.mp4", request.param)


@pytest.fixture(scope="module")
def h264_path(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("h264") / "clip.mp4", "libx264")


# --------------------------------------------------------------------------------------------
# open_video: sampling


@pytest.mark.parametrize("sample_fps", [0.5, 1.0, 2.0])
def test_open_video_samples_expected_timestamps_and_frames(video_path, sample_fps):
    stream = open_video(video_path, sample_fps=sample_fps)
    times, images = drain(stream)
    expected_times = [k / sample_fps for k in range(int(6 * sample_fps))]
    assert times == pytest.approx(expected_times, abs=1e-6)
    assert [frame_index(image) for image in images] == [round(t * NATIVE_FPS) for t in expected_times]
    assert stream.exhausted
    assert stream.next_time() is None
    assert stream.next_batch(4) is None


def test_open_video_half_fps_content(video_path):
    times, images = drain(open_video(video_path, sample_fps=0.5))
    assert times == pytest.approx([0.0, 2.0, 4.0], abs=1e-6)
    assert [frame_index(image) for image in images] == [0, 20, 40]


def test_open_video_default_rate_is_half_fps(h264_path):
    times, _ = drain(open_video(h264_path))
    assert times == pytest.approx([0.0, 2.0, 4.0], abs=1e-6)


def test_open_video_keeps_first_frame_at_or_after_each_sampling_time(h264_path):
    # At 3 fps the sampling times 0, 1/3, 2/3, 1, ... fall between 10 fps frames.
    times, images = drain(open_video(h264_path, sample_fps=3.0))
    expected = [math.ceil(k * NATIVE_FPS / 3 - 1e-9) for k in range(18)]
    assert expected[:7] == [0, 4, 7, 10, 14, 17, 20]
    assert [frame_index(image) for image in images] == expected
    assert times == pytest.approx([i / NATIVE_FPS for i in expected], abs=1e-6)


@pytest.mark.parametrize("sample_fps", [10.0, 25.0])
def test_open_video_at_or_above_native_rate_keeps_every_frame(h264_path, sample_fps):
    times, images = drain(open_video(h264_path, sample_fps=sample_fps))
    assert [frame_index(image) for image in images] == list(range(NUM_FRAMES))
    assert times == pytest.approx([i / NATIVE_FPS for i in range(NUM_FRAMES)], abs=1e-6)


@pytest.mark.parametrize("sample_fps", [0.5, 1.0, 2.0, 10.0])
def test_open_video_timestamps_strictly_increase_across_batches(video_path, sample_fps):
    times, _ = drain(open_video(video_path, sample_fps=sample_fps), max_frames=3)
    assert times[0] == 0.0
    assert np.all(np.diff(times) > 0)


@pytest.mark.parametrize("sample_fps", [0.5, 1.0, 2.0])
def test_open_video_expected_frames_is_close_to_actual(video_path, sample_fps):
    stream = open_video(video_path, sample_fps=sample_fps)
    actual = len(drain(stream)[0])
    assert actual == int(6 * sample_fps)
    assert stream.expected_frames is not None
    assert abs(stream.expected_frames - actual) <= 1


def test_open_video_expected_frames_capped_by_native_frame_count(h264_path):
    stream = open_video(h264_path, sample_fps=20.0)
    assert len(drain(stream)[0]) == NUM_FRAMES
    assert stream.expected_frames is not None
    assert stream.expected_frames <= NUM_FRAMES + 1


@pytest.mark.parametrize("max_frames", [1, 2, 3, 7, 100])
def test_open_video_batches_yield_every_sampled_frame_once(h264_path, max_frames):
    reference_times, reference_images = drain(open_video(h264_path, sample_fps=2.0), max_frames=1000)
    assert len(reference_times) == 12
    times, images = drain(open_video(h264_path, sample_fps=2.0), max_frames=max_frames)
    assert times == reference_times
    assert [frame_index(i) for i in images] == [frame_index(i) for i in reference_images]


def test_iterating_a_stream_yields_batches_of_eight(h264_path):
    batches = list(open_video(h264_path, sample_fps=2.0))
    assert [len(b) for b in batches] == [8, 4]
    indices = [frame_index(image) for batch in batches for image in batch.frames]
    assert indices == list(range(0, NUM_FRAMES, 5))


# --------------------------------------------------------------------------------------------
# next_batch(until=...)


def test_next_batch_until_never_returns_later_frames(h264_path):
    stream = open_video(h264_path, sample_fps=2.0)  # frames at 0, 0.5, ..., 5.5
    first = stream.next_batch(100, until=1.9)
    assert first is not None
    assert first.timestamps.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert [frame_index(i) for i in first.frames] == [0, 5, 10, 15]
    # The frame at 2.0 stays in the stream.
    assert stream.next_time() == pytest.approx(2.0)
    assert stream.next_batch(100, until=1.9) is None
    assert not stream.exhausted
    # ``until`` is inclusive, and max_frames still limits the batch.
    second = stream.next_batch(2, until=3.0)
    assert second is not None
    assert second.timestamps.tolist() == pytest.approx([2.0, 2.5])
    third = stream.next_batch(100, until=3.0)
    assert third is not None
    assert third.timestamps.tolist() == pytest.approx([3.0])
    rest = stream.next_batch(100)
    assert rest is not None
    assert rest.timestamps.tolist() == pytest.approx([3.5, 4.0, 4.5, 5.0, 5.5])
    assert [frame_index(i) for i in rest.frames] == [35, 40, 45, 50, 55]
    assert stream.next_batch(100) is None
    assert stream.exhausted


@pytest.mark.parametrize("until", [0.0, 0.2, 2.0, 2.4, 5.5, 100.0])
def test_next_batch_until_splits_at_the_right_frame(until):
    stream = from_array(indexed_frames(30), fps=5.0)  # frames at i / 5
    before = stream.next_batch(100, until=until)
    after = stream.next_batch(100)
    before_times = [] if before is None else before.timestamps.tolist()
    after_times = [] if after is None else after.timestamps.tolist()
    assert all(t <= until for t in before_times)
    assert all(t > until for t in after_times)
    assert before_times + after_times == pytest.approx([i / 5 for i in range(30)])


def test_next_batch_until_before_first_frame_returns_none():
    stream = from_array(indexed_frames(3), timestamps=[1.0, 2.0, 3.0])
    assert stream.next_batch(4, until=0.5) is None
    assert stream.next_time() == 1.0
    batch = stream.next_batch(4, until=1.0)
    assert batch is not None
    assert batch.timestamps.tolist() == [1.0]


@pytest.mark.parametrize("max_frames", [0, -1])
def test_next_batch_rejects_non_positive_max_frames(max_frames):
    stream = from_array(indexed_frames(3), fps=1.0)
    with pytest.raises(ValueError, match="max_frames"):
        stream.next_batch(max_frames)


def test_close_ends_a_partly_read_video(h264_path):
    stream = open_video(h264_path, sample_fps=2.0)
    assert stream.next_batch(2) is not None
    stream.close()
    assert stream.exhausted
    assert stream.next_batch(4) is None


# --------------------------------------------------------------------------------------------
# open_video / open_source: errors


def test_open_video_missing_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match=f"not found: {path_pattern(missing)}"):
        open_video(missing)


def test_open_video_directory_is_not_a_video(tmp_path):
    with pytest.raises(VideoError, match=path_pattern(tmp_path)):
        open_video(tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        b"hello, this is not a video\n",
        np.random.default_rng(0).bytes(4096),
        b"",
    ],
    ids=["text", "random-bytes", "empty-file"],
)
def test_open_video_corrupt_file(tmp_path, content):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match=f"{path_pattern(path)}: cannot open as a video"):
        open_video(path)


def test_open_video_truncated_file(tmp_path, h264_path):
    path = tmp_path / "truncated.mp4"
    data = h264_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=path_pattern(path)):
        open_video(path)


def test_open_video_corrupt_packets_fail_while_decoding(tmp_path, h264_path):
    data = bytearray(h264_path.read_bytes())
    mdat = data.find(b"mdat")
    size = struct.unpack(">I", data[mdat - 4 : mdat])[0]
    start = mdat + 4 + (size - 8) // 2
    data[start : start + 200] = b"\xff" * 200
    path = tmp_path / "garbled.mp4"
    path.write_bytes(bytes(data))
    with pytest.raises(VideoError, match=f"{path_pattern(path)}: decoding failed"):
        stream = open_video(path, sample_fps=10.0)
        drain(stream, max_frames=1)


def test_open_video_audio_only_file(tmp_path):
    import av

    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        stream.layout = "mono"
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 8000
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoError, match=f"{path_pattern(path)}: has no video stream"):
        open_video(path)


def test_open_video_mp4_without_frames(tmp_path):
    import av

    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.start_encoding()
    assert path.stat().st_size > 0
    with pytest.raises(VideoError, match=path_pattern(path)):
        open_video(path)


def test_open_video_video_stream_with_zero_frames(tmp_path):
    # A valid y4m header declares a video stream, but no frame follows.
    path = tmp_path / "header_only.y4m"
    path.write_bytes(b"YUV4MPEG2 W64 H48 F10:1 Ip A1:1 C420jpeg\n")
    with pytest.raises(VideoError, match=f"{path_pattern(path)}: no frames"):
        open_video(path)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, math.inf, "2"])
def test_open_video_rejects_bad_sample_fps(h264_path, bad):
    with pytest.raises(ValueError, match="sample_fps: must be a positive number"):
        open_video(h264_path, sample_fps=bad)


def test_open_source_opens_videos(h264_path):
    times, images = drain(open_source(h264_path, sample_fps=1.0))
    assert times == pytest.approx([float(k) for k in range(6)], abs=1e-6)
    assert [frame_index(i) for i in images] == [0, 10, 20, 30, 40, 50]
    times, _ = drain(open_source(str(h264_path), npy_fps=30.0))
    assert times == pytest.approx([0.0, 2.0, 4.0], abs=1e-6)


@pytest.mark.parametrize("name", ["frames.npy", "FRAMES.NPY"])
def test_open_source_npy_without_fps(tmp_path, name):
    path = tmp_path / name
    with path.open("wb") as file:
        np.save(file, indexed_frames(4))
    with pytest.raises(ValueError, match=rf"{path_pattern(path)}: an \.npy frame array needs its frame rate"):
        open_source(path)


def test_open_source_npy_with_fps(tmp_path):
    path = tmp_path / "frames.npy"
    np.save(path, indexed_frames(30))
    times, images = drain(open_source(path, sample_fps=2.0, npy_fps=10.0))
    assert times == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert [int(i[0, 0, 0]) for i in images] == [0, 5, 10, 15, 20, 25]


def test_open_source_missing_video(tmp_path):
    with pytest.raises(VideoError, match=path_pattern(tmp_path / "x.mkv")):
        open_source(tmp_path / "x.mkv")


# --------------------------------------------------------------------------------------------
# open_npy


@pytest.fixture
def npy30(tmp_path) -> tuple[Path, np.ndarray]:
    array = np.random.default_rng(1).integers(0, 256, (30, 6, 5, 3), dtype=np.uint8)
    path = tmp_path / "frames.npy"
    np.save(path, array)
    return path, array


def test_open_npy_sub_samples_at_sample_fps(npy30):
    path, array = npy30
    stream = open_npy(path, fps=10.0, sample_fps=2.0)
    assert stream.expected_frames == 6
    assert stream.name == str(path)
    times, images = drain(stream)
    indices = [0, 5, 10, 15, 20, 25]
    assert times == pytest.approx([i / 10 for i in indices])
    np.testing.assert_array_equal(np.stack(images), array[indices])


def test_open_npy_nearest_frame_for_non_integer_step(npy30):
    path, array = npy30
    times, images = drain(open_npy(path, fps=10.0, sample_fps=3.0))
    indices = [0, 3, 7, 10, 13, 17, 20, 23, 27]
    assert times == pytest.approx([i / 10 for i in indices])
    np.testing.assert_array_equal(np.stack(images), array[indices])


@pytest.mark.parametrize("sample_fps", [None, 10.0, 30.0])
def test_open_npy_keeps_every_frame(npy30, sample_fps):
    path, array = npy30
    stream = open_npy(path, fps=10.0, sample_fps=sample_fps)
    assert stream.expected_frames == 30
    times, images = drain(stream, max_frames=4)
    assert times == pytest.approx([i / 10 for i in range(30)])
    np.testing.assert_array_equal(np.stack(images), array)


def test_open_npy_default_sample_fps_is_half(npy30):
    path, array = npy30
    times, images = drain(open_npy(path, fps=2.0))  # one frame in four
    assert times == pytest.approx([0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0])
    np.testing.assert_array_equal(np.stack(images), array[::4])


def test_open_npy_memory_maps_the_file(npy30, monkeypatch):
    path, array = npy30
    calls: list[dict] = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    stream = open_npy(path, fps=10.0, sample_fps=None)
    assert [c.get("mmap_mode") for c in calls] == ["r"]
    batch = stream.next_batch(30)
    assert batch is not None
    assert not isinstance(batch.frames, np.memmap)
    np.testing.assert_array_equal(batch.frames, array)


def test_open_npy_missing_file(tmp_path):
    missing = tmp_path / "missing.npy"
    with pytest.raises(VideoError, match=f"not found: {path_pattern(missing)}"):
        open_npy(missing, fps=10.0)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 6, 5, 3), np.float32),
        np.zeros((4, 6, 5, 3), np.int64),
        np.zeros((4, 6, 5), np.uint8),
        np.zeros((4, 6, 5, 4), np.uint8),
        np.zeros((6, 5, 3), np.uint8),
        np.zeros((2, 4, 6, 5, 3), np.uint8),
    ],
    ids=["float32", "int64", "no-channels", "rgba", "single-frame", "5d"],
)
def test_open_npy_wrong_dtype_or_shape(tmp_path, array):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(VideoError, match=f"{path_pattern(path)}: expected uint8 frames"):
        open_npy(path, fps=10.0)


def test_open_npy_empty_array(tmp_path):
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((0, 6, 5, 3), np.uint8))
    with pytest.raises(VideoError, match=f"{path_pattern(path)}: no frames"):
        open_npy(path, fps=10.0)


def test_open_npy_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"definitely not numpy" * 5)
    with pytest.raises(VideoError, match=rf"{path_pattern(garbage)}: not a readable \.npy frame array"):
        open_npy(garbage, fps=10.0)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(VideoError, match=rf"{path_pattern(objects)}: not a readable \.npy frame array"):
        open_npy(objects, fps=10.0)


@pytest.mark.parametrize("bad", [0, -5.0, math.nan, math.inf])
def test_open_npy_rejects_bad_rates(npy30, bad):
    path, _ = npy30
    with pytest.raises(ValueError, match=r"^fps: must be a positive number"):
        open_npy(path, fps=bad)
    with pytest.raises(ValueError, match="sample_fps: must be a positive number"):
        open_npy(path, fps=10.0, sample_fps=bad)


# --------------------------------------------------------------------------------------------
# from_array


def test_from_array_with_fps():
    frames = indexed_frames(7)
    stream = from_array(frames, fps=4.0, name="mine")
    assert stream.name == "mine"
    assert stream.expected_frames == 7
    times, images = drain(stream)
    assert times == pytest.approx([i / 4 for i in range(7)])
    np.testing.assert_array_equal(np.stack(images), frames)


def test_from_array_with_fps_and_sample_fps():
    times, images = drain(from_array(indexed_frames(20), fps=10.0, sample_fps=5.0))
    assert times == pytest.approx([i / 10 for i in range(0, 20, 2)])
    assert [int(i[0, 0, 0]) for i in images] == list(range(0, 20, 2))


def test_from_array_with_timestamps():
    frames = indexed_frames(4)
    times, images = drain(from_array(frames, timestamps=[0.0, 0.25, 1.7, 9.0]))
    assert times == [0.0, 0.25, 1.7, 9.0]
    np.testing.assert_array_equal(np.stack(images), frames)


def test_from_array_accepts_a_list_of_frames():
    frames = list(indexed_frames(3))
    times, images = drain(from_array(frames, fps=1.0))
    assert times == [0.0, 1.0, 2.0]
    assert [int(i[0, 0, 0]) for i in images] == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"fps": 2.0, "timestamps": [0.0, 1.0, 2.0]}],
    ids=["neither", "both"],
)
def test_from_array_needs_exactly_one_of_fps_or_timestamps(kwargs):
    with pytest.raises(ValueError, match="exactly one of fps or timestamps"):
        from_array(indexed_frames(3), **kwargs)


@pytest.mark.parametrize("timestamps", [[0.0, 1.0], [0.0, 1.0, 2.0, 3.0], [[0.0, 1.0, 2.0]], []])
def test_from_array_wrong_number_of_timestamps(timestamps):
    with pytest.raises(ValueError, match="timestamps: expected 3 values"):
        from_array(indexed_frames(3), timestamps=timestamps)


@pytest.mark.parametrize("timestamps", [[0.0, 1.0, 1.0], [0.0, 2.0, 1.0]])
def test_from_array_non_increasing_timestamps_fail_when_read(timestamps):
    stream = from_array(indexed_frames(3), timestamps=timestamps, name="clip")
    first = stream.next_batch(2)
    assert first is not None
    assert first.timestamps.tolist() == timestamps[:2]
    with pytest.raises(VideoError, match=r"clip: timestamps must increase"):
        stream.next_batch(2)


def test_from_array_non_increasing_timestamps_fail_within_a_batch():
    stream = from_array(indexed_frames(3), timestamps=[0, 1, 1])
    assert stream.next_batch(8).timestamps.tolist() == [0, 1]  # the good frames first
    with pytest.raises(VideoError, match="timestamps must increase"):
        stream.next_batch(8)


@pytest.mark.parametrize("timestamps", [[0.0, math.nan, 1.0], [math.nan, 0.0, 1.0]])
def test_from_array_nan_timestamps_are_rejected(timestamps):
    with pytest.raises(VideoError):
        stream = from_array(indexed_frames(3), timestamps=timestamps)
        drain(stream)


@pytest.mark.parametrize("kwargs", [{"fps": 1.0}, {"timestamps": [0.0, 1.0]}])
@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 4, 4, 3), np.float32),
        np.zeros((2, 4, 4), np.uint8),
        np.zeros((2, 4, 4, 1), np.uint8),
    ],
    ids=["float32", "3d", "one-channel"],
)
def test_from_array_wrong_frames(kwargs, frames):
    with pytest.raises(VideoError, match="mine: expected"):
        from_array(frames, name="mine", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fps": 1.0}, r"clip: no frames"),
        ({"timestamps": []}, r"clip: expected frames .* with N >= 1, got \[0, 4, 4, 3\]"),
    ],
    ids=["fps", "timestamps"],
)
def test_from_array_empty(kwargs, message):
    with pytest.raises(VideoError, match=message):
        from_array(np.zeros((0, 4, 4, 3), np.uint8), name="clip", **kwargs)


@pytest.mark.parametrize("bad", [0, -2.0, math.nan, math.inf])
def test_from_array_rejects_bad_fps(bad):
    with pytest.raises(ValueError, match=r"^fps: must be a positive number"):
        from_array(indexed_frames(3), fps=bad)


@pytest.mark.parametrize("bad", [0, -2.0, math.nan, math.inf])
def test_from_array_rejects_bad_sample_fps(bad):
    with pytest.raises(ValueError, match=r"^sample_fps: must be a positive number"):
        from_array(indexed_frames(3), fps=10.0, sample_fps=bad)


@pytest.mark.parametrize("fps", [np.float32(10.0), np.int64(10)])
def test_from_array_accepts_numpy_scalar_fps(fps):
    times, _ = drain(from_array(indexed_frames(3), fps=fps))
    assert times == pytest.approx([0.0, 0.1, 0.2])


# --------------------------------------------------------------------------------------------
# FrameStream over a plain iterator


def test_frame_stream_peeks_without_consuming():
    frames = indexed_frames(3)
    stream = FrameStream(iter([(frames[0], 0.5), (frames[1], 1.5), (frames[2], 2.5)]), name="it")
    assert stream.expected_frames is None
    assert stream.next_time() == 0.5
    assert stream.next_time() == 0.5
    assert not stream.exhausted
    batch = stream.next_batch(2)
    assert batch is not None
    assert batch.timestamps.tolist() == [0.5, 1.5]
    assert stream.next_time() == 2.5
    assert stream.next_batch(2).timestamps.tolist() == [2.5]
    assert stream.exhausted
    assert stream.next_time() is None


# --------------------------------------------------------------------------------------------
# PushStream


def solid(value: int) -> np.ndarray:
    return np.full((4, 5, 3), value, dtype=np.uint8)


def test_push_stream_from_another_thread():
    stream = PushStream(name="cam", timeout=5.0)
    n = 25

    def produce():
        for i in range(n):
            stream.push(solid(i), i * 0.5)
        stream.end()

    producer = threading.Thread(target=produce)
    producer.start()
    times, images = drain(stream, max_frames=4)
    producer.join(timeout=5.0)
    assert not producer.is_alive()
    assert times == [i * 0.5 for i in range(n)]
    assert [int(i[0, 0, 0]) for i in images] == list(range(n))
    assert stream.exhausted


def test_push_stream_returns_what_has_been_pushed_without_waiting():
    stream = PushStream(timeout=2.0)
    for i in range(3):
        stream.push(solid(i), float(i))
    assert stream.available() == 3
    start = time.monotonic()
    batch = stream.next_batch(10)
    assert time.monotonic() - start < 0.5
    assert batch is not None
    assert batch.timestamps.tolist() == [0.0, 1.0, 2.0]
    assert [int(i[0, 0, 0]) for i in batch.frames] == [0, 1, 2]
    assert stream.available() == 0
    stream.push(solid(3), 3.0)
    stream.push(solid(4), 4.0)
    batch = stream.next_batch(1)
    assert batch is not None
    assert batch.timestamps.tolist() == [3.0]
    assert stream.available() == 1
    stream.end()
    assert stream.next_batch(10).timestamps.tolist() == [4.0]
    assert stream.next_batch(10) is None


def test_push_stream_waits_for_the_first_frame():
    stream = PushStream(timeout=5.0)
    timer = threading.Timer(0.1, lambda: stream.push(solid(7), 1.25))
    timer.start()
    try:
        batch = stream.next_batch(4)
    finally:
        timer.join()
    assert batch is not None
    assert batch.timestamps.tolist() == [1.25]
    assert int(batch.frames[0, 0, 0, 0]) == 7


def test_push_stream_end_ends_iteration():
    stream = PushStream()
    stream.push(solid(1), 0.0)
    stream.push(solid(2), 1.0)
    stream.end()
    stream.end()  # idempotent
    batches = list(stream)
    assert [b.timestamps.tolist() for b in batches] == [[0.0, 1.0]]
    assert stream.exhausted
    assert stream.next_batch(4) is None


def test_push_stream_end_with_nothing_pushed():
    stream = PushStream()
    stream.end()
    assert stream.next_batch(4) is None
    assert stream.exhausted


def test_push_after_end_raises():
    stream = PushStream(name="cam0")
    stream.push(solid(0), 0.0)
    stream.end()
    with pytest.raises(VideoError, match="cam0: stream already ended"):
        stream.push(solid(1), 1.0)
    assert stream.next_batch(4).timestamps.tolist() == [0.0]
    assert stream.next_batch(4) is None


@pytest.mark.parametrize(
    "frame",
    [np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), np.uint8), np.zeros((2, 4, 5, 3), np.uint8)],
    ids=["float32", "2d", "batch"],
)
def test_push_rejects_bad_frames(frame):
    stream = PushStream(name="cam1")
    with pytest.raises(VideoError, match="cam1: expected uint8 RGB frames"):
        stream.push(frame, 0.0)
    assert stream.available() == 0


def test_push_stream_until_leaves_later_frames():
    stream = PushStream(timeout=2.0)
    for t in (0.0, 1.0, 2.0):
        stream.push(solid(int(t)), t)
    batch = stream.next_batch(10, until=1.5)
    assert batch is not None
    assert batch.timestamps.tolist() == [0.0, 1.0]
    start = time.monotonic()
    assert stream.next_batch(10, until=1.5) is None
    assert time.monotonic() - start < 0.5
    assert stream.next_time() == 2.0
    stream.end()
    assert stream.next_batch(10).timestamps.tolist() == [2.0]


def test_push_stream_refuses_a_non_increasing_timestamp_at_push():
    stream = PushStream(name="live")
    stream.push(solid(0), 1.0)
    with pytest.raises(VideoError, match="live: timestamps must increase"):
        stream.push(solid(1), 1.0)
    stream.end()
    assert stream.next_batch(4).timestamps.tolist() == [1.0]


def test_push_stream_a_rejected_frame_costs_no_good_frame():
    stream = PushStream(name="live")
    stream.push(solid(1), 1.0)
    with pytest.raises(VideoError, match=r"timestamps must increase \(0.5 after 1.0\)"):
        stream.push(solid(2), 0.5)
    stream.push(solid(3), 2.0)
    stream.end()
    batch = stream.next_batch(8)
    assert batch.timestamps.tolist() == [1.0, 2.0]
    assert [int(i[0, 0, 0]) for i in batch.frames] == [1, 3]


@pytest.mark.parametrize("timestamp", [math.nan, math.inf, -math.inf, "1.0", None, True])
def test_push_stream_refuses_a_timestamp_that_is_not_a_finite_number(timestamp):
    stream = PushStream(name="live")
    with pytest.raises(VideoError, match="not a finite number of seconds"):
        stream.push(solid(0), timestamp)
    assert stream.available() == 0


def test_a_bad_frame_in_a_stream_is_reported_after_the_good_frames_before_it():
    frames = iter([(solid(1), 1.0), (solid(2), 0.5), (solid(3), 2.0)])
    stream = FrameStream(frames, name="gen")
    assert stream.next_batch(8).timestamps.tolist() == [1.0]
    with pytest.raises(VideoError, match="gen: timestamps must increase"):
        stream.next_batch(8)
    assert stream.next_batch(8).timestamps.tolist() == [2.0]


def test_a_decoding_error_mid_stream_comes_after_the_frames_decoded_before_it():
    def frames():
        yield solid(1), 0.0
        yield solid(2), 2.0
        raise VideoError("clip.mp4: decoding failed after the frame at 2.0 s")

    stream = FrameStream(frames(), name="clip.mp4")
    batch = stream.next_batch(8)
    assert batch.timestamps.tolist() == [0.0, 2.0]
    assert stream.error is not None
    with pytest.raises(VideoError, match=r"decoding failed after the frame at 2\.0 s"):
        stream.next_batch(8)
    assert stream.next_batch(8) is None and stream.exhausted and stream.error is None


def test_push_stream_timeout_returns_none():
    stream = PushStream(timeout=0.05)
    start = time.monotonic()
    assert stream.next_batch(4) is None
    assert 0.03 <= time.monotonic() - start < 1.0


def test_push_stream_frames_pushed_after_a_timeout_are_not_lost():
    stream = PushStream(timeout=0.05)
    assert stream.next_batch(4) is None
    try:
        stream.push(solid(5), 1.0)
    except VideoError:
        return  # refusing the push would also be acceptable: nothing is lost silently
    batch = stream.next_batch(4)
    assert batch is not None
    assert batch.timestamps.tolist() == [1.0]


def test_a_damaged_npy_is_named_without_advice_to_unpickle(tmp_path):
    path = tmp_path / "clip.npy"
    path.write_bytes(bytes(range(256)) + b"\x93NUMPY garbage")
    with pytest.raises(VideoError, match=r"clip\.npy: not a readable \.npy frame array") as caught:
        open_npy(path, fps=2.0)
    assert "unsafely" not in str(caught.value) and "allow_pickle" not in str(caught.value)
