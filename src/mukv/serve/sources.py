"""Where a served stream's frames come from: pushed over HTTP, a file under an allowed directory,
or a live URL; and the thread that plays a file or live source into its stream.

Live URLs are read by ``mukv.video.live.open_live(url, *, sample_fps) -> FrameStream`` when that
function exists; it is looked up when a stream is created, so the server takes live sources as
soon as the module provides it, and until then answers 501 ``live_sources_unavailable``.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mukv.errors import MukvError
from mukv.serve.config import ServeConfig
from mukv.serve.errors import ApiError, from_exception
from mukv.video.live import redact_url
from mukv.video.sources import FrameStream

logger = logging.getLogger(__name__)

LIVE_MODULE = "mukv.video.live"
LIVE_FUNCTION = "open_live"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Frames handed from a source to its stream at once.
PLAYER_BATCH = 8


@dataclass(frozen=True)
class SourceSpec:
    """A validated source: ``kind`` ``push``, ``file`` (``path``, resolved, under an allowed
    directory) or ``live`` (``url`` with an allowed scheme)."""

    kind: Literal["push", "file", "live"]
    path: Path | None = None
    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind}
        if self.path is not None:
            data["path"] = str(self.path)
        if self.url is not None:
            data["url"] = redact_url(self.url)  # stream info is listed to every client: no password
        return data


def parse_source(source: str, config: ServeConfig) -> SourceSpec:
    """Validate the ``source`` of a stream request against the server's allow-lists."""
    if source == "push":
        return SourceSpec("push")
    match = _URL.match(source)
    if match is not None:
        scheme = match.group(1).lower()
        if scheme not in config.allowed_schemes:
            allowed = ", ".join(config.allowed_schemes) or "none"
            raise ApiError(
                422, "scheme_not_allowed", f"URL scheme {scheme!r} is not allowed (allowed: {allowed})", field="source"
            )
        return SourceSpec("live", url=source)
    return SourceSpec("file", path=_allowed_file(source, config))


def _allowed_file(source: str, config: ServeConfig) -> Path:
    if not config.allow_dirs:
        raise ApiError(
            403,
            "file_sources_disabled",
            "file sources are off: start the server with --allow-dir DIR to play files under DIR",
            field="source",
        )
    given = Path(source)
    # A relative path is looked up in the allowed directories, in order.
    candidates = [given] if given.is_absolute() else [directory / given for directory in config.allow_dirs]
    inside = False
    for candidate in candidates:
        resolved = candidate.resolve()  # symbolic links and ".." are followed before the check
        if any(resolved.is_relative_to(directory) for directory in config.allow_dirs):
            inside = True
            if resolved.is_file():
                return resolved
    if inside:
        raise ApiError(404, "source_not_found", f"no file {source} under the allowed directories", field="source")
    raise ApiError(403, "source_not_allowed", f"{source} is not under an allowed directory", field="source")


def live_opener() -> Callable[..., FrameStream] | None:
    """``mukv.video.live.open_live`` if that module provides it, else ``None``."""
    try:
        module = importlib.import_module(LIVE_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == LIVE_MODULE:
            return None
        raise
    opener = getattr(module, LIVE_FUNCTION, None)
    return opener if callable(opener) else None


def open_frames(spec: SourceSpec, *, fps: float, npy_fps: float | None = None) -> FrameStream:
    """Open a file or live source (blocking: run it off the event loop). ``ApiError`` when it cannot be."""
    if spec.kind == "file":
        from mukv.video.sources import open_source

        assert spec.path is not None
        try:
            return open_source(spec.path, sample_fps=fps, npy_fps=npy_fps)
        except (MukvError, ValueError) as exc:
            error = from_exception(exc)
            raise ApiError(422, "source_unreadable", error.message, field="source") from None
    if spec.kind == "live":
        opener = live_opener()
        if opener is None:
            raise ApiError(501, "live_sources_unavailable", "live sources: not available yet", field="source")
        try:
            return opener(spec.url, sample_fps=fps)
        except (MukvError, ValueError, OSError) as exc:
            shown = redact_url(spec.url)
            message = str(exc).replace(spec.url, shown)
            if shown not in message:
                message = f"{shown}: {message}"
            raise ApiError(422, "source_unreadable", message, field="source") from None
    raise ValueError(f"source: {spec.kind} streams have no source to open")


class SourcePlayer:
    """Plays a file or live source into its stream on a thread of its own.

    A file is played at its clock: the frame at ``t`` is handed over once ``t / speed`` seconds
    have passed since the start. A live source (``speed=None``) is handed over as frames come.
    ``deliver(frames [T, H, W, 3], timestamps [T])`` queues frames in the stream (it raises
    :class:`ApiError` when the stream takes no more, which stops the player); ``on_end(error)`` is
    called once at the end (``error`` ``None`` when the source was played to its end or stopped).
    """

    def __init__(
        self,
        source: FrameStream,
        *,
        speed: float | None,
        deliver: Callable[[np.ndarray, np.ndarray], None],
        on_end: Callable[[ApiError | None], None],
        name: str = "mukv-source",
    ) -> None:
        self._source = source
        self._speed = speed
        self._deliver = deliver
        self._on_end = on_end
        self._stop = threading.Event()
        self._started = time.monotonic()
        self.ended = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def position(self) -> float | None:
        """Where real time is in the source, in seconds of stream time: the playing position of a
        file; for a live source, its clock (the newest frame it decoded) where it tells it."""
        if self._speed is None:
            return getattr(self._source, "source_time", None)
        return (time.monotonic() - self._started) * self._speed

    def dropped(self) -> int:
        """Frames the source itself dropped before the player took them (a live source's reader
        keeps a bounded queue of its own), where it counts them."""
        dropped = getattr(self._source, "dropped", 0)
        return dropped if isinstance(dropped, int) else 0

    def stop(self, timeout: float | None = None) -> None:
        """Ask the player to stop; wait up to ``timeout`` seconds for it (a blocking read of a live
        source may outlast that: the thread then ends with its read)."""
        self._stop.set()
        if timeout is not None and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        error: ApiError | None = None
        try:
            while not self._stop.is_set():
                upcoming = self._source.next_time()
                if upcoming is None:
                    if self._source.exhausted:
                        self._source.next_batch(1)  # raises a decoding error met at the end, if any
                        break
                    self._stop.wait(0.05)  # a live source with nothing new yet
                    continue
                until = None
                if self._speed is not None:
                    position = self.position()
                    assert position is not None
                    if upcoming > position:
                        self._stop.wait(min((upcoming - position) / self._speed, 0.25))
                        continue
                    until = position
                batch = self._source.next_batch(PLAYER_BATCH, until)
                if batch is not None:
                    self._deliver(batch.frames, batch.timestamps)
        except ApiError as exc:
            error = exc
        except MukvError as exc:
            error = ApiError(422, "source_failed", str(exc))
        except Exception as exc:
            logger.exception("playing %s failed", self._source.name)
            error = ApiError(500, "source_failed", f"{type(exc).__name__}: {exc}")
        finally:
            self._source.close()
            self.ended = True
        self._on_end(error)
