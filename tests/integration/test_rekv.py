"""ReKV and the recent-frames baseline on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mukv import StreamSession
from mukv.memory import Query, create_memory
from mukv.memory.rekv import _LayerRetrieval
from tests.conftest import make_frames

QUESTION = "What colour was the triangle?"


def answer(backend, method, frames, chunks, overrides=None, max_new_tokens=8):
    session = StreamSession(backend, method, overrides=overrides)
    start = 0
    for size in chunks:
        session.ingest(frames[start : start + size], np.arange(start, start + size) * 2.0)
        start += size
    return session, session.ask(QUESTION, max_new_tokens=max_new_tokens, output_logits=True)


@pytest.mark.parametrize(
    ("method", "overrides"),
    [("rekv", None), ("rekv", {"layer_shared": True}), ("rekv", {"block_frames": 2}), ("recent", None)],
)
def test_without_eviction_and_with_every_block_the_answer_equals_full(backend, method, overrides):
    frames = make_frames(6, seed=21)
    _, reference = answer(backend, "full", frames, [6])
    _, result = answer(backend, method, frames, [4, 2], overrides)
    assert result.context_tokens == reference.context_tokens
    assert (result.first_logits - reference.first_logits).abs().max().item() < 1e-4
    assert result.token_ids == reference.token_ids


@torch.inference_mode()
def test_sliding_window_limits_what_each_frame_attends_to(backend):
    """With a window of two frames, frame 5's KV is exactly one forward over
    ``[init | frames 3, 4 as stored, at positions right after init]``, and not what it would be
    if it also saw frames 0-2."""
    from transformers import DynamicCache

    p = backend.tokens_per_frame
    features = backend.encode_frames(make_frames(6, seed=22))
    memory = create_memory("rekv", backend, overrides={"n_local": 2 * p})
    memory.ingest(features, np.arange(6.0))
    stored = {r.first_frame: memory.store.payload(r.block_id) for r in memory.store.records()}
    init_cache, init = backend.system_cache()
    window = torch.cat([stored[3].kv, stored[4].kv], dim=3)  # [L, 2, Hkv, 2P, D]
    old = torch.cat([stored[3].positions, stored[4].positions], dim=1)  # [1, 2P]
    keys = backend.positions.shift(window[:, 0], old, torch.arange(init, init + 2 * p)[None])
    cache = DynamicCache(
        ddp_cache_data=[
            (torch.cat((layer.keys, keys[i][None]), 2), torch.cat((layer.values, window[i, 1][None]), 2))
            for i, layer in enumerate(init_cache.layers)
        ]
    )
    positions = torch.arange(init + 2 * p, init + 3 * p)
    assert torch.equal(stored[5].positions, positions[None])
    backend.forward(features[5:6], cache, positions[None], logits="none")
    expected = torch.stack([torch.stack((layer.keys[0, :, -p:], layer.values[0, :, -p:])) for layer in cache.layers])
    assert (stored[5].kv - expected).abs().max().item() < 1e-5
    # Without the window, frame 5 also sees frames 0-2 and its values differ.
    unlimited = create_memory("rekv", backend, overrides={"n_local": 100 * p})
    unlimited.ingest(features, np.arange(6.0))
    (last,) = [unlimited.store.payload(r.block_id) for r in unlimited.store.records() if r.first_frame == 5]
    assert (last.kv[:, 1] - expected[:, 1]).abs().max().item() > 1e-4
    # Positions never go beyond init + n_local + one frame.
    assert max(int(payload.positions.max()) for payload in stored.values()) < init + 3 * p


def test_per_layer_retrieval_differs_by_layer_and_the_cache_is_well_formed(backend):
    frames = make_frames(8, seed=23)
    memory = create_memory("rekv", backend, overrides={"retrieve_blocks": 2})
    memory.ingest(backend.encode_frames(frames), np.arange(8.0))
    chosen: dict[int, list[int]] = {}
    original = _LayerRetrieval.__call__

    def spy(self, module, *args, **kwargs):
        out = original(self, module, *args, **kwargs)
        chosen[module.layer_idx] = self.chosen[module.layer_idx]
        return out

    _LayerRetrieval.__call__ = spy
    try:
        memory.materialize(7.0)
        context = memory.prepare(Query(text=QUESTION, ids=backend.tokenize(QUESTION), time=7.0))
    finally:
        _LayerRetrieval.__call__ = original
    assert len(chosen) == backend.text.num_layers
    assert len({tuple(ids) for ids in chosen.values()}) > 1, "expected different frames at different layers"
    p = backend.tokens_per_frame
    init = memory.init_len
    for layer, ids in chosen.items():
        assert ids == sorted(ids) and len(ids) == 2
        keys, values = memory.layer_blocks(ids, layer, backend.device)
        cached = context.cache.layers[layer]
        assert cached.keys.shape[2] == init + 2 * p == context.context_tokens
        assert torch.equal(cached.keys[:, :, init:], keys) and torch.equal(cached.values[:, :, init:], values)
    assert {b.first_frame for b in context.retrieved} == {i for ids in chosen.values() for i in ids}


class _CountingBackend:
    """Counts the tokens each forward call prefills."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.tokens = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def forward(self, embeds, cache, position_ids, logits="last"):
        self.tokens += embeds.shape[1]
        return self._inner.forward(embeds, cache, position_ids, logits)


def test_recent_never_prefills_a_frame_twice(backend):
    counting = _CountingBackend(backend)
    backend.system_cache()  # computed once per backend, before counting starts
    session = StreamSession(counting, "recent", overrides={"num_frames": 3})
    p = backend.tokens_per_frame
    frames = make_frames(7, seed=24)
    session.ingest(frames[:4], np.arange(4.0))
    assert counting.tokens == 4 * p
    before = counting.tokens
    result = session.ask(QUESTION, max_new_tokens=3)
    prompt = backend.tokenize(backend.prompts.render_question(QUESTION)).shape[1]
    assert counting.tokens - before == prompt + result.generated_tokens - 1  # no visual token again
    session.ingest(frames[4:], np.arange(4.0, 7.0))
    assert counting.tokens - before - (prompt + result.generated_tokens - 1) == 3 * p
    last = session.ask(QUESTION, max_new_tokens=2)
    assert [b.first_frame for b in last.retrieved] == [4, 5, 6]
    assert last.context_tokens == backend.system_cache()[1] + 3 * p


def test_recent_refuses_a_question_whose_frames_left_the_window(backend):
    from mukv.errors import StreamError

    memory = create_memory("recent", backend, overrides={"num_frames": 2})
    memory.ingest(backend.encode_frames(make_frames(5)), np.arange(5.0))
    with pytest.raises(StreamError, match="left the rolling window"):
        memory.materialize(1.0)
        memory.prepare(Query(text=QUESTION, ids=backend.tokenize(QUESTION), time=1.0))


def test_rekv_answering_tokens_are_r_frames(backend):
    p = backend.tokens_per_frame
    _, result = answer(backend, "rekv", make_frames(7, seed=25), [7], {"retrieve_blocks": 4}, max_new_tokens=2)
    assert result.context_tokens == backend.system_cache()[1] + 4 * p


def test_rekv_partial_block_is_used_until_complete(backend):
    session, result = answer(backend, "rekv", make_frames(5, seed=26), [5], {"block_frames": 2}, max_new_tokens=2)
    spans = sorted((b.first_frame, b.last_frame) for b in result.retrieved)
    assert spans == [(0, 1), (2, 3), (4, 4)]
    session.ingest(make_frames(1, seed=27), [10.0])
    records = sorted((r.first_frame, r.last_frame, r.provisional) for r in session.memory.store.records())
    assert records == [(0, 1, False), (2, 3, False), (4, 5, False)]


@pytest.mark.parametrize(("field", "value"), [("n_local", 0), ("retrieve_blocks", 0), ("block_frames", 0)])
def test_rekv_options_are_validated(backend, field, value):
    with pytest.raises(ValueError, match=field):
        create_memory("rekv", backend, overrides={field: value})
