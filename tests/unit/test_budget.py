"""The byte budget's pieces that need no model: re-pruning a payload by its scores, and reading
``memory_budget`` from configs and overrides."""

from __future__ import annotations

import pytest
import torch

from mukv.config import apply_overrides
from mukv.kv.blocks import BlockPayload
from mukv.memory.blocks import can_reprune, halve_by_score
from mukv.memory.mukv_config import MukvConfig
from mukv.memory.rekv import RekvConfig


def _payload(kept: list[int], scores: list[float]) -> BlockPayload:
    n = len(kept)
    # kv [L=2, 2, Hkv=1, n, D=3]: token j's elements all equal j, so slicing is visible.
    kv = torch.arange(n, dtype=torch.float32).reshape(1, 1, 1, n, 1).expand(2, 2, 1, n, 3).contiguous()
    positions = torch.tensor([[10 + k for k in kept]])
    return BlockPayload(kv=kv, positions=positions, kept=torch.tensor(kept), scores=torch.tensor(scores))


def test_halving_keeps_the_top_half_of_the_kept_tokens_by_score_in_order():
    # Block of 10 tokens, 6 kept; their scores: 1:0.9, 2:0.1, 4:0.5, 5:0.8, 7:0.2, 9:0.7.
    scores = [0.0, 0.9, 0.1, 0.95, 0.5, 0.8, 0.99, 0.2, 0.3, 0.7]
    payload = _payload([1, 2, 4, 5, 7, 9], scores)
    halved = halve_by_score(payload)
    assert halved.kept.tolist() == [1, 5, 9]  # 0.9, 0.8, 0.7, in their original order
    assert halved.positions.tolist() == [[11, 15, 19]]
    # Tokens 0, 3 and 5 of the kept six.
    assert halved.kv[0, 0, 0, :, 0].tolist() == [0.0, 3.0, 5.0]
    assert halved.kv.shape == (2, 2, 1, 3, 3)
    assert torch.equal(halved.scores, payload.scores)  # whole: kept indexes it
    again = halve_by_score(halved)
    assert again.kept.tolist() == [1]
    assert not can_reprune(again)


def test_halving_odd_counts_and_ties():
    halved = halve_by_score(_payload([0, 1, 2, 3, 4], [0.5, 0.5, 0.1, 0.5, 0.2]))
    assert halved.kept.tolist() == [0, 1]  # 5 // 2 = 2; ties keep the earlier tokens


def test_halving_needs_scores_and_two_tokens():
    assert not can_reprune(_payload([0], [1.0]))
    no_scores = BlockPayload(
        kv=torch.zeros(1, 2, 1, 4, 2), positions=torch.zeros(1, 4), kept=torch.arange(4), scores=torch.empty(0)
    )
    assert not can_reprune(no_scores)
    with pytest.raises(ValueError, match="halve_by_score"):
        halve_by_score(no_scores)


@pytest.mark.parametrize("cls", [MukvConfig, RekvConfig])
@pytest.mark.parametrize("bad", [0, -5, "abc", "2 parsecs", True])
def test_a_bad_budget_names_the_field(cls, bad):
    with pytest.raises(ValueError, match="memory_budget"):
        cls(memory_budget=bad)


def test_budget_units_and_overrides():
    assert MukvConfig().memory_budget is None
    assert MukvConfig(memory_budget="512MiB").memory_budget == 512 * 2**20
    assert apply_overrides(MukvConfig(), {"memory_budget": "2GB"}).memory_budget == 2 * 10**9
    assert apply_overrides(RekvConfig(), {"memory_budget": "1.5GiB"}).memory_budget == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="memory_budget"):
        apply_overrides(MukvConfig(), {"memory_budget": "abc"})
