"""BlockStore bookkeeping and the token layout of patch blocks (method.md sections 2 and 4)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mukv.kv.blocks import BlockPayload, BlockRecord, BlockStore
from mukv.memory.mukv import patch_token_indices

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 4


def payload(tokens: int, block_tokens: int, *, fill: float = 0.0, dtype=torch.float16) -> BlockPayload:
    """A payload of ``tokens`` kept tokens out of ``block_tokens``."""
    return BlockPayload(
        kv=torch.full((LAYERS, 2, KV_HEADS, tokens, HEAD_DIM), fill, dtype=dtype),
        positions=torch.arange(13, 13 + tokens),
        kept=torch.arange(tokens),
        scores=torch.linspace(0, 1, block_tokens),
    )


def rep(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def add(
    store: BlockStore, granularity: str, frame: int, representative: torch.Tensor, *, tokens: int = 3, part: int = -1
):
    return store.add(
        granularity=granularity,
        first_frame=frame,
        last_frame=frame + (3 if granularity == "segment" else 0),
        part=part,
        start_time=2.0 * frame,
        end_time=2.0 * frame + 2.0,
        payload=payload(tokens, 10),
        representative=representative,
    )


@pytest.fixture
def store() -> BlockStore:
    """Blocks 0..4: segment, frame, patch, frame, patch (insertion order)."""
    s = BlockStore()
    add(s, "segment", 0, rep(1.0, 0.0))
    add(s, "frame", 0, rep(0.0, 1.0))
    add(s, "patch", 0, rep(1.0, 1.0), part=0)
    add(s, "frame", 1, rep(2.0, 0.0))
    add(s, "patch", 0, rep(-1.0, 1.0), part=1)
    return s


# --- records -----------------------------------------------------------------------------


def test_ids_are_consecutive_in_insertion_order(store):
    assert [r.block_id for r in store.records()] == [0, 1, 2, 3, 4]
    assert [r.granularity for r in store.records()] == ["segment", "frame", "patch", "frame", "patch"]
    assert len(store) == 5


def test_records_by_granularity(store):
    assert [r.block_id for r in store.records("segment")] == [0]
    assert [r.block_id for r in store.records("frame")] == [1, 3]
    assert [r.block_id for r in store.records("patch")] == [2, 4]
    assert store.records("unknown") == []


def test_record_fields_are_exact():
    s = BlockStore()
    record = s.add(
        granularity="segment",
        first_frame=4,
        last_frame=7,
        part=-1,
        start_time=8.0,
        end_time=16.0,
        payload=payload(5, 784),
        representative=torch.zeros(2 * 64),
        provisional=True,
    )
    assert isinstance(record, BlockRecord)
    assert record == BlockRecord(
        block_id=0,
        granularity="segment",
        first_frame=4,
        last_frame=7,
        part=-1,
        start_time=8.0,
        end_time=16.0,
        tokens=5,
        # kv 2*2*2*5*4 fp16 = 160 * 2; positions 5 int64; kept 5 int64; scores 784 fp32; rep 128 * 4.
        nbytes=160 * 2 + 5 * 8 + 5 * 8 + 784 * 4 + 128 * 4,
        location="cpu",
        provisional=True,
    )
    assert s.record(0) is record
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.tokens = 3  # type: ignore[misc]


@pytest.mark.parametrize(("dtype", "element"), [(torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4)])
def test_nbytes_is_payload_bytes_plus_four_per_representative_element(dtype, element):
    s = BlockStore()
    p = payload(3, 10, dtype=dtype)
    record = s.add(
        granularity="frame", first_frame=0, last_frame=0, part=-1, start_time=0.0, end_time=2.0,
        payload=p, representative=torch.ones(8, dtype=torch.float16),
    )  # fmt: skip
    kv_bytes = LAYERS * 2 * KV_HEADS * 3 * HEAD_DIM * element
    assert p.nbytes == kv_bytes + 3 * 8 + 3 * 8 + 10 * 4
    # The representative is stored as float32 whatever its dtype: 8 elements -> 32 bytes.
    assert record.nbytes == p.nbytes + 8 * 4


def test_payloads_are_stored_on_cpu_and_unchanged(store):
    for block_id in range(5):
        p = store.payload(block_id)
        assert {t.device.type for t in (p.kv, p.positions, p.kept, p.scores)} == {"cpu"}
        assert p.kv.shape == (LAYERS, 2, KV_HEADS, 3, HEAD_DIM)
        assert p.positions.tolist() == [13, 14, 15]
    assert store.record(0).location == "cpu"


# --- index -------------------------------------------------------------------------------


def test_index_returns_ids_and_representatives_in_order(store):
    frame_ids, frame_reps = store.index("frame")
    assert frame_ids.dtype == torch.long
    assert frame_ids.tolist() == [1, 3]
    assert frame_reps.dtype == torch.float32
    torch.testing.assert_close(frame_reps, torch.tensor([[0.0, 1.0], [2.0, 0.0]]), atol=0, rtol=0)
    patch_ids, patch_reps = store.index("patch")
    assert patch_ids.tolist() == [2, 4]
    torch.testing.assert_close(patch_reps, torch.tensor([[1.0, 1.0], [-1.0, 1.0]]), atol=0, rtol=0)


def test_index_of_an_empty_granularity_is_empty():
    ids, reps = BlockStore().index("segment")
    assert ids.numel() == 0
    assert reps.numel() == 0


def test_index_is_refreshed_after_add(store):
    assert store.index("frame")[0].tolist() == [1, 3]  # cached
    record = add(store, "frame", 2, rep(0.5, 0.5))
    assert record.block_id == 5
    ids, reps = store.index("frame")
    assert ids.tolist() == [1, 3, 5]
    torch.testing.assert_close(reps[-1], rep(0.5, 0.5), atol=0, rtol=0)
    # Other granularities are untouched.
    assert store.index("patch")[0].tolist() == [2, 4]


def test_remove_updates_records_payloads_and_index(store):
    assert store.index("frame")[0].tolist() == [1, 3]  # cached before the removal
    store.remove(1)
    assert len(store) == 4
    assert [r.block_id for r in store.records()] == [0, 2, 3, 4]
    assert [r.block_id for r in store.records("frame")] == [3]
    ids, reps = store.index("frame")
    assert ids.tolist() == [3]
    torch.testing.assert_close(reps, torch.tensor([[2.0, 0.0]]), atol=0, rtol=0)
    with pytest.raises(KeyError):
        store.record(1)
    with pytest.raises(KeyError):
        store.payload(1)
    with pytest.raises(KeyError):
        store.remove(1)
    # Ids are never reused.
    assert add(store, "frame", 5, rep(3.0, 3.0)).block_id == 5
    assert store.index("frame")[0].tolist() == [3, 5]


def test_remove_the_last_block_of_a_granularity(store):
    store.remove(0)
    assert store.records("segment") == []
    ids, reps = store.index("segment")
    assert ids.numel() == 0 and reps.numel() == 0


def test_representatives_are_detached_float32_copies():
    s = BlockStore()
    source = torch.tensor([1.5, -2.0], dtype=torch.bfloat16, requires_grad=True)
    add(s, "frame", 0, source)
    reps = s.index("frame")[1]
    assert reps.dtype == torch.float32
    assert not reps.requires_grad
    torch.testing.assert_close(reps, torch.tensor([[1.5, -2.0]]), atol=0, rtol=0)


# --- patch layouts -------------------------------------------------------------------------


def test_raster_patches_for_196_tokens_are_four_runs_of_49():
    patches = patch_token_indices(196, "raster")
    assert len(patches) == 4
    for i, patch in enumerate(patches):
        assert patch.tolist() == list(range(49 * i, 49 * (i + 1)))


def test_quadrant_patches_for_16_tokens():
    # 4 x 4 grid, row-major:  0  1 |  2  3
    #                         4  5 |  6  7
    #                         -----+------
    #                         8  9 | 10 11
    #                        12 13 | 14 15
    top_left, top_right, bottom_left, bottom_right = patch_token_indices(16, "quadrant")
    assert top_left.tolist() == [0, 1, 4, 5]
    assert top_right.tolist() == [2, 3, 6, 7]
    assert bottom_left.tolist() == [8, 9, 12, 13]
    assert bottom_right.tolist() == [10, 11, 14, 15]


def test_quadrant_patches_for_196_tokens_are_the_7x7_quadrants_of_the_14x14_grid():
    patches = patch_token_indices(196, "quadrant")
    expected = [
        [row * 14 + col for row in rows for col in cols]
        for rows in (range(0, 7), range(7, 14))
        for cols in (range(0, 7), range(7, 14))
    ]
    assert [p.tolist() for p in patches] == expected
    assert [len(p) for p in patches] == [49, 49, 49, 49]
    assert patches[0][:8].tolist() == [0, 1, 2, 3, 4, 5, 6, 14]
    assert patches[3][-1].item() == 195


@pytest.mark.parametrize("layout", ["raster", "quadrant"])
@pytest.mark.parametrize("tokens", [4, 16, 36, 196, 729])
def test_every_token_is_in_exactly_one_patch(layout, tokens):
    patches = patch_token_indices(tokens, layout)
    assert len(patches) == 4
    flat = torch.cat(patches)
    assert sorted(flat.tolist()) == list(range(tokens))
    if tokens != 729:  # 27 x 27 (odd side) has no equal quadrants; the rest split into P/4 each
        assert [len(p) for p in patches] == [tokens // 4] * 4


@pytest.mark.parametrize("tokens", [200, 12, 195, 2])
def test_quadrant_with_a_non_square_grid_raises(tokens):
    with pytest.raises(ValueError, match=r"patch_layout: quadrant needs a square token grid"):
        patch_token_indices(tokens, "quadrant")


@pytest.mark.parametrize("layout", ["diagonal", "", "Raster"])
def test_unknown_patch_layout_raises(layout):
    with pytest.raises(ValueError, match="patch_layout"):
        patch_token_indices(16, layout)


def test_to_device_concatenates_in_one_copy():
    from mukv.kv.blocks import to_device

    parts = [torch.arange(6.0).reshape(1, 2, 3), torch.arange(6.0, 10.0).reshape(1, 2, 2)]
    out = to_device(parts, dim=2, device=torch.device("cpu"))
    assert torch.equal(out, torch.cat(parts, dim=2))


@pytest.mark.gpu
def test_to_device_stages_through_pinned_memory_on_cuda():
    from mukv.kv.blocks import to_device

    parts = [torch.randn(2, 3, 4), torch.randn(2, 5, 4)]
    out = to_device(parts, dim=1, device=torch.device("cuda"))
    torch.cuda.synchronize()
    assert out.device.type == "cuda" and torch.equal(out.cpu(), torch.cat(parts, dim=1))
