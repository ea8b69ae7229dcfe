"""Memory methods behind one interface; importing this package registers the built-in ones."""

from mukv.memory import baselines as _baselines  # noqa: F401  (registers full, uniform)
from mukv.memory import mukv as _mukv  # noqa: F401  (registers mukv)
from mukv.memory import rekv as _rekv  # noqa: F401  (registers rekv, recent)
from mukv.memory.base import AnswerContext, MemoryMethod, MemoryStats, Query, RetrievedBlock
from mukv.memory.registry import (
    available_methods,
    create_memory,
    method_class,
    method_config,
    method_presets,
    register_method,
)

__all__ = [
    "AnswerContext",
    "MemoryMethod",
    "MemoryStats",
    "Query",
    "RetrievedBlock",
    "available_methods",
    "create_memory",
    "method_class",
    "method_config",
    "method_presets",
    "register_method",
]
