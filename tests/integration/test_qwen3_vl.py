"""Qwen3-VL backend on a tiny checkpoint: streaming units equals the real model.

The reference is ``Qwen3VLForConditionalGeneration`` itself over ``input_ids`` as the processor
builds them — per temporal group ``<{t:.1f} seconds><|vision_start|>`` + video placeholders +
``<|vision_end|>``, ``t`` from the processor's own rule (``Qwen3VLProcessor._calculate_timestamps``) —
with ``pixel_values_videos``, ``video_grid_thw`` and ``mm_token_type_ids``, so the model computes its
own positions (``get_rope_index``) and adds its own DeepStack features; and its own ``generate``.
Frames are 64 x 96 px: a 2 x 3 merged grid (not square), 6 visual tokens per unit of two frames.

First units fed straight through the backend (the system prompt's cache, units with their text,
the question), then streams through the session and every memory method: ``full`` equals the model,
and the lossless settings of ``mukv`` and ``rekv`` equal ``full``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from mukv import StreamSession
from mukv.backends.positions import MultimodalRopePositions
from tests.conftest import make_frames
from tests.integration import qwen_helpers as shared
from tests.integration.qwen_helpers import FPS, QUESTION, Proxy, generated, load_tiny, padded, small_settings, stream

FRAME_SHAPE = (64, 96)
SMALL = small_settings(n_local=40)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from mukv.backends.tiny_qwen import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("qwen3_vl"))


@pytest.fixture(scope="module")
def qwen3(qwen3_dir):
    from mukv.backends.qwen3_vl import Qwen3VLBackend

    backend = load_tiny(qwen3_dir, FRAME_SHAPE)
    assert type(backend) is Qwen3VLBackend
    return backend


def processor_stamps(count: int, fps: float) -> list[float]:
    """The times the processor writes for ``count`` frames sampled at ``fps`` (frame ``i`` at ``i / fps``)."""
    return Qwen3VLProcessor._calculate_timestamps(None, list(range(count)), fps, 2)


def unit_times(count: int, fps: float) -> list[float]:
    """What the session stamps each unit with: its frames' mean time (a padded unit repeats its last frame)."""
    times = padded(np.arange(count) / fps)
    return [(times[i] + times[i + 1]) / 2 for i in range(0, len(times), 2)]


def reference_inputs(backend, frames: np.ndarray, fps: float = FPS, question: str = QUESTION) -> dict:
    """Model inputs for ``[system | one video of frames sampled at fps | question]`` as the processor
    builds them (its prompt text and timestamps; pixels by the backend's preprocessing)."""
    stamps = processor_stamps(len(frames), fps)
    frames = padded(frames)
    units = len(frames) // 2
    pad = backend.video_placeholder
    video = "".join(
        f"<{t:.1f} seconds><|vision_start|>" + pad * backend.layout.tokens + "<|vision_end|>" for t in stamps
    )
    ids = backend.tokenize(backend.prompts.system + video + backend.prompts.render_question(question))
    pad_id = backend.tokenizer.convert_tokens_to_ids(pad)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == pad_id).long() * 2,  # text 0, image 1, video 2
        "pixel_values_videos": backend.preprocessor(frames),
        "video_grid_thw": backend.video_grid(units),
    }


@torch.inference_mode()
def reference_logits(backend, frames: np.ndarray, fps: float = FPS) -> torch.Tensor:
    return backend.model(**reference_inputs(backend, frames, fps)).logits[0, -1].float()


@torch.inference_mode()
def reference_generate(backend, frames: np.ndarray, max_new: int):
    return generated(backend, reference_inputs(backend, frames), max_new)


def streamed(backend, features: torch.Tensor, times: list[float], chunks: list[int] | None = None):
    """The system prompt's cache with units ``features [U, P, (1+K)d]`` fed with their text, ``chunks``
    units per forward call (default: all at once); returns the cache and the cursor after them."""
    from mukv.memory.base import prefill_frames

    cache, cursor = backend.system_cache()
    chunks = chunks or [features.shape[0]]
    start = 0
    for size in chunks:
        piece = features[start : start + size]
        cursor = prefill_frames(backend, cache, piece, cursor, 4096, stamps=times[start : start + size])
        start += size
    assert start == features.shape[0]
    return cache, cursor


def streamed_logits(backend, frames: np.ndarray, fps: float = FPS, chunks=None, times=None) -> torch.Tensor:
    features = backend.encode_frames(padded(frames))
    cache, cursor = streamed(backend, features, times or unit_times(len(frames), fps), chunks)
    prompt = backend.tokenize(backend.prompts.render_question(QUESTION))
    logits = backend.forward(backend.embed_ids(prompt), cache, backend.positions.text(cursor, prompt.shape[1]))
    return logits[0, -1]


def test_the_tiny_checkpoint_loads_by_model_type_with_its_defaults(qwen3_dir, qwen3):
    from mukv.backends import load_backend

    loaded = load_backend(qwen3_dir)
    assert type(loaded) is type(qwen3)
    # The default budget is the video processor's per-frame ceiling (max_video_tokens = 4 merged tokens).
    assert loaded.layout.grid == (2, 2) and loaded.layout.frames_per_unit == 2
    assert qwen3.layout.grid == (2, 3) and qwen3.tokens_per_frame == 6
    assert qwen3.deepstack_layers == 2 and qwen3.feature_width == 3 * qwen3.text.hidden_size
    assert qwen3.positions.interleaved and qwen3.positions.span_per_unit
    assert qwen3.positions.sections == (24, 20, 20)
    assert qwen3.stream_positions(FPS) is qwen3.stream_positions(2.0) is qwen3.positions
    assert qwen3.prompts.system == "<|im_start|>user\n<|vision_start|>"
    assert qwen3.prompts.render_question("Why?").startswith("<|vision_end|>Why?<|im_end|>")
    assert qwen3.unit_text(12.5) == ("<12.5 seconds><|vision_start|>", "<|vision_end|>")
    features = qwen3.encode_frames(make_frames(4, seed=0))
    assert features.shape == (2, 6, qwen3.feature_width)


def test_the_stream_knows_the_processors_timestamps():
    assert unit_times(6, FPS) == processor_stamps(6, FPS) == [1.0, 5.0, 9.0]
    assert unit_times(5, 2.0) == processor_stamps(5, 2.0) == [0.25, 1.25, 2.0]


def test_encoding_in_batches_equals_one_call(qwen3):
    frames = make_frames(6, seed=1)
    whole = qwen3.encode_frames(frames)
    size = qwen3.vision_batch_frames
    try:
        qwen3.vision_batch_frames = 2
        batched = qwen3.encode_frames(frames)
    finally:
        qwen3.vision_batch_frames = size
    assert (whole - batched).abs().max().item() < 1e-5


@pytest.mark.parametrize("count", [4, 5, 6])
def test_units_with_their_text_equal_a_plain_forward(qwen3, count):
    """Odd counts: the last unit is padded as the processor pads it, its time the last frame's."""
    frames = make_frames(count, seed=1)
    error = (streamed_logits(qwen3, frames) - reference_logits(qwen3, frames)).abs().max().item()
    assert error < 1e-4


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [2, 2], [3, 1]])
def test_units_fed_in_pieces_equal_one_call(qwen3, chunks):
    frames = make_frames(8, seed=2)
    whole = streamed_logits(qwen3, frames)
    pieces = streamed_logits(qwen3, frames, chunks=chunks)
    assert (whole - pieces).abs().max().item() < 1e-5


@pytest.mark.parametrize("fps", [2.0, 0.25])
def test_the_rate_is_in_the_timestamps(qwen3, fps):
    frames = make_frames(6, seed=14)
    logits = streamed_logits(qwen3, frames, fps=fps)
    assert (logits - reference_logits(qwen3, frames, fps=fps)).abs().max().item() < 1e-4
    assert (logits - reference_logits(qwen3, frames, fps=FPS)).abs().max().item() > 1e-3


def test_greedy_decoding_equals_generate(qwen3):
    from mukv.engine.generate import greedy_decode

    frames = make_frames(10, seed=3)
    features = qwen3.encode_frames(frames)
    cache, cursor = streamed(qwen3, features, unit_times(10, FPS))
    prompt = qwen3.tokenize(qwen3.prompts.render_question(QUESTION))
    steps: list[torch.Tensor] = []
    tokens = [t for t in greedy_decode(qwen3, cache, prompt, cursor, 8, steps) if t not in qwen3.eos_token_ids]
    expected, logits = reference_generate(qwen3, frames, 8)
    assert tokens == expected and len(expected) >= 4
    assert max((a - b).abs().max().item() for a, b in zip(steps, logits, strict=False)) < 1e-4


def test_moving_keys_equals_recomputing_them_per_interleaved_section(qwen3):
    old, _ = qwen3.positions.visual(20, qwen3.layout, 1)
    shared.check_moving_keys_equals_recomputing_them(qwen3, old)


def test_text_only_forwards_take_plain_embeddings(qwen3):
    cache, _ = qwen3.system_cache()
    ids = qwen3.tokenize("Hello")
    with pytest.raises(ValueError, match="channels"):
        qwen3.forward(torch.zeros(1, ids.shape[1], 7), cache, qwen3.positions.text(0, ids.shape[1]))


# ---------------------------------------------------------------------------------------- sabotage


def test_the_comparison_detects_dropped_deepstack(qwen3):
    frames = make_frames(6, seed=11)
    features = qwen3.encode_frames(frames)
    d = qwen3.text.hidden_size
    dropped = torch.cat((features[..., :d], torch.zeros_like(features[..., d:])), dim=-1)
    cache, cursor = streamed(qwen3, dropped, unit_times(6, FPS))
    prompt = qwen3.tokenize(qwen3.prompts.render_question(QUESTION))
    logits = qwen3.forward(qwen3.embed_ids(prompt), cache, qwen3.positions.text(cursor, prompt.shape[1]))[0, -1]
    assert (logits - reference_logits(qwen3, frames)).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "times",
    [
        pytest.param(lambda n: list(np.arange(1, n, 2) / FPS), id="last frame's time"),
        pytest.param(lambda n: list(np.arange(0, n, 2) / FPS), id="first frame's time"),
    ],
)
def test_the_comparison_detects_wrong_timestamps(qwen3, times):
    frames = make_frames(6, seed=11)
    logits = streamed_logits(qwen3, frames, times=times(6))
    assert (logits - reference_logits(qwen3, frames)).abs().max().item() > 1e-3


def test_the_comparison_detects_positions_without_grids(qwen3):
    class Flat(MultimodalRopePositions):
        def visual(self, start, layout, units, device="cpu"):
            return self.text(start, units * layout.tokens, device), start + units * layout.tokens

    frames = make_frames(6, seed=11)
    right = qwen3.positions
    try:
        qwen3.positions = Flat(right.inv_freq.float(), right.sections, interleaved=True, span_per_unit=True)
        logits = streamed_logits(qwen3, frames)
    finally:
        qwen3.positions = right
    assert (logits - reference_logits(qwen3, frames)).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------- through the session


@pytest.mark.parametrize("count", [4, 5])
def test_full_first_logits_equal_a_plain_forward(qwen3, count):
    """An odd count: the last unit is padded for this answer, stamped with its one frame's time."""
    shared.check_full_first_logits(qwen3, count, reference_logits)


def test_full_greedy_decoding_equals_generate(qwen3):
    frames = make_frames(10, seed=3)
    _, answer = stream(qwen3, frames, [3, 7], max_new_tokens=8)
    expected, logits = reference_generate(qwen3, frames, 8)
    assert list(answer.token_ids) == expected and len(expected) >= 4
    assert (answer.first_logits - logits[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1, 1], [2, 3, 1], [4, 2], [3, 3]])
def test_chunked_ingestion_equals_one_shot(qwen3, chunks):
    shared.check_chunked_ingestion_equals_one_shot(qwen3, chunks)


def test_a_question_about_an_earlier_time_takes_that_prefix(qwen3):
    """Units differ in length with their text: the prefix for an earlier question ends at its unit."""
    frames = make_frames(8, seed=4)
    session = StreamSession(qwen3, "full", fps=FPS)
    session.ingest(frames, np.arange(8) / FPS)
    session.memory.materialize(6.0)
    from mukv.memory import Query

    context = session.memory.prepare(Query(text=QUESTION, ids=qwen3.tokenize(QUESTION), time=6.0))
    _, alone = stream(qwen3, frames[:4], [4])
    assert context.context_tokens == alone.context_tokens
    assert context.retrieved[0].last_frame == 1


@pytest.mark.parametrize("encode", ["shared", "independent"])
def test_lossless_temporal_mukv_equals_full(qwen3, encode):
    """Keep ratio 1, segment blocks only, every one retrieved in time order: the full context, text
    and DeepStack included."""
    full, answer = shared.check_lossless_temporal_mukv_equals_full(qwen3, encode)
    assert sum(b.tokens for b in answer.retrieved) == full.retrieved[0].tokens


@pytest.mark.parametrize("overrides", [{}, {"layer_shared": True}, {"block_frames": 2}])
def test_rekv_without_eviction_and_with_every_block_equals_full(qwen3, overrides):
    shared.check_rekv_without_eviction_equals_full(qwen3, overrides)


def test_rekv_with_eviction_and_selection_answers_from_rotated_keys(qwen3):
    shared.check_rekv_with_eviction_answers(qwen3, n_local=40)


def test_recent_holding_every_unit_equals_full_and_holds_whole_units(qwen3):
    frames = make_frames(8, seed=5)
    _, full = stream(qwen3, frames, [3, 5])
    _, answer = stream(qwen3, frames, [3, 5], "recent", {"num_frames": 4})
    assert (answer.first_logits - full.first_logits).abs().max().item() < 1e-4
    session, _ = stream(qwen3, frames, [8], "recent", {"num_frames": 2})
    # The last two units, stamped 9.0 and 13.0 s, whole with their text.
    text = sum(len(qwen3.tokenize(t)[0]) for stamp in (9.0, 13.0) for t in qwen3.unit_text(stamp))
    assert session.memory.window.length == 2 * qwen3.tokens_per_frame + text
    assert [(b.first_frame, b.last_frame) for b in session.ask(QUESTION, max_new_tokens=1).retrieved] == [
        (2, 2),
        (3, 3),
    ]


@pytest.mark.parametrize("method", list(SMALL))
def test_a_question_between_the_frames_of_a_group_changes_no_state(qwen3, method):
    """A question after an odd frame is answered as if the padded group had been stored, and stores
    nothing: later answers are those of a stream that was never asked."""
    # Frame 4 twice, the copy a hair later: the unit's stamp (their mean) still writes <8.0 seconds>.
    frames, times, asked, never, _, _ = shared.ask_between_the_frames_of_a_group(
        qwen3, method, SMALL[method], copy_after=0.01
    )
    for session in (asked, never):
        session.ingest(frames[5:], times[5:])
    shared.check_later_answers_equal(asked, never)


@pytest.mark.parametrize("method", list(SMALL))
def test_every_method_answers_through_the_session(qwen3, method):
    shared.check_every_method_answers(qwen3, method, SMALL[method])


def test_mukv_blocks_keep_their_units_text(qwen3):
    """A frame block is its unit's 6 visual tokens with the unit's text; each patch block carries the
    text too (self-contained), and a segment both units' tokens."""
    session = StreamSession(
        qwen3, "mukv", overrides={"segment_frames": 2, "patch_layout": "quadrant", "keep_ratio.frame": 1.0}, fps=FPS
    )
    session.ingest(make_frames(4, seed=10), np.arange(4) / FPS)
    store = session.memory.store
    text = [sum(len(qwen3.tokenize(t)[0]) for t in qwen3.unit_text(stamp)) for stamp in (1.0, 5.0)]
    assert [store.payload(r.block_id).scores.shape[0] for r in store.records("frame")] == [6 + n for n in text]
    assert [store.payload(r.block_id).scores.shape[0] for r in store.records("segment")] == [12 + sum(text)]
    patches = [store.payload(r.block_id).scores.shape[0] for r in store.records("patch") if r.first_frame == 0]
    assert sum(patches) == 6 + len(patches) * text[0]


# ---------------------------------------------------------------------------------------- sabotage


class _DropsDeepStack(Proxy):
    """Visual features without their DeepStack maps (zeros: the language model adds nothing)."""

    def encode_frames(self, frames):
        features = self._inner.encode_frames(frames)
        d = self._inner.text.hidden_size
        return torch.cat((features[..., :d], torch.zeros_like(features[..., d:])), dim=-1)


class _StampsLastFrame(Proxy):
    """Each unit stamped one second late (as if by its last frame's time at 1 fps)."""

    def unit_text(self, time):
        return self._inner.unit_text(time + 1.0)


@pytest.mark.parametrize("wrong", [_DropsDeepStack, _StampsLastFrame], ids=["no DeepStack", "late stamps"])
def test_the_session_comparison_detects_a_broken_backend(qwen3, wrong):
    shared.check_comparison_detects(qwen3, wrong(qwen3), reference_logits)


def test_tiny_model_command_writes_a_checkpoint_every_command_loads(tmp_path):
    shared.check_tiny_model_command(tmp_path, "qwen3_vl", "Qwen3-VL")
