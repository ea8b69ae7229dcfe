"""Cache layers that grow in place, and the scheme's fused rotation."""

from __future__ import annotations

import pytest
import torch

from mukv.backends.positions import RopePositions
from mukv.kv.cache import GrowingLayer, cache_of, reserve


def test_a_growing_layer_appends_in_place_until_its_room_runs_out():
    keys, values = torch.zeros(1, 2, 10, 4), torch.ones(1, 2, 10, 4)
    layer = GrowingLayer(keys, values, length=6)
    cache = cache_of([layer])
    assert cache.get_seq_length() == 6
    storage = layer.keys.untyped_storage().data_ptr()
    k, _ = cache.update(torch.full((1, 2, 3, 4), 5.0), torch.full((1, 2, 3, 4), 7.0), 0)
    assert k.shape[2] == 9 and layer.keys.untyped_storage().data_ptr() == storage  # written in place
    assert torch.equal(keys[:, :, 6:9], torch.full((1, 2, 3, 4), 5.0))  # into the adopted buffer
    k, _ = cache.update(torch.full((1, 2, 4, 4), 9.0), torch.zeros(1, 2, 4, 4), 0)
    assert k.shape[2] == 13 and layer.key_buffer.shape[2] == 20  # doubled once, contents kept
    assert torch.equal(k[:, :, 6:9], torch.full((1, 2, 3, 4), 5.0)) and torch.equal(
        k[:, :, 9:], torch.full((1, 2, 4, 4), 9.0)
    )
    cache.crop(-4)
    assert cache.get_seq_length() == 9


@pytest.mark.parametrize(
    ("capacity", "needed", "limit", "grown"), [(8, 5, None, 8), (8, 9, None, 16), (8, 9, 10, 10), (8, 30, 10, 30)]
)
def test_reserve_doubles_up_to_the_limit(capacity, needed, limit, grown):
    buffer = torch.arange(capacity, dtype=torch.float32).reshape(1, 1, capacity, 1)
    out = reserve(buffer, 4, needed, limit)
    assert out.shape[2] == grown and torch.equal(out[:, :, :4], buffer[:, :, :4])
    assert (out is buffer) == (needed <= capacity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotation_equals_the_plain_one(dtype):
    scheme = RopePositions(1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64)))
    states = torch.randn(3, 2, 40, 64).to(dtype)
    cos, sin = scheme.rotation(torch.arange(40)[None] + 5, torch.arange(40)[None] + 300)
    out = torch.empty_like(states)
    scheme.rotate_into(out, states, cos, sin)
    expected = scheme.rotate(states, cos, sin)
    assert (out.float() - expected.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 0.0)
    # And it is the shift the scheme defines.
    assert torch.allclose(
        out.float(), scheme.shift(states, torch.arange(40)[None] + 5, torch.arange(40)[None] + 300).float(), atol=1e-5
    )
