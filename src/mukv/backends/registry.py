"""Backends by model family: the checkpoint's ``model_type`` picks the class that loads it.

A family is one module in this package whose backend class is decorated with
:func:`register_backend`; :func:`load_backend` finds it by the ``model_type`` in the checkpoint's
``config.json``. Nothing else needs an edit to add a family: the package's modules are imported
on the first lookup of an unknown type.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from mukv._lazy import import_submodules
from mukv.config import BackendConfig
from mukv.errors import ModelLoadError
from mukv.models import shipped_model_dir

_BACKENDS: dict[str, type] = {}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "video_processor/*"]
# Modules of this package that hold no family (importing them would only cost time).
_NOT_FAMILIES = frozenset(
    {"base", "common", "positions", "prompts", "qwen_vl", "registry", "tiny", "tiny_qwen", "transformers_api"}
)


def register_backend(*model_types: str) -> Callable[[type], type]:
    """Class decorator: the class loads checkpoints of ``model_types`` with its
    ``from_pretrained(config: BackendConfig, directory=...)``."""

    def add(cls: type) -> type:
        for model_type in model_types:
            other = _BACKENDS.get(model_type)
            if other is not None and other is not cls:
                raise ValueError(f"model_type {model_type!r}: already served by {other.__name__}")
            _BACKENDS[model_type] = cls
        return cls

    return add


def _discover() -> None:
    import_submodules("mukv.backends", _NOT_FAMILIES)


def supported_model_types() -> tuple[str, ...]:
    """Every ``model_type`` a backend is registered for."""
    _discover()
    return tuple(sorted(_BACKENDS))


def backend_class(model_type: str) -> type:
    """The backend class registered for ``model_type`` (``ModelLoadError`` if none)."""
    if model_type not in _BACKENDS:
        _discover()
    try:
        return _BACKENDS[model_type]
    except KeyError:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(_BACKENDS))})"
        ) from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Map a dtype name to torch; ``auto`` is float32 on CPU and bfloat16 (or float16) on CUDA."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_device(device: str) -> torch.device:
    """Parse ``device``; a CUDA device on a machine without CUDA is a ``ValueError``."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available on this machine")
    return parsed


def resolve_model_dir(model: str) -> Path:
    """A local directory for ``model``: the directory itself, a checkpoint shipped with the
    package (``mukv-tiny``; a local directory of the same name wins, as it does over hub ids), or
    a hub snapshot.

    Raises :class:`ModelLoadError` naming both the local path and the hub id that were tried.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    shipped = shipped_model_dir(model)
    if shipped is not None:
        return shipped
    if path.exists():
        raise ModelLoadError(f"model {model!r}: {path.resolve()} is a file; expected a model directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # hub errors come in many types; all mean "not loadable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load model {model!r}: no local directory at {path.resolve()}, and the Hugging Face "
            f"Hub id {model!r} could not be fetched ({type(exc).__name__}: {reason}). Pass a local "
            "checkpoint directory, or build an offline model with `mukv tiny-model DIR`."
        ) from exc


def read_model_type(directory: Path, model: str) -> str:
    """``model_type`` from ``directory/config.json`` (``ModelLoadError`` if missing or unreadable)."""
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"model {model!r}: {directory} has no config.json")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"model {model!r}: unreadable config.json in {directory}: {exc}") from exc
    if not isinstance(model_type, str):
        raise ModelLoadError(f"model {model!r}: config.json in {directory} names no model_type")
    return model_type


def load_backend(model: str | os.PathLike | None = None, **kwargs):
    """Load a backend by hub id, shipped name or directory; keyword arguments are
    :class:`BackendConfig` fields. The checkpoint's ``model_type`` picks the family."""
    if model is not None:
        kwargs["model"] = str(model)
    config = BackendConfig(**kwargs)
    resolve_dtype(config.dtype, resolve_device(config.device))  # bad values fail before any download
    directory = resolve_model_dir(config.model)
    model_type = read_model_type(directory, config.model)
    try:
        cls = backend_class(model_type)
    except ModelLoadError as exc:
        raise ModelLoadError(f"model {config.model!r}: {exc}") from None
    return cls.from_pretrained(config, directory=directory)
