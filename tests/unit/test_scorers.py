"""Hand-computed checks of the per-token scores and token selection (method.md section 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mukv.compress.scorers import (
    FREQUENCY_SCORERS,
    attention_importance,
    diff_importance,
    fuse,
    highpass_importance,
    keep_count,
    minmax,
    select_dedup,
    select_tokens,
)


def column(values) -> torch.Tensor:
    """A 1-channel key matrix ``[n, 1]``."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


def numpy_highpass(keys: np.ndarray) -> np.ndarray:
    """Independent float64 reference: zero rfft bins below max(1, floor(bins/2)), invert, mean |.|."""
    n = keys.shape[0]
    spectrum = np.fft.rfft(keys.astype(np.float64), axis=0)
    spectrum[: max(1, spectrum.shape[0] // 2)] = 0
    return np.abs(np.fft.irfft(spectrum, n=n, axis=0)).mean(axis=-1)


# --- frequency importance: fft high-pass -------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 16, 49])
def test_highpass_of_a_constant_signal_is_zero(n):
    keys = torch.full((n, 3), 7.5)
    out = highpass_importance(keys)
    assert out.shape == (n,)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.zeros(n), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [2, 4, 16, 196])
def test_highpass_keeps_an_alternating_signal(n):
    # [1, -1, 1, -1, ...] lives entirely in the Nyquist bin (the last one), which is always kept.
    keys = column([(-1.0) ** j for j in range(n)])
    torch.testing.assert_close(highpass_importance(keys), torch.ones(n), atol=1e-6, rtol=0)


def test_highpass_removes_one_slow_cosine_period():
    # n=16: 9 bins, bins 0..3 zeroed; cos(2*pi*j/16) is bin 1.
    n = 16
    keys = column([3.0 + math.cos(2 * math.pi * j / n) for j in range(n)])
    torch.testing.assert_close(highpass_importance(keys), torch.zeros(n), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("freq", "kept"), [(1, False), (2, False), (3, False), (4, True), (5, True), (7, True)])
def test_highpass_cutoff_for_sixteen_tokens_is_bin_four(freq, kept):
    # n=16 -> 9 bins -> bins below max(1, 9 // 2) = 4 are zeroed.
    n = 16
    signal = [math.cos(2 * math.pi * freq * j / n) for j in range(n)]
    expected = torch.tensor([abs(v) for v in signal]) if kept else torch.zeros(n)
    torch.testing.assert_close(highpass_importance(column(signal)), expected, atol=1e-6, rtol=0)


def test_highpass_of_a_hand_mix_keeps_only_the_high_component():
    # 2 + cos(bin 1) + 0.5 cos(bin 5): DC and bin 1 are removed, bin 5 survives with its phase.
    n = 16
    signal = [2 + math.cos(2 * math.pi * j / n) + 0.5 * math.cos(2 * math.pi * 5 * j / n + 0.3) for j in range(n)]
    expected = torch.tensor([0.5 * abs(math.cos(2 * math.pi * 5 * j / n + 0.3)) for j in range(n)])
    torch.testing.assert_close(highpass_importance(column(signal)), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("n", "channels"), [(16, 4), (49, 8), (196, 2), (7, 3), (784, 5)])
def test_highpass_matches_a_numpy_reference_on_random_keys(n, channels):
    keys = np.random.default_rng(n).normal(size=(n, channels)).astype(np.float32)
    expected = numpy_highpass(keys)
    out = highpass_importance(torch.from_numpy(keys))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # n=1: 1 bin, max(1, 0) = 1 -> the only (DC) bin is zeroed.
        ([5.0], [0.0]),
        # n=2: 2 bins, max(1, 1) = 1 -> DC zeroed, Nyquist kept: [3, 1] -> [1, -1].
        ([3.0, 1.0], [1.0, 1.0]),
        # n=3: 2 bins, DC zeroed only: x - mean = [-1, -1, 2].
        ([0.0, 0.0, 3.0], [1.0, 1.0, 2.0]),
        # n=4: 3 bins, max(1, 1) = 1 -> DC zeroed only: [4, 0, 0, 0] - 1 = [3, -1, -1, -1].
        ([4.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 1.0]),
        # n=6: 4 bins, max(1, 2) = 2 -> bins 0 and 1 zeroed; cos(bin 1) + cos(bin 2) -> cos(bin 2).
        (
            [math.cos(2 * math.pi * j / 6) + math.cos(2 * math.pi * 2 * j / 6) for j in range(6)],
            [1.0, 0.5, 0.5, 1.0, 0.5, 0.5],
        ),
    ],
    ids=["n1", "n2", "n3", "n4", "n6"],
)
def test_highpass_zeroes_bins_below_max_one_half_for_small_n(values, expected):
    out = highpass_importance(column(values))
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)


def test_highpass_averages_magnitudes_over_channels():
    n = 8
    alternating = [(-1.0) ** j for j in range(n)]
    keys = torch.tensor([[a, 3.0, -2 * a] for a in alternating])
    # Per channel: |alt| = 1, constant -> 0, |-2 alt| = 2; mean = 1.
    torch.testing.assert_close(highpass_importance(keys), torch.ones(n), atol=1e-6, rtol=0)


def test_highpass_accepts_half_precision_and_returns_float32():
    keys = column([(-1.0) ** j for j in range(8)]).to(torch.bfloat16)
    out = highpass_importance(keys)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones(8), atol=1e-6, rtol=0)


# --- frequency importance: diff ----------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]], [0.0, 5.0, 0.0]),
        ([[1.0, 1.0, 1.0]], [0.0]),
        ([[1.0], [-1.0], [2.0], [2.0]], [0.0, 2.0, 3.0, 0.0]),
        ([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], [0.0, 1.0, 1.0, math.sqrt(2)]),
    ],
)
def test_diff_is_the_l2_norm_of_consecutive_differences(keys, expected):
    out = diff_importance(torch.tensor(keys))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)


def test_frequency_scorers_are_registered_by_option_name():
    assert {"fft": highpass_importance, "diff": diff_importance} == FREQUENCY_SCORERS


# --- attention importance ----------------------------------------------------------------

# Head-averaged probabilities of a forward with past = 2 (two init keys) and 3 block queries at
# key indices 2, 3, 4; row i can see columns 0 .. 2 + i (causal), each row sums to one.
PROBS = torch.tensor(
    [
        [0.2, 0.3, 0.5, 0.0, 0.0],
        [0.1, 0.1, 0.4, 0.4, 0.0],
        [0.1, 0.2, 0.1, 0.2, 0.4],
    ]
)


def test_attention_importance_sums_block_queries_over_block_keys():
    out = attention_importance(PROBS, torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4]), past=2)
    # Columns 2, 3, 4 summed over rows 0..2; the init columns 0, 1 are not scored.
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1.0, 0.6, 0.4]), atol=1e-6, rtol=0)


def test_attention_causal_correction_divides_by_the_queries_that_see_each_key():
    out = attention_importance(PROBS, torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4]), past=2, causal_correction=True)
    # Key 2 is seen by the queries at 2, 3, 4 (3 of them), key 3 by 3, 4 (2), key 4 by 4 (1).
    torch.testing.assert_close(out, torch.tensor([1.0 / 3, 0.6 / 2, 0.4 / 1]), atol=1e-6, rtol=0)


def test_attention_importance_with_a_subset_of_queries_and_keys():
    # Block = queries at rows 1, 2 (key indices 3, 4) and keys at columns 3, 4.
    rows, cols = torch.tensor([1, 2]), torch.tensor([3, 4])
    plain = attention_importance(PROBS, rows, cols, past=2)
    torch.testing.assert_close(plain, torch.tensor([0.4 + 0.2, 0.0 + 0.4]), atol=1e-6, rtol=0)
    corrected = attention_importance(PROBS, rows, cols, past=2, causal_correction=True)
    # Key 3 is seen by the queries at 3 and 4, key 4 only by the query at 4.
    torch.testing.assert_close(corrected, torch.tensor([0.6 / 2, 0.4 / 1]), atol=1e-6, rtol=0)


def test_attention_causal_correction_uses_the_past_offset():
    # 2 queries at key indices 5, 6 (past = 5); block keys at columns 5, 6 and a key at 3 seen by both.
    probs = torch.zeros(2, 7)
    probs[0, [3, 5]] = torch.tensor([0.4, 0.6])
    probs[1, [3, 5, 6]] = torch.tensor([0.2, 0.3, 0.5])
    rows, cols = torch.tensor([0, 1]), torch.tensor([3, 5, 6])
    plain = attention_importance(probs, rows, cols, past=5)
    torch.testing.assert_close(plain, torch.tensor([0.6, 0.9, 0.5]), atol=1e-6, rtol=0)
    corrected = attention_importance(probs, rows, cols, past=5, causal_correction=True)
    torch.testing.assert_close(corrected, torch.tensor([0.3, 0.45, 0.5]), atol=1e-6, rtol=0)


def test_attention_importance_of_half_precision_probabilities_is_float32():
    out = attention_importance(PROBS.half(), torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4]), past=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1.0, 0.6, 0.4]), atol=2e-3, rtol=0)


# --- min-max normalisation and fusion ----------------------------------------------------


def test_minmax_on_hand_numbers():
    out = minmax(torch.tensor([2.0, 4.0, 6.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0, 4.0, 1.0], dtype=torch.float64) / (4.0 + 1e-8))


def test_minmax_denominator_carries_the_epsilon():
    # A range of 1e-8 is halved by the +1e-8: (1e-8 - 0) / (1e-8 + 1e-8) = 0.5.
    out = minmax(torch.tensor([0.0, 1e-8], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("value", [0.0, 3.0, -2.5])
def test_minmax_of_constant_input_is_zero(value):
    torch.testing.assert_close(minmax(torch.full((5,), value)), torch.zeros(5), atol=0, rtol=0)


def test_fuse_on_hand_numbers():
    attention = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # -> [0, 0.5, 1]
    frequency = torch.tensor([10.0, 0.0, 5.0], dtype=torch.float64)  # -> [1, 0, 0.5]
    out = fuse(attention, frequency, 0.7)
    torch.testing.assert_close(out, torch.tensor([0.3, 0.35, 0.85], dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    ("alpha", "expected"), [(1.0, [0.0, 0.5, 1.0]), (0.0, [1.0, 0.0, 0.5]), (0.5, [0.5, 0.25, 0.75])]
)
def test_fuse_alpha_weights_attention(alpha, expected):
    out = fuse(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 0.0, 5.0]), alpha)
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)


def test_fuse_with_a_constant_frequency_ranks_by_attention_only():
    out = fuse(torch.tensor([4.0, 1.0, 2.0]), torch.zeros(3), 0.8)
    torch.testing.assert_close(out, torch.tensor([0.8, 0.0, 0.8 / 3]), atol=1e-6, rtol=0)


# --- keep count and selection -------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "ratio", "expected"),
    [
        (196, 0.1, 19),
        (49, 0.1, 4),
        (784, 0.8, 627),
        (16, 0.1, 1),
        (5, 1.0, 5),
        (3, 0.1, 1),  # floor(0.3) = 0 -> at least one
        (1, 0.01, 1),
        (49, 0.7, 34),  # release preset
        (196, 0.5, 98),
        (784, 0.3, 235),
        (100, 0.29, 29),  # 0.29 * 100 = 28.999999999999996 in floating point
        (10, 0.7, 7),
    ],
)
def test_keep_count_is_floor_with_at_least_one(n, ratio, expected):
    assert keep_count(n, ratio) == expected


def test_keep_count_reproduces_the_paper_tokens_per_frame():
    # Method.md section 4: 4 patches x 4 + 19 + 627 / 4 = 191.75 tokens per frame at P = 196, F = 4.
    per_frame = 4 * keep_count(49, 0.1) + keep_count(196, 0.1) + keep_count(784, 0.8) / 4
    assert per_frame == 191.75


@pytest.mark.parametrize(
    ("scores", "keep", "expected"),
    [
        ([0.1, 0.9, 0.3, 0.8, 0.5], 3, [1, 3, 4]),
        ([0.1, 0.9, 0.3, 0.8, 0.5], 1, [1]),
        ([0.1, 0.9, 0.3, 0.8, 0.5], 5, [0, 1, 2, 3, 4]),
        ([5.0, 4.0, 3.0, 2.0, 1.0, 0.0], 2, [0, 1]),
        ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 2, [4, 5]),
        ([-1.0, -3.0, -2.0], 2, [0, 2]),
    ],
)
def test_select_tokens_returns_top_k_in_ascending_index_order(scores, keep, expected):
    out = select_tokens(torch.tensor(scores), keep)
    assert out.tolist() == expected


# --- near-duplicate removal ----------------------------------------------------------------


def test_select_dedup_drops_the_lower_scored_duplicate_and_takes_the_next_distinct_token():
    # Tokens 1 and 4 are near-duplicates (cos = 1 / sqrt(1.01) = 0.995); token 4 scores lower.
    keys = torch.tensor([[0.0, -1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, -1.0]])
    scores = torch.tensor([0.5, 0.9, 0.4, 0.7, 0.8, 0.1])
    assert select_tokens(scores, 3).tolist() == [1, 3, 4]
    # keep 3 -> pool ceil(3.6) = 4 = tokens 1, 4, 3, 0; token 4 is dropped, token 0 comes in.
    assert select_dedup(scores, keys, 3).tolist() == [0, 1, 3]


def test_select_dedup_keeps_the_higher_scored_member_whatever_its_position():
    keys = torch.tensor([[1.0, 0.1], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    scores = torch.tensor([0.2, 0.5, 0.3, 0.9])  # token 3 outranks its duplicate token 0
    assert select_dedup(scores, keys, 2, candidates=2.0).tolist() == [1, 3]


@pytest.mark.parametrize(("threshold", "expected"), [(0.9, [0, 1]), (0.7, [0, 2]), (0.81, [0, 1])])
def test_select_dedup_threshold_is_respected(threshold, expected):
    # cos(token 0, token 1) = 0.8 (vectors [1, 0] and [0.8, 0.6]); token 2 is orthogonal to both.
    keys = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, -1.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert select_dedup(scores, keys, 2, threshold=threshold, candidates=1.5).tolist() == expected


def test_select_dedup_candidate_pool_is_ceil_of_candidates_times_keep():
    # Scores descending a, a', b, b', c, c2 with a ~ a' and b ~ b'; c and c2 are distinct.
    keys = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.01], [0.0, 0.0, 1.0],
                         [-1.0, 0.0, 0.0]])  # fmt: skip
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # keep 3, candidates 1.2: pool ceil(3.6) = 4 = {a, a', b, b'} -> only a and b survive.
    assert select_dedup(scores, keys, 3).tolist() == [0, 2]
    # candidates 1.5: pool ceil(4.5) = 5 -> c joins.
    assert select_dedup(scores, keys, 3, candidates=1.5).tolist() == [0, 2, 4]
    # candidates 2.0: pool 6 -> still the top 3 survivors a, b, c.
    assert select_dedup(scores, keys, 3, candidates=2.0).tolist() == [0, 2, 4]


def test_select_dedup_without_duplicates_equals_plain_selection():
    keys = torch.eye(6)
    scores = torch.tensor([0.3, 0.1, 0.6, 0.5, 0.2, 0.4])
    assert select_dedup(scores, keys, 3).tolist() == select_tokens(scores, 3).tolist() == [2, 3, 5]


def test_select_dedup_drops_any_pair_member_outranked_by_a_similar_candidate():
    # Chain a ~ b ~ c with a !~ c: every lower-scored member of a similar pair is dropped ("any
    # pair", method.md section 3), so c goes as well although its only similar neighbour b went.
    keys = torch.tensor([[1.0, 0.0], [math.cos(0.4), math.sin(0.4)], [math.cos(0.8), math.sin(0.8)], [0.0, -1.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    assert select_dedup(scores, keys, 2, candidates=2.0).tolist() == [0, 3]


def test_select_dedup_with_keep_equal_to_n_and_magnitude_invariant_cosine():
    keys = torch.tensor([[2.0, 0.0], [10.0, 0.5], [0.0, 3.0]])  # token 1 ~ token 0 despite the scale
    scores = torch.tensor([0.5, 0.9, 0.1])
    assert select_dedup(scores, keys, 3).tolist() == [1, 2]
