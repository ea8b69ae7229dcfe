"""mukv: question answering over long, live video streams with a compressed KV-cache memory.

Importing this package does no I/O and loads no model; heavy modules load on first use.
"""

from __future__ import annotations

from mukv._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "load_backend": "mukv.backends",
    "build_tiny_model": "mukv.backends",
    "LlavaOnevisionBackend": "mukv.backends",
    "PromptTemplate": "mukv.backends",
    "StreamSession": "mukv.engine",
    "Answer": "mukv.engine",
    "TokenEvent": "mukv.engine",
    "DoneEvent": "mukv.engine",
    "available_methods": "mukv.memory",
    "create_memory": "mukv.memory",
    "MemoryStats": "mukv.memory",
    "RetrievedBlock": "mukv.memory",
    "open_video": "mukv.video",
    "open_npy": "mukv.video",
    "open_source": "mukv.video",
    "from_array": "mukv.video",
    "PushStream": "mukv.video",
    "BackendConfig": "mukv.config",
    "GenerationConfig": "mukv.config",
    "SessionConfig": "mukv.config",
    "MukvError": "mukv.errors",
    "ModelLoadError": "mukv.errors",
    "VideoError": "mukv.errors",
    "StreamError": "mukv.errors",
}

__all__ = ["__version__", *_EXPORTS]

__getattr__ = lazy_exports(__name__, _EXPORTS)
