"""Registry of memory methods: names map to a method class and its config class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mukv.backends.base import Backend
from mukv.config import apply_overrides
from mukv.memory.base import MemoryMethod

_METHODS: dict[str, type[MemoryMethod]] = {}


def register_method(cls: type[MemoryMethod]) -> type[MemoryMethod]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method: {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered memory methods."""
    return sorted(_METHODS)


def method_class(name: str) -> type[MemoryMethod]:
    """The class registered as ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown {name!r}; available: {', '.join(available_methods())}") from None


def method_config(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The default config of method ``name`` with ``overrides`` (dotted keys, typed or strings)."""
    config = method_class(name).config_class()
    return apply_overrides(config, overrides) if overrides else config


def create_memory(
    name: str, backend: Backend, config: Any = None, overrides: Mapping[str, Any] | None = None
) -> MemoryMethod:
    """Instantiate method ``name`` on ``backend`` with ``config`` (default) plus ``overrides``."""
    cls = method_class(name)
    config = config if config is not None else cls.config_class()
    if overrides:
        config = apply_overrides(config, overrides)
    return cls(backend, config)
