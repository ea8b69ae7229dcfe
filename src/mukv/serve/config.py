"""Settings of one server process: :class:`ServeConfig` (frozen, keyword-only, validated on construction).

Importing this module needs neither FastAPI nor uvicorn, so the command line can check its options
(and say how to install the server's extra) before importing them.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mukv.config import DEFAULT_MODEL_ID, DTYPES

MIB = 2**20
# Live protocols a stream may name. Plain http(s) is left out by default: a server that fetches any
# URL a client names can be made to reach addresses behind it; `--allow-scheme https` opts in.
DEFAULT_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt")
TOKEN_ENV = "MUKV_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


def _positive_int(value: object, field: str) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        field,
        f"must be an integer >= 1, got {value!r}",
    )


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """One server process: the model it serves (loaded once, shared by every stream) and its limits.

    - ``model``, ``device``, ``dtype``: as for :func:`mukv.load_backend`; ``model_name`` is the id
      listed by ``/v1/models`` and expected in chat requests (default: the loaded model's id).
    - ``host``, ``port``: where to listen (``port=0`` takes a free port). Any host other than a
      loopback address needs a ``token``; with a token every ``/v1`` and ``/metrics`` request needs
      ``Authorization: Bearer <token>``.
    - ``max_streams``: streams open at once; ``max_body_bytes``: largest request body;
      ``max_frame_pixels``: largest frame (width x height); ``max_frames_per_request``: images in
      one multipart push; ``stream_memory_bytes``: a stream stops taking frames once its memory
      holds this much; ``max_queued_frames``: frames waiting to be encoded per stream, beyond which
      the oldest waiting frames are dropped (and counted); ``encode_batch_frames``: frames encoded
      in one device job (a question waits for at most one such job: fewer frames answer sooner,
      more encode faster); ``max_new_tokens``: longest answer a request may ask for.
    - ``allow_dirs``: directories whose files (and only those) may be played as file sources;
      ``allowed_schemes``: URL schemes a live source may use.
    - ``default_method``, ``default_preset``, ``default_fps``: what a stream gets when its request
      names none.
    - ``memory_dir``: where ``POST /v1/streams/{id}/save`` saves a stream's memory (``DIR/<id>``) and
      whence saved streams are reopened at startup (``None``: saving is off). Created if missing.
    """

    model: str = DEFAULT_MODEL_ID
    model_name: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_streams: int = 8
    max_body_bytes: int = 32 * MIB
    max_frame_pixels: int = 3840 * 2160
    max_frames_per_request: int = 64
    stream_memory_bytes: int = 8 * 1024 * MIB
    max_queued_frames: int = 64
    encode_batch_frames: int = 8
    max_new_tokens: int = 1024
    allow_dirs: tuple[Path, ...] = ()
    allowed_schemes: tuple[str, ...] = DEFAULT_SCHEMES
    default_method: str = "mukv"
    default_preset: str | None = None
    default_fps: float = 0.5
    memory_dir: Path | None = None

    def __post_init__(self) -> None:
        _require(bool(self.model.strip()), "model", "must be a hub id, a local directory or mukv-tiny")
        _require(self.model_name is None or bool(self.model_name.strip()), "model_name", "must not be empty")
        _require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _require(bool(self.host.strip()), "host", "must not be empty")
        _require(
            isinstance(self.port, int) and not isinstance(self.port, bool) and 0 <= self.port <= 65535,
            "port",
            f"must be between 0 and 65535, got {self.port!r}",
        )
        if self.token is not None:
            _require(
                len(self.token) >= MIN_TOKEN_CHARS and not any(c.isspace() for c in self.token),
                "token",
                f"must be at least {MIN_TOKEN_CHARS} characters without spaces",
            )
        _require(
            self.token is not None or is_loopback(self.host),
            "token",
            f"binding {self.host} (not a loopback address) needs a token: pass --token or set {TOKEN_ENV}",
        )
        for name in (
            "max_streams",
            "max_body_bytes",
            "max_frame_pixels",
            "max_frames_per_request",
            "stream_memory_bytes",
            "max_queued_frames",
            "encode_batch_frames",
            "max_new_tokens",
        ):
            _positive_int(getattr(self, name), name)
        _require(
            isinstance(self.default_fps, int | float) and math.isfinite(self.default_fps) and self.default_fps > 0,
            "default_fps",
            f"must be a positive number of frames per second, got {self.default_fps!r}",
        )
        object.__setattr__(self, "allow_dirs", self._directories(self.allow_dirs))
        object.__setattr__(self, "allowed_schemes", self._schemes(self.allowed_schemes))
        if self.memory_dir is not None:
            object.__setattr__(self, "memory_dir", self._memory_dir(self.memory_dir))
        from mukv.memory import method_config

        method_config(self.default_method, None, self.default_preset)  # raises naming method / preset

    @staticmethod
    def _directories(values: Sequence[str | os.PathLike]) -> tuple[Path, ...]:
        _require(not isinstance(values, str | os.PathLike), "allow_dirs", "must be a list of directories")
        directories = []
        for value in values:
            path = Path(value).expanduser().resolve()
            _require(path.is_dir(), "allow_dirs", f"{value} is not a directory")
            directories.append(path)
        return tuple(directories)

    @staticmethod
    def _memory_dir(value: str | os.PathLike) -> Path:
        path = Path(value).expanduser().resolve()
        _require(not path.exists() or path.is_dir(), "memory_dir", f"{value} is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"memory_dir: cannot create {value} ({exc.strerror})") from None
        return path

    @staticmethod
    def _schemes(values: Sequence[str]) -> tuple[str, ...]:
        _require(not isinstance(values, str), "allowed_schemes", "must be a list of URL schemes")
        schemes = []
        for value in values:
            scheme = str(value).strip().lower().removesuffix("://")
            _require(
                scheme.isascii() and scheme[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme),
                "allowed_schemes",
                f"{value!r} is not a URL scheme",
            )
            _require(scheme != "file", "allowed_schemes", "file URLs are not live sources: use allow_dirs")
            schemes.append(scheme)
        return tuple(schemes)
