"""Saved streams: ``POST /v1/streams/{id}/save`` writes a stream's memory to ``memory_dir/<id>``
(:meth:`mukv.engine.StreamSession.save`, atomic), and a server started on that directory reopens
every saved memory there as the stream it was: the same id, method, config and rate.

The manifest's ``extra`` holds, under ``"serve"``, what the server needs to rebuild the stream
around its memory (:func:`saved_facts`): the source (kind, a file's path, a live URL with its
credentials hidden), method, preset, overrides, fps, speed and the stream clock. A reopened push
stream takes frames again from where it was; a file or live stream is reopened ``ended`` (its
source is not played or reconnected again): it answers from its memory and takes no frames.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from mukv.errors import MemoryFileError, SavedMemoryError
from mukv.memory.persist import delete_memory
from mukv.serve.config import ServeConfig
from mukv.serve.errors import ApiError
from mukv.serve.sources import SourceSpec
from mukv.video.live import redact_url

logger = logging.getLogger(__name__)

# Stream ids are the server's own (``st_`` and 16 hex digits, StreamManager.create); any other name
# in the directory is not a stream's and is never turned into a path or a stream.
STREAM_ID = re.compile(r"^st_[0-9a-f]{16}$")
EXTRA_KEY = "serve"
EXTRA_VERSION = 1


def saving_disabled() -> ApiError:
    return ApiError(409, "saving_disabled", "saving is off: start the server with --memory-dir DIR")


def memory_path(config: ServeConfig, stream_id: str) -> Path:
    """``memory_dir/<stream_id>``; an id that is not a server-made one (or a path that would leave
    the directory) is refused."""
    directory = config.memory_dir
    if directory is None:
        raise saving_disabled()
    if not STREAM_ID.fullmatch(stream_id):
        raise ApiError(404, "stream_not_found", f"no stream {stream_id[:100]!r}", field="stream_id")
    path = directory / stream_id
    if path.resolve().parent != directory:  # a link planted in the directory
        raise ApiError(
            409, "save_failed", f"{stream_id} in the memory directory is a link; remove it", field="stream_id"
        )
    return path


def saved_facts(stream_id: str, options: Any, clock: float, created_at: float) -> dict[str, Any]:
    """What the manifest's ``extra`` keeps for reopening the stream (JSON-ready, no credentials)."""
    source = options.source
    return {
        EXTRA_KEY: {
            "version": EXTRA_VERSION,
            "id": stream_id,
            "source": {
                "kind": source.kind,
                "path": str(source.path) if source.path is not None else None,
                "url": redact_url(source.url) if source.url is not None else None,
            },
            "method": options.method,
            "preset": options.preset,
            "overrides": dict(options.overrides),
            "fps": options.fps,
            "speed": options.speed,
            "npy_fps": options.npy_fps,
            "clock": clock,
            "created_at": created_at,
        }
    }


def source_of(data: dict[str, Any]) -> SourceSpec:
    kind = data.get("kind")
    if kind == "push":
        return SourceSpec("push")
    if kind == "file" and isinstance(data.get("path"), str):
        return SourceSpec("file", path=Path(data["path"]))
    if kind == "live" and isinstance(data.get("url"), str):
        return SourceSpec("live", url=data["url"])
    raise SavedMemoryError(f"unknown source {data!r}")


def saved_dirs(directory: Path) -> list[Path]:
    """The saved streams' directories under ``directory`` (sorted); other entries are logged and left
    alone (hidden ones, a save's temporary or set-aside directories, silently)."""
    found = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if not STREAM_ID.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            logger.warning("memory dir: skipping %r (not a saved stream)", entry.name[:100])
            continue
        found.append(entry)
    return found


def remove_saved(config: ServeConfig, stream_id: str) -> None:
    """Remove a deleted stream's saved memory (none saved: nothing happens)."""
    if config.memory_dir is None or not STREAM_ID.fullmatch(stream_id):
        return
    try:
        delete_memory(config.memory_dir / stream_id)
    except (OSError, MemoryFileError) as exc:
        # The stream is gone either way; what could not be removed is left for the operator.
        logger.warning("could not remove the saved memory of %s: %s", stream_id, exc)


def directory_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())
