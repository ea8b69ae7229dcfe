"""Attention hooks: see or replace one layer's attention without forking the model.

A custom attention function is registered with transformers' ``AttentionInterface`` (and the
sdpa mask with ``AttentionMaskInterface``, without which chunked prefill loses causality). While
a hook is active (:func:`attention_hook`), every attention call goes to the hook first: it may
record what it sees (:class:`AttentionCapture` computes the scored layers' probabilities only;
no other layer's map is materialised) or return its own result (ReKV's per-layer retrieval).
Otherwise ordinary sdpa runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from mukv.backends.transformers_api import repeat_kv, sdpa_attention_forward, sdpa_mask

ATTENTION_NAME = "mukv_scored_sdpa"
_ACTIVE: ContextVar[AttentionHook | None] = ContextVar("mukv_attention_hook", default=None)


class AttentionHook(Protocol):
    """Called for every attention layer while active; return ``None`` to run ordinary sdpa, or
    ``(output, weights)`` as transformers' attention functions do."""

    def __call__(self, module, query, key, value, attention_mask, **kwargs) -> tuple | None: ...


_REGISTERED = threading.Lock()
_registered = False


@dataclass
class AttentionCapture:
    """Collects head-averaged attention probabilities of the layers in ``weights``.

    After a forward pass, ``probs`` is ``sum_l w_l * mean_h softmax(q k^T)`` with shape
    ``[B, n_queries, n_keys]`` (float32; keys include every cached key, e.g. the system prompt).
    If ``query_layer`` is set, ``queries`` holds that layer's post-RoPE queries ``[B, H, n, D]``.
    """

    weights: dict[int, float]
    query_layer: int | None = None
    probs: torch.Tensor | None = None
    queries: torch.Tensor | None = None

    def reset(self) -> None:
        self.probs = None
        self.queries = None

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float):
        if layer == self.query_layer:
            self.queries = query.detach().float()
        weight = self.weights.get(layer)
        if weight is None:
            return
        q = query.float()
        k = repeat_kv(key, q.shape[1] // key.shape[1]).float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        n, total = scores.shape[-2:]
        if mask is None:
            # No mask means plain causal attention aligned to the end of the keys.
            allowed = torch.ones(n, total, dtype=torch.bool, device=scores.device).tril(total - n)
            scores = scores.masked_fill(~allowed, float("-inf"))
        elif mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
        probs = torch.softmax(scores, dim=-1).mean(dim=1) * weight
        self.probs = probs if self.probs is None else self.probs + probs

    def __call__(self, module, query, key, value, attention_mask, **kwargs) -> None:
        self.record(module.layer_idx, query, key, attention_mask, kwargs.get("scaling") or query.shape[-1] ** -0.5)
        return None


def _hooked_sdpa(module, query, key, value, attention_mask, **kwargs):
    hook = _ACTIVE.get()
    if hook is not None:
        result = hook(module, query, key, value, attention_mask, **kwargs)
        if result is not None:
            return result
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    global _registered
    with _REGISTERED:
        if not _registered:
            AttentionInterface.register(ATTENTION_NAME, _hooked_sdpa)
            AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
            _registered = True


def use_hooked_attention(model) -> bool:
    """Switch ``model``'s text attention from sdpa to the hooked sdpa (the same kernel while no hook
    is active). Backends call this once, when they wrap their model, so that no later attention
    hook changes the model's configuration; returns whether hooks are available (sdpa models)."""
    _register()
    text_config = model.config.get_text_config()
    if text_config._attn_implementation == "sdpa":
        model.set_attn_implementation({"text_config": ATTENTION_NAME})
    return text_config._attn_implementation == ATTENTION_NAME


@contextmanager
def attention_hook(model, hook: AttentionHook) -> Iterator[AttentionHook]:
    """Within the block, ``model``'s language-model attention calls (in this thread or task)
    go through ``hook``; the hook is removed in ``finally``.

    The model must use the hooked sdpa (:func:`use_hooked_attention`, which backends apply when
    they are built; a bare sdpa model is switched here on first use). It is never switched back:
    without an active hook it is plain sdpa, and concurrent sessions sharing one model must not
    turn each other's hooks off.
    """
    if not use_hooked_attention(model):
        raise ValueError(
            "attention hooks need sdpa attention, the model uses "
            f"{model.config.get_text_config()._attn_implementation!r}"
        )
    token = _ACTIVE.set(hook)
    try:
        yield hook
    finally:
        _ACTIVE.reset(token)


@contextmanager
def capture_attention(model, weights: dict[int, float], query_layer: int | None = None) -> Iterator[AttentionCapture]:
    """Record the attention of ``weights``' layers (and ``query_layer``'s queries) while active."""
    with attention_hook(model, AttentionCapture(weights=dict(weights), query_layer=query_layer)) as capture:
        yield capture  # type: ignore[misc]


def scored_layers(choice: str, num_layers: int) -> dict[int, float]:
    """Layer weights for an attention-layer option (method.md section 3)."""
    if choice == "last":
        return {num_layers - 1: 1.0}
    if choice == "second_last":
        return {num_layers - 2: 1.0}
    if choice == "middle":
        return {num_layers // 2: 1.0}
    if choice == "weighted_last5":
        if num_layers < 5:
            raise ValueError(f"attention_layer: weighted_last5 needs >= 5 layers, the model has {num_layers}")
        return dict(zip(range(num_layers - 5, num_layers), (0.1, 0.15, 0.2, 0.25, 0.3), strict=True))
    raise ValueError(f"attention_layer: unknown {choice!r}")
