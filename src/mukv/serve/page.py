"""The web page the server ships (``/`` and ``/static/*``) and the listing of playable files
(``GET /v1/sources``) that the page offers as file sources.

The page is plain HTML, JavaScript and CSS in ``mukv/serve/static`` (no build step, nothing
fetched from elsewhere), so it works offline and ships inside the wheel.
"""

from __future__ import annotations

import itertools
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from mukv.serve.config import ServeConfig

STATIC_DIR = Path(__file__).parent / "static"

# Video containers PyAV reads. ``.npy`` frame arrays are left out: they also need their frame rate.
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".ogv", ".wmv"}
)
# A listing is bounded whatever the allowed directories hold: files listed, directory entries
# looked at, and directory levels below an allowed directory.
MAX_SOURCES = 500
MAX_ENTRIES_SCANNED = 20_000
MAX_DEPTH = 4

# The page may only run its own script and reach its own origin (its WebSocket included): a
# string that slipped past the page's escaping still could not load or send anything elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "media-src 'self' blob: mediastream:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


PAGE_FILE = "index.html"


class PageFiles(StaticFiles):
    """The page's files under ``/static``, each with :data:`PAGE_HEADERS` (``nosniff`` above all: a
    file is only ever what its type says). The page itself is not among them: it is served at ``/``
    alone, so that it is never shown without its headers by another address."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if path.lstrip("/") == PAGE_FILE:  # ``path`` is normalised: ``./index.html`` is this too
            raise HTTPException(404, f"the page is served at /, not /static/{PAGE_FILE}")
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def add_page_routes(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/static`` (no token needed: the page holds no
    data; it asks for the token and sends it with each API request)."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / PAGE_FILE, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.mount("/static", PageFiles(directory=STATIC_DIR), name="static")


@dataclass(frozen=True)
class Listing:
    """Files found under the allowed directories: ``files`` (``name``: the path relative to its
    allowed directory, which the server looks up as a stream's ``source``; ``size`` in bytes) and
    whether the listing stopped at one of its bounds (``truncated``)."""

    files: list[dict[str, Any]]
    truncated: bool

    def to_json(self) -> dict[str, Any]:
        return {"object": "list", "data": self.files, "truncated": self.truncated}


def _listable(name: str) -> bool:
    """Names a client can show and send back unchanged: valid Unicode (not undecodable bytes),
    no control characters (``Cc``) nor invisible format characters (``Cf``: a right-to-left
    override would show ``evil\u202egpm.mp4`` as ``evilmp4.mpg``), not hidden."""
    if name.startswith("."):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system holds that are not UTF-8 (surrogate escapes)
        return False
    return not any(unicodedata.category(char) in ("Cc", "Cf") for char in name)


def list_sources(config: ServeConfig) -> Listing:
    """Video files under ``config.allow_dirs`` (blocking: run it off the event loop).

    Directories are walked breadth-first, at most ``MAX_DEPTH`` levels below each allowed one,
    without following links to directories; a linked file is listed only when it resolves inside
    its allowed directory (as the stream request checks). A relative name is looked up in the allowed
    directories in order, so a name already listed from an earlier directory is not listed again:
    each listed name plays the file listed.
    """
    files: dict[str, dict[str, Any]] = {}
    scanned = 0
    truncated = False
    for root in config.allow_dirs:
        pending: list[tuple[Path, int]] = [(root, 0)]
        while pending and not truncated:
            directory, depth = pending.pop(0)
            try:
                with os.scandir(directory) as entries:
                    # One more than the budget left tells a directory that goes beyond it.
                    taken = list(itertools.islice(entries, MAX_ENTRIES_SCANNED - scanned + 1))
            except OSError:  # unreadable (permissions, removed meanwhile): nothing to list there
                continue
            for entry in sorted(taken, key=lambda entry: entry.name):
                scanned += 1
                if scanned > MAX_ENTRIES_SCANNED or len(files) >= MAX_SOURCES:
                    truncated = True
                    break
                if not _listable(entry.name):
                    continue
                path = Path(entry.path)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if depth < MAX_DEPTH:
                            pending.append((path, depth + 1))
                        continue
                    if path.suffix.lower() not in VIDEO_SUFFIXES or not entry.is_file():
                        continue
                    resolved = path.resolve()
                    if not resolved.is_relative_to(root):
                        continue
                    size = resolved.stat().st_size
                except OSError:
                    continue
                name = path.relative_to(root).as_posix()
                files.setdefault(name, {"name": name, "size": size})
        if truncated:
            break
    return Listing(sorted(files.values(), key=lambda item: item["name"]), truncated)
