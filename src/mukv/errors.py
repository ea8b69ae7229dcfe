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


class SavedMemoryError(MukvError):
    """A saved memory (:mod:`mukv.memory.persist`) cannot be used; the message names the problem."""


class MemoryFileError(SavedMemoryError):
    """A saved memory is missing, damaged, truncated, or in a format version this package cannot read."""


class MemoryMismatchError(SavedMemoryError):
    """A saved memory was made with another model, method, method config or stream than the one asked
    for: loading it would answer from key/values the model in use never computed."""
