"""Live URL sources (:func:`mukv.video.live.open_live`) against a real live stream on loopback.

Each test starts its own ffmpeg that encodes its ``testsrc`` pattern at 25 fps in real time
(``-re``) and serves it as MPEG-TS over HTTP on 127.0.0.1 to one client (``-listen 1``).
``scripts/install.sh --dev`` (run by ``make test``) installs ffmpeg where it is missing; the
tests run that step themselves when ffmpeg is still missing and skip only if it cannot be
installed. Every test is bounded: the library bounds its waits, the helpers bound theirs, a
watchdog ends a run stuck past ``TEST_LIMIT_S`` and every server stops after ``-t`` seconds on
its own even if a test could not kill it.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mukv.errors import VideoError
from mukv.video import FrameStream, LiveStream, open_live

REPO = Path(__file__).resolve().parents[2]
TEST_LIMIT_S = 30.0
FPS = 25  # the served stream's frame rate
SERVER_LIMIT_S = 40  # a server outliving its test ends on its own after this many seconds


@pytest.fixture(autouse=True)
def bounded(request: pytest.FixtureRequest) -> Iterator[None]:
    """End the run with every thread's traceback if a test hangs (after the test module's
    ``TEST_LIMIT_S``); then check that no reader thread outlives its test."""
    faulthandler.dump_traceback_later(getattr(request.module, "TEST_LIMIT_S", TEST_LIMIT_S), exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
    deadline = time.monotonic() + 5.0
    while (readers := live_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not readers, f"reader threads left running: {readers}"


def live_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("mukv-live")]


@pytest.fixture(scope="module")
def ffmpeg() -> str:
    """The ffmpeg executable, installed by the install script's system step when missing."""
    found = shutil.which("ffmpeg")
    if found is None:
        try:
            done = subprocess.run(
                ["bash", str(REPO / "scripts" / "install.sh"), "--system-packages"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=600,
            )
            detail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        except (OSError, subprocess.TimeoutExpired) as exc:
            detail = [repr(exc)]
        found = shutil.which("ffmpeg")
        if found is None:
            pytest.skip(f"ffmpeg is missing and scripts/install.sh --system-packages could not install it: {detail[0]}")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(ffmpeg: str, tmp_path: Path, *, realtime: bool = True) -> Iterator[tuple[str, subprocess.Popen]]:
    """Serve a 160x120 ``testsrc`` at ``FPS`` as MPEG-TS over HTTP; yields its URL and process.

    ``realtime=False`` sends as fast as the connection takes it (a file served over HTTP).
    """
    url = f"http://127.0.0.1:{free_port()}/live.ts"
    log = tmp_path / "ffmpeg.log"
    command = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error"]
    command += ["-re"] if realtime else []
    command += ["-f", "lavfi", "-i", f"testsrc=size=160x120:rate={FPS}", "-t", str(SERVER_LIMIT_S)]
    # mpeg2video is built into every ffmpeg; a keyframe each second lets a client start within one.
    command += ["-c:v", "mpeg2video", "-g", str(FPS), "-bf", "0", "-f", "mpegts", "-listen", "1", url]
    with log.open("wb") as err:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield url, process
    finally:
        with_signal(process, signal.SIGCONT)  # a stopped process ignores SIGKILL until continued
        process.kill()
        process.wait(timeout=10)


def with_signal(process: subprocess.Popen, sig: int) -> None:
    if process.poll() is None:
        os.kill(process.pid, sig)


def open_served(url: str, process: subprocess.Popen, **kwargs) -> LiveStream:
    """``open_live(url)`` once the server listens: it refuses connections until ffmpeg is up."""
    kwargs.setdefault("open_timeout_s", 8.0)
    deadline = time.monotonic() + 8.0
    while True:
        try:
            return open_live(url, **kwargs)
        except VideoError as exc:
            if "refused" not in str(exc) or time.monotonic() > deadline or process.poll() is not None:
                raise
            time.sleep(0.05)


def drain(stream: LiveStream, seconds: float) -> tuple[list[np.ndarray], list[float], list[float]]:
    """Take frames as they come for ``seconds``: frames, their timestamps and arrival times."""
    frames: list[np.ndarray] = []
    times: list[float] = []
    arrivals: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stream.exhausted:
        batch = stream.next_batch(8, wait_s=min(0.5, max(0.0, deadline - time.monotonic())))
        if batch is not None:
            frames.extend(batch.frames)
            times.extend(batch.timestamps.tolist())
            arrivals.extend([time.monotonic()] * len(batch))
    return frames, times, arrivals


def test_frames_arrive_at_the_sampling_rate_in_real_time(ffmpeg, tmp_path):
    with live_server(ffmpeg, tmp_path) as (url, process), open_served(url, process, sample_fps=5.0) as stream:
        assert isinstance(stream, FrameStream) and stream.expected_frames is None
        frames, times, arrivals = drain(stream, 3.5)
        assert stream.error is None and not stream.ended

    assert len(frames) >= 12, times
    assert all(f.dtype == np.uint8 and f.shape == (120, 160, 3) for f in frames)
    assert times[0] == 0.0
    gaps = np.diff(times)
    # The first frame at or after each multiple of 0.2 s of a 25 fps stream: 0.2 s apart, give or take a frame.
    assert np.all(gaps > 0.2 - 1.5 / FPS) and np.all(gaps < 0.2 + 1.5 / FPS), gaps
    # Frames buffered while the stream was probed come at once; from then on, at the stream's pace:
    # the gap between a frame's timestamp and its arrival stays put (a frame period and scheduling).
    later = [arrival - t for arrival, t in zip(arrivals, times, strict=True) if arrival - arrivals[0] > 1.0]
    assert len(later) >= 8 and max(later) - min(later) < 0.5, later
    assert not np.array_equal(frames[0], frames[-1])  # the pattern moves: the frames are decoded, not repeated
    assert stream.dropped == 0 and stream.frames_read >= len(frames)


def test_slow_consumer_gets_the_newest_frames_and_drops_are_counted(ffmpeg, tmp_path):
    with (
        live_server(ffmpeg, tmp_path) as (url, process),
        open_served(url, process, sample_fps=5.0, max_queue_frames=3) as stream,
    ):
        time.sleep(2.5)  # a consumer busy elsewhere
        stats = stream.stats()  # one snapshot: the reader goes on queueing and dropping meanwhile
        assert stats.queued == 3
        assert stats.dropped > 0 and stats.dropped + 3 == stats.frames_read
        behind, source_time = stats.lag, stats.source_time
        batch = stream.next_batch(16, wait_s=0)
        assert batch is not None and len(batch) == 3
        assert stream.lag < behind or stream.available() > 0

    # The three kept are the newest: consecutive samples ending at the source's clock.
    assert np.all(np.diff(batch.timestamps) < 0.2 + 1.5 / FPS)
    assert source_time - batch.timestamps[-1] < 0.2 + 1.5 / FPS
    assert behind >= batch.timestamps[-1] - batch.timestamps[0]
    assert batch.timestamps[0] > 1.0  # the first frames (from 0 s) were dropped


def test_close_stops_the_reader_and_is_idempotent(ffmpeg, tmp_path):
    with live_server(ffmpeg, tmp_path) as (url, process):
        stream = open_served(url, process, sample_fps=5.0)
        reader = stream._thread
        assert reader is not None and reader.is_alive()
        assert stream.next_batch(4, wait_s=5.0) is not None
        started = time.monotonic()
        stream.close()
        assert time.monotonic() - started < 2.0
        assert not reader.is_alive() and not live_threads()
        stream.close()  # idempotent
        assert stream.ended and stream.exhausted and stream.error is None
        assert stream.next_batch(4) is None


def test_context_manager_closes(ffmpeg, tmp_path):
    with live_server(ffmpeg, tmp_path) as (url, process):
        with open_served(url, process, sample_fps=5.0) as stream:
            assert stream.next_batch(4, wait_s=5.0) is not None
        assert stream.ended and not live_threads()


def test_unreachable_url_fails_at_once_naming_it_without_the_password():
    url = f"http://viewer:s3cret@127.0.0.1:{free_port()}/live.ts"
    started = time.monotonic()
    with pytest.raises(VideoError, match="refused") as caught:
        open_live(url, open_timeout_s=5.0)
    assert time.monotonic() - started < 3.0
    message = str(caught.value)
    assert "viewer:***@127.0.0.1" in message and "s3cret" not in message


@pytest.mark.parametrize("scheme", ["http", "rtsp", "rtmp", "udp"])
def test_silent_server_times_out_within_the_open_timeout(scheme):
    # A server that accepts connections and never answers (for UDP: a port nobody sends to).
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        url = f"{scheme}://127.0.0.1:{server.getsockname()[1]}" + ("" if scheme == "udp" else "/live")
        started = time.monotonic()
        with pytest.raises(VideoError, match="open timeout") as caught:
            open_live(url, open_timeout_s=1.0)
        assert 0.9 < time.monotonic() - started < 2.5
        assert url in str(caught.value)


@pytest.mark.parametrize(
    ("url", "allowed", "match"),
    [
        ("file:///etc/passwd", None, "unsupported URL scheme 'file'"),
        ("ftp://127.0.0.1/live.ts", None, "unsupported URL scheme 'ftp'"),
        ("http://127.0.0.1:1/live.ts", ("rtsp",), "unsupported URL scheme 'http' \\(allowed: rtsp\\)"),
        ("/videos/walk.mp4", None, "not a live stream URL"),
        ("rtsp://", None, "not a live stream URL"),
        ("", None, "not a live stream URL"),
        ("http://127.0.0.1/a b", None, "not a URL"),
        ("http://[::1/live.ts", None, "not a URL"),
    ],
)
def test_bad_urls_and_schemes_are_refused_before_connecting(url, allowed, match):
    kwargs = {} if allowed is None else {"allowed_schemes": allowed}
    started = time.monotonic()
    with pytest.raises(VideoError, match=match):
        open_live(url, **kwargs)
    assert time.monotonic() - started < 0.5 and not live_threads()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sample_fps": 0}, "sample_fps"),
        ({"max_queue_frames": 0}, "max_queue_frames"),
        ({"open_timeout_s": float("inf")}, "open_timeout_s"),
        ({"read_timeout_s": -1}, "read_timeout_s"),
        ({"wait_s": -1}, "wait_s"),
    ],
)
def test_bad_parameters_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        open_live("http://127.0.0.1:1/live.ts", **kwargs)


def test_server_gone_mid_stream_ends_the_stream_and_keeps_the_frames_read(ffmpeg, tmp_path):
    with live_server(ffmpeg, tmp_path) as (url, process), open_served(url, process, sample_fps=5.0) as stream:
        before, times_before, _ = drain(stream, 1.5)
        assert before, "no frame before the server went away"
        process.kill()
        process.wait(timeout=10)
        after, times_after, _ = drain(stream, 5.0)  # the frames queued before the end, then the end
        assert stream.ended and stream.exhausted
        # A killed server closes its connection: the stream ends like a stream that ended.
        assert stream.error is None or isinstance(stream.error, VideoError)
        assert stream.next_batch(4, wait_s=0.1) is None
    assert len(before) + len(after) + stream.dropped == stream.frames_read
    times = times_before + times_after
    assert np.all(np.diff(times) > 0) and times[0] == 0.0


def test_stalled_server_ends_the_stream_with_a_read_timeout(ffmpeg, tmp_path):
    with (
        live_server(ffmpeg, tmp_path) as (url, process),
        open_served(url, process, sample_fps=5.0, read_timeout_s=1.5) as stream,
    ):
        before, _, _ = drain(stream, 1.0)
        assert before
        with_signal(process, signal.SIGSTOP)  # alive, connection open, nothing sent
        stalled = time.monotonic()
        taken = len(before)
        with pytest.raises(VideoError, match="read timeout") as caught:
            while time.monotonic() - stalled < 10.0:
                batch = stream.next_batch(8, wait_s=0.5)
                taken += 0 if batch is None else len(batch)
        # Ended within the read timeout (plus what the socket had buffered), never hanging.
        assert time.monotonic() - stalled < 1.5 + 3.0
        assert stream.error is caught.value and url in str(stream.error)
        assert stream.next_batch(4, wait_s=0.1) is None  # raised once; the error stays in ``error``
        assert stream.error is caught.value
        assert taken + stream.dropped == stream.frames_read


def test_a_source_faster_than_real_time_is_paced_to_its_clock(ffmpeg, tmp_path):
    with live_server(ffmpeg, tmp_path, realtime=False) as (url, process):
        started = time.monotonic()
        with open_served(url, process, sample_fps=5.0, max_queue_frames=64, max_lead_s=1.0) as stream:
            _, times, _ = drain(stream, 2.5)
            elapsed = time.monotonic() - started
            # Unpaced, the source would be far ahead (ffmpeg encodes this pattern at hundreds of
            # frames a second); paced, it stays within the lead of the wall clock since opening.
            assert stream.source_time is not None
            assert stream.source_time <= elapsed + 1.0 + 0.2, (stream.source_time, elapsed)
            assert stream.dropped == 0
    assert times[-1] >= elapsed - 1.5, (times[-1], elapsed)  # and it does keep up with the clock


class FakeFrame:
    """What the reader uses of a decoded PyAV frame: ``pts`` in ``time_base`` and RGB conversion."""

    time_base = Fraction(1, 90_000)

    def __init__(self, seconds: float) -> None:
        self.pts = round(seconds * 90_000)

    def to_ndarray(self, format: str) -> np.ndarray:
        return np.zeros((4, 4, 3), np.uint8)


class FakeContainer:
    """A source whose clock starts at ``start`` s, restarts at 0 after 1 s and jumps 1 h ahead after 2 s."""

    def __init__(self, start: float) -> None:
        self.times = [start + i / 10 for i in range(10)] + [i / 10 for i in range(10)]
        self.times += [3600 + i / 10 for i in range(10)]

    def demux(self, stream) -> Iterator[SimpleNamespace]:
        for t in self.times:
            yield SimpleNamespace(decode=lambda t=t: [FakeFrame(t)])


def test_source_clock_restarts_and_jumps_keep_timestamps_increasing_and_paced():
    stream = LiveStream(
        "http://127.0.0.1:1/live.ts",
        options={},
        sample_fps=5.0,
        max_queue_frames=64,
        open_timeout_s=1.0,
        read_timeout_s=1.0,
        wait_s=0.0,
        max_lead_s=10.0,
    )
    stream._anchor = time.monotonic()
    started = time.monotonic()
    stream._read(FakeContainer(start=95_000.0), SimpleNamespace(average_rate=Fraction(10), guessed_rate=None))
    assert time.monotonic() - started < 1.0  # the jump ahead did not hold the stream for an hour
    stream._ended = True
    batch = stream.next_batch(64)
    assert batch is not None and stream.next_batch(64) is None and stream.exhausted
    times = batch.timestamps
    # 0..0.9 s, then the restart continues at 1.0 s instead of going back, then the jump is kept.
    assert np.allclose(times[:10], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8])
    assert np.all(np.diff(times) > 0) and times[-1] > 3600
