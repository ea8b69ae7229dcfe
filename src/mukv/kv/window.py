"""A sliding-window KV cache: the system prompt plus the most recent ``n_local`` tokens.

New tokens attend to the system prompt and the window only. Window keys are kept at positions
right after the system prompt (re-rotated exactly when the oldest tokens leave), so a stream of
any length never goes beyond ``init + n_local + chunk`` positions (method.md section 7).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from mukv.backends.base import Backend
from mukv.kv.rope import rerotate


class SlidingWindow:
    """``[init | window]`` with ``window`` at most ``n_local`` tokens after each append."""

    def __init__(self, backend: Backend, n_local: int) -> None:
        if n_local < 1:
            raise ValueError(f"n_local: must be >= 1, got {n_local}")
        self.backend = backend
        self.n_local = n_local
        self.cache, self.init_len = backend.system_cache()
        # Window keys as computed, and the positions they were computed at: every re-positioning
        # rotates from these, so rounding never accumulates over many evictions.
        self._computed_keys: list[torch.Tensor] = [layer.keys[:, :, :0] for layer in self.cache.layers]
        self._computed_at = torch.empty(0, dtype=torch.long, device=backend.device)

    @property
    def length(self) -> int:
        """Tokens in the window (system prompt excluded)."""
        return self.cache.get_seq_length() - self.init_len

    def append(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill ``embeds [1, m, d]`` after the window; then evict beyond ``n_local``.

        Returns the new tokens' ``kv [L, 2, Hkv, m, D]`` (keys rotated at the returned
        ``positions [m]``), copied out of the window.
        """
        m = embeds.shape[1]
        start = self.init_len + self.length
        positions = torch.arange(start, start + m, device=self.backend.device)
        self.backend.forward(embeds, self.cache, positions.unsqueeze(0), logits="none")
        kv = torch.stack(
            [torch.stack((layer.keys[0, :, -m:], layer.values[0, :, -m:])) for layer in self.cache.layers]
        ).clone()
        self._computed_keys = [
            torch.cat((computed, layer.keys[:, :, -m:]), dim=2)
            for computed, layer in zip(self._computed_keys, self.cache.layers, strict=True)
        ]
        self._computed_at = torch.cat((self._computed_at, positions))
        self._evict()
        return kv, positions

    def _evict(self) -> None:
        excess = self.length - self.n_local
        if excess <= 0:
            return
        init = self.init_len
        self._computed_at = self._computed_at[excess:]
        delta = torch.arange(init, init + self._computed_at.shape[0], device=self.backend.device) - self._computed_at
        inv_freq = self.backend.rope_inv_freq
        for i, layer in enumerate(self.cache.layers):
            self._computed_keys[i] = self._computed_keys[i][:, :, excess:]
            keys = rerotate(self._computed_keys[i], delta, inv_freq)
            layer.keys = torch.cat((layer.keys[:, :, :init], keys), dim=2)
            layer.values = torch.cat((layer.values[:, :, :init], layer.values[:, :, init + excess :]), dim=2)

    @property
    def nbytes(self) -> int:
        """Bytes held beyond the system prompt: window keys and values plus the keys as computed."""
        init = self.init_len
        held = sum(layer.keys[:, :, init:].nbytes + layer.values[:, :, init:].nbytes for layer in self.cache.layers)
        return held + sum(k.nbytes for k in self._computed_keys)

    def prefix(self, tokens: int) -> DynamicCache:
        """A new cache of ``[init | first tokens of the window]`` (views; the window is not changed)."""
        end = self.init_len + tokens
        return DynamicCache(
            ddp_cache_data=[(layer.keys[:, :, :end], layer.values[:, :, :end]) for layer in self.cache.layers]
        )
