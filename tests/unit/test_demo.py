"""Pieces of the demo that are plain functions."""

from __future__ import annotations

from mukv.demo import merge_spans
from mukv.memory.base import RetrievedBlock


def block(first: int, last: int, granularity: str = "frame") -> RetrievedBlock:
    return RetrievedBlock(granularity, first, last, 2.0 * first, 2.0 * last, tokens=16)


def test_merge_spans_joins_touching_frames_and_sorts():
    blocks = [block(5, 5), block(0, 0), block(1, 1), block(3, 4, "segment"), block(9, 9), block(4, 4, "patch")]
    assert merge_spans(blocks, period=2.0) == [(0.0, 4.0), (6.0, 12.0), (18.0, 20.0)]


def test_merge_spans_of_nothing():
    assert merge_spans([], period=2.0) == []
