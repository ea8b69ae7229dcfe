"""Model backends: the only place that knows model classes.

Names load on first use, so that light modules of this package (prompt pieces, say) can be
imported without loading torch and the model classes.
"""

from __future__ import annotations

from mukv._lazy import lazy_exports

_EXPORTS = {
    "Backend": "mukv.backends.base",
    "TextModelSpec": "mukv.backends.base",
    "LlavaOnevisionBackend": "mukv.backends.llava_onevision",
    "load_backend": "mukv.backends.registry",
    "register_backend": "mukv.backends.registry",
    "supported_model_types": "mukv.backends.registry",
    "FrameLayout": "mukv.backends.positions",
    "PositionScheme": "mukv.backends.positions",
    "PromptTemplate": "mukv.backends.prompts",
    "TinyModelSpec": "mukv.backends.tiny",
    "build_tiny_model": "mukv.backends.tiny",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
