"""Live network video sources (RTSP, RTMP, HTTP, UDP, ...) read in real time by a background thread.

:func:`open_live` opens a URL with PyAV and returns a :class:`LiveStream`: a
:class:`~mukv.video.sources.FrameStream` fed by a reader thread that decodes the stream as it
arrives, samples it at ``sample_fps`` by presentation time (seconds from the first frame) and
keeps the sampled uint8 RGB frames ``[H, W, 3]`` in a bounded queue for the consumer::

    with open_live("rtsp://camera.local/stream", sample_fps=1.0) as stream:
        while not stream.exhausted:
            session.ingest_source(stream)  # returns when no frame came for ``wait_s`` seconds

Drop policy: the queue holds at most ``max_queue_frames`` frames; when the consumer falls behind,
the OLDEST queued frames are dropped so that it always gets the newest ones, and every drop is
counted in :attr:`LiveStream.dropped`. Every wait (connecting, probing, reading, the consumer's
wait for a frame, closing) is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import math
import numbers
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import numpy as np

from mukv.errors import VideoError
from mukv.video.sources import Frame, FrameBatch, FrameStream

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream

LIVE_SCHEMES: tuple[str, ...] = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "srt")
"""URL schemes :func:`open_live` accepts by default (``srt`` needs a PyAV built with libsrt)."""

RTSP_TRANSPORTS: tuple[str, ...] = ("auto", "tcp", "udp")
"""How an ``rtsp://`` source may send its RTP packets (see ``rtsp_transport`` of :func:`open_live`)."""

# Transport protocols the schemes above open underneath (RTSP over TCP/TLS, RTP over UDP,
# encrypted HLS segments, HTTP proxies). Everything else (file, pipe, concat, ...) is refused even
# when a stream refers to it: an HLS playlist naming file:///etc/passwd must not read local files.
_TRANSPORTS = ("tcp", "tls", "udp", "rtp", "crypto", "httpproxy")

# A timestamp that goes back by more than this is a restart of the source's clock (a camera or
# encoder restarted), not a reordered frame: timestamps are rebased to continue after the last one.
_CLOCK_RESTART_S = 1.0
# A frame this far ahead of the pacing clock means the source's clock jumped forward: pacing restarts
# from it instead of holding the stream for the size of the jump.
_CLOCK_JUMP_S = 10.0


# Query (and fragment) parameters whose value is hidden by :func:`redact_url`: any whose name holds
# one of these, in any case (``password``, ``api_key``, ``X-Amz-Signature``, ``access_token``, ...).
_SECRET_NAMES = re.compile(r"pass|pwd|secret|token|key|sig|auth|cred|session|ticket", re.IGNORECASE)
# ``name=value`` pairs of a query, separated by ``&`` or ``;``.
_PARAMETER = re.compile(r"(^|[&;])([^&;=]*)=([^&;]*)")
# ``scheme://`` then the authority (up to the first ``/``, ``?`` or ``#``), for URLs urlsplit refuses.
_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:)?//([^/?#]*)")
_HIDDEN = "***"


def _redact_parameters(text: str) -> str:
    """``text`` (a query or fragment) with the values of credential-like parameters hidden."""

    def hide(match: re.Match[str]) -> str:
        separator, name, value = match.groups()
        if value and _SECRET_NAMES.search(name):
            value = _HIDDEN
        return f"{separator}{name}={value}"

    return _PARAMETER.sub(hide, text)


def _redact_netloc(netloc: str) -> str:
    """``netloc`` with its user info hidden: ``user:***@host`` for a user and password, ``***@host``
    for a user name alone (often an access token given as one)."""
    if "@" not in netloc:
        return netloc
    userinfo, hostport = netloc.rsplit("@", 1)
    user, colon, _ = userinfo.partition(":")
    return f"{user}:{_HIDDEN}@{hostport}" if colon else f"{_HIDDEN}@{hostport}"


def redact_url(url: str) -> str:
    """``url`` as messages and logs show it, with its credentials hidden (``***``): the password of
    its user info (a user name without a password is hidden whole, as it is often a token), and the
    values of query and fragment parameters whose names look like credentials (``password``,
    ``passwd``, ``pwd``, ``token``, ``key``, ``secret``, ``sig``/``signature``, ``auth``, ...).

    A URL that does not parse is redacted as text: whatever stands between ``//`` and the last ``@``
    of its authority is hidden, and its parameters as above.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # "rtsp://user:pw@[::1/x" (a bad IPv6 address): hidden all the same
        return _redact_text(url)
    netloc = _redact_netloc(parts.netloc)
    query = _redact_parameters(parts.query)
    fragment = _redact_parameters(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url  # nothing to hide: as given, not as urlsplit would rebuild it
    return parts._replace(netloc=netloc, query=query, fragment=fragment).geturl()


def _redact_text(url: str) -> str:
    """:func:`redact_url` for text that is not a URL urlsplit reads."""
    match = _AUTHORITY.match(url)
    if match is not None and "@" in match.group(2):
        scheme = match.group(1) or ""
        url = f"{scheme}//{_HIDDEN}@{match.group(2).rsplit('@', 1)[1]}{url[match.end() :]}"
    head, mark, rest = url.partition("?")
    if not mark:
        head, mark, rest = url.partition("#")
    return head + mark + _redact_parameters(rest) if mark else head


@dataclass(frozen=True)
class LiveStats:
    """One consistent snapshot of a :class:`LiveStream`'s counters (see its attributes of the same names).

    ``frames_read`` = frames taken + ``dropped`` + ``queued``.
    """

    frames_read: int
    dropped: int
    queued: int
    decode_errors: int
    source_time: float | None
    lag: float
    ended: bool
    error: VideoError | None


def _positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a positive number, got {value!r}")
    return float(value)


class LiveStream(FrameStream):
    """Frames of a live URL, read in real time by a background thread (see :func:`open_live`).

    Consumption follows :class:`FrameStream`: ``next_batch(max_frames, until)`` returns a
    :class:`FrameBatch` (``frames`` uint8 ``[T, H, W, 3]``, ``timestamps`` seconds ``[T]``) of
    the frames queued now, waiting up to ``wait_s`` for a first one when none is queued; ``None``
    when none came (the stream may still be live: see :attr:`exhausted`) or at the end. A read
    error that ended the stream is raised by ``next_batch`` once, after the frames read before it
    were taken, and stays in :attr:`error`.

    Counters: :attr:`frames_read` = frames taken + :attr:`dropped` + :meth:`available` (until
    :meth:`close`, which discards the frames still queued); :meth:`stats` reads them at one instant.
    """

    def __init__(
        self,
        url: str,
        *,
        options: Mapping[str, str],
        sample_fps: float,
        max_queue_frames: int,
        open_timeout_s: float,
        read_timeout_s: float,
        wait_s: float,
        max_lead_s: float | None,
        fallback_options: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(iter(()), name=redact_url(url))
        self.url = url
        self.sample_fps = sample_fps
        self.max_queue_frames = max_queue_frames
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.wait_s = wait_s
        self.max_lead_s = max_lead_s
        self._options = dict(options)
        # Options of a second attempt when the server refuses the transport of the first (RTSP:
        # RTP over TCP refused, UDP next); None: one attempt.
        self._fallback_options = None if fallback_options is None else dict(fallback_options)
        # Guards the queue and the counters below; the reader thread takes only this lock.
        self._cond = threading.Condition()
        self._queue: collections.deque[Frame] = collections.deque()
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._open_error: VideoError | None = None
        self._reader_error: VideoError | None = None
        self._unraised_error: VideoError | None = None
        self._ended = False
        self._closed = False
        self._frames_read = 0
        self._dropped = 0
        self._decode_errors = 0
        self._source_time: float | None = None
        self._thread: threading.Thread | None = None
        self._anchor = 0.0  # the wall time (monotonic) that stream time 0 is paced to

    # -- reader thread ----------------------------------------------------------------------

    def _start(self) -> None:
        """Start the reader and wait (at most ``open_timeout_s``) until the URL is open."""
        self._thread = threading.Thread(target=self._run, name=f"mukv-live {self.name}", daemon=True)
        self._thread.start()
        if not self._opened.wait(self.open_timeout_s):
            # The reader's own open timeout ends it shortly after; it closes what it opened.
            self._stop.set()
            raise VideoError(f"{self.name}: no answer within {self.open_timeout_s:g} s (open timeout)")
        if self._open_error is not None:
            self._stop.set()
            self._thread.join(1.0)  # it has already failed: only its cleanup is left
            raise self._open_error

    def _run(self) -> None:
        import av

        container = None
        try:
            # Pacing is measured from the connection attempt, not the first frame: the frames
            # buffered while the stream is probed are not early and pass at once.
            self._anchor = time.monotonic()
            try:
                container = self._open_container()
            except av.ExitError:
                self._open_error = VideoError(f"{self.name}: no answer within {self.open_timeout_s:g} s (open timeout)")
                return
            except av.ProtocolNotFoundError:
                scheme = urlsplit(self.url).scheme
                self._open_error = VideoError(f"{self.name}: this FFmpeg build (PyAV) cannot read {scheme}:// URLs")
                return
            except (av.FFmpegError, OSError, ValueError) as exc:
                self._open_error = VideoError(f"{self.name}: cannot open the live stream ({self._reason(exc)})")
                return
            if not container.streams.video:
                self._open_error = VideoError(f"{self.name}: has no video stream")
                return
            self._opened.set()
            if not self._stop.is_set():  # open_live may have given up while the stream was probed
                self._read(container, container.streams.video[0])
        except VideoError as exc:
            self._reader_error = self._unraised_error = exc
        except Exception as exc:  # a reader thread must never die silently: the consumer sees why it ended
            error = VideoError(f"{self.name}: reading failed ({type(exc).__name__}: {self._reason(exc)})")
            if self._opened.is_set():
                self._reader_error = self._unraised_error = error
            else:
                self._open_error = error
        finally:
            if container is not None:
                # Closing a broken connection can fail too; there is nothing left to report then.
                with contextlib.suppress(Exception):
                    container.close()
            with self._cond:
                self._ended = True
                self._cond.notify_all()
            self._opened.set()

    def _open_container(self) -> InputContainer:
        """``av.open`` the URL; once more with the fallback options if the server refused the transport."""
        import av

        # open_live gives up after open_timeout_s; FFmpeg's own limit is a little later, so that a
        # silent server is always reported as a timeout, not as FFmpeg's reaction to the
        # interruption (RTSP reports "invalid data"). PyAV's timeouts interrupt every blocking call
        # of every protocol, so no protocol's own socket timeout option is needed (RTSP's is
        # ``timeout`` in the FFmpeg that PyAV bundles, ``stimeout`` in FFmpeg before 5.0).
        limit = self.open_timeout_s + 1.0
        try:
            return av.open(self.url, options=self._options, timeout=(limit, self.read_timeout_s))
        except av.FFmpegError as exc:
            if self._fallback_options is None or not _transport_refused(exc) or self._stop.is_set():
                raise
        # open_live is still waiting (it had not given up), so the refusal came within the open
        # timeout: the second attempt gets what is left of it (the floor only covers a race with
        # open_live giving up now).
        left = max(limit - (time.monotonic() - self._anchor), 1.0)
        return av.open(self.url, options=self._fallback_options, timeout=(left, self.read_timeout_s))

    def _reason(self, exc: BaseException) -> str:
        """``exc``'s message without the URL's password (FFmpeg's errors repeat the URL in full)."""
        reason = getattr(exc, "strerror", None) or str(exc)
        return reason.replace(self.url, self.name) if self.url != self.name else reason

    def _read(self, container: InputContainer, stream: VideoStream) -> None:
        """Decode ``stream`` until its end, an error or :meth:`close`; queue the sampled frames."""
        import av

        period = 1.0 / self.sample_fps
        rate = stream.average_rate or stream.guessed_rate
        frame_step = 1.0 / float(rate) if rate else 0.04
        origin: float | None = None
        last: float | None = None
        next_sample = 0.0
        asked = time.monotonic()  # when the packet being read was asked for
        try:
            for packet in container.demux(stream):
                if self._stop.is_set():
                    return
                try:
                    decoded = packet.decode()
                except av.InvalidDataError:
                    # A corrupt packet (a live stream joined mid-GOP, a lost UDP datagram) costs
                    # the frames that depend on it, not the stream.
                    self._decode_errors += 1
                    asked = time.monotonic()
                    continue
                for frame in decoded:
                    if frame.pts is None:
                        continue
                    raw = float(frame.pts * frame.time_base)
                    if origin is None:
                        origin = raw
                    time_s = raw - origin
                    if last is not None and time_s <= last:
                        if last - time_s < _CLOCK_RESTART_S:
                            continue  # a repeated timestamp: the frame adds nothing
                        origin = raw - (last + frame_step)
                        time_s = last + frame_step
                    last = time_s
                    if not self._pace(time_s):
                        return
                    with self._cond:
                        self._source_time = time_s
                    # A small tolerance keeps frames whose timestamp rounds just below a sampling time.
                    if time_s + 1e-6 < next_sample:
                        continue
                    self._put(frame.to_ndarray(format="rgb24"), time_s)
                    next_sample = (math.floor(time_s / period + 1e-6) + 1) * period
                asked = time.monotonic()
        except av.FFmpegError as exc:
            if self._stop.is_set():
                return
            where = "before the first frame" if last is None else f"after the frame at {last:.1f} s"
            # The read timeout interrupts FFmpeg, which some demuxers report as their own error.
            if isinstance(exc, av.ExitError) or time.monotonic() - asked >= self.read_timeout_s:
                raise VideoError(f"{self.name}: no data for {self.read_timeout_s:g} s {where} (read timeout)") from None
            raise VideoError(f"{self.name}: reading failed {where} ({self._reason(exc)})") from None

    def _pace(self, time_s: float) -> bool:
        """Hold a frame until the wall clock (less ``max_lead_s``) reaches its time; False once closed.

        A source faster than real time (a file served over HTTP) is slowed to its own clock; a
        live source's frames arrive at or after their time and pass without waiting.
        """
        if self.max_lead_s is None:
            return not self._stop.is_set()
        now = time.monotonic()
        delay = self._anchor + time_s - self.max_lead_s - now
        if delay > _CLOCK_JUMP_S:
            self._anchor = now - time_s + self.max_lead_s
            delay = 0.0
        if delay > 0:
            return not self._stop.wait(delay)
        return not self._stop.is_set()

    def _put(self, image: np.ndarray, time_s: float) -> None:
        with self._cond:
            if self._closed:
                return
            # Drop policy: the oldest frames go, so that a consumer that falls behind resumes
            # at the newest ones; every drop is counted.
            while len(self._queue) >= self.max_queue_frames:
                self._queue.popleft()
                self._dropped += 1
            self._queue.append((image, time_s))
            self._frames_read += 1
            self._cond.notify_all()

    # -- consumer side --------------------------------------------------------------------

    def _pull(self) -> Frame | None:
        with self._cond:
            if self._queue:
                return self._queue.popleft()
            if self._ended or self._closed:
                self._done = True
                error, self._unraised_error = self._unraised_error, None
                if error is not None:
                    raise error  # FrameStream keeps it and raises it from next_batch once
            return None

    def next_batch(
        self, max_frames: int, until: float | None = None, *, wait_s: float | None = None
    ) -> FrameBatch | None:
        """Up to ``max_frames`` queued frames with timestamp <= ``until`` (any time if ``None``).

        Returns the frames queued now without waiting for a full batch. When none is queued it
        waits up to ``wait_s`` seconds (default: the stream's ``wait_s``; 0 never waits) for one;
        returns ``None`` if none came or the stream has ended (see :attr:`exhausted`).
        Raises the :class:`VideoError` that ended the stream once, after the frames before it.
        """
        if max_frames < 1:
            raise ValueError(f"max_frames: must be >= 1, got {max_frames}")
        wait = self.wait_s if wait_s is None else wait_s
        if wait > 0:
            deadline = time.monotonic() + wait
            with self._cond:
                while not self._queue and self._pending is None and not self._ended and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
        return super().next_batch(max_frames, until)

    def available(self) -> int:
        """Frames read and not yet taken (queued, plus the one looked ahead at)."""
        with self._cond:
            return len(self._queue) + (self._pending is not None)

    @property
    def error(self) -> VideoError | None:
        """The error that ended the stream (a read timeout, a broken connection), ``None`` while it
        runs, after a clean end or :meth:`close`. Kept after ``next_batch`` raised it."""
        return self._reader_error

    @property
    def ended(self) -> bool:
        """True when the reader has stopped (end of the stream, an error or :meth:`close`);
        frames already queued can still be taken until :attr:`exhausted`."""
        return self._ended or self._closed

    @property
    def frames_read(self) -> int:
        """Sampled frames the reader has queued (taken, dropped or still waiting)."""
        return self._frames_read

    @property
    def dropped(self) -> int:
        """Frames dropped because the consumer fell ``max_queue_frames`` behind (oldest first)."""
        return self._dropped

    @property
    def decode_errors(self) -> int:
        """Packets the decoder rejected and that were skipped."""
        return self._decode_errors

    @property
    def source_time(self) -> float | None:
        """The source's clock: timestamp of the newest decoded frame (sampled or not), ``None`` before."""
        return self._source_time

    @property
    def lag(self) -> float:
        """Seconds the consumer is behind the source clock: :attr:`source_time` minus the timestamp
        of the oldest frame not yet taken; 0 when the consumer has taken every frame read."""
        with self._cond:
            pending = self._pending
            oldest = pending[1] if pending is not None else (self._queue[0][1] if self._queue else None)
            if oldest is None or self._source_time is None:
                return 0.0
            return max(0.0, self._source_time - oldest)

    def stats(self) -> LiveStats:
        """The counters at one instant (read one by one, they may come from different frames)."""
        with self._cond:
            return LiveStats(
                frames_read=self._frames_read,
                dropped=self._dropped,
                queued=self.available(),
                decode_errors=self._decode_errors,
                source_time=self._source_time,
                lag=self.lag,
                ended=self.ended,
                error=self._reader_error,
            )

    def __iter__(self) -> Iterator[FrameBatch]:
        """Batches of up to 8 frames as they arrive, until the stream ends (a pause in the source
        does not end the iteration, unlike a ``next_batch`` that returned ``None``)."""
        while not self.exhausted:
            batch = self.next_batch(8)
            if batch is not None:
                yield batch

    def close(self) -> None:
        """Stop the reader, close the connection and discard queued frames (idempotent).

        Waits at most ``read_timeout_s + 1`` seconds: the reader notices the request between two
        packets, or when a stalled read times out.
        """
        self._stop.set()
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.read_timeout_s + 1.0)
        super().close()

    def __enter__(self) -> LiveStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _transport_refused(exc: BaseException) -> bool:
    """True for FFmpeg's error when an RTSP server refused the RTP transport asked for.

    FFmpeg reports a ``461 Unsupported Transport`` answer to its only transport as
    ``EPROTONOSUPPORT``; servers that know only RTP over UDP answer a request for TCP with
    ``400 Bad Request`` instead (a malformed request would fail the same way over UDP).
    """
    import av

    return isinstance(exc, av.HTTPBadRequestError) or getattr(exc, "errno", None) == errno.EPROTONOSUPPORT


def open_live(
    url: str,
    *,
    sample_fps: float = 0.5,
    allowed_schemes: Iterable[str] = LIVE_SCHEMES,
    max_queue_frames: int = 32,
    open_timeout_s: float = 10.0,
    read_timeout_s: float = 10.0,
    wait_s: float = 1.0,
    max_lead_s: float | None = 1.0,
    rtsp_transport: Literal["auto", "tcp", "udp"] = "auto",
    options: Mapping[str, str] | None = None,
) -> LiveStream:
    """Open the live video at ``url`` and read it in real time in a background thread.

    Frames are sampled at ``sample_fps`` by presentation time (seconds from the first frame),
    converted to uint8 RGB ``[H, W, 3]`` and queued; at most ``max_queue_frames`` wait, the
    oldest are dropped (and counted) when the consumer falls behind.

    ``open_timeout_s`` bounds this call (connecting and probing the stream); ``read_timeout_s``
    bounds each read: a source silent for that long ends the stream with a :class:`VideoError`
    in :attr:`LiveStream.error`. ``wait_s`` is how long ``next_batch`` waits for a frame when none
    is queued. ``max_lead_s`` paces a source that sends faster than real time (a file served over
    HTTP) to at most that far ahead of the wall clock (``None``: no pacing).

    ``rtsp_transport`` is how an ``rtsp://`` source sends its RTP packets: ``"tcp"`` interleaved in
    the RTSP connection (nothing lost, one port through firewalls and NAT); ``"udp"`` on UDP ports
    of their own (what some servers and older cameras only offer; a busy network loses packets,
    which costs frames); ``"auto"`` (default) TCP, and UDP when the server refuses TCP (it
    answers 461 Unsupported Transport, or 400 Bad Request as UDP-only servers do), within the
    same open timeout. ``rtsps://`` is always read over its TLS connection (FFmpeg offers nothing
    else). ``options`` are extra FFmpeg options for ``av.open`` (e.g.
    ``{"analyzeduration": "1000000"}``), over the defaults; an ``rtsp_transport`` among them is
    used as given, without the fallback.

    Raises :class:`VideoError` naming the URL (its password hidden) for a URL that is not one,
    a scheme not in ``allowed_schemes``, an unreachable host, no answer within the open timeout,
    a path the server does not serve (``404 Not Found``), or a stream without video; ``ValueError``
    for a bad parameter. After an open timeout the reader thread, still inside FFmpeg, ends on its
    own about a second later. Close the stream (or use it as a context manager): its reader runs
    until then. Memory: up to ``max_queue_frames`` RGB frames (a 1080p frame is 6 MB).
    """
    if not isinstance(url, str):
        raise VideoError(f"live URL: expected a string, got {type(url).__name__}")
    shown = redact_url(url)
    sample_fps = _positive(sample_fps, "sample_fps")
    open_timeout_s = _positive(open_timeout_s, "open_timeout_s")
    read_timeout_s = _positive(read_timeout_s, "read_timeout_s")
    if isinstance(wait_s, bool) or not isinstance(wait_s, numbers.Real) or not 0 <= wait_s < math.inf:
        raise ValueError(f"wait_s: must be a number of seconds >= 0, got {wait_s!r}")
    if max_lead_s is not None and (
        isinstance(max_lead_s, bool) or not isinstance(max_lead_s, numbers.Real) or not 0 <= max_lead_s < math.inf
    ):
        raise ValueError(f"max_lead_s: must be a number of seconds >= 0 or None, got {max_lead_s!r}")
    if isinstance(max_queue_frames, bool) or not isinstance(max_queue_frames, int) or max_queue_frames < 1:
        raise ValueError(f"max_queue_frames: must be an integer >= 1, got {max_queue_frames!r}")
    if rtsp_transport not in RTSP_TRANSPORTS:
        raise ValueError(f"rtsp_transport: must be one of {', '.join(RTSP_TRANSPORTS)}, got {rtsp_transport!r}")
    allowed = tuple(dict.fromkeys(scheme.lower() for scheme in allowed_schemes))
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise VideoError(f"{shown!r}: not a URL (contains whitespace or control characters)")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise VideoError(f"{shown}: not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    expected = "expected scheme://host/..., e.g. rtsp://camera.local/stream"
    if not scheme:
        raise VideoError(f"{shown!r}: not a live stream URL ({expected}; open a file with open_video)")
    if scheme not in allowed:
        raise VideoError(f"{shown}: unsupported URL scheme {scheme!r} (allowed: {', '.join(allowed)})")
    if not parts.netloc:
        raise VideoError(f"{shown}: not a live stream URL: no host ({expected})")
    defaults = {"protocol_whitelist": ",".join(dict.fromkeys(allowed + _TRANSPORTS))}
    if scheme in ("rtsp", "rtsps"):
        # TCP first: UDP loses packets (and whole frames) on a busy network and is often blocked.
        defaults["rtsp_transport"] = "udp" if rtsp_transport == "udp" else "tcp"
    merged = {**defaults, **(options or {})}
    fallback = None
    if scheme == "rtsp" and rtsp_transport == "auto" and "rtsp_transport" not in (options or {}):
        fallback = {**merged, "rtsp_transport": "udp"}
    stream = LiveStream(
        url,
        options=merged,
        fallback_options=fallback,
        sample_fps=sample_fps,
        max_queue_frames=max_queue_frames,
        open_timeout_s=open_timeout_s,
        read_timeout_s=read_timeout_s,
        wait_s=float(wait_s),
        max_lead_s=None if max_lead_s is None else float(max_lead_s),
    )
    stream._start()
    return stream
