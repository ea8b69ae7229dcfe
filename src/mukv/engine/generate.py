"""Greedy decoding after an assembled cache, as a generator of token ids."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import DynamicCache

from mukv.backends.base import Backend


def greedy_decode(
    backend: Backend,
    cache: DynamicCache,
    prompt_ids: torch.Tensor,
    start_position: int,
    max_new_tokens: int,
    logits_out: list[torch.Tensor] | None = None,
) -> Iterator[int]:
    """Prefill ``prompt_ids [1, n]`` from cursor ``start_position`` on, then decode greedily
    (positions from the backend's scheme). Generated tokens continue right after the prompt's last
    token, as transformers' ``generate`` continues an M-RoPE prompt too (it advances the prompt's
    ``position_ids`` by one per token), even where a video's time axis runs past the text.

    Yields each new token id, the end-of-sequence token included (then stops), at most
    ``max_new_tokens`` ids. ``cache`` grows as decoding proceeds. If ``logits_out`` is a list, the
    float32 logits ``[V]`` that chose each yielded token are appended to it.
    """
    device = backend.device
    scheme = backend.positions
    n = prompt_ids.shape[1]
    logits = backend.forward(backend.embed_ids(prompt_ids), cache, scheme.text(start_position, n, device), "last")
    position = start_position + n
    for step in range(max_new_tokens):
        assert logits is not None
        if logits_out is not None:
            logits_out.append(logits[0, -1].detach().cpu())
        token = int(logits[0, -1].argmax())
        yield token
        if token in backend.eos_token_ids or step + 1 == max_new_tokens:
            return
        ids = torch.tensor([[token]], device=device)
        logits = backend.forward(backend.embed_ids(ids), cache, scheme.text(position, 1, device))
        position += 1


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete characters."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._backend.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self._emitted) :] if text.startswith(self._emitted) else text
        self._emitted = text
        return delta

    def flush(self) -> str:
        """Text not yet returned (an incomplete character at the end is returned as is)."""
        text = self._backend.decode(self._ids)
        delta = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return delta
