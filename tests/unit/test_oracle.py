"""The study's oracle: its answering cache holds every evidence frame, at most ``budget_frames``
frames, each frame's KV being that frame's independent encoding re-positioned in time order."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mukv.engine import StreamSession
from mukv.eval.oracle import OracleConfig, OracleMemory, filler_frames
from mukv.memory import Query
from mukv.video.streams import KINDS, make_stream

FPS = 0.5


def oracle_session(backend, frames: int, budget: int, seed: int = 0):
    stream = make_stream(frames, seed=seed, fps=FPS, kinds=KINDS, size=backend.preprocessor.size)
    memory = OracleMemory.for_stream(
        backend, stream, OracleConfig(budget_frames=budget, encode_batch_frames=7), fps=FPS
    )
    session = StreamSession(backend, memory, fps=FPS)
    session.ingest(stream.frames, stream.timestamps)
    return stream, memory, session


def prepared(memory: OracleMemory, backend, question: str, time: float):
    query = Query(text=question, ids=backend.tokenize(question), time=time)
    memory.materialize(time)
    return memory.prepare(query)


def independent_kv(backend, frame) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` ``[Hkv, P, D]`` of one frame fed alone after the system prompt."""
    cache, init = backend.system_cache()
    features = backend.encode_frames(frame[None])
    p = backend.tokens_per_frame
    backend.forward(features, cache, backend.positions.text(init, p), logits="none")
    return [(layer.keys[0, :, init:], layer.values[0, :, init:]) for layer in cache.layers]


@pytest.mark.parametrize(("frames", "budget"), [(40, 6), (12, 6), (9, 42)])
def test_the_cache_holds_every_evidence_frame_within_the_budget(backend, frames, budget):
    stream, memory, _ = oracle_session(backend, frames, budget)
    p, init = backend.tokens_per_frame, memory.init_len
    time = float(stream.timestamps[-1])
    assert {q.kind for q in stream.questions} == set(KINDS)
    for q in stream.questions:
        context = prepared(memory, backend, q.question, time)
        chosen = [b.first_frame for b in context.retrieved]
        assert all(b.first_frame == b.last_frame for b in context.retrieved)
        assert set(range(q.first_frame, q.last_frame + 1)) <= set(chosen)
        assert len(chosen) == len(set(chosen)) == min(budget, frames)
        assert chosen == sorted(chosen)  # time order
        assert context.context_tokens == context.cache.get_seq_length() == init + len(chosen) * p
        assert context.next_position == context.context_tokens  # re-positioned one after another
        # Evidence blocks are marked, fillers not.
        marked = [b.first_frame for b in context.retrieved if b.score == 1.0]
        assert marked == list(range(q.first_frame, q.last_frame + 1))


def test_each_frame_in_the_cache_is_its_independent_encoding_re_positioned(backend):
    stream, memory, _ = oracle_session(backend, 30, 5, seed=3)
    p, init = backend.tokens_per_frame, memory.init_len
    q = next(q for q in stream.questions if q.kind == "order")
    context = prepared(memory, backend, q.question, float(stream.timestamps[-1]))
    scheme = backend.positions
    for slot, block in enumerate(context.retrieved):
        expected = independent_kv(backend, stream.frames[block.first_frame])
        where = slice(init + slot * p, init + (slot + 1) * p)
        old = scheme.text(init, p)
        new = scheme.text(init + slot * p, p)
        for layer, (keys, values) in zip(context.cache.layers, expected, strict=True):
            torch.testing.assert_close(layer.values[0, :, where], values, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.keys[0, :, where], scheme.shift(keys, old, new), rtol=1e-4, atol=1e-4)


def test_the_session_answers_from_the_oracle_cache(backend):
    stream, memory, session = oracle_session(backend, 20, 4, seed=5)
    q = stream.questions[0]
    answer = session.ask(q.question, max_new_tokens=3)
    assert answer.method == "oracle"
    assert [b.first_frame for b in answer.retrieved if b.score == 1.0] == list(range(q.first_frame, q.last_frame + 1))
    assert answer.context_tokens == memory.init_len + 4 * backend.tokens_per_frame
    # The answer is the greedy continuation of exactly that cache (a fresh copy of it).
    context = prepared(memory, backend, q.question, float(stream.timestamps[-1]))
    prompt = backend.tokenize(backend.prompts.render_question(q.question))
    cache = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in context.cache.layers])
    logits = backend.forward(
        backend.embed_ids(prompt), cache, backend.positions.text(context.next_position, prompt.shape[1])
    )
    assert answer.token_ids[0] == int(logits[0, -1].argmax())


def test_questions_without_ground_truth_or_unseen_evidence_are_refused(backend):
    stream, memory, _ = oracle_session(backend, 12, 4)
    with pytest.raises(KeyError, match="no evidence"):
        prepared(memory, backend, "What colour was the moon?", float(stream.timestamps[-1]))
    q = stream.questions[0]
    memory.evidence[q.question] = (11, 12)  # frame 12 does not exist yet
    with pytest.raises(ValueError, match="not all seen"):
        prepared(memory, backend, q.question, float(stream.timestamps[-1]))
    with pytest.raises(ValueError, match="budget_frames"):
        OracleConfig(budget_frames=1)


def test_fillers_are_distinct_and_spread_over_the_candidates():
    candidates = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert filler_frames(candidates, 5) == [0, 2, 5, 7, 9]
    assert filler_frames(candidates, 20) == candidates
    assert filler_frames(candidates, 0) == []
    for n in range(1, 40):
        for count in range(0, n + 1):
            picked = filler_frames(list(range(n)), count)
            assert len(picked) == len(set(picked)) == count


def test_a_model_that_merges_frames_is_refused(tmp_path):
    # The streams' evidence counts frames; a Qwen-VL memory counts pairs of them.
    from mukv.backends import load_backend
    from mukv.backends.tiny_qwen import build_tiny_qwen

    qwen = load_backend(build_tiny_qwen(tmp_path / "qwen"))
    with pytest.raises(ValueError, match="merges 2 frames per unit"):
        OracleMemory.for_stream(qwen, make_stream(8, seed=1), fps=1.0)
