"""Qwen-VL backends on tiny checkpoints: streaming equals the real model.

The references are the model itself — ``Qwen*ForConditionalGeneration`` over ``input_ids`` with the
video placeholders, ``pixel_values_videos``, ``video_grid_thw``, ``mm_token_type_ids`` and
``second_per_grid_ts`` as the processor builds them, so the model computes its own positions
(``get_rope_index``) — and its own ``generate``. Frames are 56 x 84 px: a 2 x 3 merged grid (not
square), 6 tokens per unit of two frames. Streams are sampled at ``FPS`` unless a test says otherwise:
the rate is the stream's (``StreamSession(..., fps=...)``), and sets ``second_per_grid_ts``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mukv import StreamSession
from mukv.backends.positions import MultimodalRopePositions
from mukv.memory import Query
from tests.conftest import make_frames
from tests.integration import qwen_helpers as shared
from tests.integration.qwen_helpers import FPS, QUESTION, Proxy, generated, load_tiny, padded, small_settings, stream

FAMILIES = ["qwen2_5_vl"]
FRAME_SHAPE = (56, 84)
SMALL = small_settings(n_local=12)


@pytest.fixture(scope="session", params=FAMILIES)
def qwen_dir(request, tmp_path_factory):
    from mukv.backends.tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    return load_tiny(qwen_dir, FRAME_SHAPE)


def reference_inputs(backend, frames: np.ndarray, question: str = QUESTION, fps: float = FPS) -> dict:
    """Model inputs for ``[system | one video of frames sampled at fps | question]`` as the processor
    builds them."""
    frames = padded(frames)
    units = len(frames) // backend.layout.frames_per_unit
    pad = backend.tokenizer.convert_tokens_to_ids(backend.video_placeholder)
    ids = torch.cat(
        [
            backend.tokenize(backend.prompts.system),
            torch.full((1, units * backend.layout.tokens), pad),
            backend.tokenize(backend.prompts.render_question(question)),
        ],
        dim=1,
    )
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == pad).long() * 2,  # text 0, image 1, video 2
        "pixel_values_videos": backend.preprocessor(frames),
        "video_grid_thw": backend.video_grid(units),
        "second_per_grid_ts": backend.second_per_grid(fps).reshape(1),
    }


@torch.inference_mode()
def reference_logits(backend, frames: np.ndarray, fps: float = FPS) -> torch.Tensor:
    return backend.model(**reference_inputs(backend, frames, fps=fps)).logits[0, -1].float()


@torch.inference_mode()
def reference_generate(backend, frames: np.ndarray, max_new: int):
    return generated(backend, reference_inputs(backend, frames), max_new)


def test_the_family_is_loaded_by_model_type_with_its_layout(qwen, qwen_dir):
    from mukv.backends import load_backend

    loaded = load_backend(qwen_dir)
    assert type(loaded) is type(qwen)
    assert loaded.layout.frames_per_unit == 2 and loaded.layout.grid == (2, 2)  # the checkpoint's default: 56 x 56
    assert qwen.layout.grid == (2, 3) and qwen.tokens_per_frame == 6
    assert qwen.positions.rows == 3 and qwen.positions.sections == (16, 24, 24)
    assert qwen.prompts.system.endswith("<|vision_start|>")
    assert qwen.prompts.render_question("Why?").startswith("<|vision_end|>Why?<|im_end|>")


@pytest.mark.parametrize("count", [4, 5])
def test_full_first_logits_equal_a_plain_forward(qwen, count):
    shared.check_full_first_logits(qwen, count, reference_logits)


def _decode(backend, frames, max_new: int) -> tuple[list[int], list[torch.Tensor], int]:
    """The session's ``full`` cache decoded greedily: tokens, each step's logits, and how far the
    video's largest position lies beyond the end of the question."""
    from mukv.engine.generate import greedy_decode

    session = StreamSession(backend, "full", fps=FPS)
    session.ingest(frames, np.arange(len(frames)) * 2.0)
    session.memory.materialize(session.time)
    context = session.memory.prepare(Query(text=QUESTION, ids=backend.tokenize(QUESTION), time=session.time))
    prompt = backend.tokenize(backend.prompts.render_question(QUESTION))
    units = len(padded(frames)) // 2
    largest = int(backend.stream_positions(FPS).visual(backend.system_cache()[1], backend.layout, units)[0].max())
    steps: list[torch.Tensor] = []
    tokens = list(greedy_decode(backend, context.cache, prompt, context.next_position, max_new, steps))
    beyond = largest - (context.next_position + prompt.shape[1] - 1)
    return [t for t in tokens if t not in backend.eos_token_ids], steps, beyond


def test_full_greedy_decoding_equals_generate(qwen):
    """Tokens and every step's logits; the video's time axis runs past the question, and generated
    tokens still continue right after the question, as ``generate`` continues them."""
    frames = make_frames(10, seed=3)
    tokens, steps, beyond = _decode(qwen, frames, 8)
    expected, logits = reference_generate(qwen, frames, 8)
    assert beyond > 0
    assert tokens == expected and len(expected) >= 4
    assert max((a - b).abs().max().item() for a, b in zip(steps, logits, strict=False)) < 1e-4
    session = StreamSession(qwen, "full", fps=FPS)
    session.ingest(frames, np.arange(10) * 2.0)
    assert list(session.ask(QUESTION, max_new_tokens=8).token_ids) == expected


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1, 1], [2, 3, 1], [4, 2], [3, 3]])
def test_chunked_ingestion_equals_one_shot(qwen, chunks):
    shared.check_chunked_ingestion_equals_one_shot(qwen, chunks)


def test_an_odd_frame_at_question_time_is_padded_for_that_answer_only(qwen):
    """A question after an odd number of frames is answered as a plain forward over the frames with
    the processor's padding (the last frame repeated), again the same when asked twice; the padded
    group is not stored: the next frame completes the real one, units (0 1) (2 3) (4 5)."""
    frames = make_frames(6, seed=4)
    session = StreamSession(qwen, "full", fps=FPS)
    session.ingest(frames[:5], np.arange(5) * 2.0)
    first = session.ask(QUESTION, max_new_tokens=2, output_logits=True)
    assert (first.first_logits - reference_logits(qwen, frames[:5])).abs().max().item() < 1e-4
    assert first.frames_seen == 5 and session.memory.frames == 2
    again = session.ask(QUESTION, max_new_tokens=2, output_logits=True)
    assert torch.equal(first.first_logits, again.first_logits) and session.memory.frames == 2
    session.ingest(frames[5:], [10.0])
    later = session.ask(QUESTION, max_new_tokens=2, output_logits=True)
    assert session.memory.frames == 3 and later.frames_seen == 6
    assert (later.first_logits - reference_logits(qwen, frames)).abs().max().item() < 1e-4
    padded_for_good = np.concatenate([frames[:5], frames[4:5], frames[5:6]])  # (0 1) (2 3) (4 4) (5 5)
    assert (later.first_logits - reference_logits(qwen, padded_for_good)).abs().max().item() > 1e-3


def _records(memory) -> list[tuple]:
    """What a block method stores, provisional blocks excluded (empty for the other methods)."""
    store = getattr(memory, "store", None)
    if store is None:
        return []
    provisional = set(memory.provisional_ids)
    return [
        (r.granularity, r.first_frame, r.last_frame, r.part, r.start_time, r.end_time, r.tokens)
        for g in ("frame", "patch", "segment", "block")
        for r in store.records(g)
        if r.block_id not in provisional
    ]


@pytest.mark.parametrize("method", list(SMALL))
def test_a_question_between_the_frames_of_a_group_changes_no_state(qwen, method):
    """For every method: a question after an odd frame is answered as if the padded group had been
    stored (same logits), and stores nothing: after the next frames, the stored units, blocks and
    answers are those of a stream that was never asked."""
    frames, times, asked, never, answer, expected = shared.ask_between_the_frames_of_a_group(
        qwen, method, SMALL[method], copy_after=0.5
    )
    assert [(b.granularity, b.first_frame, b.last_frame) for b in answer.retrieved] == [
        (b.granularity, b.first_frame, b.last_frame) for b in expected.retrieved
    ]
    assert asked.memory.frames == never.memory.frames == 2 and _records(asked.memory) == _records(never.memory)
    for session in (asked, never):
        session.ingest(frames[5:], times[5:])
    assert asked.memory.frames == never.memory.frames == 4
    assert _records(asked.memory) == _records(never.memory)
    shared.check_later_answers_equal(asked, never)


def test_the_state_comparison_detects_a_padded_group_stored_for_good(qwen):
    """Sabotage: a session that stores the padded group (the rule before provisional units) differs
    from a stream that was never asked, in units and in later answers."""

    class StoresPadding(StreamSession):
        def _provisional_unit(self):
            if self._pending is not None:
                last = self._pending[-1:].expand(self.backend.layout.frames_per_unit - len(self._pending), -1, -1, -1)
                self._store_units(torch.cat((self._pending, last)), np.asarray(self._pending_times[-1:]), 0)
                self._pending, self._pending_times = None, []
            return None

    frames = make_frames(8, seed=13)
    times = np.arange(8) * 2.0
    asked, never = StoresPadding(qwen, "full", fps=FPS), StreamSession(qwen, "full", fps=FPS)
    for session in (asked, never):
        session.ingest(frames[:5], times[:5])
    asked.ask(QUESTION, max_new_tokens=1)
    for session in (asked, never):
        session.ingest(frames[5:7], times[5:7])
    assert (asked.memory.frames, never.memory.frames) == (4, 3)  # (0 1) (2 3) (4 4) (5 6) vs (0 1) (2 3) (4 5)
    a = asked.ask(QUESTION, max_new_tokens=1, output_logits=True).first_logits
    b = never.ask(QUESTION, max_new_tokens=1, output_logits=True).first_logits
    assert (a - b).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------ the stream's rate


@pytest.mark.parametrize("fps", [2.0, 0.25])
def test_a_stream_is_placed_in_time_by_its_own_rate(qwen, fps):
    """At 2 fps a unit spans 2 / 2 = 1 s (``second_per_grid_ts = 1``): the session equals the model
    over the same frames with that rate, and differs from the same frames at the default rate."""
    frames = make_frames(6, seed=14)
    _, answer = stream(qwen, frames, [3, 3], fps=fps, frame_seconds=2.0)
    assert (answer.first_logits - reference_logits(qwen, frames, fps=fps)).abs().max().item() < 1e-4
    assert (answer.first_logits - reference_logits(qwen, frames, fps=FPS)).abs().max().item() > 1e-3


def test_streams_at_different_rates_share_one_backend(qwen):
    """Two sessions on one backend, interleaved, each equal to its own reference."""
    frames = make_frames(6, seed=15)
    fast, slow = StreamSession(qwen, "rekv", fps=2.0), StreamSession(qwen, "full", fps=0.5)
    for start in (0, 3):
        for session in (fast, slow):
            session.ingest(frames[start : start + 3], np.arange(start, start + 3) * 2.0)
    for session, fps in ((fast, 2.0), (slow, 0.5)):
        logits = session.ask(QUESTION, max_new_tokens=1, output_logits=True).first_logits
        assert (logits - reference_logits(qwen, frames, fps=fps)).abs().max().item() < 1e-4


def test_a_stream_without_a_rate_is_refused(qwen):
    with pytest.raises(ValueError, match="sampling rate"):
        StreamSession(qwen, "full")
    with pytest.raises(ValueError, match="no time step"):
        qwen.positions.visual(0, qwen.layout, 1)  # the backend's own scheme places text only
    with pytest.raises(ValueError, match="fps"):
        StreamSession(qwen, "full", fps=0.0)


def test_a_source_at_another_rate_than_the_session_is_refused(qwen):
    from mukv.video.sources import from_array

    session = StreamSession(qwen, "full", fps=2.0)
    with pytest.raises(ValueError, match="sampled at 1 frames per second"):
        session.ingest_source(from_array(make_frames(4, seed=16), fps=1.0))
    assert session.ingest_source(from_array(make_frames(4, seed=16), fps=4.0, sample_fps=2.0)) == 2


class _IgnoresRate(Proxy):
    """Sabotage: a backend proxy whose streams all get the default rate's positions."""

    def stream_positions(self, fps):
        return self._inner.stream_positions(FPS)


def test_the_rate_comparison_detects_a_rate_that_is_ignored(qwen):
    frames = make_frames(6, seed=14)
    _, answer = stream(_IgnoresRate(qwen), frames, [6], fps=2.0, frame_seconds=2.0)
    assert (answer.first_logits - reference_logits(qwen, frames, fps=2.0)).abs().max().item() > 1e-3


@pytest.mark.parametrize("encode", ["shared", "independent"])
def test_lossless_temporal_mukv_equals_full(qwen, encode):
    """Keep ratio 1, segment blocks only, every one retrieved in time order: the full context."""
    shared.check_lossless_temporal_mukv_equals_full(qwen, encode)


@pytest.mark.parametrize("overrides", [{}, {"layer_shared": True}, {"block_frames": 2}])
def test_rekv_without_eviction_and_with_every_block_equals_full(qwen, overrides):
    shared.check_rekv_without_eviction_equals_full(qwen, overrides)


def test_rekv_with_eviction_and_selection_answers_from_rotated_keys(qwen):
    shared.check_rekv_with_eviction_answers(qwen, n_local=12)


def test_moving_keys_equals_recomputing_them_per_mrope_section(qwen):
    """Keys computed at a stream's positions, re-rotated per M-RoPE section, equal recomputed keys."""
    old, _ = qwen.stream_positions(FPS).visual(20, qwen.layout, 1)
    shared.check_moving_keys_equals_recomputing_them(qwen, old)


@pytest.mark.parametrize("method", list(SMALL))
def test_every_method_answers_through_the_session(qwen, method):
    shared.check_every_method_answers(qwen, method, SMALL[method])


def test_mukv_blocks_follow_the_unit_layout(qwen):
    """Frame blocks are one temporal group, patch blocks spatial parts of its 2 x 3 grid, segments
    whole groups."""
    session = StreamSession(qwen, "mukv", overrides={"segment_frames": 2, "patch_layout": "quadrant"}, fps=FPS)
    session.ingest(make_frames(8, seed=10), np.arange(8) * 2.0)
    store = session.memory.store
    p = qwen.layout.tokens
    frames = store.records("frame")
    assert [r.first_frame for r in frames] == [0, 1, 2, 3] and all(r.first_frame == r.last_frame for r in frames)
    assert [(r.first_frame, r.last_frame) for r in store.records("segment")] == [(0, 1), (2, 3)]
    patches = [r for r in store.records("patch") if r.first_frame == 0]
    assert len(patches) == 4
    full_sizes = {store.payload(r.block_id).scores.shape[0] for r in patches}
    assert sum(store.payload(r.block_id).scores.shape[0] for r in patches) == p and full_sizes <= {1, 2}


# ---------------------------------------------------------------------------------------- sabotage


class _WrongPositions(Proxy):
    """A backend proxy whose streams' position scheme is wrong, to show the comparisons above can fail."""

    def __init__(self, inner, positions) -> None:
        super().__init__(inner)
        self.wrong = positions

    def stream_positions(self, fps):
        return self.wrong


class _Flat(MultimodalRopePositions):
    """Visual tokens at consecutive positions on every axis, as 1-D RoPE places them."""

    def visual_run(self, start, layout, units, device="cpu", *, first_unit=0):
        start += first_unit * layout.tokens
        return self.text(start, units * layout.tokens, device), start + units * layout.tokens


def _scheme(qwen, cls=MultimodalRopePositions, **changes):
    p = qwen.stream_positions(FPS)
    options = {"time_scale": p.time_scale, "interleaved": p.interleaved, "span_per_unit": p.span_per_unit, **changes}
    return cls(p.inv_freq.float(), p.sections, **options)


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(lambda q: _scheme(q, _Flat), id="1-D positions"),
        pytest.param(lambda q: _scheme(q, time_scale=1.0), id="time step 1"),
    ],
)
def test_the_reference_comparison_detects_wrong_positions(qwen, wrong):
    shared.check_comparison_detects(qwen, _WrongPositions(qwen, wrong(qwen)), reference_logits)


class _DecodeAfterLargest(Proxy):
    """Generated tokens placed one past the prompt's largest position (``rope_deltas``' rule)."""

    def __init__(self, inner, offset: int) -> None:
        super().__init__(inner)
        self._offset = offset

    def forward(self, embeds, cache, position_ids, logits="last"):
        if embeds.shape[1] == 1:
            position_ids = position_ids + self._offset
        return self._inner.forward(embeds, cache, position_ids, logits)


def test_the_generate_comparison_detects_decoding_after_the_largest_position(qwen):
    frames = make_frames(10, seed=3)
    _, _, beyond = _decode(qwen, frames, 1)
    _, steps, _ = _decode(_DecodeAfterLargest(qwen, beyond), frames, 4)
    _, logits = reference_generate(qwen, frames, 4)
    assert len(steps) >= 2 and (steps[0] - logits[0]).abs().max().item() < 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(steps[1:], logits[1:], strict=False)) > 1e-3


def test_tiny_model_command_writes_a_checkpoint_every_command_loads(tmp_path):
    from mukv.cli import app

    runner = shared.check_tiny_model_command(tmp_path, "qwen2_5_vl", "Qwen2.5-VL")
    bad = runner.invoke(app, ["tiny-model", str(tmp_path / "other"), "--family", "gpt2"])
    assert bad.exit_code != 0 and "--family" in bad.output
