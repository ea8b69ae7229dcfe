"""A few training steps on CPU (smoke: seconds) reduce the loss, in the session's sequence format,
with batches built through the inference backend's frame encoding, prompts and positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mukv.backends.llava_onevision import LlavaOnevisionBackend
from mukv.backends.positions import MultimodalRopePositions
from mukv.backends.tiny import TinyModelSpec, create_tiny_model
from mukv.training.trainer import SequenceBuilder, TrainConfig, sample_clip, train_stage0, train_tiny
from mukv.video.preprocess import FramePreprocessor

SMALL = TinyModelSpec(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64, text_layers=2)


def tiny_backend() -> LlavaOnevisionBackend:
    model, tokenizer = create_tiny_model(seed=0, spec=SMALL)
    return LlavaOnevisionBackend(model, tokenizer, FramePreprocessor(size=112), model_id="test-training")


def test_a_few_qa_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    builder = SequenceBuilder(tiny_backend())
    rng = np.random.default_rng(0)
    clips = [sample_clip(rng, 3, kind, 112) for kind in ("frame", "patch", "order", "frame")]
    optimizer = torch.optim.AdamW(builder.model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        loss, _ = builder.loss(builder.batch(clips, isolated=step % 2 == 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


def test_sequences_match_the_session_format():
    backend = tiny_backend()
    builder = SequenceBuilder(backend)
    tokenizer = backend.tokenizer
    clip = sample_clip(np.random.default_rng(1), 2, "frame", 112)
    batch = builder.batch([clip], isolated=False)
    prompts = backend.prompts
    system = tokenizer(prompts.system, add_special_tokens=False).input_ids
    tail = tokenizer(
        prompts.render_question(clip.question) + clip.answer + "<|im_end|>", add_special_tokens=False
    ).input_ids
    assert builder.tokens_per_frame == backend.layout.tokens == 16
    assert batch["embeds"].shape[1] == len(system) + 2 * builder.tokens_per_frame + len(tail)
    answer = [t for t in batch["labels"][0].tolist() if t != -100]
    assert tokenizer.decode(answer) == clip.answer + "<|im_end|>"
    isolated = builder.batch([clip], isolated=True)
    p, init = builder.tokens_per_frame, len(system)
    second = init + p
    assert isolated["positions"][0, second].item() == init  # every frame at the same positions
    assert isolated["positions"][0, init + 2 * p].item() == init + 2 * p  # the question after both frames
    assert not isolated["mask"][0, 0, second, init].item()  # frame 2 does not see frame 1
    assert isolated["mask"][0, 0, second, 0].item()  # but sees the system prompt
    assert isolated["mask"][0, 0, -1, init].item()  # the question sees every frame


def test_batches_use_the_backends_frame_encoding_and_positions():
    backend = tiny_backend()
    builder = SequenceBuilder(backend)
    rng = np.random.default_rng(2)
    t = 3
    clips = [sample_clip(rng, t, kind, 112) for kind in ("frame", "order")]
    init = backend.tokenize(backend.prompts.system).shape[1]
    p = backend.layout.tokens
    scheme = backend.positions
    causal_visual, cursor = scheme.visual(init, backend.layout, t)
    block, _ = scheme.visual(init, backend.layout, 1)
    for isolated in (False, True):
        batch = builder.batch(clips, isolated=isolated)
        length = batch["embeds"].shape[1]
        for i, clip in enumerate(clips):
            # The visual tokens are the ones a session stores for these frames.
            torch.testing.assert_close(
                batch["embeds"][i, init : init + t * p].detach(),
                backend.encode_frames(clip.frames).reshape(t * p, -1),
                rtol=1e-5,
                atol=1e-5,
            )
        visual = block.repeat(1, t) if isolated else causal_visual
        expected = torch.cat([scheme.text(0, init), visual, scheme.text(cursor, length - init - t * p)], dim=1)
        assert torch.equal(batch["positions"], expected.expand(len(clips), -1))


def test_the_builder_refuses_a_multimodal_rope_backend():
    backend = tiny_backend()
    half = backend.text.head_dim // 2
    backend.positions = MultimodalRopePositions(torch.ones(half), (half - 2 * (half // 3), half // 3, half // 3))
    with pytest.raises(ValueError, match="1-D RoPE"):
        SequenceBuilder(backend)


def test_stage0_and_full_pipeline_smoke(tmp_path):
    cfg = TrainConfig(
        spec=SMALL, stage0_steps=4, stage1_steps=2, stage2_steps=2, max_frames=3, eval_clips=2, stage2_batch=2
    )
    record = train_tiny(tmp_path, cfg, report=lambda *_: None)
    assert set(record["accuracy"]) == {"frame", "patch", "order"}
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "training.json").is_file()
    from mukv.backends import load_backend

    assert load_backend(tmp_path).tokens_per_frame == 16
    model, _ = create_tiny_model(seed=0, spec=SMALL)
    accuracy = train_stage0(model, FramePreprocessor(size=112), cfg, np.random.default_rng(0), lambda *_: None)
    assert {"shape", "colour", "present"} <= set(accuracy)
    stages = tmp_path / "stages"
    assert (stages / "stage0" / "config.json").is_file() and (stages / "stage1" / "config.json").is_file()


def test_resume_runs_stage_two_from_the_stage_one_weights(tmp_path):
    cfg = TrainConfig(spec=SMALL, stage0_steps=2, stage1_steps=2, stage2_steps=0, max_frames=3, eval_clips=1)
    first = train_tiny(tmp_path / "a", cfg, report=lambda *_: None)
    stage1 = tmp_path / "a" / "stages" / "stage1"
    # No stage-2 steps: the resumed model must be exactly the stage-1 one.
    resumed = train_tiny(tmp_path / "b", cfg, report=lambda *_: None, resume=stage1)
    assert resumed["resumed_from"]["path"] == str(stage1)
    assert resumed["stage0_accuracy"] == first["stage0_accuracy"]
    from transformers import LlavaOnevisionForConditionalGeneration

    a = LlavaOnevisionForConditionalGeneration.from_pretrained(stage1).state_dict()
    b = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "b").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_checks_the_checkpoint_before_training(tmp_path):
    import json
    from dataclasses import asdict

    from mukv.backends.tiny import save_checkpoint

    cfg = TrainConfig(spec=SMALL, stage2_steps=0, max_frames=3, eval_clips=1)
    with pytest.raises(FileNotFoundError, match="not a saved training checkpoint"):
        train_tiny(tmp_path / "b", cfg, report=lambda *_: None, resume=tmp_path / "nowhere")
    other_spec = TinyModelSpec(text_hidden=32, text_layers=1)
    other, tokenizer = create_tiny_model(seed=0, spec=other_spec)
    save_checkpoint(other, tokenizer, tmp_path / "other")
    record = tmp_path / "other" / "training.json"
    record.write_text(json.dumps({"config": {"spec": asdict(other_spec)}}))
    with pytest.raises(ValueError, match="stage 1 has not run"):
        train_tiny(tmp_path / "b", cfg, report=lambda *_: None, resume=tmp_path / "other")
    record.write_text(json.dumps({"config": {"spec": asdict(other_spec)}, "stage1_accuracy": {}}))
    with pytest.raises(ValueError, match="trained with model sizes"):
        train_tiny(tmp_path / "b", cfg, report=lambda *_: None, resume=tmp_path / "other")
    # A record that lies about its sizes is still caught by the strict weight load.
    record.write_text(json.dumps({"config": {"spec": asdict(SMALL)}, "stage1_accuracy": {}}))
    with pytest.raises(RuntimeError, match=r"size mismatch|Missing|Unexpected"):
        train_tiny(tmp_path / "b", cfg, report=lambda *_: None, resume=tmp_path / "other")


def test_model_card_names_the_commands_that_reproduce_a_resumed_run():
    from mukv.training.trainer import model_card

    first = {**asdict_config(TrainConfig(spec=SMALL))}
    first.pop("isolated_order")  # a record from before the option: order questions were in isolated batches
    record = {
        "config": asdict_config(TrainConfig(spec=SMALL, seed=1, stage2_steps=7)),
        "resumed_from": {"path": "/x", "stage": "final", "config": first},
        "accuracy": {"frame": {"1": 1.0, "16": 0.95}, "order": {"16": 0.5}},
        "seconds": 60.0,
    }
    card = model_card(record)
    assert "1. `mukv train-tiny RUN1 --seed 0 --stage0-steps 1500" in card and "--isolated-order`" in card
    assert "2. `mukv train-tiny OUT --resume RUN1 --seed 1 --stage2-steps 7 --max-frames 24`" in card
    assert "| order | - | 0.50 |" in card and "| frame | 1.00 | 0.95 |" in card


def test_model_card_of_a_stage3_run_shows_its_long_and_placed_accuracy():
    from mukv.training.trainer import model_card

    first = asdict_config(TrainConfig(spec=SMALL))
    cfg = TrainConfig(spec=SMALL, seed=3, stage2_steps=0, stage3_steps=9, placed_share=0.25, isolated_share=0.25)
    record = {
        "config": asdict_config(cfg),
        "resumed_from": {"path": "/x", "stage": "final", "config": first},
        "accuracy": {"frame": {"1": 1.0}},
        "accuracy_long": {"frame": {"64": 0.75, "256": 0.5}},
        "accuracy_placed": {"patch": {"64": 1.0, "256": 0.25}},
        "seconds": 60.0,
    }
    card = model_card(record)
    assert "--stage3-steps 9" in card and "(stage 3 only, from run 1's final weights)" in card
    assert "- run 2 stage 3:" in card and "- run 2 stage 2:" not in card
    assert "--isolated-share 0.25 --placed-share 0.25 --stage3-steps 9" in card
    long_part, placed_part = card.split("Long causal clips (seed 6)")[1].split("The oracle's shape (seed 7)")
    assert "| frame | 0.75 | 0.50 |" in long_part and "| kind | 64 frames | 256 frames |" in long_part
    assert "| patch | 1.00 | 0.25 |" in placed_part


def asdict_config(cfg: TrainConfig) -> dict:
    import json
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg)))


def test_clips_carry_one_rare_target_per_kind(monkeypatch):
    import mukv.training.trainer as trainer

    made = []

    def recording(*args, **kwargs):
        made.append(trainer_make_stream(*args, **kwargs))
        return made[-1]

    trainer_make_stream = trainer.make_stream
    monkeypatch.setattr(trainer, "make_stream", recording)
    rng = np.random.default_rng(3)
    for kind in ("frame", "patch", "order"):
        clip = sample_clip(rng, 8, kind, 112, targets=3)
        stream = made[-1]
        assert sorted(q.kind for q in stream.questions) == ["frame", "order", "patch"]
        assert clip.kind == kind and clip.question == next(q.question for q in stream.questions if q.kind == kind)
        assert np.array_equal(clip.frames, stream.frames)
    assert len(sample_clip(rng, 8, "patch", 112, targets=1) and made[-1].questions) == 1
    single = sample_clip(rng, 1, "patch", 112, targets=3)
    assert single.frames.shape[0] == 1
    with pytest.raises(ValueError, match="targets"):
        sample_clip(rng, 8, "frame", 112, targets=4)
    with pytest.raises(ValueError, match="clip_targets"):
        TrainConfig(clip_targets=0)
