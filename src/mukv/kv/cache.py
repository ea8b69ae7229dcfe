"""Cache layers that grow in place, and caches built from them without copying.

transformers' ``DynamicLayer`` appends by concatenation: every decoding step copies the whole
layer, and a ``DynamicCache`` built from ``ddp_cache_data`` copies its data once more. An
answering cache of thousands of retrieved tokens would be copied at every generated token.
:class:`GrowingLayer` keeps keys and values as views of buffers with room to spare, so appending
writes in place (growing by doubling when the room runs out).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, DynamicLayer


def reserve(buffer: torch.Tensor, used: int, needed: int, limit: int | None = None, dim: int = 2) -> torch.Tensor:
    """``buffer`` with room for ``needed`` entries along ``dim`` (its first ``used`` kept): itself
    if it has room, else a copy with twice the capacity (at most ``max(limit, needed)``)."""
    capacity = buffer.shape[dim]
    if needed <= capacity:
        return buffer
    shape = list(buffer.shape)
    grown_to = 2 * capacity if limit is None else min(2 * capacity, limit)
    shape[dim] = max(needed, grown_to)
    grown = buffer.new_empty(shape)
    grown.narrow(dim, 0, used).copy_(buffer.narrow(dim, 0, used))
    return grown


class GrowingLayer(DynamicLayer):
    """A cache layer whose ``keys``/``values`` ``[B, Hkv, length, D]`` are views of the first
    ``length`` tokens of ``key_buffer``/``value_buffer`` (adopted, not copied): appending writes
    in place. ``limit`` caps the doubling (``None``: no cap)."""

    def __init__(
        self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int, limit: int | None = None
    ) -> None:
        super().__init__()
        self.lazy_initialization(key_buffer, value_buffer)
        self.limit = limit
        self.key_buffer = key_buffer
        self.value_buffer = value_buffer
        self.resize(length)

    @classmethod
    def copy_of(cls, keys: torch.Tensor, values: torch.Tensor, limit: int | None = None) -> GrowingLayer:
        """A layer holding a copy of ``keys``/``values``."""
        return cls(keys.clone(), values.clone(), keys.shape[2], limit)

    def resize(self, length: int) -> None:
        self.keys = self.key_buffer[:, :, :length]
        self.values = self.value_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, m = self.keys.shape[2], key_states.shape[2]
        self.key_buffer = reserve(self.key_buffer, n, n + m, self.limit)
        self.value_buffer = reserve(self.value_buffer, n, n + m, self.limit)
        self.key_buffer[:, :, n : n + m] = key_states
        self.value_buffer[:, :, n : n + m] = value_states
        self.resize(n + m)
        return self.keys, self.values


def cache_of(layers: list[DynamicLayer]) -> DynamicCache:
    """A ``DynamicCache`` made of ``layers`` as they are (no copy)."""
    cache = DynamicCache()
    cache.layers = layers
    return cache
