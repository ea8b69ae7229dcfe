"""Package plumbing: attributes that load their module on first use (keeps ``import mukv`` and the CLI's
error paths free of torch and the model classes), and discovery of registered modules."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``exports`` (attribute name -> module that defines it)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def import_submodules(package: str, exclude: frozenset[str]) -> None:
    """Import every module of ``package`` (on its current ``__path__``) not in ``exclude`` and not
    private: how registries of methods and model families find a new one from its file alone."""
    import pkgutil

    for info in pkgutil.iter_modules(import_module(package).__path__):
        if info.name not in exclude and not info.name.startswith("_"):
            import_module(f"{package}.{info.name}")
