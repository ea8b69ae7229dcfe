"""Exact re-rotation of post-RoPE keys: rotations compose, R(p + d) = R(d) R(p)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The pairing transformers' Qwen2/Llama RoPE uses: (x1, x2) -> (-x2, x1) over the two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_angles(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[n, D]`` for integer ``positions [n]`` (float64 angles, then float32)."""
    freqs = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE ``keys [..., n, D]`` by ``delta [n]`` positions (may be negative).

    Computed in float32 and returned in the keys' dtype.
    """
    cos, sin = rope_angles(inv_freq.to(keys.device), delta.to(keys.device))
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)
