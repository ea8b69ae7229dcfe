"""Memory methods behind one interface; importing this package registers every method.

A method is one module of this package whose class is decorated with :func:`register_method`:
the modules are imported here, so adding a method needs no edit anywhere else.
"""

from mukv.memory.base import AnswerContext, MemoryMethod, MemoryStats, Query, RetrievedBlock
from mukv.memory.registry import (
    available_methods,
    create_memory,
    discover_methods,
    method_class,
    method_config,
    method_presets,
    register_method,
)

discover_methods()

__all__ = [
    "AnswerContext",
    "MemoryMethod",
    "MemoryStats",
    "Query",
    "RetrievedBlock",
    "available_methods",
    "create_memory",
    "discover_methods",
    "method_class",
    "method_config",
    "method_presets",
    "register_method",
]
