"""MuKV on the tiny model: attention scores against eager attention, equivalence with ``full``,
segment bookkeeping, and the paper preset's token counts at 196 tokens per frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from mukv import StreamSession
from mukv.compress.scorers import keep_count
from mukv.memory import create_memory
from tests.conftest import make_frames

QUESTION = "What colour was the triangle?"


@torch.inference_mode()
def eager_attention(backend, embeds: torch.Tensor, layer: int) -> torch.Tensor:
    """Head-averaged attention ``[n, init + n]`` of ``layer`` for ``embeds [1, n, d]`` after the
    system prompt, from the model run with eager attention and ``output_attentions``."""
    cache, init = backend.system_cache()
    positions = torch.arange(init, init + embeds.shape[1]).unsqueeze(0)
    backend.model.set_attn_implementation({"text_config": "eager"})
    try:
        out = backend.model.model.language_model(
            inputs_embeds=embeds, cache=cache, position_ids=positions, output_attentions=True
        )
    finally:
        backend.model.set_attn_implementation({"text_config": "sdpa"})
    return out.attentions[layer][0].mean(dim=0)


@pytest.mark.parametrize(("choice", "layer"), [("last", 2), ("second_last", 1), ("middle", 1)])
def test_attention_importance_equals_eager_attention(backend, choice, layer):
    memory = create_memory("mukv", backend, overrides={"attention_layer": choice})
    features = backend.encode_frames(make_frames(2))
    positions, _ = backend.positions.visual(memory.init_len, backend.layout, 1)
    blocks = memory._independent_blocks(features, positions)
    _, init = backend.system_cache()
    for b, block in enumerate(blocks):
        probs = eager_attention(backend, features[b : b + 1], layer)
        expected = probs[:, init:].sum(dim=0)
        assert (block.attention - expected).abs().max().item() < 1e-5


def test_attention_importance_in_shared_encoding_uses_the_blocks_own_queries_and_keys(backend):
    memory = create_memory("mukv", backend, overrides={"encode": "shared", "keep_ratio.frame": 1.0})
    features = backend.encode_frames(make_frames(2, seed=4))
    memory.ingest(features, np.array([0.0, 1.0]))
    probs = eager_attention(backend, features.reshape(1, -1, features.shape[-1]), 2)
    _, init = backend.system_cache()
    p = backend.tokens_per_frame
    from mukv.compress.scorers import fuse, highpass_importance

    for record in memory.store.records("frame"):
        f = record.first_frame
        rows = slice(f * p, (f + 1) * p)
        attention = probs[rows, init + f * p : init + (f + 1) * p].sum(dim=0)
        keys = memory.store.payload(record.block_id).kv[-1, 0].mean(dim=0)
        expected = fuse(attention, highpass_importance(keys), memory.config.alpha.frame)
        assert (memory.store.payload(record.block_id).scores - expected).abs().max().item() < 1e-5


def test_a_backend_configures_its_attention_once_and_capture_changes_nothing(tiny_model_dir):
    from mukv.backends import load_backend
    from mukv.compress.attention import ATTENTION_NAME

    fresh = load_backend(tiny_model_dir)
    config = fresh.model.config.get_text_config()
    assert config._attn_implementation == ATTENTION_NAME  # set when the backend wrapped the model
    before = config.to_dict()
    embeds = fresh.embed_ids(fresh.tokenize("hello there"))
    cache, init = fresh.system_cache()
    with fresh.capture_attention({1: 1.0}) as capture:
        fresh.forward(embeds, cache, torch.arange(init, init + embeds.shape[1]).unsqueeze(0))
    assert capture.probs is not None
    assert fresh.model.config.get_text_config().to_dict() == before


def test_capture_leaves_outputs_unchanged_and_removes_the_hook(backend):
    from mukv.compress.attention import ATTENTION_NAME

    features = backend.encode_frames(make_frames(1)).reshape(1, -1, backend.text.hidden_size)
    cache, init = backend.system_cache()
    positions = torch.arange(init, init + features.shape[1]).unsqueeze(0)
    backend.model.set_attn_implementation({"text_config": "sdpa"})
    plain = backend.forward(features, cache, positions)
    cache, _ = backend.system_cache()
    with backend.capture_attention({2: 1.0}) as capture:
        captured = backend.forward(features, cache, positions)
    assert torch.equal(plain, captured)
    assert capture.probs.shape == (1, features.shape[1], init + features.shape[1])
    assert backend.model.config.get_text_config()._attn_implementation == ATTENTION_NAME
    recorded = capture.probs
    cache, _ = backend.system_cache()
    assert torch.equal(backend.forward(features, cache, positions), plain)  # no hook: plain sdpa
    assert capture.probs is recorded
    with pytest.raises(RuntimeError, match="boom"), backend.capture_attention({2: 1.0}) as failed:
        raise RuntimeError("boom")
    cache, _ = backend.system_cache()
    backend.forward(features, cache, positions)
    assert failed.probs is None  # the hook was removed despite the exception


@pytest.mark.parametrize("encode", ["shared", "independent"])
@pytest.mark.parametrize("order", ["temporal", "reference"])
def test_lossless_segment_only_mukv_equals_full(backend, encode, order):
    """Keep ratio 1, segment blocks only, all retrieved, one segment: exactly plain full context."""
    frames = make_frames(4, seed=7)
    times = np.arange(4) * 2.0
    full = StreamSession(backend, "full")
    full.ingest(frames, times)
    reference = full.ask(QUESTION, max_new_tokens=8, output_logits=True)
    overrides = {
        "encode": encode,
        "order": order,
        "keep_ratio.segment": 1.0,
        "granularities.frame": False,
        "granularities.patch": False,
    }
    mukv = StreamSession(backend, "mukv", overrides=overrides)
    mukv.ingest(frames[:3], times[:3])
    mukv.ingest(frames[3:], times[3:])
    answer = mukv.ask(QUESTION, max_new_tokens=8, output_logits=True)
    assert answer.context_tokens == reference.context_tokens
    assert (answer.first_logits - reference.first_logits).abs().max().item() < 1e-4
    assert answer.token_ids == reference.token_ids
    assert [(r.granularity, r.first_frame, r.last_frame) for r in answer.retrieved] == [("segment", 0, 3)]


def test_lossless_mukv_detects_a_wrong_segment_position(backend):
    """The equivalence above fails when a block's keys sit at the wrong positions."""
    frames = make_frames(4, seed=7)
    full = StreamSession(backend, "full")
    full.ingest(frames, np.arange(4.0))
    reference = full.ask(QUESTION, max_new_tokens=2, output_logits=True)
    mukv = StreamSession(
        backend,
        "mukv",
        overrides={
            "encode": "shared",
            "order": "temporal",
            "keep_ratio.segment": 1.0,
            "granularities.frame": False,
            "granularities.patch": False,
        },
    )
    mukv.ingest(frames, np.arange(4.0))
    store = mukv.memory.store
    (record,) = store.records("segment")
    payload = store.payload(record.block_id)
    # Claim the keys were rotated in reverse order: re-rotation then moves every key but the middle.
    object.__setattr__(payload, "positions", payload.positions.flip(-1))
    answer = mukv.ask(QUESTION, max_new_tokens=2, output_logits=True)
    assert (answer.first_logits - reference.first_logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("encode", ["independent", "shared"])
def test_partial_segments_are_retrievable_and_replaced(backend, encode):
    memory_session = StreamSession(backend, "mukv", overrides={"encode": encode})
    store = memory_session.memory.store
    frames = make_frames(10)
    memory_session.ingest(frames[:6], np.arange(6.0))
    assert [(r.first_frame, r.last_frame, r.provisional) for r in store.records("segment")] == [(0, 3, False)]
    answer = memory_session.ask(QUESTION, max_new_tokens=2)
    spans = [(r.first_frame, r.last_frame, r.provisional) for r in store.records("segment")]
    assert spans == [(0, 3, False), (4, 5, True)]
    assert {(b.first_frame, b.last_frame) for b in answer.retrieved if b.granularity == "segment"} == {(0, 3), (4, 5)}
    memory_session.ingest(frames[6:], np.arange(6.0, 10.0))
    spans = [(r.first_frame, r.last_frame, r.provisional) for r in store.records("segment")]
    assert spans == [(0, 3, False), (4, 7, False)]
    memory_session.ask(QUESTION, max_new_tokens=2)
    spans = [(r.first_frame, r.last_frame, r.provisional) for r in store.records("segment")]
    assert spans == [(0, 3, False), (4, 7, False), (8, 9, True)]


@pytest.mark.parametrize("encode", ["independent", "shared"])
@pytest.mark.parametrize("layout", ["raster", "quadrant"])
def test_no_frame_is_dropped_at_any_granularity(backend, encode, layout):
    session = StreamSession(backend, "mukv", overrides={"encode": encode, "patch_layout": layout})
    frames = make_frames(7)
    for start, size in [(0, 3), (3, 1), (4, 3)]:
        session.ingest(frames[start : start + size], np.arange(start, start + size) * 1.0)
        session.ask(QUESTION, max_new_tokens=1)
        store = session.memory.store
        seen = session.frames_seen
        assert sorted(r.first_frame for r in store.records("frame")) == list(range(seen))
        patches = sorted((r.first_frame, r.part) for r in store.records("patch"))
        assert patches == [(f, part) for f in range(seen) for part in range(4)]
        covered = sorted(f for r in store.records("segment") for f in range(r.first_frame, r.last_frame + 1))
        assert covered == list(range(seen))


def test_kept_tokens_follow_the_keep_ratios(backend):
    session = StreamSession(backend, "mukv", overrides={"keep_ratio.patch": 0.5, "keep_ratio.frame": 0.25})
    session.ingest(make_frames(4), np.arange(4.0))
    p = backend.tokens_per_frame
    store = session.memory.store
    assert {r.tokens for r in store.records("patch")} == {keep_count(p // 4, 0.5)}
    assert {r.tokens for r in store.records("frame")} == {keep_count(p, 0.25)}
    assert {r.tokens for r in store.records("segment")} == {keep_count(4 * p, 0.8)}
    for record in store.records():
        payload = store.payload(record.block_id)
        assert payload.kv.shape[3] == record.tokens == payload.kept.shape[0] == payload.positions.shape[1]
        assert payload.positions.shape[0] == backend.positions.rows
        assert torch.equal(payload.kept, payload.kept.sort().values)


@pytest.mark.parametrize("query", ["last_key", "mean_query"])
@pytest.mark.parametrize("retrieval", ["semi_hierarchical", "parallel", "hierarchical"])
def test_every_query_and_retrieval_option_answers(backend, query, retrieval):
    session = StreamSession(
        backend,
        "mukv",
        overrides={"query": query, "retrieval": retrieval, "top_k.patch": 2, "top_k.frame": 2, "top_k.segment": 1},
    )
    session.ingest(make_frames(9), np.arange(9.0))
    answer = session.ask(QUESTION, max_new_tokens=2)
    counts = {g: sum(b.granularity == g for b in answer.retrieved) for g in ("patch", "frame", "segment")}
    assert counts["segment"] == 1 and counts["frame"] <= 2 and counts["patch"] <= 2
    assert all(b.score is not None for b in answer.retrieved)
    if retrieval == "hierarchical":
        (segment,) = [b for b in answer.retrieved if b.granularity == "segment"]
        assert all(segment.first_frame <= b.first_frame <= segment.last_frame for b in answer.retrieved)


def test_release_preset_and_dedup_run(backend):
    from mukv.memory import method_config

    config = method_config("mukv", preset="release")
    session = StreamSession(backend, "mukv", method_config=config)
    session.ingest(make_frames(5), np.arange(5.0))
    answer = session.ask(QUESTION, max_new_tokens=2)
    assert answer.context_tokens > 0
    frame_tokens = {r.tokens for r in session.memory.store.records("frame")}
    assert max(frame_tokens) <= keep_count(backend.tokens_per_frame, 0.5)


def test_dedup_drops_near_duplicate_tokens(backend):
    """Frames of two flat halves hold many identical patches: with dedup, a token that plain top-k
    keeps is dropped as a near-duplicate of a higher-scored one."""
    from mukv.memory import method_config

    frames = np.zeros((4, 96, 128, 3), np.uint8)
    frames[:, :, :64] = 200
    kept = {}
    for dedup in (False, True):
        config = method_config("mukv", {"dedup": str(dedup).lower()}, "release")
        session = StreamSession(backend, "mukv", method_config=config)
        session.ingest(frames, np.arange(4.0))
        kept[dedup] = [
            set(session.memory.store.payload(r.block_id).kept.tolist()) for r in session.memory.store.records("frame")
        ]
    dropped = [without - with_ for with_, without in zip(kept[True], kept[False], strict=True)]
    assert any(dropped), "dedup removed nothing"


def test_paper_preset_token_counts_at_196_tokens_per_frame(backend_196):
    """Method.md section 4: 191.75 stored tokens per frame; 8212 answering tokens for 64 blocks."""
    memory = create_memory("mukv", backend_196)
    generator = torch.Generator().manual_seed(0)
    frames = 48  # 12 segments, enough for k = 20 / 32 / 12 blocks
    features = torch.randn(frames, 196, backend_196.text.hidden_size, generator=generator) * 0.02
    for start in range(0, frames, 16):
        memory.ingest(features[start : start + 16], np.arange(start, start + 16) * 2.0)
    stats = memory.stats()
    assert stats.tokens["patch"] == frames * 4 * 4
    assert stats.tokens["frame"] == frames * 19
    assert stats.tokens["segment"] == (frames // 4) * 627
    visual = stats.tokens["patch"] + stats.tokens["frame"] + stats.tokens["segment"]
    assert visual / frames == 191.75
    query = backend_196.tokenize(QUESTION)
    from mukv.memory import Query

    memory.materialize(1e9)
    context = memory.prepare(Query(text=QUESTION, ids=query, time=1e9))
    assert context.context_tokens - backend_196.system_cache()[1] == 20 * 4 + 32 * 19 + 12 * 627 == 8212
    assert isinstance(context.cache, DynamicCache)
    assert context.cache.get_seq_length() == context.context_tokens


@pytest.mark.parametrize("encode", ["independent", "shared"])
def test_a_question_before_the_newest_frame_gets_the_open_segment_prefix(backend, encode):
    """Six frames, segments of four, a question at 4.5 s: frame 4 must be in a segment block,
    and that block equals the one a memory that only saw frames 0-4 builds."""
    from mukv.memory import Query

    features = backend.encode_frames(make_frames(6, seed=31))
    times = np.arange(6.0)
    later = create_memory("mukv", backend, overrides={"encode": encode})
    later.ingest(features, times)
    early = create_memory("mukv", backend, overrides={"encode": encode})
    early.ingest(features[:5], times[:5])
    query = Query(text=QUESTION, ids=backend.tokenize(QUESTION), time=4.5)
    later.materialize(4.5)
    early.materialize(4.5)
    a, b = later.prepare(query), early.prepare(query)
    spans = sorted((r.first_frame, r.last_frame) for r in later.store.records("segment") if r.end_time <= 4.5)
    assert spans == [(0, 3), (4, 4)]
    (mine,) = [r for r in later.store.records("segment") if r.first_frame == 4]
    (theirs,) = [r for r in early.store.records("segment") if r.first_frame == 4]
    pa, pb = later.store.payload(mine.block_id), early.store.payload(theirs.block_id)
    assert torch.equal(pa.kept, pb.kept)
    assert (pa.kv - pb.kv).abs().max().item() < 1e-5 and (pa.scores - pb.scores).abs().max().item() < 1e-5
    assert a.context_tokens == b.context_tokens
    # Asking at the newest frame afterwards rebuilds the provisional block for frames 4-5.
    later.materialize(5.0)
    assert sorted((r.first_frame, r.last_frame) for r in later.store.records("segment")) == [(0, 3), (4, 5)]


def test_rekv_open_block_prefix_for_an_earlier_question(backend):

    memory = create_memory("rekv", backend, overrides={"block_frames": 3})
    memory.ingest(backend.encode_frames(make_frames(5, seed=32)), np.arange(5.0))
    memory.materialize(3.5)
    assert sorted((r.first_frame, r.last_frame, r.provisional) for r in memory.store.records()) == [
        (0, 2, False),
        (3, 3, True),
    ]
