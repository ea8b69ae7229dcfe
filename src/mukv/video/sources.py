"""Video sources: every input becomes a :class:`FrameStream` of timestamped RGB frames.

A stream is pulled in batches (``next_batch(max_frames, until=t)``) so that a long video never
sits whole in memory and a question at time ``t`` never sees a later frame. Sources:

- :func:`open_video`: a video file decoded with PyAV, sampled at ``sample_fps``;
- :func:`open_npy`: an ``.npy`` array ``[N, H, W, 3]`` recorded at an explicit ``fps``;
- :func:`from_array`: frames already in memory, with a frame rate or timestamps;
- :class:`PushStream`: frames pushed live by another thread.
"""

from __future__ import annotations

import math
import numbers
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mukv.errors import VideoError

Frame = tuple[np.ndarray, float]


@dataclass(frozen=True)
class FrameBatch:
    """Consecutive frames of a stream: ``frames`` uint8 ``[T, H, W, 3]``, ``timestamps`` seconds ``[T]``."""

    frames: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return int(self.frames.shape[0])


class FrameStream:
    """A pull-based stream of frames with one frame of look-ahead.

    ``expected_frames`` is an estimate for progress bars (``None`` when unknown, e.g. live);
    ``duration`` is the length in seconds the source declares (a file's header), ``None`` when
    unknown: a file that ends well before it was truncated (see :attr:`last_time`).
    ``sample_fps`` is the rate the stream delivers frames at (frames per second; ``None`` when
    unknown, e.g. explicit timestamps): the stream's rate a session places frames by.
    """

    def __init__(
        self,
        frames: Iterator[Frame],
        *,
        name: str,
        expected_frames: int | None = None,
        duration: float | None = None,
        sample_fps: float | None = None,
    ) -> None:
        self.name = name
        self.expected_frames = expected_frames
        self.duration = duration
        self.sample_fps = sample_fps
        self._frames = frames
        self._pending: Frame | None = None
        self._done = False
        self._last_time = -math.inf
        # A decoding error met while looking ahead: raised once the frames before it are taken.
        self._error: VideoError | None = None
        # One stream may be read by a player thread while another asks whether it has ended.
        self._lock = threading.RLock()

    def _pull(self) -> Frame | None:
        """The next frame, or ``None`` if none is available now (``_done`` set at the end)."""
        try:
            return next(self._frames)
        except StopIteration:
            self._done = True
            return None

    def _peek(self) -> Frame | None:
        with self._lock:
            if self._pending is None and not self._done:
                try:
                    self._pending = self._pull()
                except VideoError as exc:
                    self._error, self._done = exc, True
            return self._pending

    def _raise_error(self) -> None:
        """Raise a decoding error met while looking ahead (once)."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def exhausted(self) -> bool:
        """True when every frame has been taken and no more will come."""
        return self._peek() is None and self._done

    @property
    def error(self) -> VideoError | None:
        """A decoding error met while looking ahead, raised by the next :meth:`next_batch` once the
        frames before it are taken (``None`` when there is none)."""
        return self._error

    @property
    def last_time(self) -> float | None:
        """Timestamp of the last frame taken from the stream (``None`` before the first)."""
        return None if self._last_time == -math.inf else self._last_time

    def next_time(self) -> float | None:
        """Timestamp of the next frame, or ``None`` if there is none (yet)."""
        frame = self._peek()
        return None if frame is None else frame[1]

    def next_batch(self, max_frames: int, until: float | None = None) -> FrameBatch | None:
        """Up to ``max_frames`` next frames with timestamp <= ``until`` (any time if ``None``).

        Returns ``None`` when no such frame is available; frames after ``until`` stay in the
        stream. Raises :class:`VideoError` for non-finite or non-increasing timestamps, or a frame
        of another size; good frames before such a frame are returned first (the error comes with
        the next call), so a bad frame never costs a good one.
        """
        if max_frames < 1:
            raise ValueError(f"max_frames: must be >= 1, got {max_frames}")
        frames: list[np.ndarray] = []
        times: list[float] = []
        with self._lock:
            while len(frames) < max_frames:
                frame = self._peek()
                if frame is None and not frames:
                    self._raise_error()
                if frame is None or (until is not None and frame[1] > until):
                    break
                image, timestamp = frame
                problem = None
                if not math.isfinite(timestamp):
                    problem = f"timestamp {timestamp} is not a finite number of seconds"
                elif timestamp <= self._last_time:
                    problem = f"timestamps must increase ({timestamp} after {self._last_time})"
                elif frames and image.shape != frames[0].shape:
                    problem = f"frame size changed from {frames[0].shape} to {image.shape}"
                if problem is not None:
                    if frames:
                        break  # deliver the good frames; the bad one raises on the next call
                    self._pending = None  # the bad frame is dropped, the stream goes on after it
                    raise VideoError(f"{self.name}: {problem}")
                self._pending = None
                self._last_time = timestamp
                frames.append(image)
                times.append(timestamp)
        if not frames:
            return None
        return FrameBatch(np.stack(frames), np.asarray(times, dtype=np.float64))

    def __iter__(self) -> Iterator[FrameBatch]:
        while (batch := self.next_batch(8)) is not None:
            yield batch

    def close(self) -> None:
        with self._lock:
            close = getattr(self._frames, "close", None)
            if close is not None:
                close()
            self._done = True
            self._pending = None


def _validate_fps(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a positive number of frames per second, got {value!r}")
    return float(value)


def _check_frame(image: np.ndarray, where: str) -> np.ndarray:
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise VideoError(f"{where}: expected uint8 RGB frames [H, W, 3], got {image.dtype} {list(image.shape)}")
    return image


def _sample_indices(num_frames: int, native_fps: float, sample_fps: float | None) -> Iterator[int]:
    """Indices of the frames nearest to times 0, 1/sample_fps, 2/sample_fps, ..."""
    if sample_fps is None or sample_fps >= native_fps:
        yield from range(num_frames)
        return
    step = native_fps / sample_fps
    k = 0
    while (index := round(k * step)) < num_frames:
        yield index
        k += 1


def _prime(stream: FrameStream) -> FrameStream:
    """Pull the first frame now, so that empty or undecodable inputs fail at open time."""
    if stream.exhausted:
        stream._raise_error()
        raise VideoError(f"{stream.name}: no frames")
    return stream


def open_video(path: str | Path, *, sample_fps: float = 0.5) -> FrameStream:
    """Decode ``path`` with PyAV, keeping the first frame at or after each sampling time.

    Timestamps are the decoded frames' presentation times (seconds, first frame at 0).
    Raises :class:`VideoError` for a missing, unreadable or frameless file.
    """
    import av

    sample_fps = _validate_fps(sample_fps, "sample_fps")
    file = Path(path)
    if not file.is_file():
        raise VideoError(f"video not found: {file}")
    try:
        container = av.open(str(file))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{file}: cannot open as a video ({exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{file}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    expected = None
    if duration is not None:
        # Sampling times 0, 1/fps, ... strictly before the end; never more than the file holds.
        expected = max(1, math.ceil(duration * sample_fps - 1e-9))
        if stream.frames:
            expected = min(expected, stream.frames)

    def frames() -> Iterator[Frame]:
        period = 1.0 / sample_fps
        start: float | None = None
        last: float | None = None
        next_time = 0.0
        try:
            for decoded in container.decode(stream):
                if decoded.pts is None:
                    continue
                time = float(decoded.pts * decoded.time_base)
                if start is None:
                    start = time
                time -= start
                # A small tolerance keeps frames whose timestamp rounds just below a sampling time.
                if time + 1e-6 < next_time:
                    continue
                yield decoded.to_ndarray(format="rgb24"), time
                last = time
                next_time = (math.floor(time / period + 1e-6) + 1) * period
        except av.FFmpegError as exc:
            where = "before the first frame" if last is None else f"after the frame at {last:.1f} s"
            raise VideoError(f"{file}: decoding failed {where} ({exc})") from None
        finally:
            container.close()

    # A file recorded below the sampling rate gives every frame: its own rate is the stream's.
    native = float(stream.average_rate) if stream.average_rate else None
    rate = sample_fps if native is None else min(sample_fps, native)
    stream_of = FrameStream(frames(), name=str(file), expected_frames=expected, duration=duration, sample_fps=rate)
    return _prime(stream_of)


def open_npy(path: str | Path, *, fps: float, sample_fps: float | None = 0.5) -> FrameStream:
    """Frames from an ``.npy`` array ``[N, H, W, 3]`` uint8 recorded at ``fps`` (required: the
    file does not say its rate), sub-sampled to ``sample_fps`` (``None`` keeps every frame)."""
    file = Path(path)
    if not file.is_file():
        raise VideoError(f"frame array not found: {file}")
    fps = _validate_fps(fps, "fps")
    if sample_fps is not None:
        sample_fps = _validate_fps(sample_fps, "sample_fps")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        # numpy's advice for object arrays ("load it unsafely") is wrong here: frames are never pickled.
        reason = "it is damaged or holds Python objects" if "pickle" in str(exc) else str(exc)
        raise VideoError(f"{file}: not a readable .npy frame array ({reason})") from None
    return _array_stream(array, fps=fps, sample_fps=sample_fps, name=str(file))


def from_array(
    frames: np.ndarray,
    *,
    fps: float | None = None,
    timestamps: np.ndarray | list[float] | None = None,
    sample_fps: float | None = None,
    name: str = "array",
) -> FrameStream:
    """A stream over in-memory frames ``[N, H, W, 3]`` uint8 with either ``fps`` or ``timestamps``."""
    array = np.asarray(frames)
    if (fps is None) == (timestamps is None):
        raise ValueError("from_array: give exactly one of fps or timestamps")
    if timestamps is not None:
        if sample_fps is not None:
            raise ValueError("from_array: sample_fps applies to a frame rate, not to explicit timestamps")
        times = np.asarray(timestamps, dtype=np.float64)
        if array.ndim != 4 or array.shape[0] == 0:
            raise VideoError(f"{name}: expected frames [N, H, W, 3] with N >= 1, got {list(array.shape)}")
        if times.shape != (array.shape[0],):
            raise ValueError(f"timestamps: expected {array.shape[0]} values, got shape {list(times.shape)}")
        frames_iter = ((_check_frame(array[i], name), float(times[i])) for i in range(len(times)))
        return _prime(FrameStream(frames_iter, name=name, expected_frames=len(times)))
    if sample_fps is not None:
        sample_fps = _validate_fps(sample_fps, "sample_fps")
    return _array_stream(array, fps=_validate_fps(fps, "fps"), sample_fps=sample_fps, name=name)  # type: ignore[arg-type]


def _array_stream(array: np.ndarray, *, fps: float, sample_fps: float | None, name: str) -> FrameStream:
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise VideoError(f"{name}: expected uint8 frames [N, H, W, 3], got {array.dtype} {list(array.shape)}")
    if array.shape[0] == 0:
        raise VideoError(f"{name}: no frames")
    indices = list(_sample_indices(array.shape[0], fps, sample_fps))
    stream = FrameStream(
        ((np.array(array[i]), i / fps) for i in indices),
        name=name,
        expected_frames=len(indices),
        duration=array.shape[0] / fps,
        sample_fps=fps if sample_fps is None else min(fps, sample_fps),
    )
    return _prime(stream)


def open_source(path: str | Path, *, sample_fps: float = 0.5, npy_fps: float | None = None) -> FrameStream:
    """Open a video file or an ``.npy`` frame array (which needs ``npy_fps``)."""
    file = Path(path)
    if file.suffix.lower() == ".npy":
        if npy_fps is None:
            raise ValueError(f"{file}: an .npy frame array needs its frame rate (npy_fps / --npy-fps)")
        return open_npy(file, fps=npy_fps, sample_fps=sample_fps)
    return open_video(file, sample_fps=sample_fps)


class PushStream(FrameStream):
    """A live stream fed from another thread with :meth:`push`; :meth:`end` closes it.

    ``next_batch`` returns the frames pushed so far without waiting for a full batch. When
    nothing has been pushed it waits up to ``timeout`` seconds (forever if ``None``) and then
    returns ``None``; the stream stays open until :meth:`end`.
    """

    _END = object()

    def __init__(self, *, name: str = "live", timeout: float | None = None) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._timeout = timeout
        self._push_lock = threading.Lock()
        self._ended = False
        self._shape: tuple[int, ...] | None = None
        self._pushed_time = -math.inf
        super().__init__(iter(()), name=name)

    def _pull(self) -> Frame | None:
        try:
            item = self._queue.get(timeout=self._timeout)
        except queue.Empty:
            return None
        if item is self._END:
            self._done = True
            return None
        return item

    def push(self, frame: np.ndarray, timestamp: float) -> None:
        """Add one uint8 ``[H, W, 3]`` frame at ``timestamp`` seconds (all frames one size).

        Raises :class:`VideoError` (and keeps nothing of this frame, and loses nothing already
        pushed) for a frame of another size, a timestamp that is not a finite number, or one not
        after the previous pushed frame's.
        """
        image = _check_frame(np.asarray(frame), self.name)
        if isinstance(timestamp, bool) or not isinstance(timestamp, numbers.Real) or not math.isfinite(timestamp):
            raise VideoError(f"{self.name}: timestamp {timestamp!r} is not a finite number of seconds")
        timestamp = float(timestamp)
        with self._push_lock:
            if self._ended:
                raise VideoError(f"{self.name}: stream already ended")
            if self._shape is not None and image.shape != self._shape:
                raise VideoError(f"{self.name}: frame size {image.shape} differs from the stream's {self._shape}")
            if timestamp <= self._pushed_time:
                raise VideoError(
                    f"{self.name}: timestamps must increase ({timestamp} after {self._pushed_time}); frame dropped"
                )
            self._shape = image.shape
            self._pushed_time = timestamp
            self._queue.put((image, timestamp))

    def end(self) -> None:
        """Mark the end of the stream; frames already pushed are still delivered."""
        with self._push_lock:
            if not self._ended:
                self._ended = True
                self._queue.put(self._END)

    def available(self) -> int:
        """Frames pushed but not yet taken (approximate while another thread pushes)."""
        return self._queue.qsize() + (self._pending is not None)

    def next_batch(self, max_frames: int, until: float | None = None) -> FrameBatch | None:
        # Take what is there without waiting for a full batch: a live stream must not stall.
        limit = max(1, min(max_frames, self.available()))
        return super().next_batch(limit, until)
