"""Registry of memory methods: names map to a method class and its config class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mukv._lazy import import_submodules
from mukv.backends.base import Backend
from mukv.config import apply_overrides
from mukv.memory.base import MemoryMethod

_METHODS: dict[str, type[MemoryMethod]] = {}
# Modules of mukv.memory that define no method (shared pieces).
_NOT_METHODS = frozenset({"base", "blocks", "granularity", "mukv_config", "registry"})


def discover_methods() -> None:
    """Import every module of :mod:`mukv.memory`, registering the methods they define (done when
    the package is imported; call again after adding a directory to its ``__path__``)."""
    import_submodules("mukv.memory", _NOT_METHODS)


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


def method_presets(name: str) -> list[str]:
    """Preset names of method ``name`` (empty if it has none)."""
    return sorted(getattr(method_class(name), "presets", {}))


def method_config(name: str, overrides: Mapping[str, Any] | None = None, preset: str | None = None) -> Any:
    """The config of method ``name``: its default (or ``preset``) with ``overrides`` applied
    (dotted keys, typed values or strings)."""
    cls = method_class(name)
    if overrides and "preset" in overrides:
        raise ValueError("preset: choose a preset with --preset (method_config(preset=...)), not as an override")
    if preset is None:
        config = cls.config_class()
    else:
        presets = getattr(cls, "presets", {})
        if preset not in presets:
            valid = ", ".join(sorted(presets)) or "none"
            raise ValueError(f"preset: method {name!r} has no preset {preset!r} (presets: {valid})")
        config = presets[preset]()
    return apply_overrides(config, overrides) if overrides else config


def create_memory(
    name: str,
    backend: Backend,
    config: Any = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    fps: float | None = None,
) -> MemoryMethod:
    """Instantiate method ``name`` on ``backend`` with ``config`` (default) plus ``overrides``, for
    a stream sampled at ``fps`` frames per second (needed by backends that place frames in time by
    the rate: see ``Backend.stream_positions``)."""
    cls = method_class(name)
    if config is None:
        return cls(backend, method_config(name, overrides), fps=fps)
    return cls(backend, apply_overrides(config, overrides) if overrides else config, fps=fps)
