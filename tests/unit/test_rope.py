"""Exact re-rotation of post-RoPE keys by the 1-D scheme, checked against transformers' own Qwen2 RoPE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from mukv.backends.positions import RopePositions, rope_angles, rotate_half

THETA = 1_000_000.0


def rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move ``keys [..., n, D]`` by ``delta [n]`` positions with the 1-D scheme."""
    return RopePositions(inv_freq).shift(keys, torch.zeros_like(delta)[None], delta[None])


def realistic_inv_freq(head_dim: int = 64) -> torch.Tensor:
    return 1.0 / (THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rotate_from_zero(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate un-rotated ``keys [..., n, D]`` to ``positions [n]`` with the module's own helpers."""
    cos, sin = rope_angles(inv_freq, positions)
    return keys * cos + rotate_half(keys) * sin


def positions_and_deltas(n: int, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``p`` and deltas ``d`` (negative ones included) with ``0 <= p, p + d < limit``."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, limit, (n,), generator=g)
    target = torch.randint(0, limit, (n,), generator=g)
    return p, target - p


def qwen2_rotary(hidden_size: int) -> Qwen2RotaryEmbedding:
    config = transformers.Qwen2Config(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
    )
    return Qwen2RotaryEmbedding(config)


def hf_rotate(rotary: Qwen2RotaryEmbedding, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' path: cos/sin from the rotary module, then ``apply_rotary_pos_emb`` on ``[B, H, n, D]``."""
    cos, sin = rotary(keys, positions[None])
    return apply_rotary_pos_emb(keys, keys, cos, sin)[1]


def hf_rotate_float64_angles(rotary: Qwen2RotaryEmbedding, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' ``inv_freq`` and ``apply_rotary_pos_emb``, but with angles computed in float64 (numpy)."""
    angles = positions.numpy().astype(np.float64)[:, None] * rotary.inv_freq.numpy().astype(np.float64)[None, :]
    emb = np.concatenate([angles, angles], axis=-1)
    cos = torch.from_numpy(np.cos(emb)).float()[None]
    sin = torch.from_numpy(np.sin(emb)).float()[None]
    return apply_rotary_pos_emb(keys, keys, cos, sin)[1]


# --- helpers -----------------------------------------------------------------------------


def test_rotate_half_pairs_the_two_halves():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert rotate_half(x).tolist() == [-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]


def test_rope_angles_on_hand_numbers():
    inv_freq = torch.tensor([1.0, 0.5])
    cos, sin = rope_angles(inv_freq, torch.tensor([0, 2]))
    assert cos.dtype == sin.dtype == torch.float32
    assert cos.shape == sin.shape == (2, 4)
    # Angles: position 0 -> [0, 0, 0, 0]; position 2 -> [2, 1, 2, 1] (frequencies repeated over halves).
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(cos, expected.cos().float(), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin, expected.sin().float(), atol=1e-7, rtol=0)


def test_rerotate_by_a_quarter_turn_on_hand_numbers():
    # One frequency pair (D = 2), inv_freq = pi / 2: moving by 1 position rotates (x1, x2) by 90 degrees.
    keys = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    out = rerotate(keys, torch.tensor([1, -1]), torch.tensor([torch.pi / 2]))
    torch.testing.assert_close(out, torch.tensor([[-4.0, 3.0], [0.0, -1.0]]), atol=1e-6, rtol=0)


def test_zero_delta_is_the_identity():
    keys = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    out = rerotate(keys, torch.zeros(5, dtype=torch.long), realistic_inv_freq())
    torch.testing.assert_close(out, keys, atol=0, rtol=0)


# --- composition --------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [16, 1000, 4000])
def test_rerotate_round_trip(limit):
    inv_freq = realistic_inv_freq()
    keys = torch.randn(2, 3, 256, 64, generator=torch.Generator().manual_seed(limit))
    p, d = positions_and_deltas(256, limit, seed=limit)
    del p
    back = rerotate(rerotate(keys, d, inv_freq), -d, inv_freq)
    torch.testing.assert_close(back, keys, atol=1e-5, rtol=0)


@pytest.mark.parametrize("limit", [16, 1000, 4000])
def test_rerotate_composes_with_rotation_from_position_zero(limit):
    inv_freq = realistic_inv_freq()
    raw = torch.randn(2, 256, 64, generator=torch.Generator().manual_seed(limit + 1))
    p, d = positions_and_deltas(256, limit, seed=limit + 1)
    moved = rerotate(rotate_from_zero(raw, p, inv_freq), d, inv_freq)
    torch.testing.assert_close(moved, rotate_from_zero(raw, p + d, inv_freq), atol=1e-5, rtol=0)


def test_rerotate_preserves_norms_of_each_pair():
    inv_freq = realistic_inv_freq()
    keys = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    out = rerotate(keys, torch.tensor([1, 100, -7, 3000]), inv_freq)
    pair_norm = (keys[:, :32] ** 2 + keys[:, 32:] ** 2).sqrt()
    torch.testing.assert_close((out[:, :32] ** 2 + out[:, 32:] ** 2).sqrt(), pair_norm, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rerotate_preserves_dtype(dtype):
    inv_freq = realistic_inv_freq()
    keys = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    d = torch.arange(8) * 37 - 100
    out = rerotate(keys, d, inv_freq)
    assert out.dtype == dtype
    assert out.shape == keys.shape
    # Computed in float32, then rounded once to the keys' dtype.
    torch.testing.assert_close(out, rerotate(keys.float(), d, inv_freq).to(dtype), atol=0, rtol=0)


# --- agreement with transformers' Qwen2 RoPE ------------------------------------------------


@pytest.mark.parametrize("hidden_size", [64, 256], ids=["head_dim16", "head_dim64"])
def test_rotary_module_uses_the_realistic_inverse_frequencies(hidden_size):
    rotary = qwen2_rotary(hidden_size)
    head_dim = hidden_size // 4
    torch.testing.assert_close(rotary.inv_freq, realistic_inv_freq(head_dim), atol=0, rtol=1e-6)
    # mukv's angles agree with transformers' cos/sin (which are computed in float32) at small positions.
    positions = torch.arange(64)
    cos, sin = rotary(torch.zeros(1, 1, 64, head_dim), positions[None])
    ours_cos, ours_sin = rope_angles(rotary.inv_freq, positions)
    # Tolerance: transformers' float32 angle rounding, 64 * 2**-24 rad at most, plus cos/sin rounding.
    torch.testing.assert_close(ours_cos, cos[0], atol=5e-6, rtol=0)
    torch.testing.assert_close(ours_sin, sin[0], atol=5e-6, rtol=0)


@pytest.mark.parametrize("hidden_size", [64, 256], ids=["head_dim16", "head_dim64"])
def test_rerotate_matches_transformers_qwen2_rope_exactly_at_small_positions(hidden_size):
    rotary = qwen2_rotary(hidden_size)
    head_dim = hidden_size // 4
    raw = torch.rand(1, 2, 256, head_dim, generator=torch.Generator().manual_seed(5)) * 2 - 1
    p, d = positions_and_deltas(256, 128, seed=5)
    moved = rerotate(hf_rotate(rotary, raw, p), d, rotary.inv_freq)
    torch.testing.assert_close(moved, hf_rotate(rotary, raw, p + d), atol=1e-5, rtol=0)


@pytest.mark.parametrize("hidden_size", [64, 256], ids=["head_dim16", "head_dim64"])
def test_rerotate_matches_transformers_qwen2_pairing_and_frequencies_up_to_4000(hidden_size):
    # transformers' rotate_half pairing, apply_rotary_pos_emb and inv_freq; angles in float64 so that
    # the reference itself is exact to float32 rounding at large positions.
    rotary = qwen2_rotary(hidden_size)
    head_dim = hidden_size // 4
    raw = torch.randn(1, 2, 512, head_dim, generator=torch.Generator().manual_seed(6))
    p, d = positions_and_deltas(512, 4000, seed=6)
    moved = rerotate(hf_rotate_float64_angles(rotary, raw, p), d, rotary.inv_freq)
    torch.testing.assert_close(moved, hf_rotate_float64_angles(rotary, raw, p + d), atol=1e-5, rtol=0)


@pytest.mark.parametrize("hidden_size", [64, 256], ids=["head_dim16", "head_dim64"])
def test_rerotate_matches_transformers_qwen2_rope_up_to_4000_within_its_float32_angle_error(hidden_size):
    # Qwen2RotaryEmbedding computes the angle position * inv_freq in float32: at position p that
    # angle carries up to p * 2**-24 rad of rounding (2.4e-4 at 4000), so two of its rotations
    # (to p, and to p + d) cannot agree to 1e-5 there whatever re-rotation is used. The bound:
    # per element, both angle errors plus cos/sin rounding, times the norm of the element's pair.
    rotary = qwen2_rotary(hidden_size)
    head_dim = hidden_size // 4
    raw = torch.randn(1, 2, 512, head_dim, generator=torch.Generator().manual_seed(7))
    p, d = positions_and_deltas(512, 4000, seed=7)
    moved = rerotate(hf_rotate(rotary, raw, p), d, rotary.inv_freq)
    expected = hf_rotate(rotary, raw, p + d)
    half = head_dim // 2
    pair_norm = (raw[..., :half] ** 2 + raw[..., half:] ** 2).sqrt().repeat(1, 1, 1, 2)
    angle_error = (p + (p + d)).float()[None, None, :, None] * 2.0**-24
    bound = (angle_error + 4 * 2.0**-24) * pair_norm + 1e-6
    assert bool(((moved - expected).abs() <= bound).all())
    # And the residue really is the reference's: against float64 angles mukv is exact to 1e-5
    # up to the float32 error already in the rotated input.
    exact = hf_rotate_float64_angles(rotary, raw, p + d)
    input_error = (hf_rotate(rotary, raw, p) - hf_rotate_float64_angles(rotary, raw, p)).abs().amax()
    assert float((moved - exact).abs().amax()) <= float(input_error) + 1e-5


def test_rerotate_handles_transformers_key_layout_with_batch_and_heads():
    rotary = qwen2_rotary(256)
    raw = torch.randn(3, 2, 10, 64, generator=torch.Generator().manual_seed(8))
    p = torch.arange(10) + 13  # block tokens after a 13-token init, as in the independent encode
    d = torch.full((10,), 500)  # re-positioned further along the cache
    moved = rerotate(hf_rotate_float64_angles(rotary, raw, p), d, rotary.inv_freq)
    torch.testing.assert_close(moved, hf_rotate_float64_angles(rotary, raw, p + d), atol=1e-5, rtol=0)
