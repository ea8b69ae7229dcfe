"""RTSP sources end to end: a real RTSP/RTP server on loopback, :func:`mukv.video.live.open_live`
reading it, and the HTTP server's streams taking it as their source.

The server is Debian's ``rtsp-server-perl`` (installed by ``scripts/install.sh``), listening on
127.0.0.1 on free unprivileged ports: ffmpeg publishes a ``testsrc`` pattern to it in real time
(``-re``, ANNOUNCE/RECORD) and readers PLAY it from its client port. It relays RTP only over UDP:
readers ask for RTP over TCP first and are refused (``400 Bad Request``), which is what
``open_live``'s default ``rtsp_transport="auto"`` falls back from.

Every wait is bounded: the library bounds its own, the helpers here theirs, a watchdog ends a run
stuck past ``TEST_LIMIT_S``, and the server and publisher run in process groups of their own that
are killed after their test (and that end on their own after ``PROCESS_LIMIT_S`` if even that
could not run).
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from mukv.errors import VideoError
from mukv.video import open_live
from tests.integration.test_live_source import bounded, drain, live_threads  # noqa: F401 (bounded: autouse fixture)
from tests.integration.test_serve_app import sse_events, wait_for

TEST_LIMIT_S = 45.0  # the watchdog: no test of this module takes this long
PROCESS_LIMIT_S = 180  # a server or publisher outliving the run ends on its own after this long
FPS = 25  # the published stream's frame rate
SAMPLE_FPS = 5.0
PERIOD = 1 / SAMPLE_FPS
# Ports the server hands out for RTP, two per publisher and per reader, never given back while a
# path is published: enough for every reader of the module, probes included.
RTP_PORTS = 160

T = TypeVar("T")


# -- the RTSP server and its publisher ---------------------------------------------------------
def tools() -> tuple[str, str]:
    """``rtsp-server-perl`` and ``ffmpeg``; the test is skipped, saying which, when one is missing."""
    found = {name: shutil.which(name) for name in ("rtsp-server-perl", "ffmpeg")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (scripts/install.sh --system-packages installs them)")
    return found["rtsp-server-perl"], found["ffmpeg"]  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_udp_ports(count: int) -> int:
    """The first of ``count`` consecutive UDP ports free on 127.0.0.1 now (the server's RTP ports)."""
    for _ in range(50):
        base = random.randrange(20_000, 60_000 - count, 2)
        with ExitStack() as held:
            try:
                for port in range(base, base + count):
                    probe = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    pytest.fail(f"no {count} consecutive free UDP ports on 127.0.0.1")


def tcp_sockets(port: int, state: str) -> int:
    """Sockets on 127.0.0.1:``port`` in TCP ``state`` (``/proc/net/tcp``'s hex code: 01 established,
    0A listening)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[1] == f"0100007F:{port:04X}" and row[3] == state)


def rtsp_describe(port: int, path: str) -> int | None:
    """The status of a DESCRIBE of ``path`` (``None``: no answer): 200 once the path is published."""
    request = f"DESCRIBE rtsp://127.0.0.1:{port}/{path} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as connection:
            connection.sendall(request.encode())
            status = connection.recv(256).split(b"\r\n", 1)[0].split()
    except OSError:
        return None
    return int(status[1]) if len(status) >= 2 and status[1].isdigit() else None


@dataclass
class RtspServer:
    """A running ``rtsp-server-perl`` with ffmpeg publishing to it; readers PLAY ``url(path)``."""

    client_port: int
    source_port: int
    server: subprocess.Popen
    log_dir: Path
    publishers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def url(self, path: str = "live", userinfo: str = "") -> str:
        return f"rtsp://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.client_port}/{path}"

    def logs(self) -> str:
        """The server's and publishers' output, for failure messages."""
        return "\n".join(
            f"== {log.name}\n{log.read_text(errors='replace')[-2000:]}" for log in self.log_dir.glob("*.log")
        )

    def sessions(self) -> int:
        """RTSP sessions open now (the server's side of their connections)."""
        return tcp_sockets(self.client_port, "01")


def start_group(command: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    """Start ``command`` in a process group (and session) of its own, its output in ``log``."""
    bound = ["timeout", "-s", "KILL", str(PROCESS_LIMIT_S)] if shutil.which("timeout") else []
    with log.open("wb") as output:
        return subprocess.Popen(
            bound + command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(process: subprocess.Popen) -> None:
    """Kill ``process`` and everything in its group; reap it (bounded)."""
    if process.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped group ignores SIGKILL until continued
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
    process.wait(timeout=10)


def publish(rtsp: RtspServer, ffmpeg: str, path: str) -> None:
    """ffmpeg publishing a 160x120 ``testsrc`` at ``FPS`` in real time to ``path``, once readable."""
    command = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-re"]
    command += ["-f", "lavfi", "-i", f"testsrc=size=160x120:rate={FPS}", "-t", str(PROCESS_LIMIT_S)]
    # MPEG-4 part 2 is built into every ffmpeg; a keyframe each second lets a reader start within one.
    command += ["-c:v", "mpeg4", "-g", str(FPS), "-bf", "0"]
    # The server takes RTP from its publishers over UDP only.
    command += ["-f", "rtsp", "-rtsp_transport", "udp", f"rtsp://127.0.0.1:{rtsp.source_port}/{path}"]
    publisher = start_group(command, rtsp.log_dir / f"publisher-{path}.log", rtsp.log_dir)
    rtsp.publishers[path] = publisher

    def readable() -> bool:
        if publisher.poll() is not None or rtsp.server.poll() is not None:
            pytest.fail(f"the publisher of {path} or the server exited\n{rtsp.logs()}")
        return rtsp_describe(rtsp.client_port, path) == 200 and first_frame(rtsp.url(path))

    wait_for(readable, f"{rtsp.url(path)} to be readable", timeout=20.0)


def first_frame(url: str) -> bool:
    """Whether a plain PyAV reader gets a decoded frame from ``url`` (bounded: 3 s to open and per read)."""
    import av

    try:
        with av.open(url, options={"rtsp_transport": "udp"}, timeout=(3.0, 3.0)) as container:
            return next(container.decode(video=0), None) is not None
    except (av.FFmpegError, OSError):
        return False


def wait_listening(process: subprocess.Popen, port: int, timeout: float) -> bool:
    """Whether ``process`` accepts connections on 127.0.0.1:``port`` within ``timeout`` seconds
    (False at once if it exits)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@contextmanager
def rtsp_server(tmp_path: Path) -> Iterator[RtspServer]:
    """``rtsp-server-perl`` on 127.0.0.1 (free unprivileged ports, no root), ffmpeg publishing ``live``."""
    server_bin, ffmpeg = tools()
    tmp_path.mkdir(parents=True, exist_ok=True)
    rtsp: RtspServer | None = None
    try:
        for _ in range(3):  # a port taken between choosing it and the server binding it: new ports
            client_port, source_port = free_port(), free_port()
            command = [server_bin, "--clientport", str(client_port), "--serverport", str(source_port)]
            command += ["--client_listen_address", "127.0.0.1", "--source_listen_address", "127.0.0.1"]
            command += ["--rtp_start_port", str(free_udp_ports(RTP_PORTS)), "--loglevel", "2"]
            process = start_group(command, tmp_path / "server.log", tmp_path)
            rtsp = RtspServer(client_port, source_port, process, tmp_path)
            if wait_listening(process, client_port, timeout=15.0):
                break
            stop_group(process)
        else:
            pytest.fail(f"rtsp-server-perl did not start\n{rtsp.logs() if rtsp else ''}")
        publish(rtsp, ffmpeg, "live")
        yield rtsp
    finally:
        if rtsp is not None:
            for process in [*rtsp.publishers.values(), rtsp.server]:
                stop_group(process)


@pytest.fixture(scope="module")
def rtsp(tmp_path_factory) -> Iterator[RtspServer]:
    """One server for the module, publishing ``live``."""
    with rtsp_server(tmp_path_factory.mktemp("rtsp")) as server:
        yield server


# -- open_live -----------------------------------------------------------------------------------
def test_frames_arrive_at_the_stream_clock(rtsp):
    started = time.monotonic()
    with open_live(rtsp.url(), sample_fps=SAMPLE_FPS, open_timeout_s=5.0) as stream:
        opened = time.monotonic() - started
        assert rtsp.sessions() == 1  # the RTSP session of this reader
        frames, times, arrivals = drain(stream, 3.0)
        assert stream.error is None and not stream.ended, rtsp.logs()
    assert opened < 5.0

    assert len(frames) >= 11, times
    assert all(f.dtype == np.uint8 and f.shape == (120, 160, 3) for f in frames)
    assert times[0] == 0.0
    gaps = np.diff(times)
    # The first frame at or after each multiple of 0.2 s of a 25 fps stream: 0.2 s apart, give or
    # take a frame (a frame lost in UDP transit may widen one gap by a frame more).
    assert np.all(gaps > PERIOD - 1.5 / FPS) and np.all(gaps < PERIOD + 2.5 / FPS), gaps
    # Presentation time follows the wall clock: 3 s of reading covers about 3 s of stream.
    assert times[-1] > 3.0 - 1.0 and times[-1] < opened + 3.0 + 1.0, (times[-1], opened)
    # From the first second on, frames come at the stream's pace: the gap between a frame's
    # timestamp and its arrival stays put (network, a frame period and scheduling).
    later = [arrival - t for arrival, t in zip(arrivals, times, strict=True) if arrival - arrivals[0] > 1.0]
    assert len(later) >= 6 and max(later) - min(later) < 0.6, later
    assert not np.array_equal(frames[1], frames[-1])  # the pattern moves: frames are decoded, not repeated
    assert stream.dropped == 0 and stream.frames_read >= len(frames)
    wait_for(lambda: rtsp.sessions() == 0, "the RTSP session to close", timeout=5.0)


def test_the_transport_can_be_chosen(rtsp):
    # This server relays RTP over UDP only: TCP alone is refused, at once and clearly.
    started = time.monotonic()
    with pytest.raises(VideoError, match="400 Bad Request"):
        open_live(rtsp.url(), rtsp_transport="tcp", open_timeout_s=5.0)
    with pytest.raises(VideoError, match="400 Bad Request"):
        open_live(rtsp.url(), options={"rtsp_transport": "tcp"}, open_timeout_s=5.0)  # as given: no fallback
    assert time.monotonic() - started < 3.0
    with open_live(rtsp.url(), rtsp_transport="udp", sample_fps=SAMPLE_FPS, open_timeout_s=5.0) as stream:
        batch = stream.next_batch(4, wait_s=3.0)
        assert batch is not None and batch.frames.shape[1:] == (120, 160, 3)


def test_credentials_are_hidden_in_names_errors_and_logs(rtsp, caplog):
    caplog.set_level(logging.DEBUG)
    # The server asks for no credentials: a reader that gives some plays as any other.
    with open_live(rtsp.url(userinfo="viewer:s3cret"), sample_fps=SAMPLE_FPS, open_timeout_s=5.0) as stream:
        assert stream.name == rtsp.url(userinfo="viewer:***")
        assert all("s3cret" not in thread.name for thread in live_threads()) and live_threads()
        assert stream.next_batch(4, wait_s=3.0) is not None
    started = time.monotonic()
    with pytest.raises(VideoError, match="404 Not Found") as caught:
        open_live(rtsp.url("nothere", userinfo="viewer:s3cret"), open_timeout_s=5.0)
    assert time.monotonic() - started < 3.0  # refused at once: not a wait for the open timeout
    message = str(caught.value)
    assert message.startswith(rtsp.url("nothere", userinfo="viewer:***")) and "s3cret" not in message
    assert "s3cret" not in caplog.text


def test_a_stalled_then_gone_server_ends_the_stream_with_a_clear_error(tmp_path):
    with rtsp_server(tmp_path) as own:
        url = own.url(userinfo="viewer:s3cret")
        with open_live(url, sample_fps=SAMPLE_FPS, open_timeout_s=5.0, read_timeout_s=1.5) as stream:
            before, _, _ = drain(stream, 1.0)
            assert before, own.logs()
            os.killpg(own.server.pid, signal.SIGSTOP)  # alive, its connections open, nothing relayed
            stalled = time.monotonic()
            taken = len(before)
            with pytest.raises(VideoError, match="read timeout") as caught:
                while time.monotonic() - stalled < 10.0:
                    batch = stream.next_batch(8, wait_s=0.5)
                    taken += 0 if batch is None else len(batch)
            # Ended within the read timeout (plus the frames already on their way), never hanging.
            assert time.monotonic() - stalled < 1.5 + 3.0
            assert stream.error is caught.value and "s3cret" not in str(caught.value)
            assert str(caught.value).startswith(own.url(userinfo="viewer:***"))
            assert taken + stream.dropped == stream.frames_read
        stop_group(own.server)
        # Gone once its socket is: a killed process still accepts connections until it has exited.
        wait_for(lambda: tcp_sockets(own.client_port, "0A") == 0, "the server's port to close", timeout=5.0)
        started = time.monotonic()
        with pytest.raises(VideoError, match="refused") as gone:
            open_live(url, open_timeout_s=5.0)
        assert time.monotonic() - started < 3.0 and "s3cret" not in str(gone.value)


# -- through the HTTP server ---------------------------------------------------------------------
def test_a_served_stream_reads_rtsp_answers_and_stops_on_delete(rtsp, tiny_model_dir):
    from fastapi.testclient import TestClient

    from mukv.serve import ServeConfig, create_app

    fps = 2.0
    config = ServeConfig(model=str(tiny_model_dir), default_method="full", allowed_schemes=("rtsp",))
    with TestClient(create_app(config)) as client:
        wait_for(lambda: client.get("/health/ready").status_code == 200, "the model to load", timeout=30.0)

        def info(stream_id: str) -> dict[str, Any]:
            response = client.get(f"/v1/streams/{stream_id}")
            assert response.status_code == 200, response.text
            return response.json()

        def start() -> str:
            created = client.post("/v1/streams", json={"source": rtsp.url(), "fps": fps})
            assert created.status_code == 201, created.text
            assert created.json()["source"] == {"kind": "live", "url": rtsp.url()}
            return created.json()["id"]

        stream_id = start()
        data = wait_for(lambda: (d := info(stream_id))["frames"]["encoded"] >= 3 and d, "3 frames encoded", 15.0)
        assert data["state"] == "playing" and data["error"] is None, data
        assert data["position"] is not None and data["position"] >= data["time"] >= 1.0 / fps
        assert rtsp.sessions() == 1

        response = client.post(f"/v1/streams/{stream_id}/questions", json={"question": "What?", "max_new_tokens": 4})
        assert response.status_code == 200, response.text
        events = sse_events(response.text)
        assert events and events[-1][0] == "done", events
        done = events[-1][1]
        assert done["frames_seen"] > 0
        # No frame after the question's time: frames are sampled from 0 at ``fps``, so at most
        # floor(time * fps) + 1 of them are at or before it; whatever was retrieved ends by then.
        assert done["frames_seen"] <= math.floor(done["time"] * fps + 1e-6) + 1, done
        assert all(block["end_time"] <= done["time"] for block in done["retrieved"]), done["retrieved"]
        later = wait_for(lambda: (d := info(stream_id))["time"] > done["time"] and d, "the stream to go on", 10.0)
        assert later["state"] == "playing"

        assert client.delete(f"/v1/streams/{stream_id}").status_code == 200
        # The reader stopped and its RTSP session closed; the RTSP server is unharmed.
        wait_for(lambda: not live_threads(), "the reader to stop", timeout=5.0)
        wait_for(lambda: rtsp.sessions() == 0, "the RTSP session to close", timeout=5.0)
        assert rtsp.server.poll() is None and rtsp.publishers["live"].poll() is None, rtsp.logs()

        second = start()
        wait_for(lambda: info(second)["frames"]["encoded"] >= 1, "a frame of the second stream", 15.0)
        assert client.delete(f"/v1/streams/{second}").status_code == 200
        wait_for(lambda: rtsp.sessions() == 0 and not live_threads(), "the second session to close", timeout=5.0)
