"""The long/sparse/re-positioned curriculum of ``mukv train-tiny`` on tiny sizes (seconds): placed
batches are the cache a block memory assembles, sparse clips keep their evidence, stage-3 batches
stay within their token budget, and an interrupted run resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mukv.backends.llava_onevision import LlavaOnevisionBackend
from mukv.backends.tiny import TinyModelSpec, create_tiny_model
from mukv.eval.oracle import OracleConfig, OracleMemory
from mukv.training import trainer
from mukv.training.trainer import (
    SequenceBuilder,
    TrainConfig,
    TrainingInterrupted,
    load_progress,
    plan_stage3,
    sample_sparse_clip,
    train_tiny,
)
from mukv.video.preprocess import FramePreprocessor
from mukv.video.streams import make_stream

SMALL = TinyModelSpec(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64, text_layers=2)
P = 16


def tiny_backend() -> LlavaOnevisionBackend:
    model, tokenizer = create_tiny_model(seed=0, spec=SMALL)
    return LlavaOnevisionBackend(model, tokenizer, FramePreprocessor(size=112), model_id="test-curriculum")


def oracle_cache(backend, clip) -> tuple[OracleMemory, DynamicCache, int]:
    """The oracle's answering cache over every frame of ``clip`` (its budget holds them all)."""
    t = clip.frames.shape[0]
    memory = OracleMemory(backend, OracleConfig(budget_frames=t), fps=0.5, evidence={clip.question: (0, 0)})
    times = np.arange(t) * 2.0
    memory.ingest(backend.encode_frames(clip.frames), times)
    memory.materialize(float(times[-1]))
    context = memory.prepare(memory_query(backend, clip.question, float(times[-1])))
    return memory, context.cache, context.next_position


def memory_query(backend, text: str, time: float):
    from mukv.memory import Query

    return Query(text=text, ids=backend.tokenize(text), time=time)


def test_a_placed_batch_is_the_cache_a_block_memory_assembles():
    backend = tiny_backend()
    builder = SequenceBuilder(backend)
    rng = np.random.default_rng(0)
    clips = [sample_sparse_clip(rng, 20, 5, kind, 112) for kind in ("order", "frame")]
    with torch.no_grad():
        past, cursor = builder.placed_context(builder.visual(clips))
        batch = builder.batch(clips, layout="placed")
        loss, _ = builder.loss(batch)
    init = len(builder.system_ids)
    assert cursor == init + 5 * P
    assert batch["positions"][0, 0].item() == cursor  # the question right after the re-positioned blocks
    losses = []
    for i, clip in enumerate(clips):
        _, cache, next_position = oracle_cache(backend, clip)
        assert next_position == cursor
        for layer, (keys, values) in zip(cache.layers, past, strict=True):
            torch.testing.assert_close(keys[i], layer.keys[0, :, :cursor], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values[i], layer.values[0, :, :cursor], rtol=1e-5, atol=1e-5)
        # The answer's loss is the one of decoding it after the question from the oracle's cache.
        prompt = backend.tokenize(backend.prompts.render_question(clip.question))[0].tolist()
        answer = [*backend.tokenize(clip.answer)[0].tolist(), builder.eos]
        ids = torch.tensor([prompt + answer])
        logits = backend.forward(
            backend.embed_ids(ids), cache, backend.positions.text(next_position, ids.shape[1]), logits="all"
        )
        losses.append(F.cross_entropy(logits[0, len(prompt) - 1 : -1], torch.tensor(answer), reduction="sum"))
    tokens = sum(len(backend.tokenize(c.answer)[0]) + 1 for c in clips)
    torch.testing.assert_close(loss, sum(losses) / tokens, rtol=1e-4, atol=1e-5)


def test_sparse_clips_keep_the_evidence_in_time_order():
    rng = np.random.default_rng(1)
    for kind in ("frame", "patch", "order"):
        for keep, length in ((2, 9), (6, 40), (12, 13)):
            state = rng.bit_generator.state
            clip = sample_sparse_clip(rng, length, keep, kind, 112)
            # The same draw of the stream: its seed is the first number drawn.
            replay = np.random.default_rng()
            replay.bit_generator.state = state
            others = [k for k in ("frame", "patch", "order") if k != kind]
            stream = make_stream(length, seed=int(replay.integers(2**31)), size=112, kinds=(kind, *others))
            question = stream.questions[0]
            assert clip.question == question.question and clip.answer == question.answer
            assert len(clip.frame_ids) == keep == clip.frames.shape[0] and clip.stream_frames == length
            assert list(clip.frame_ids) == sorted(set(clip.frame_ids))
            assert set(range(question.first_frame, question.last_frame + 1)) <= set(clip.frame_ids)
            assert np.array_equal(clip.frames, stream.frames[list(clip.frame_ids)])
    with pytest.raises(ValueError, match="keep"):
        sample_sparse_clip(rng, 5, 5, "frame", 112)


def test_stage3_batches_grow_to_the_longest_clip_within_the_token_budget():
    cfg = TrainConfig(
        spec=SMALL, stage3_steps=100, max_frames=8, long_frames=64, sparse_frames=12, stage3_tokens=512, stage3_batch=4
    )
    rng = np.random.default_rng(2)
    plans = [plan_stage3(step, cfg, rng) for step in range(100) for _ in range(4)]
    dense = [p for p in plans if not p.sparse]
    sparse = [p for p in plans if p.sparse]
    assert dense and sparse and {p.layout for p in plans} == {"causal", "isolated"}
    assert 56 <= max(p.frames for p in dense) <= 64 and min(p.frames for p in dense) >= 2
    assert max(p.frames for p in dense[: len(dense) // 10]) <= 8 + (64 - 8) * 0.15
    assert all(2 <= p.frames <= 12 and p.frames < p.stream_frames <= 48 for p in sparse)
    for p in plans:
        assert 1 <= p.clips <= 4 and (p.clips == 1 or p.clips * p.frames * P <= 512)
    placed = replace(cfg, isolated_share=0.2, placed_share=0.5)
    layouts = [plan_stage3(0, placed, rng).layout for _ in range(400)]
    assert 0.4 < layouts.count("placed") / 400 < 0.6 and 0.1 < layouts.count("isolated") / 400 < 0.3


def test_each_layout_places_a_sparse_subset_as_its_memory_method_does():
    backend = tiny_backend()
    builder = SequenceBuilder(backend)
    rng = np.random.default_rng(3)
    clips = [sample_sparse_clip(rng, 30, 4, "frame", 112)]
    init, scheme = len(builder.system_ids), backend.positions
    causal = builder.batch(clips, layout="causal")["positions"][0]
    # `uniform` prefills its sampled frames contiguously after the system prompt.
    uniform, cursor = scheme.visual(init, backend.layout, 4)
    assert torch.equal(causal[init : init + 4 * P], uniform[0]) and causal[init + 4 * P].item() == cursor
    isolated = builder.batch(clips, layout="isolated")["positions"][0]
    assert torch.equal(isolated[init : init + 4 * P], scheme.text(init, P)[0].repeat(4))
    placed = builder.batch(clips, layout="placed")
    assert placed["embeds"].shape[1] == placed["positions"].shape[1] == placed["labels"].shape[1]
    assert placed["mask"].shape[-1] == init + 4 * P + placed["embeds"].shape[1]
    assert [k.shape[2] for k, _ in placed["past"]] == [init + 4 * P] * len(placed["past"])


RUN = TrainConfig(
    spec=SMALL,
    stage0_steps=3,
    stage0_batch=4,
    stage1_steps=2,
    stage1_batch=2,
    stage2_steps=3,
    stage2_batch=2,
    max_frames=3,
    stage3_steps=4,
    long_frames=6,
    sparse_frames=3,
    stage3_tokens=64,
    stage3_batch=2,
    placed_share=0.4,
    isolated_share=0.3,
    eval_clips=1,
    checkpoint_every=1000,
    report_every=1,
)


def weights(directory) -> dict[str, torch.Tensor]:
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(directory).state_dict()


def assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    record = train_tiny(out, RUN, report=lambda *_: None)
    assert not (out / trainer.PROGRESS).exists()
    return record, weights(out)


def test_a_run_stopped_by_a_signal_mid_step_resumes_to_the_same_weights(tmp_path, monkeypatch, uninterrupted):
    calls = []
    real_loss = SequenceBuilder.loss

    def loss(self, batch):
        calls.append(1)
        if len(calls) == 9:  # stage 3's second step, before its optimizer step
            signal.raise_signal(signal.SIGTERM)
        return real_loss(self, batch)

    monkeypatch.setattr(SequenceBuilder, "loss", loss)
    with pytest.raises(TrainingInterrupted, match="SIGTERM") as stopped:
        train_tiny(tmp_path, RUN, report=lambda *_: None)
    assert (stopped.value.stage, stopped.value.step) == ("stage3", 1)
    state = load_progress(tmp_path)
    assert (state["stage"], state["step"]) == ("stage3", 1)
    with pytest.raises(ValueError, match="unfinished run"):
        train_tiny(tmp_path, RUN, report=lambda *_: None)
    with pytest.raises(ValueError, match=r"other settings.*stage3_steps"):
        train_tiny(tmp_path, replace(RUN, stage3_steps=5), report=lambda *_: None, resume=tmp_path)
    record = train_tiny(tmp_path, None, report=lambda *_: None, resume=tmp_path)
    assert not (tmp_path / trainer.PROGRESS).exists()
    assert_same_weights(weights(tmp_path), uninterrupted[1])
    assert record["accuracy"] == uninterrupted[0]["accuracy"]


def test_a_killed_run_resumes_from_its_last_periodic_state(tmp_path, uninterrupted):
    cfg = replace(RUN, checkpoint_every=2)

    def report(stage, step, stats):
        # A kill (no chance to save) after stage 2's step 3: the state saved after 2 steps is left.
        if stage == "stage2" and step == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train_tiny(tmp_path, cfg, report=report)
    state = load_progress(tmp_path)
    assert (state["stage"], state["step"]) == ("stage2", 2)
    train_tiny(tmp_path, None, report=lambda *_: None, resume=tmp_path)
    assert_same_weights(weights(tmp_path), uninterrupted[1])
