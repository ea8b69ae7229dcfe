"""InfiniPot-V: continual, query-agnostic compression of the stream's KV cache under a hard cap.

The stream's KV is one cache ``[init | region]`` like ``full``'s, but the visual region never holds
more than ``max_units * P`` tokens (``P``: visual tokens per unit). When the next unit would not
fit, every layer's region is compressed, per KV head, to ``keep_units * P`` tokens chosen by two
scores of what is already cached (no question is known yet, nothing is retrieved later):

* **TaR** (temporal-axis redundancy): a cached visual token whose key is close (cosine) to the keys
  of the same patch in the most recent units is redundant; the recent units' visual tokens are kept,
  and the least redundant older ones fill the rest of a ``tar_ratio`` share of the budget.
* **VaN** (value norm): the rest of the budget goes to the tokens with the largest value L2 norm.

Kept tokens keep the keys and positions they were computed with (nothing is re-rotated); the
question continues at the stream's cursor, where it would follow the uncompressed stream. The full
specification, its sources and where it departs from the public release are in ``docs/peers.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from mukv.errors import StreamError
from mukv.memory.base import (
    AnswerContext,
    MemoryMethod,
    MemoryStats,
    Query,
    RetrievedBlock,
    feed,
    unit_sequence,
)
from mukv.memory.registry import register_method

# Added to norms before dividing, as the release's TaR does (``kvcache_utils.py``).
_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class InfiniPotConfig:
    """InfiniPot-V's options (defaults: the release's ``scripts/run_sample.sh`` and argument defaults).

    ``max_units`` is the memory threshold ``|M|`` in units (the release's ``block_size``): the visual
    region holds at most ``max_units * P`` tokens. ``keep_units`` is the compression target ``|C|``
    (``compress_frame_num``): each compression leaves ``keep_units * P`` tokens per KV head.
    ``tar_ratio`` is the share of the target chosen by TaR (the recent units included), the rest by
    VaN. ``recent_ratio`` (the release's ``query_ratio``) gives the recent units TaR compares with:
    ``floor(recent_ratio * max_units)``. ``prefill_chunk_tokens`` bounds the tokens prefilled per
    forward call (memory only; results do not depend on it).
    """

    max_units: int = 32
    keep_units: int = 24
    tar_ratio: float = 0.5
    recent_ratio: float = 0.25
    prefill_chunk_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_units < 2:
            raise ValueError(f"max_units: must be >= 2, got {self.max_units}")
        if not 1 <= self.keep_units < self.max_units:
            raise ValueError(f"keep_units: must be >= 1 and below max_units ({self.max_units}), got {self.keep_units}")
        if not 0.0 <= self.tar_ratio <= 1.0:
            raise ValueError(f"tar_ratio: must be in [0, 1], got {self.tar_ratio}")
        if not 0.0 < self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio: must be in (0, 1], got {self.recent_ratio}")
        if self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens: must be >= 1, got {self.prefill_chunk_tokens}")
        if self.tar_ratio > 0:
            recent = self.recent_units
            if recent < 1:
                raise ValueError(
                    f"recent_ratio: {self.recent_ratio} of max_units={self.max_units} selects no recent unit for TaR "
                    "(raise it, or set tar_ratio=0)"
                )
            if recent > self.max_units - self.keep_units:
                raise ValueError(
                    f"recent_ratio: {recent} recent units exceed the {self.max_units - self.keep_units} units added "
                    "between two compressions (max_units - keep_units); TaR compares with whole, uncompressed units"
                )

    @property
    def recent_units(self) -> int:
        """Units TaR compares with (kept whole): ``floor(recent_ratio * max_units)``."""
        return math.floor(self.recent_ratio * self.max_units)


@dataclass(frozen=True)
class Region:
    """The stored cache, per layer: ``keys``/``values`` ``[1, Hkv, init + L, D]`` (the system prompt,
    then the region of ``L`` compressible tokens), and for every region token of every KV head its
    ``unit`` (stream index) and ``patch`` (index among its unit's ``P`` visual tokens; ``-1`` for text
    the model writes around a unit), ``[Hkv, L]`` int32. Kept tokens differ per layer and head, so
    their origin is stored per layer and head."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    unit: tuple[torch.Tensor, ...]
    patch: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        """Region tokens ``L`` (every layer and head holds as many)."""
        return int(self.unit[0].shape[1])

    @property
    def kv_bytes(self) -> int:
        """Bytes of the stored keys and values, the system prompt's included."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values, strict=True))

    @property
    def index_bytes(self) -> int:
        """Bytes of the region tokens' origins (unit and patch)."""
        return sum(u.nbytes + p.nbytes for u, p in zip(self.unit, self.patch, strict=True))

    def cache(self) -> DynamicCache:
        """A cache over the stored tensors for one answer or prefill: updates concatenate into new
        tensors, so what is stored is never written."""
        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values, strict=True)))


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[H, k]`` of the ``k`` largest of ``scores [H, L]`` per row, equal scores going to the
    earlier token: a rule of its own, as ``topk``'s order among ties is unspecified (the same text
    written around several units has equal value norms in the first layer)."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def tar_scores(keys: torch.Tensor, patch: torch.Tensor, recent: torch.Tensor, p: int) -> torch.Tensor:
    """TaR score of every token of one layer: ``keys [Hkv, L, D]``, ``patch [Hkv, L]``, ``recent [L]``
    (the visual tokens of the recent units: whole units, in stream order, the same in every head).

    A visual token's score is minus its key's cosine similarity to the keys of the same patch in the
    recent units, averaged over them (the release's pix2pix similarity); higher is less redundant.
    Returns ``[Hkv, L]``; tokens that are recent or not visual get ``-inf`` (TaR never picks them).
    """
    heads, _, dim = keys.shape
    normed = keys.float()
    normed = normed / (normed.norm(dim=-1, keepdim=True) + _EPS)
    # Recent units are whole in every head: their visual keys in stream order are [R units x P patches].
    recent_keys = normed[:, recent].reshape(heads, -1, p, dim)  # [Hkv, R, P, D]
    # mean_r cos(k, q_r) = k_hat . mean_r(q_hat_r): one mean direction per head and patch.
    mean_recent = recent_keys.mean(dim=1)  # [Hkv, P, D]
    aligned = torch.gather(mean_recent, 1, patch.clamp(min=0).long()[..., None].expand(-1, -1, dim))  # [Hkv, L, D]
    score = -(normed * aligned).sum(dim=-1)
    old_visual = ~recent[None, :] & (patch >= 0)
    return torch.where(old_visual, score, torch.full_like(score, -math.inf))


def select_tokens(
    keys: torch.Tensor,
    values: torch.Tensor,
    patch: torch.Tensor,
    recent: torch.Tensor,
    p: int,
    budget: int,
    tar_budget: int,
) -> torch.Tensor:
    """Indices ``[Hkv, budget]`` (ascending) of the tokens one layer keeps: ``keys``/``values``
    ``[Hkv, L, D]``, ``patch [Hkv, L]``, ``recent [L]`` (see :func:`tar_scores`).

    With ``tar_budget > 0`` the TaR set is the recent units' visual tokens plus the
    ``tar_budget - |recent|`` older visual tokens of highest TaR score; VaN then fills the budget
    with the tokens of largest value norm among the rest (the release's ``infinipot-v`` branch: the
    TaR set's norms are raised above every other before one top-k).
    """
    van = values.float().norm(dim=-1)  # [Hkv, L]
    if tar_budget > 0:
        forced = recent[None, :].expand_as(van).clone()
        extra = tar_budget - int(recent.sum())
        tar = tar_scores(keys, patch, recent, p)
        # Fewer older visual tokens than the share (text the model writes around units is not
        # scored by TaR): VaN fills what TaR cannot.
        extra = min(extra, int(torch.isfinite(tar).sum(dim=-1).min()))
        if extra > 0:
            forced.scatter_(1, top(tar, extra), True)
        van = torch.where(forced, torch.full_like(van, math.inf), van)
    return top(van, budget).sort(dim=-1).values


@register_method
class InfiniPotMemory(MemoryMethod):
    """InfiniPot-V's continual KV compression (see the module docstring and ``docs/peers.md``).

    One cache ``[init | region]`` on the model's device; each unit is prefilled once, attending to
    the system prompt and to what the region holds when it arrives. Before a unit that would take the
    region past ``max_units * P`` tokens, every layer's region is compressed to ``keep_units * P``
    tokens per KV head. A question is answered from the whole cache at the stream's time; a question
    about an earlier time is refused (compression has already used, and kept, later frames).
    """

    name = "infinipot"
    config_class = InfiniPotConfig
    answers_past_questions = False

    def __init__(self, backend, config: InfiniPotConfig | None = None, *, fps: float | None = None) -> None:
        super().__init__(backend, config, fps=fps)
        cache, self._init_len = backend.system_cache()
        p = backend.tokens_per_frame
        #: Most tokens the region ever holds (``|M|``), and what a compression leaves (``|C|``).
        self.cap_tokens = self.config.max_units * p
        self.keep_tokens = self.config.keep_units * p
        #: Of ``keep_tokens``, how many TaR chooses (the recent units included), as the release
        #: computes it: ``keep - round((1 - tar_ratio) * keep)``; none with ``tar_ratio = 0``.
        self.tar_tokens = self.keep_tokens - round((1.0 - self.config.tar_ratio) * self.keep_tokens)
        if self.config.tar_ratio == 0:
            self.tar_tokens = 0
        if self.tar_tokens and self.config.recent_units * p > self.tar_tokens:
            raise ValueError(
                f"recent_ratio: the {self.config.recent_units} recent units ({self.config.recent_units * p} tokens) do "
                f"not fit TaR's {self.tar_tokens} tokens (tar_ratio={self.config.tar_ratio} of keep_units="
                f"{self.config.keep_units}); raise tar_ratio or lower recent_ratio"
            )
        empty = torch.empty(backend.text.num_kv_heads, 0, dtype=torch.int32, device=backend.device)
        layers = cache.layers
        self._region = Region(
            keys=tuple(layer.keys for layer in layers),
            values=tuple(layer.values for layer in layers),
            unit=tuple(empty for _ in layers),
            patch=tuple(empty for _ in layers),
        )
        # The stream is one run of units from the end of the system prompt (as ``full`` places it).
        self._cursor = self._init_len
        # The first unit appended after the last compression: units from it on are whole in every head.
        self._since = 0
        #: Compressions run so far.
        self.compressions = 0

    # ------------------------------------------------------------------ ingest

    def _ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        first = self.frames
        lengths = [self.unit_tokens(first + u) for u in range(features.shape[0])]
        # Checked before anything changes: a unit that cannot fit after a compression fails the whole call.
        for u, length in enumerate(lengths):
            self._check_fits(length, first + u)
        region, cursor, since, compressions = self._region, self._cursor, self._since, 0
        u = 0
        while u < len(lengths):
            if region.length + lengths[u] > self.cap_tokens:
                region = self._compress(region, self._recent(region, first + u, since))
                since, compressions = first + u, compressions + 1
            count, total = 0, region.length
            while u + count < len(lengths) and total + lengths[u + count] <= self.cap_tokens:
                total += lengths[u + count]
                count += 1
            region, cursor = self._append(region, features[u : u + count], first + u, cursor)
            u += count
        # State changes only once the whole call succeeded.
        self._region, self._cursor, self._since = region, cursor, since
        self.compressions += compressions

    def _check_fits(self, length: int, unit: int) -> None:
        if self.keep_tokens + length > self.cap_tokens:
            raise ValueError(
                f"max_units: unit {unit} takes {length} tokens, more than the {self.cap_tokens - self.keep_tokens} "
                f"left between keep_units ({self.keep_tokens} tokens) and max_units ({self.cap_tokens} tokens)"
            )

    def _append(self, region: Region, features: torch.Tensor, first_unit: int, cursor: int) -> tuple[Region, int]:
        """``region`` with units ``features [U, P, w]`` (stream indices from ``first_unit``) prefilled
        after it, each attending to the system prompt and the region; and the cursor after them."""
        backend = self.backend
        p = backend.tokens_per_frame
        stamps = self.stamps(first_unit, features.shape[0])
        flat, positions, cursor, units = unit_sequence(
            backend,
            self.positions,
            features.to(backend.device),
            stamps,
            self._init_len,
            first_unit=first_unit,
            cursor=cursor,
        )
        cache = region.cache()
        feed(backend, cache, flat, positions, self.config.prefill_chunk_tokens)
        # Each new token's origin: its unit, and its patch (-1 for the unit's text), in sequence order.
        unit_ids, patch_ids = [], []
        for u, tokens in enumerate(units):
            n = tokens.length(p)
            unit_ids.append(torch.full((n,), first_unit + u, dtype=torch.int32))
            patch = torch.full((n,), -1, dtype=torch.int32)
            patch[tokens.prefix : tokens.prefix + p] = torch.arange(p, dtype=torch.int32)
            patch_ids.append(patch)
        heads = backend.text.num_kv_heads
        new_unit = torch.cat(unit_ids).to(backend.device)[None].expand(heads, -1)
        new_patch = torch.cat(patch_ids).to(backend.device)[None].expand(heads, -1)
        appended = Region(
            keys=tuple(layer.keys for layer in cache.layers),
            values=tuple(layer.values for layer in cache.layers),
            unit=tuple(torch.cat((u, new_unit), dim=1) for u in region.unit),
            patch=tuple(torch.cat((q, new_patch), dim=1) for q in region.patch),
        )
        return appended, cursor

    # ------------------------------------------------------------------ compression

    def _recent(self, region: Region, next_unit: int, since: int) -> torch.Tensor:
        """``[L]`` mask of the visual tokens of the units TaR compares with: the newest
        ``recent_units`` before unit ``next_unit``, but only units added since the last compression
        (unit ``since`` on), which every head holds whole; fewer of them fit when units carry text.
        The text a model writes around those units is not part of it (it has no patch to compare)."""
        unit, patch = region.unit[0][0], region.patch[0][0]
        return (unit >= max(next_unit - self.config.recent_units, since)) & (patch >= 0)

    def _compress(self, region: Region, recent: torch.Tensor) -> Region:
        """``region`` compressed to ``keep_tokens`` tokens per layer and KV head by
        :func:`select_tokens`, the system prompt kept whole; kept keys are not moved."""
        init, p = self._init_len, self.backend.tokens_per_frame
        keys, values, units, patches = [], [], [], []
        for k, v, u, q in zip(region.keys, region.values, region.unit, region.patch, strict=True):
            keep = select_tokens(k[0, :, init:], v[0, :, init:], q, recent, p, self.keep_tokens, self.tar_tokens)
            index = keep[None, :, :, None].expand(1, -1, -1, k.shape[-1])
            keys.append(torch.cat((k[:, :, :init], torch.gather(k[:, :, init:], 2, index)), dim=2))
            values.append(torch.cat((v[:, :, :init], torch.gather(v[:, :, init:], 2, index)), dim=2))
            units.append(torch.gather(u, 1, keep))
            patches.append(torch.gather(q, 1, keep))
        return Region(tuple(keys), tuple(values), tuple(units), tuple(patches))

    # ------------------------------------------------------------------ answering

    def prepare(self, query: Query) -> AnswerContext:
        frames = self.frames_until(query.time)
        if frames < self.frames:
            raise StreamError(
                f"infinipot: a question at {query.time:.1f}s is before the newest frame ({self.time:.1f}s); "
                "the compressed cache already holds, and was chosen with, later frames"
            )
        region, cursor = self._region, self._cursor
        pending = self.pending_unit(query.time)
        if pending is not None:
            # The provisional unit joins the answer's own copy as an ingested unit would (that copy
            # compressed first if the unit does not fit); what is stored stays as it is.
            length = self.unit_tokens(frames)
            self._check_fits(length, frames)
            if region.length + length > self.cap_tokens:
                region = self._compress(region, self._recent(region, frames, self._since))
            region, cursor = self._append(region, pending.features[None], frames, cursor)
        return AnswerContext(
            cache=region.cache(),
            next_position=cursor,
            context_tokens=self._init_len + region.length,
            retrieved=self._held_units(region),
        )

    def _held_units(self, region: Region) -> tuple[RetrievedBlock, ...]:
        """One block per unit with any token held in any layer and head; ``tokens`` is the unit's
        entries averaged over layers and KV heads, rounded up."""
        if region.length == 0:
            return ()
        ids, counts = torch.cat([u.flatten() for u in region.unit]).unique(return_counts=True)
        slots = len(region.unit) * region.unit[0].shape[0]
        return tuple(
            RetrievedBlock(
                granularity="frame",
                first_frame=i,
                last_frame=i,
                start_time=self.timestamp(i),
                end_time=self.timestamp(i),
                tokens=-(-c // slots),
                block_id=i,
            )
            for i, c in zip(ids.tolist(), counts.tolist(), strict=True)
        )

    def kept(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Origin of the region tokens layer ``layer`` holds, per KV head: unit and patch ``[Hkv, L]``
        (patch ``-1``: text the model writes around a unit), in cache order."""
        return self._region.unit[layer], self._region.patch[layer]

    def stats(self) -> MemoryStats:
        region = self._region
        per_token = region.kv_bytes // (self._init_len + region.length)
        units = len(torch.cat([u.flatten() for u in region.unit]).unique()) if region.length else 0
        return MemoryStats(
            frames=self.frames,
            blocks={"init": 1, "frame": units},
            tokens={"init": self._init_len, "frame": region.length},
            bytes={
                "init": per_token * self._init_len,
                "frame": per_token * region.length,
                "index": region.index_bytes,
            },
        )
