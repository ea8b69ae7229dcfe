"""The cost benchmarks' synthetic states and real-size models (``benchmarks/synthetic.py``).

A benchmark's numbers are only as good as the state it times: a store grown by copies of real
blocks must hold what a store of that many really encoded frames holds (blocks, tokens, bytes,
clock) and answer from as many tokens, and the random-weight models must have the real
checkpoints' sizes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mukv

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import synthetic  # noqa: E402


def ingest_units(session: mukv.StreamSession, first: int, count: int, interval: float, seed: int) -> None:
    features = synthetic.random_features(session.backend, count, seed)
    session.memory.ingest(features, np.arange(first, first + count, dtype=np.float64) * interval)


def ask(session: mukv.StreamSession):
    return session.ask("What happened in the video?", max_new_tokens=2)


def test_cloned_store_holds_and_answers_like_an_encoded_one(backend):
    interval = 2.0
    encoded = mukv.StreamSession(backend, "mukv")
    segment = encoded.memory.config.segment_frames
    ingest_units(encoded, 0, 3 * segment, interval, seed=1)

    grown = mukv.StreamSession(backend, "mukv")
    ingest_units(grown, 0, segment, interval, seed=1)
    template = synthetic.stored_blocks(grown)
    synthetic.clone_groups(grown, template, segment, 2, interval, seed=0)

    a, b = encoded.memory.stats(), grown.memory.stats()
    assert (a.frames, a.blocks, a.tokens, a.bytes) == (b.frames, b.blocks, b.tokens, b.bytes)
    assert grown.memory.time == encoded.memory.time == (3 * segment - 1) * interval
    spans = sorted((r.first_frame, r.last_frame, r.start_time, r.end_time) for r in grown.memory.store.records())
    assert spans == sorted(
        (r.first_frame, r.last_frame, r.start_time, r.end_time) for r in encoded.memory.store.records()
    )
    # Copies share the template's K/V: hours of blocks cost the process one group.
    template_ptrs = {block.payload.kv.data_ptr() for block in template}
    assert {grown.memory.store.payload(r.block_id).kv.data_ptr() for r in grown.memory.store.records()} == template_ptrs
    # Each copy ranks on its own representative.
    reps = torch.stack([grown.memory.store.representative(r.block_id) for r in grown.memory.store.records("frame")])
    assert torch.unique(reps, dim=0).shape[0] == reps.shape[0]

    ea, ga = ask(encoded), ask(grown)
    assert ga.context_tokens == ea.context_tokens
    assert sorted(block.granularity for block in ga.retrieved) == sorted(block.granularity for block in ea.retrieved)
    assert max(block.last_frame for block in ga.retrieved) >= segment  # copies are retrieved, not only the template


def test_clone_groups_refuses_a_partial_group(backend):
    session = mukv.StreamSession(backend, "mukv")
    segment = session.memory.config.segment_frames
    ingest_units(session, 0, segment + 1, 2.0, seed=1)
    with pytest.raises(ValueError, match="whole groups"):
        synthetic.clone_groups(session, synthetic.stored_blocks(session), segment, 1, 2.0, seed=0)


@pytest.mark.parametrize(
    ("config_class", "sizes", "total", "vision"),
    [
        # Qwen2.5-VL-3B-Instruct and Qwen3-VL-2B-Instruct as published (tied output head).
        ("Qwen2_5_VLConfig", "QWEN25_VL_3B", 3_754_622_976, 668_684_288),
        ("Qwen3VLConfig", "QWEN3_VL_2B", 2_127_532_032, 406_957_056),
    ],
)
def test_real_size_qwen_models_have_the_checkpoints_parameter_counts(config_class, sizes, total, vision):
    import transformers

    from mukv.backends.tiny import build_tokenizer

    tokenizer = build_tokenizer(special_tokens=synthetic.QWEN_SPECIAL_TOKENS)
    model = synthetic.qwen_model(
        getattr(transformers, config_class), getattr(synthetic, sizes), tokenizer, torch.device("meta"), torch.float32
    )
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.model.visual.parameters()) == vision
    assert model.lm_head.weight is model.model.language_model.get_input_embeddings().weight
