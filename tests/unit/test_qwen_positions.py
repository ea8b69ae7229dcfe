"""Runs of visual units fed in pieces are placed as when fed at once, for every position scheme."""

from __future__ import annotations

import pytest
import torch

from mukv.backends.positions import FrameLayout, MultimodalRopePositions, RopePositions

INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 64, 2).double() / 64))  # 32 slots


def schemes():
    yield "1-D", RopePositions(INV_FREQ)
    for scale in (8.0, 0.7, 1.0):
        yield f"qwen2.5 x{scale}", MultimodalRopePositions(INV_FREQ, (8, 12, 12), time_scale=scale)
    yield "qwen3", MultimodalRopePositions(INV_FREQ, (12, 10, 10), interleaved=True, span_per_unit=True)


@pytest.mark.parametrize(("name", "scheme"), list(schemes()), ids=[n for n, _ in schemes()])
@pytest.mark.parametrize("pieces", [[1, 1, 1, 1, 1], [2, 3], [4, 1]])
def test_a_run_fed_in_pieces_is_placed_as_at_once(name, scheme, pieces):
    layout = FrameLayout((2, 3), frames_per_unit=2)
    whole, cursor = scheme.visual(13, layout, sum(pieces))
    parts, done = [], 0
    for size in pieces:
        positions, piece_cursor = scheme.visual_run(13, layout, size, first_unit=done)
        parts.append(positions)
        done += size
    assert torch.equal(torch.cat(parts, dim=1), whole)
    assert piece_cursor == cursor


def test_a_qwen25_run_keeps_counting_time_from_its_start():
    scheme = MultimodalRopePositions(INV_FREQ, (8, 12, 12), time_scale=8.0)
    layout = FrameLayout((2, 3), frames_per_unit=2)
    positions, cursor = scheme.visual_run(10, layout, 1, first_unit=3)
    assert positions[0].unique().tolist() == [10 + 24] and positions[1].tolist() == [10, 10, 10, 11, 11, 11]
    assert cursor == 10 + 3  # text after the video: its start plus the larger grid side
    restarted, _ = scheme.visual(cursor, layout, 1)
    assert not torch.equal(restarted, positions)


def test_mrope_placement_continues_text_after_the_grid_and_keeps_a_run_together():
    scheme = MultimodalRopePositions(INV_FREQ, (8, 12, 12), time_scale=8.0)
    layout = FrameLayout((2, 3), frames_per_unit=2)
    run, _ = scheme.visual(20, layout, 3)
    blocks = [run[:, 6 * u : 6 * (u + 1)] for u in range(3)]
    placed, cursor = scheme.place_run(blocks, 5)
    assert torch.equal(placed, run - 15) and cursor == 5 + 3
    single, after = scheme.place(blocks[2], 5)
    assert int(single.min()) == 5 and after == 5 + 3
