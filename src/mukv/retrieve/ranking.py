"""Semi-hierarchical retrieval over per-granularity block representatives (method.md section 5).

Pure tensor code: cosine similarity against every representative (one matrix product per
granularity), over-retrieval of ``2 k_g`` candidates, segment-guided rerank, final top ``k_g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRATEGIES = ("semi_hierarchical", "parallel", "hierarchical")


@dataclass(frozen=True)
class Ranked:
    """Chosen blocks of one granularity: ``ids [k]`` with their final ``scores [k]`` (descending)."""

    ids: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class RetrievalResult:
    """Blocks chosen per granularity, and the candidate count considered before reranking."""

    chosen: dict[str, Ranked]
    candidates: dict[str, int]


def cosine(query: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``query [C]`` with each row of ``matrix [N, C]`` -> ``[N]``."""
    if matrix.numel() == 0:
        return torch.empty(0)
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    m = torch.nn.functional.normalize(matrix.float(), dim=-1)
    return m @ q


def top(ids: torch.Tensor, scores: torch.Tensor, k: int) -> Ranked:
    """The ``k`` best (descending)."""
    k = min(k, scores.shape[0])
    if k <= 0:
        return Ranked(ids[:0], scores[:0])
    best = torch.topk(scores, k, sorted=True)
    return Ranked(ids[best.indices], best.values)


def rerank_scores(scores: torch.Tensor, reps: torch.Tensor, context: torch.Tensor, weight: float) -> torch.Tensor:
    """``s' = (1 - lambda) s + lambda cos(r, c)`` for candidates ``reps [N, C]`` and context ``c [C]``."""
    return (1 - weight) * scores + weight * cosine(context, reps)


def retrieve(
    query: torch.Tensor,
    index: dict[str, tuple[torch.Tensor, torch.Tensor]],
    top_k: dict[str, int],
    *,
    strategy: str = "semi_hierarchical",
    over_retrieve: float = 2.0,
    rerank_weight: dict[str, float] | None = None,
    rerank_top_n: int = 5,
    segment_frames: dict[int, tuple[int, int]] | None = None,
    frame_of: dict[str, dict[int, int]] | None = None,
) -> RetrievalResult:
    """Choose blocks for ``query [C]``.

    ``index`` maps granularity -> ``(ids [N], representatives [N, C])`` of the eligible blocks
    (already restricted to the question time). ``top_k`` gives ``k_g``. For ``hierarchical``,
    ``segment_frames`` maps segment ids to their frame span and ``frame_of`` maps frame/patch ids
    to their frame index.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"retrieval: unknown {strategy!r}; one of {', '.join(STRATEGIES)}")
    rerank_weight = rerank_weight or {}
    chosen: dict[str, Ranked] = {}
    candidates: dict[str, int] = {}
    sims = {g: (ids, cosine(query, reps), reps) for g, (ids, reps) in index.items()}

    if strategy == "parallel":
        for g, (ids, s, _) in sims.items():
            chosen[g] = top(ids, s, top_k.get(g, 0))
            candidates[g] = ids.shape[0]
        return RetrievalResult(chosen, candidates)

    segment = sims.get("segment")
    if segment is not None:
        ids, s, reps = segment
        chosen["segment"] = top(ids, s, top_k.get("segment", 0))
        candidates["segment"] = ids.shape[0]

    if strategy == "hierarchical":
        allowed: set[int] = set()
        if segment is not None and segment_frames is not None:
            for sid in chosen["segment"].ids.tolist():
                first, last = segment_frames[sid]
                allowed.update(range(first, last + 1))
        for g, (ids, s, _) in sims.items():
            if g == "segment":
                continue
            frames = frame_of.get(g, {}) if frame_of else {}
            mask = torch.tensor([frames.get(i, -1) in allowed for i in ids.tolist()], dtype=torch.bool)
            chosen[g] = top(ids[mask], s[mask], top_k.get(g, 0))
            candidates[g] = int(mask.sum())
        return RetrievalResult(chosen, candidates)

    # semi_hierarchical: over-retrieve, then rerank against the top segment candidates' context.
    context = None
    segment_pool = round(over_retrieve * top_k.get("segment", 0))
    if segment is not None and segment[0].shape[0] > 0 and segment_pool > 0:
        # The context is the mean of the top-N among the over-retrieved segment candidates.
        ids, s, reps = segment
        n = min(rerank_top_n, segment_pool, ids.shape[0])
        context = reps[torch.topk(s, n).indices].float().mean(dim=0)
    for g, (ids, s, reps) in sims.items():
        if g == "segment":
            continue
        k = top_k.get(g, 0)
        pool = torch.topk(s, min(ids.shape[0], round(over_retrieve * k))).indices if k > 0 else s[:0].long()
        candidates[g] = int(pool.shape[0])
        scores = s[pool]
        weight = rerank_weight.get(g, 0.0)
        if context is not None and weight > 0:
            scores = rerank_scores(scores, reps[pool], context, weight)
        chosen[g] = top(ids[pool], scores, k)
    return RetrievalResult(chosen, candidates)
