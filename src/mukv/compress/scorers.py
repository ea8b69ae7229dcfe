"""Per-token importance scores of a block and the pruning that keeps the best tokens.

Method.md section 3: attention importance, frequency importance (``fft`` high-pass or ``diff``),
min-max fusion, top-k selection in original order, optional vectorised near-duplicate removal.
All functions are pure tensor code, testable on hand-made inputs.
"""

from __future__ import annotations

import math

import torch


def attention_importance(
    probs: torch.Tensor,
    query_rows: torch.Tensor,
    key_cols: torch.Tensor,
    *,
    past: int,
    causal_correction: bool = False,
) -> torch.Tensor:
    """``I_att(j) = sum_{i in block queries} mean_h A[h, i, j]`` over the block's keys.

    ``probs [n_q, n_k]``: head-averaged probabilities of a forward whose ``n_q`` queries sit at
    key indices ``past .. past + n_q - 1``; ``query_rows [m]`` and ``key_cols [n]`` select the
    block's queries (rows) and keys (columns). Keys outside the block (e.g. the system prompt)
    take part in the softmax but are not scored. With ``causal_correction`` each key's sum is
    divided by the number of block queries that can see it (causal masking favours early keys).
    Returns ``[n]`` float32.
    """
    scores = probs[query_rows][:, key_cols].float().sum(dim=0)
    if causal_correction:
        visible = ((past + query_rows)[:, None] >= key_cols[None, :]).sum(dim=0).clamp(min=1)
        scores = scores / visible
    return scores


def highpass_importance(keys: torch.Tensor) -> torch.Tensor:
    """``fft`` frequency importance of keys ``[n, D]``: zero the real-FFT bins below
    ``max(1, floor(bins / 2))`` (DC and the low half) along tokens, invert to length ``n``, and
    average the magnitude over channels. Returns ``[n]`` float32."""
    n = keys.shape[0]
    spectrum = torch.fft.rfft(keys.float(), dim=0)
    bins = spectrum.shape[0]
    spectrum[: max(1, bins // 2)] = 0
    return torch.fft.irfft(spectrum, n=n, dim=0).abs().mean(dim=-1)


def diff_importance(keys: torch.Tensor) -> torch.Tensor:
    """``diff`` frequency importance: ``||K[j] - K[j-1]||_2`` with ``I(0) = 0``. ``[n, D] -> [n]``."""
    keys = keys.float()
    out = torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
    out[1:] = (keys[1:] - keys[:-1]).norm(dim=-1)
    return out


FREQUENCY_SCORERS = {"fft": highpass_importance, "diff": diff_importance}


def minmax(x: torch.Tensor) -> torch.Tensor:
    """``(x - min) / (max - min + 1e-8)``."""
    return (x - x.min()) / (x.max() - x.min() + 1e-8)


def fuse(attention: torch.Tensor, frequency: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * minmax(attention) + (1 - alpha) * minmax(frequency)``."""
    return alpha * minmax(attention) + (1 - alpha) * minmax(frequency)


def keep_count(n: int, ratio: float) -> int:
    """``floor(ratio * n)`` tokens, at least one (never more than ``n``)."""
    return min(n, max(1, math.floor(ratio * n + 1e-9)))


def select_tokens(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in ascending (original) order. ``[n] -> [keep]``."""
    top = torch.topk(scores, keep, sorted=False).indices
    return top.sort().values


def select_dedup(
    scores: torch.Tensor, keys: torch.Tensor, keep: int, *, threshold: float = 0.9, candidates: float = 1.2
) -> torch.Tensor:
    """Top-``keep`` selection after near-duplicate removal (release option).

    Among the top ``ceil(candidates * keep)`` tokens, a token is dropped when a higher-scored
    candidate's key ``keys [n, C]`` has cosine similarity above ``threshold`` with it; the top
    ``keep`` survivors are returned in original order. Vectorised: one similarity matrix.
    """
    pool = min(scores.shape[0], math.ceil(candidates * keep))
    order = torch.topk(scores, pool, sorted=True).indices  # descending score
    unit = torch.nn.functional.normalize(keys[order].float(), dim=-1)
    similar = (unit @ unit.T) > threshold
    # Row i < column j: candidate i outranks j. Drop j if any outranking candidate is similar.
    dominated = torch.triu(similar, diagonal=1).any(dim=0)
    survivors = order[~dominated][:keep]
    return survivors.sort().values
