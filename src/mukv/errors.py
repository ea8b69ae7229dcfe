"""Exceptions raised for user-facing failures.

Every error a user can trigger by passing a bad path, model id or value derives from
:class:`MukvError` (or is a plain ``ValueError`` for invalid configuration values), so that
the CLI and the server can report it in one line instead of a traceback.
"""

from __future__ import annotations


class MukvError(Exception):
    """Base class of the errors this package raises on bad input."""


class ModelLoadError(MukvError):
    """A model could not be loaded; the message names every location that was tried."""


class VideoError(MukvError):
    """A video source is missing, unreadable, or holds no frames."""


class StreamError(MukvError):
    """A stream was driven inconsistently (time going backwards, question before any frame)."""
