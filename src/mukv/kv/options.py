"""Storage options shared by every block-based memory method (``mukv``, ``rekv``).

They decide how stored blocks are held, not which blocks exist or how they are chosen:

- ``kv_dtype``: payloads kept as computed (``native``) or quantized to ``int8`` / ``int4``
  (keys per channel, values per token, in groups of ``kv_group``; the KIVI split), dequantized
  on the model's device when a cache is assembled; ``kv_keys="compact"`` groups the keys of blocks
  shorter than a group per token too (fewer bytes, more key error; see :mod:`mukv.kv.quant`);
- ``memory_budget``: the most bytes stored blocks may hold; beyond it the method's documented
  consolidation policy compresses or evicts (``None``: unbounded);
- ``ram_budget``: the most payload bytes held in RAM; older payloads beyond it move to
  memory-mapped files in ``disk_dir`` (a temporary directory when ``None``).

A memory or evaluation run saved before an option existed reads as saved with its default
(:func:`with_storage_defaults`). Byte sizes accept integers or strings with a unit (``"2GB"``,
``"512MiB"``; ``GB`` = 10**9, ``GiB`` = 2**30), from Python, ``--set``, the harness and the server
alike.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NewType

KV_DTYPES = ("native", "int8", "int4")
KV_KEYS = ("channel", "compact")

#: A byte count: typed as an ``int``; :func:`parse_bytes` reads strings with units.
ByteSize = NewType("ByteSize", int)

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, field: str) -> int:
    """``value`` as a positive byte count: an int, or a string such as ``"2GB"`` / ``"1.5GiB"``.
    ``ValueError`` naming ``field`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a byte size such as 2GB or 536870912, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{field}: expected a byte size such as 2GB, 512MiB or 536870912, got {value!r} "
                "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        number = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise ValueError(f"{field}: expected a byte size such as 2GB or 536870912, got {value!r}")
    if number <= 0:
        raise ValueError(f"{field}: must be a positive number of bytes, got {value!r}")
    return number


@dataclass(frozen=True, kw_only=True)
class StorageOptions:
    """How a block method stores its blocks (see the module docstring). A base of the block
    methods' configs: every field is set like their other options."""

    kv_dtype: str = "native"
    # Elements sharing one scale and offset: keys per channel over this many tokens, values per
    # token over this many channels (clipped to the head dimension).
    kv_group: int = 64
    # Keys of blocks shorter than a group: per channel (KIVI) or, "compact", per token.
    kv_keys: str = "channel"
    memory_budget: ByteSize | None = None
    ram_budget: ByteSize | None = None
    disk_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype: must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if isinstance(self.kv_group, bool) or not isinstance(self.kv_group, int) or self.kv_group < 2:
            raise ValueError(f"kv_group: must be an integer >= 2, got {self.kv_group!r}")
        if self.kv_keys not in KV_KEYS:
            raise ValueError(f"kv_keys: must be one of {', '.join(KV_KEYS)}, got {self.kv_keys!r}")
        for name in ("memory_budget", "ram_budget"):
            value = getattr(self, name)
            if value is not None:
                # Frozen: normalise "2GB" to its byte count once, here.
                object.__setattr__(self, name, ByteSize(parse_bytes(value, name)))
        if self.disk_dir is not None and (not isinstance(self.disk_dir, str) or not self.disk_dir.strip()):
            raise ValueError(f"disk_dir: must be a directory path, got {self.disk_dir!r}")


def with_storage_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (a block method's config as saved in a memory's manifest or a run's ``run.json``)
    with every storage option it lacks set to its default. Each option was added with the default
    that does what mukv did before it existed (native payloads, KIVI's key split, no budget, no disk
    tier), so a memory or run written before an option existed reads as written with its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(StorageOptions)}
    return {**{k: v for k, v in defaults.items() if k not in config}, **config}
