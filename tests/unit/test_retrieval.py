"""Hand-computed checks of block retrieval: parallel, semi-hierarchical, hierarchical (method.md section 5)."""

from __future__ import annotations

import math

import pytest
import torch

from mukv.retrieve.ranking import STRATEGIES, Ranked, cosine, rerank_scores, retrieve, top


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# --- cosine, top, rerank formula ----------------------------------------------------------


def test_cosine_on_planted_vectors():
    matrix = t([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    out = cosine(t([5.0, 0.0]), matrix)
    torch.testing.assert_close(out, t([1.0, 0.0, -1.0, 1 / math.sqrt(2), 0.6]), atol=1e-6, rtol=0)


def test_cosine_is_scale_invariant_and_float32():
    out = cosine(
        torch.tensor([1.0, 2.0, 2.0], dtype=torch.float16), torch.tensor([[10.0, 20.0, 20.0], [2.0, -1.0, 0.0]])
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, t([1.0, 0.0]), atol=1e-6, rtol=0)


def test_cosine_with_no_blocks_is_empty():
    assert cosine(t([1.0, 0.0]), torch.empty(0, 0)).shape == (0,)


def test_top_returns_the_k_best_descending():
    chosen = top(ids([10, 11, 12, 13]), t([0.2, 0.9, 0.5, 0.1]), 2)
    assert chosen.ids.tolist() == [11, 12]
    torch.testing.assert_close(chosen.scores, t([0.9, 0.5]))


@pytest.mark.parametrize(("k", "expected"), [(0, []), (-1, []), (4, [11, 12, 10, 13]), (10, [11, 12, 10, 13])])
def test_top_clamps_k(k, expected):
    chosen = top(ids([10, 11, 12, 13]), t([0.2, 0.9, 0.5, 0.1]), k)
    assert chosen.ids.tolist() == expected
    assert chosen.scores.shape == (len(expected),)


def test_rerank_formula_on_hand_numbers():
    # Context c = [1, 0]; representatives with cos(r, c) = 1, 0, 0.6.
    reps = t([[2.0, 0.0], [0.0, 5.0], [3.0, 4.0]])
    scores = t([0.5, 0.9, 0.4])
    out = rerank_scores(scores, reps, t([1.0, 0.0]), 0.3)
    # s' = 0.7 s + 0.3 cos: 0.35 + 0.3, 0.63 + 0, 0.28 + 0.18.
    torch.testing.assert_close(out, t([0.65, 0.63, 0.46]), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("weight", "expected"), [(0.0, [0.5, 0.9, 0.4]), (1.0, [1.0, 0.0, 0.6])])
def test_rerank_weight_extremes(weight, expected):
    reps = t([[2.0, 0.0], [0.0, 5.0], [3.0, 4.0]])
    out = rerank_scores(t([0.5, 0.9, 0.4]), reps, t([7.0, 0.0]), weight)
    torch.testing.assert_close(out, t(expected), atol=1e-6, rtol=0)


# --- a planted index ----------------------------------------------------------------------
#
# Query q = [1, 0]. Segments (cosine with q): 100 -> [3, 4] (0.6), 101 -> [4, -3] (0.8),
# 102 -> [0, 1] (0), 103 -> [-1, 0] (-1). The top segment 101 gives the context direction
# c = [0.8, -0.6].
# Frames (s = cos(r, q), cos(r, c)):
#   0 -> [0.8, 0.6]   s = 0.8   cos c = 0.28
#   1 -> [0, 1]       s = 0     cos c = -0.6
#   2 -> [0.6, -0.8]  s = 0.6   cos c = 0.96
#   3 -> [-1, 0]      s = -1    cos c = -0.8
#   4 -> [0.28, -0.96] s = 0.28 cos c = 0.8
# Patches (s = cos(r, q)): 20 -> [1, 0] (1.0), 21 -> [0, 1] (0), 22 -> [0.6, 0.8] (0.6).

QUERY = t([1.0, 0.0])
SEGMENTS = (ids([100, 101, 102, 103]), t([[3.0, 4.0], [4.0, -3.0], [0.0, 1.0], [-1.0, 0.0]]))
FRAMES = (ids([0, 1, 2, 3, 4]), t([[0.8, 0.6], [0.0, 1.0], [0.6, -0.8], [-1.0, 0.0], [0.28, -0.96]]))
PATCHES = (ids([20, 21, 22]), t([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
INDEX = {"segment": SEGMENTS, "frame": FRAMES, "patch": PATCHES}
# Segment spans (frames) and the frame of each frame/patch block, for the hierarchical strategy.
SEGMENT_FRAMES = {100: (0, 1), 101: (2, 3), 102: (4, 5), 103: (6, 7)}
FRAME_OF = {"frame": {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}, "patch": {20: 0, 21: 2, 22: 3}}


def assert_chosen(result, granularity, expected_ids, expected_scores):
    chosen = result.chosen[granularity]
    assert isinstance(chosen, Ranked)
    assert chosen.ids.tolist() == expected_ids
    torch.testing.assert_close(chosen.scores, t(expected_scores), atol=1e-6, rtol=0)


def test_parallel_takes_top_k_by_cosine_per_granularity():
    result = retrieve(QUERY, INDEX, {"segment": 2, "frame": 1, "patch": 2}, strategy="parallel")
    assert_chosen(result, "segment", [101, 100], [0.8, 0.6])
    assert_chosen(result, "frame", [0], [0.8])
    assert_chosen(result, "patch", [20, 22], [1.0, 0.6])
    assert result.candidates == {"segment": 4, "frame": 5, "patch": 3}


def test_parallel_ignores_rerank_weights():
    result = retrieve(
        QUERY, INDEX, {"segment": 2, "frame": 1, "patch": 2}, strategy="parallel", rerank_weight={"frame": 1.0}
    )
    assert_chosen(result, "frame", [0], [0.8])


def test_semi_hierarchical_rerank_changes_the_chosen_frame():
    result = retrieve(
        QUERY,
        INDEX,
        {"segment": 2, "frame": 1, "patch": 1},
        strategy="semi_hierarchical",
        rerank_weight={"patch": 0.3, "frame": 0.3, "segment": 0.0},
        rerank_top_n=1,
    )
    # Segments keep their cosine scores and order.
    assert_chosen(result, "segment", [101, 100], [0.8, 0.6])
    # Frame pool = top round(2 * 1) = 2 by s: frames 0 (0.8) and 2 (0.6). Rerank with c = r_101:
    # frame 0: 0.7 * 0.8 + 0.3 * 0.28 = 0.644; frame 2: 0.7 * 0.6 + 0.3 * 0.96 = 0.708 -> frame 2 wins,
    # where parallel picks frame 0. Frame 4 (cos c = 0.8) is outside the pool and cannot be chosen.
    assert_chosen(result, "frame", [2], [0.708])
    # Patch pool = patches 20 (1.0) and 22 (0.6); cos(r, c) = 0.8 and 0.0:
    # 20: 0.7 + 0.24 = 0.94; 22: 0.42 + 0 = 0.42.
    assert_chosen(result, "patch", [20], [0.94])
    assert result.candidates == {"segment": 4, "frame": 2, "patch": 2}
    parallel = retrieve(QUERY, INDEX, {"segment": 2, "frame": 1, "patch": 1}, strategy="parallel")
    assert parallel.chosen["frame"].ids.tolist() == [0]


def test_semi_hierarchical_over_retrieves_2k_and_returns_k_reranked():
    result = retrieve(
        QUERY, INDEX, {"segment": 1, "frame": 2, "patch": 1}, rerank_weight={"frame": 0.3}, rerank_top_n=1
    )
    # Frame pool = top 4 by s: 0 (0.8), 2 (0.6), 4 (0.28), 1 (0). Reranked (0.7 s + 0.3 cos c):
    # 0 -> 0.644, 2 -> 0.708, 4 -> 0.196 + 0.24 = 0.436, 1 -> 0 - 0.18 = -0.18.
    assert result.candidates["frame"] == 4
    assert_chosen(result, "frame", [2, 0], [0.708, 0.644])
    # No patch weight given -> no rerank: top 1 of the pool by the raw cosine.
    assert_chosen(result, "patch", [20], [1.0])
    assert_chosen(result, "segment", [101], [0.8])


def test_semi_hierarchical_context_is_the_mean_of_the_top_n_segment_representatives():
    # q = [1, 0.2]. Segments 7 = [2, 0] (s = 0.98), 8 = [0, 2] (s = 0.196), 9 = [-1, -1] (negative):
    # c = mean of 7 and 8 = [1, 1] with N = 2, c = [2, 0] with N = 1.
    query = t([1.0, 0.2])
    index = {
        "segment": (ids([7, 8, 9]), t([[2.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])),
        "frame": (ids([0, 1]), t([[1.0, 1.0], [1.0, 0.0]])),
    }
    # Frame s: 0 -> 1.2 / (sqrt(2) sqrt(1.04)), 1 -> 1 / sqrt(1.04).
    s0, s1 = 1.2 / (math.sqrt(2) * math.sqrt(1.04)), 1.0 / math.sqrt(1.04)
    # N = 2: c = [1, 1]; cos(r0, c) = 1, cos(r1, c) = 1/sqrt(2); weight 1 -> scores are the cosines.
    wide = retrieve(query, index, {"segment": 1, "frame": 2}, rerank_weight={"frame": 1.0}, rerank_top_n=2)
    assert_chosen(wide, "frame", [0, 1], [1.0, 1 / math.sqrt(2)])
    # N = 1: c = [2, 0]; cos(r0, c) = 1/sqrt(2), cos(r1, c) = 1.
    narrow = retrieve(query, index, {"segment": 1, "frame": 2}, rerank_weight={"frame": 1.0}, rerank_top_n=1)
    assert_chosen(narrow, "frame", [1, 0], [1.0, 1 / math.sqrt(2)])
    # Weight 0.5 with N = 2: 0.5 s + 0.5 cos.
    half = retrieve(query, index, {"segment": 1, "frame": 2}, rerank_weight={"frame": 0.5}, rerank_top_n=2)
    assert_chosen(half, "frame", [0, 1], [0.5 * s0 + 0.5, 0.5 * s1 + 0.5 / math.sqrt(2)])
    # The raw mean, not the mean of unit vectors: segments [4, 0] and [0, 1] give c = [2, 0.5].
    skewed = {"segment": (ids([7, 8]), t([[4.0, 0.0], [0.0, 1.0]])), "frame": index["frame"]}
    out = retrieve(query, skewed, {"segment": 1, "frame": 2}, rerank_weight={"frame": 1.0}, rerank_top_n=2)
    c_norm = math.sqrt(4.25)
    assert_chosen(out, "frame", [1, 0], [2.0 / c_norm, 2.5 / (math.sqrt(2) * c_norm)])


def test_semi_hierarchical_without_segments_does_not_rerank():
    index = {"frame": FRAMES, "patch": PATCHES}
    result = retrieve(QUERY, index, {"frame": 1, "patch": 1}, rerank_weight={"frame": 0.3, "patch": 0.3})
    assert_chosen(result, "frame", [0], [0.8])
    assert_chosen(result, "patch", [20], [1.0])
    assert "segment" not in result.chosen


def test_hierarchical_restricts_frames_and_patches_to_the_chosen_segments():
    result = retrieve(
        QUERY,
        INDEX,
        {"segment": 1, "frame": 2, "patch": 2},
        strategy="hierarchical",
        segment_frames=SEGMENT_FRAMES,
        frame_of=FRAME_OF,
    )
    # Top segment 101 covers frames 2..3: frames 2 (0.6) and 3 (-1) are allowed; frame 0 (0.8) is not.
    assert_chosen(result, "segment", [101], [0.8])
    assert_chosen(result, "frame", [2, 3], [0.6, -1.0])
    # Patches of frames 2..3: 21 (frame 2, s = 0) and 22 (frame 3, s = 0.6); patch 20 (s = 1) is excluded.
    assert_chosen(result, "patch", [22, 21], [0.6, 0.0])
    assert result.candidates == {"segment": 4, "frame": 2, "patch": 2}


def test_hierarchical_with_two_segments_unions_their_frames():
    result = retrieve(
        QUERY,
        INDEX,
        {"segment": 2, "frame": 3, "patch": 3},
        strategy="hierarchical",
        segment_frames=SEGMENT_FRAMES,
        frame_of=FRAME_OF,
    )
    # Segments 101 and 100 -> frames 0..3.
    assert_chosen(result, "frame", [0, 2, 1], [0.8, 0.6, 0.0])
    assert_chosen(result, "patch", [20, 22, 21], [1.0, 0.6, 0.0])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_k_zero_yields_nothing(strategy):
    result = retrieve(
        QUERY,
        INDEX,
        {"segment": 0, "frame": 0, "patch": 0},
        strategy=strategy,
        rerank_weight={"frame": 0.3, "patch": 0.3},
        segment_frames=SEGMENT_FRAMES,
        frame_of=FRAME_OF,
    )
    for granularity in ("segment", "frame", "patch"):
        assert result.chosen[granularity].ids.numel() == 0
        assert result.chosen[granularity].scores.numel() == 0


@pytest.mark.parametrize("strategy", ["parallel", "semi_hierarchical"])
def test_missing_top_k_entry_means_zero(strategy):
    result = retrieve(QUERY, INDEX, {"frame": 1}, strategy=strategy)
    assert result.chosen["patch"].ids.numel() == 0
    assert result.chosen["segment"].ids.numel() == 0
    assert result.chosen["frame"].ids.numel() == 1


@pytest.mark.parametrize("strategy", ["parallel", "semi_hierarchical"])
def test_fewer_blocks_than_k_returns_all_in_descending_order(strategy):
    result = retrieve(QUERY, INDEX, {"segment": 12, "frame": 32, "patch": 20}, strategy=strategy)
    assert_chosen(result, "segment", [101, 100, 102, 103], [0.8, 0.6, 0.0, -1.0])
    assert sorted(result.chosen["frame"].ids.tolist()) == [0, 1, 2, 3, 4]
    assert sorted(result.chosen["patch"].ids.tolist()) == [20, 21, 22]
    if strategy == "parallel":
        assert result.chosen["frame"].ids.tolist() == [0, 2, 4, 1, 3]
    assert result.candidates["frame"] == 5


def test_semi_hierarchical_with_no_weights_equals_parallel():
    top_k = {"segment": 2, "frame": 2, "patch": 2}
    semi = retrieve(QUERY, INDEX, top_k, rerank_weight={"segment": 0.0, "frame": 0.0, "patch": 0.0})
    parallel = retrieve(QUERY, INDEX, top_k, strategy="parallel")
    for granularity in top_k:
        assert semi.chosen[granularity].ids.tolist() == parallel.chosen[granularity].ids.tolist()
        torch.testing.assert_close(semi.chosen[granularity].scores, parallel.chosen[granularity].scores)


def test_empty_index_granularity_yields_nothing():
    index = {"segment": (ids([]), torch.empty(0, 0)), "frame": FRAMES}
    result = retrieve(QUERY, index, {"segment": 2, "frame": 1}, rerank_weight={"frame": 0.3})
    assert result.chosen["segment"].ids.numel() == 0
    assert_chosen(result, "frame", [0], [0.8])


def test_unknown_strategy_raises_value_error():
    with pytest.raises(ValueError, match=r"retrieval: unknown 'flat'"):
        retrieve(QUERY, INDEX, {"frame": 1}, strategy="flat")


def test_strategies_are_the_three_of_the_ablation():
    assert set(STRATEGIES) == {"parallel", "hierarchical", "semi_hierarchical"}
