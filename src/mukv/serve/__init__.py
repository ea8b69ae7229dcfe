"""``mukv serve``: one model answering questions about many live video streams over HTTP.

:func:`create_app` builds the FastAPI app from a :class:`ServeConfig`; ``mukv serve`` runs it under
uvicorn. Needs the ``serve`` extra (``pip install 'mukv[serve]'``); names load on first use, so the
configuration can be checked without it.
"""

from __future__ import annotations

from mukv._lazy import lazy_exports

_EXPORTS = {
    "ServeConfig": "mukv.serve.config",
    "create_app": "mukv.serve.app",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
