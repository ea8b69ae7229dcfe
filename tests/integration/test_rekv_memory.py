"""ReKV's memory accounting on the tiny model: what ``stats()`` reports is what is held, and the
sliding window does not re-allocate itself at every frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mukv.memory import Query, create_memory
from tests.conftest import make_frames


def _tensors(root, backend) -> list[torch.Tensor]:
    """Every tensor reachable from ``root`` through attributes and containers (``backend``, its
    position scheme, which the memory holds as its stream's, and modules excluded)."""
    found: list[torch.Tensor] = []
    seen: set[int] = {id(backend), id(backend.positions)}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, torch.nn.Module | type) or callable(obj):
            continue
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return found


def _storages(root, backend) -> dict[int, int]:
    """Bytes of every distinct storage behind the tensors reachable from ``root``, by address."""
    storages: dict[int, int] = {}
    for tensor in _tensors(root, backend):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return storages


@pytest.mark.parametrize("block_frames", [1, 2])
def test_stats_bytes_are_the_storages_the_memory_holds(backend, block_frames):
    """Counted once per storage, so a view that keeps a larger buffer alive is caught, and so is
    any buffer that stats() leaves out."""
    p = backend.tokens_per_frame
    overrides = {"n_local": 3 * p, "block_frames": block_frames, "layer_shared": True}
    memory = create_memory("rekv", backend, overrides=overrides)
    features = backend.encode_frames(make_frames(9, seed=31))
    memory.ingest(features[:5], np.arange(5.0))
    # A question inside an open block stores it as a provisional block.
    question = "What colour was the triangle?"
    memory.materialize(4.0)
    memory.prepare(Query(text=question, ids=backend.tokenize(question), time=4.0))
    memory.ingest(features[5:], np.arange(5.0, 9.0))  # the window has evicted by now
    assert memory.window.length == 3 * p
    for _ in range(2):
        assert memory.stats().total_bytes == sum(_storages(memory, backend).values())
        memory.ingest(features[:1], np.array([memory.timestamp(memory.frames - 1) + 1.0]))


def test_the_window_is_not_reallocated_at_every_frame(backend):
    """Once full, appending a frame writes into the window's existing storages. Re-allocating
    them at every frame (growing by concatenation) fragmented the C heap: the process held
    several times the bytes stats() reports, and more with every frame."""
    p = backend.tokens_per_frame
    memory = create_memory("rekv", backend, overrides={"n_local": 4 * p})
    features = backend.encode_frames(make_frames(8, seed=32))
    memory.ingest(features[:6], np.arange(6.0))
    before = {ptr for ptr, nbytes in _storages(memory.window, backend).items() if nbytes}
    memory.ingest(features[6:], np.arange(6.0, 8.0))
    assert {ptr for ptr, nbytes in _storages(memory.window, backend).items() if nbytes} == before


def test_eviction_in_pieces_is_bit_identical(backend, monkeypatch):
    """On CPU the window is re-positioned a few tokens at a time (bounded temporaries); pieces
    smaller and larger than the evicted span give exactly what one piece gives."""
    import mukv.kv.window as window

    p = backend.tokens_per_frame
    features = backend.encode_frames(make_frames(7, seed=33))
    results = []
    for piece_tokens in (10_000, p + 3, p // 3, 1):
        per_token = backend.text.num_kv_heads * backend.text.head_dim * 4
        monkeypatch.setattr(window, "_PIECE_BYTES", piece_tokens * per_token)
        memory = create_memory("rekv", backend, overrides={"n_local": 2 * p + 5})
        memory.ingest(features, np.arange(7.0))
        stored = [memory.store.payload(r.block_id).kv for r in memory.store.records()]
        held = [(layer.keys, layer.values) for layer in memory.window.cache.layers]
        results.append((stored, held))
    for stored, held in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(stored, results[0][0], strict=True))
        for (k, v), (k0, v0) in zip(held, results[0][1], strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)
