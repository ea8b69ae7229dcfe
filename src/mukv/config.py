"""Configuration: frozen, keyword-only dataclasses validated on construction.

Every component takes one config object; invalid values raise ``ValueError`` naming the field.
:func:`apply_overrides` turns ``key=value`` strings (as typed on the command line with
``--set``) into a new config, converting each value to the field's declared type.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mukv.kv.options import ByteSize, parse_bytes

DEFAULT_MODEL_ID = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
DTYPES = ("auto", "float32", "bfloat16", "float16")

C = TypeVar("C")


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


def check_fps(fps: float | None) -> None:
    """``ValueError`` unless ``fps`` (a stream's sampling rate, frames per second) is ``None`` or a
    positive finite number."""
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps < math.inf):
        raise ValueError(f"fps: must be a positive number of frames per second, got {fps!r}")


@dataclass(frozen=True, kw_only=True)
class BackendConfig:
    """Which checkpoint to load and where to run it.

    ``dtype="auto"`` means float32 on CPU and bfloat16 on CUDA.
    """

    model: str = DEFAULT_MODEL_ID
    device: str = "cpu"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    vision_batch_frames: int = 16
    # Resolution-dependent families (Qwen-VL): pixels per frame (frames are resized to a square of
    # about this many pixels; None: the checkpoint's video processor cap). Fixed-size towers ignore it.
    frame_pixels: int | None = None

    def __post_init__(self) -> None:
        _require(bool(self.model.strip()), "model", "must be a hub id or a local directory")
        _require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _require(self.vision_batch_frames >= 1, "vision_batch_frames", "must be >= 1")
        _require(self.frame_pixels is None or self.frame_pixels >= 1, "frame_pixels", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Greedy decoding limits (method.md section 5)."""

    max_new_tokens: int = 256
    max_new_tokens_choice: int = 16

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _require(self.max_new_tokens_choice >= 1, "max_new_tokens_choice", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    """Per-stream settings of a :class:`~mukv.engine.session.StreamSession`.

    ``encode_batch_frames`` bounds how many frames are encoded and handed to the memory at once
    when ingesting from a source; it changes speed and peak memory, never results.
    """

    encode_batch_frames: int = 8
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)

    def __post_init__(self) -> None:
        _require(self.encode_batch_frames >= 1, "encode_batch_frames", "must be >= 1")


def _convert(value: str, annotation: Any, field: str) -> Any:
    """Convert a command-line string to ``annotation`` (bool, int, float, str, byte sizes, optionals)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        if len(args) == 1:
            return _convert(value, args[0], field)
        raise ValueError(f"{field}: cannot set a field of type {annotation} from the command line")
    if annotation is ByteSize:
        return parse_bytes(value, field)
    if annotation is bool:
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{field}: expected a boolean (true/false), got {value!r}")
    if annotation in (int, float):
        try:
            return annotation(value)
        except ValueError:
            raise ValueError(f"{field}: expected {annotation.__name__}, got {value!r}") from None
    if annotation is str:
        return value
    raise ValueError(f"{field}: cannot set a field of type {annotation} from the command line")


def apply_overrides(config: C, overrides: Mapping[str, Any]) -> C:
    """Return a copy of ``config`` with dotted ``overrides`` applied.

    Values may be typed Python values or strings (converted to the field's type). Nested
    config dataclasses are addressed with dots: ``{"generation.max_new_tokens": "32"}``.
    Unknown fields raise ``ValueError`` naming the field and the valid names.
    """
    grouped: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            grouped.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]  # type: ignore[arg-type]
    changes: dict[str, Any] = {}
    for name in list(direct) + list(grouped):
        if name not in names:
            raise ValueError(f"{name}: unknown field of {type(config).__name__}; valid: {', '.join(names)}")
    for name, value in direct.items():
        current = getattr(config, name)
        if dataclasses.is_dataclass(current) and isinstance(value, str):
            # A nested config (one value per granularity, say) is set field by field.
            parts = [f"{name}.{f.name}" for f in dataclasses.fields(current)]
            raise ValueError(
                f"{name}: holds one value per {', '.join(f.name for f in dataclasses.fields(current))}; "
                f"set them one by one, e.g. --set {parts[0]}={value} (fields: {', '.join(parts)})"
            )
        changes[name] = _convert(value, hints[name], name) if isinstance(value, str) else value
    for name, sub in grouped.items():
        current = getattr(config, name)
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{name}: is not a nested config, cannot set {name}.{next(iter(sub))}")
        try:
            changes[name] = apply_overrides(current, sub)
        except ValueError as exc:
            raise ValueError(f"{name}.{exc}") from None
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """Parse ``["a=1", "b.c=x"]`` into a dict; malformed items raise ``ValueError``."""
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass, with its class name."""
    data = dataclasses.asdict(config)
    data["__class__"] = type(config).__name__
    return data
