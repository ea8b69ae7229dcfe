"""Errors the server answers with: JSON ``{"error": {"code", "message", "field"?}}``, a stable code each.

Codes are part of the API (clients branch on them); messages are for people and may change.
"""

from __future__ import annotations

import re
from typing import Any

from mukv.errors import ModelLoadError, MukvError, StreamError, VideoError

# The package's errors start with the name of what was wrong ("max_new_tokens: must be ..."),
# which becomes the error's field.
_FIELD = re.compile(r"^([A-Za-z_][\w.]*): ")


class ApiError(Exception):
    """An error answered to the client as ``status`` with a JSON body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.field)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The JSON body of an error."""
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


def field_of(message: str) -> str | None:
    """The field a package error message names (``"at: ..."`` -> ``"at"``), if any."""
    match = _FIELD.match(message)
    return match.group(1) if match else None


def from_exception(exc: BaseException, *, field_prefix: str = "") -> ApiError:
    """The API error for an exception raised by the package on bad input (anything else is a 500).

    ``field_prefix`` places the named field inside the request (``"overrides."``).
    """
    if isinstance(exc, ApiError):
        return exc
    message = str(exc)
    field = field_of(message)
    if field is not None:
        field = field_prefix + field
    if isinstance(exc, StreamError):
        return ApiError(409, "stream_state", message, field=field)
    if isinstance(exc, VideoError):
        return ApiError(422, "invalid_video", message, field=field)
    if isinstance(exc, ModelLoadError):
        return ApiError(503, "model_unavailable", message)
    if isinstance(exc, MukvError | ValueError):
        return ApiError(422, "invalid_value", message, field=field)
    return ApiError(500, "internal_error", f"{type(exc).__name__}: {message}")
