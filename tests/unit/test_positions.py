"""Position schemes checked against transformers' own position and rotary code.

1-D RoPE against Qwen2's rotary embedding; multimodal RoPE against tiny Qwen2.5-VL and Qwen3-VL models
built offline from configs: their ``get_rope_index`` (where every token of a prompt sits) and their
text rotary embeddings (how a position rotates a key).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import transformers
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb as qwen2_apply_rotary
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb as qwen25_apply_rotary
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb as qwen3_apply_rotary

from mukv.backends.positions import FrameLayout, MultimodalRopePositions, PositionScheme, RopePositions

# Token ids of the tiny models: plain text below 100, then the special tokens.
IMAGE, VIDEO, VISION_START, VISION_END = 100, 101, 102, 103
VOCAB = 128
MERGE = 2  # spatial_merge_size: the LLM grid is the patch grid divided by this
# float32 rotary angles at positions below ~100 are good to a few 1e-6.
ATOL = 1e-5


# ----------------------------------------------------------------------------------------------- models


def token_ids() -> dict[str, int]:
    return {
        "image_token_id": IMAGE,
        "video_token_id": VIDEO,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
    }


@pytest.fixture(scope="module")
def qwen25() -> transformers.Qwen2_5_VLModel:
    """A tiny Qwen2.5-VL (head dim 32: 16 frequency slots in sections 4/6/6, like 16/24/24)."""
    text = {
        "vocab_size": VOCAB,
        "hidden_size": 128,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "bos_token_id": None,
        "eos_token_id": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]},
    }
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": 128,
        "patch_size": 14,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 56,
        "fullatt_block_indexes": [0],
    }
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids())
    return transformers.Qwen2_5_VLModel(config).eval()


@pytest.fixture(scope="module")
def qwen3() -> transformers.Qwen3VLModel:
    """A tiny Qwen3-VL (head dim 32: 16 slots interleaved in sections 6/5/5, like 24/20/20)."""
    text = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
    }
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 16,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0],
    }
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids())
    return transformers.Qwen3VLModel(config).eval()


def qwen25_scheme(model: transformers.Qwen2_5_VLModel, time_scale: float = 1.0) -> MultimodalRopePositions:
    rotary = model.language_model.rotary_emb
    return MultimodalRopePositions(rotary.inv_freq, tuple(rotary.mrope_section), time_scale=time_scale)


def qwen3_scheme(model: transformers.Qwen3VLModel) -> MultimodalRopePositions:
    rotary = model.language_model.rotary_emb
    return MultimodalRopePositions(rotary.inv_freq, tuple(rotary.mrope_section), interleaved=True, span_per_unit=True)


# ---------------------------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """A prompt built piece by piece, with the positions a scheme gives each piece.

    ``ids`` and ``types`` (``mm_token_type_ids``: text 0, image 1, video 2) per token; ``positions``
    ``[R, n]`` chunks; ``cursor`` where the next text token goes.
    """

    ids: list[int] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    cursor: int = 0

    def text(self, scheme: PositionScheme, n: int, last: int | None = None) -> Prompt:
        """``n`` text tokens (the last one ``last`` if given, e.g. ``<|vision_start|>``)."""
        ids = [(len(self.ids) + i) % IMAGE for i in range(n)]
        if last is not None:
            ids[-1] = last
        self.ids += ids
        self.types += [0] * n
        self.positions.append(scheme.text(self.cursor, n))
        self.cursor += n
        return self

    def visual(self, scheme: PositionScheme, layout: FrameLayout, units: int, kind: int = VIDEO) -> Prompt:
        """``units`` units of visual placeholder tokens (``kind`` is ``VIDEO`` or ``IMAGE``) as one run."""
        n = units * layout.tokens
        self.ids += [kind] * n
        self.types += [2 if kind == VIDEO else 1] * n
        positions, self.cursor = scheme.visual(self.cursor, layout, units)
        self.positions.append(positions)
        return self

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids [1, L]`` and ``mm_token_type_ids [1, L]``."""
        return torch.tensor([self.ids]), torch.tensor([self.types], dtype=torch.int32)

    def all_positions(self) -> torch.Tensor:
        """Positions ``[3, L]`` (a 1-D scheme's single row repeated on all axes, as text is)."""
        return torch.cat(self.positions, dim=1).expand(3, -1)


def grid_thw(units: int, layout: FrameLayout) -> list[int]:
    """The ``(t, h, w)`` patch grid the model is told for ``units`` units of ``layout``."""
    return [units, layout.grid[0] * MERGE, layout.grid[1] * MERGE]


def video_time_scale(model: transformers.Qwen2_5_VLModel, second_per_grid_ts: torch.Tensor) -> float:
    """``tokens_per_second * second_per_grid_ts``, the time step per temporal group that the model uses."""
    return float(model.config.vision_config.tokens_per_second * second_per_grid_ts)


def qwen25_rope_index(
    model: transformers.Qwen2_5_VLModel,
    prompt: Prompt,
    *,
    videos: list[list[int]] | None = None,
    seconds: list[float] | None = None,
    images: list[list[int]] | None = None,
) -> tuple[torch.Tensor, int]:
    """The model's positions ``[3, L]`` for ``prompt`` and where its ``generate`` continues."""
    input_ids, types = prompt.inputs()
    positions, deltas = model.get_rope_index(
        input_ids,
        types,
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor(videos) if videos else None,
        # float32, as the processor's BatchFeature returns it.
        second_per_grid_ts=torch.tensor(seconds) if seconds else None,
    )
    return positions[:, 0], input_ids.shape[1] + int(deltas[0, 0])


# --------------------------------------------------------------------------------------------- rotation


def random_positions(rows: int, n: int, limit: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, limit, (rows, n), generator=generator)


def qwen2_rotary() -> Qwen2RotaryEmbedding:
    config = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    return Qwen2RotaryEmbedding(config)


def qwen2_rotate(rotary: Qwen2RotaryEmbedding, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE ``keys [1, H, n, D]`` rotated to ``positions [1, n]`` by transformers' Qwen2 code."""
    cos, sin = rotary(keys, positions)
    return qwen2_apply_rotary(keys, keys, cos, sin)[1]


def mrope_rotate(model: torch.nn.Module, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE ``keys [1, H, n, D]`` rotated to ``positions [3, n]`` by the model's own text rotary
    embedding (which recomposes the three axes' frequencies) and ``apply_rotary_pos_emb``."""
    cos, sin = model.language_model.rotary_emb(keys, positions[:, None, :])
    apply = qwen3_apply_rotary if isinstance(model, transformers.Qwen3VLModel) else qwen25_apply_rotary
    return apply(keys, keys, cos, sin)[1]


# ------------------------------------------------------------------------------------------------ 1-D


def test_rope_shift_equals_rotating_at_the_new_positions() -> None:
    rotary = qwen2_rotary()
    scheme = RopePositions(rotary.inv_freq)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 40, 16, generator=g)
    old, new = random_positions(1, 40, 100, g), random_positions(1, 40, 100, g)
    rotated = qwen2_rotate(rotary, keys, old)
    shifted = scheme.shift(rotated, old, new)
    torch.testing.assert_close(shifted, qwen2_rotate(rotary, keys, new), atol=ATOL, rtol=0)
    # Not vacuous: the keys did move.
    assert (shifted - rotated).abs().max() > 0.1
    torch.testing.assert_close(scheme.unrotate(rotated, old), keys, atol=ATOL, rtol=0)


def test_rope_shift_keeps_dtype() -> None:
    scheme = RopePositions(qwen2_rotary().inv_freq)
    keys = torch.randn(2, 5, 16).to(torch.bfloat16)
    out = scheme.shift(keys, torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None])
    assert out.dtype == torch.bfloat16
    assert out.shape == keys.shape


def test_rope_text_visual_block_positions_and_cursors() -> None:
    scheme = RopePositions(qwen2_rotary().inv_freq)
    layout = FrameLayout((2, 3))
    assert torch.equal(scheme.text(7, 4), torch.tensor([[7, 8, 9, 10]]))
    positions, cursor = scheme.visual(10, layout, 2)
    assert positions.shape == (1, 12)
    assert torch.equal(positions, torch.arange(10, 22)[None])
    assert cursor == 22
    # A block fed on its own packs its tokens like a sequence of their own.
    positions, cursor = scheme.block(10, layout, 2, torch.tensor([0, 5, 7]))
    assert torch.equal(positions, torch.tensor([[10, 11, 12]]))
    assert cursor == 13
    assert PositionScheme.after(torch.tensor([[3, 9, 4]])) == 10
    assert PositionScheme.after(torch.zeros(1, 0, dtype=torch.long)) == 0


def test_frame_layout() -> None:
    layout = FrameLayout((2, 3), frames_per_unit=2)
    assert layout.tokens == 6
    rows, cols = layout.token_rows_cols()
    assert rows.tolist() == [0, 0, 0, 1, 1, 1]
    assert cols.tolist() == [0, 1, 2, 0, 1, 2]
    assert FrameLayout.square(16).grid == (4, 4)
    with pytest.raises(ValueError, match="not a square"):
        FrameLayout.square(12)
    with pytest.raises(ValueError, match="positive"):
        FrameLayout((0, 3))


# ------------------------------------------------------------------------------------- Qwen2.5-VL positions


@pytest.mark.parametrize(
    ("groups", "grid", "tokens_per_second", "fps"),
    [
        (1, (2, 3), 2, 2.0),  # one temporal group
        (4, (2, 3), 2, 2.0),  # time step 2 per group
        (5, (3, 2), 2, 3.0),  # time step 4/3: truncated per group
        (3, (2, 2), 25, 1.0),  # time step 50: the time axis runs far past the text that follows
    ],
)
def test_qwen25_video_positions_match_get_rope_index(
    qwen25: transformers.Qwen2_5_VLModel,
    monkeypatch: pytest.MonkeyPatch,
    groups: int,
    grid: tuple[int, int],
    tokens_per_second: int,
    fps: float,
) -> None:
    monkeypatch.setattr(qwen25.config.vision_config, "tokens_per_second", tokens_per_second)
    layout = FrameLayout(grid, frames_per_unit=2)
    seconds = [2 / fps]  # second_per_grid_ts = temporal_patch_size / fps
    scheme = qwen25_scheme(qwen25, video_time_scale(qwen25, torch.tensor(seconds)))
    prompt = Prompt().text(scheme, 5, last=VISION_START).visual(scheme, layout, groups)
    prompt.text(scheme, 1, last=VISION_END).text(scheme, 4)  # vision_end is a text token
    expected, generate_from = qwen25_rope_index(qwen25, prompt, videos=[grid_thw(groups, layout)], seconds=seconds)
    assert torch.equal(prompt.all_positions(), expected)
    # The model's generate continues one past the largest position, not at the text cursor.
    assert generate_from == PositionScheme.after(expected)


def test_qwen25_text_after_a_video_continues_below_its_time_axis(qwen25: transformers.Qwen2_5_VLModel) -> None:
    """The 5.x rule: text after a span goes on at ``start + max(rows, cols)``, however many groups."""
    layout = FrameLayout((2, 3), frames_per_unit=2)
    scheme = qwen25_scheme(qwen25, video_time_scale(qwen25, torch.tensor(2.0)))  # time step 4
    start = 6
    positions, cursor = scheme.visual(start, layout, 5)
    assert positions.shape == (3, 30)
    assert cursor == start + 3
    assert positions[0].max() == start + 16  # last group's time position
    assert PositionScheme.after(positions) > cursor
    # Row and column axes hold the grid; the time axis the group.
    assert positions[1, :6].tolist() == [6, 6, 6, 7, 7, 7]
    assert positions[2, :6].tolist() == [6, 7, 8, 6, 7, 8]
    assert positions[0, ::6].tolist() == [6, 10, 14, 18, 22]


def test_qwen25_image_and_two_videos_match_get_rope_index(qwen25: transformers.Qwen2_5_VLModel) -> None:
    """An image, then two videos at different frame rates and grids: one scheme per time step."""
    image, first, second = FrameLayout((3, 3)), FrameLayout((2, 3), 2), FrameLayout((3, 4), 2)
    seconds = [2 / 2.0, 2 / 0.5]  # per video: time steps 2 and 8
    still = qwen25_scheme(qwen25)  # images: time step 1
    first_scheme = qwen25_scheme(qwen25, video_time_scale(qwen25, torch.tensor(seconds[0])))
    second_scheme = qwen25_scheme(qwen25, video_time_scale(qwen25, torch.tensor(seconds[1])))
    prompt = Prompt().text(still, 3, last=VISION_START).visual(still, image, 1, kind=IMAGE)
    # Between spans: <|vision_end|>, <|vision_start|> (text).
    prompt.text(still, 2, last=VISION_START).visual(first_scheme, first, 3)
    prompt.text(still, 2, last=VISION_START).visual(second_scheme, second, 4)
    prompt.text(still, 6)
    expected, generate_from = qwen25_rope_index(
        qwen25,
        prompt,
        images=[grid_thw(1, image)],
        videos=[grid_thw(3, first), grid_thw(4, second)],
        seconds=seconds,
    )
    assert torch.equal(prompt.all_positions(), expected)
    assert generate_from == PositionScheme.after(expected)


def test_mrope_block_keeps_grid_places_and_the_visual_cursor(qwen25: transformers.Qwen2_5_VLModel) -> None:
    layout = FrameLayout((2, 3), frames_per_unit=2)
    scheme = qwen25_scheme(qwen25, time_scale=4.0)
    positions, cursor = scheme.visual(9, layout, 3)
    tokens = torch.tensor([1, 2, 7, 16])
    block, block_cursor = scheme.block(9, layout, 3, tokens)
    assert torch.equal(block, positions[:, tokens])
    assert block_cursor == cursor
    # All blocks of some units together are those units.
    halves = [scheme.block(9, layout, 3, part)[0] for part in torch.arange(18).chunk(2)]
    assert torch.equal(torch.cat(halves, dim=1), positions)


# ------------------------------------------------------------------------------------- Qwen3-VL positions


@pytest.mark.parametrize(("groups", "grid"), [(1, (2, 3)), (3, (3, 2)), (4, (2, 2))])
def test_qwen3_video_positions_match_get_rope_index(
    qwen3: transformers.Qwen3VLModel, groups: int, grid: tuple[int, int]
) -> None:
    """``<t seconds><|vision_start|>`` + one group + ``<|vision_end|>`` per temporal group, each group a
    ``visual(cursor, layout, 1)`` call between text calls."""
    layout = FrameLayout(grid, frames_per_unit=2)
    scheme = qwen3_scheme(qwen3)
    prompt = Prompt().text(scheme, 4)
    for group in range(groups):
        # "<0.5 seconds>" and "<12.5 seconds>" tokenise to different lengths.
        prompt.text(scheme, 3 + group % 2 + 1, last=VISION_START)
        prompt.visual(scheme, layout, 1)
        prompt.text(scheme, 1, last=VISION_END)
    prompt.text(scheme, 5)
    input_ids, types = prompt.inputs()
    # One video of `groups` temporal groups: the model splits it into one grid per group itself.
    expected, deltas = qwen3.get_rope_index(input_ids, types, video_grid_thw=torch.tensor([grid_thw(groups, layout)]))
    assert torch.equal(prompt.all_positions(), expected[:, 0])
    assert input_ids.shape[1] + int(deltas[0, 0]) == PositionScheme.after(expected[:, 0])


def test_qwen3_units_are_consecutive_spans_and_ignore_time_scale(qwen3: transformers.Qwen3VLModel) -> None:
    layout = FrameLayout((2, 3), frames_per_unit=2)
    scheme = qwen3_scheme(qwen3)
    positions, cursor = scheme.visual(10, layout, 3)
    chained, chained_cursor = [], 10
    for _ in range(3):
        one, chained_cursor = scheme.visual(chained_cursor, layout, 1)
        chained.append(one)
    assert torch.equal(positions, torch.cat(chained, dim=1))
    assert cursor == chained_cursor == 10 + 3 * 3
    # Each group's time position is its span's start.
    assert positions[0, ::6].tolist() == [10, 13, 16]
    rotary = qwen3.language_model.rotary_emb
    scaled = MultimodalRopePositions(
        rotary.inv_freq, tuple(rotary.mrope_section), interleaved=True, span_per_unit=True, time_scale=7.0
    )
    assert torch.equal(scaled.visual(10, layout, 3)[0], positions)


# ----------------------------------------------------------------------------------------- M-RoPE shift


def assert_axes_match(rotary: torch.nn.Module, scheme: MultimodalRopePositions) -> None:
    """Moving one axis alone changes exactly the frequency slots the scheme gives that axis."""
    slots = scheme.inv_freq.shape[0]
    for axis in range(3):
        positions = torch.zeros(3, 1, 1, dtype=torch.long)
        positions[axis] = 1
        # sin, not cos: cos of the lowest frequencies' tiny angles rounds to 1 in float32.
        _, sin = rotary(torch.zeros(1), positions)
        moved = sin[0, 0, :slots] != 0
        assert torch.equal(moved, scheme.axis_of_slot == axis), axis


@pytest.mark.parametrize("family", ["qwen25", "qwen3"])
def test_mrope_axis_of_slot_matches_the_rotary_embedding(family: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(family)
    scheme = qwen25_scheme(model) if family == "qwen25" else qwen3_scheme(model)
    assert_axes_match(model.language_model.rotary_emb, scheme)


def test_mrope_axis_of_slot_at_real_sizes() -> None:
    """Head dim 128 with the released checkpoints' sections: 16/24/24 (Qwen2.5-VL), 24/20/20 interleaved
    (Qwen3-VL). Only the rotary embeddings are built."""
    qwen25 = transformers.Qwen2_5_VLTextConfig(
        hidden_size=2048,
        num_attention_heads=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    )
    rotary = Qwen2_5_VLRotaryEmbedding(qwen25)
    assert_axes_match(rotary, MultimodalRopePositions(rotary.inv_freq, (16, 24, 24)))
    qwen3 = transformers.Qwen3VLTextConfig(
        head_dim=128,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    )
    rotary = Qwen3VLTextRotaryEmbedding(qwen3)
    assert_axes_match(rotary, MultimodalRopePositions(rotary.inv_freq, (24, 20, 20), interleaved=True))


@pytest.mark.parametrize("family", ["qwen25", "qwen3"])
def test_mrope_shift_equals_rotating_at_the_new_positions(family: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(family)
    scheme = qwen25_scheme(model) if family == "qwen25" else qwen3_scheme(model)
    one_d = RopePositions(model.language_model.rotary_emb.inv_freq)
    g = torch.Generator().manual_seed(1)
    n = 48
    keys = torch.randn(1, 2, n, 32, generator=g)
    old = random_positions(3, n, 80, g)
    rotated = mrope_rotate(model, keys, old)

    # Unequal per-axis moves.
    new = random_positions(3, n, 80, g)
    expected = mrope_rotate(model, keys, new)
    torch.testing.assert_close(scheme.shift(rotated, old, new), expected, atol=ATOL, rtol=0)
    # A 1-D rotation by the time axis' move is wrong here, so the comparison can fail.
    assert (one_d.shift(rotated, old[:1], new[:1]) - expected).abs().max() > 0.1

    # The same move on all axes: also a 1-D rotation by that move.
    # Moves back by up to 20, never below position 0 on any axis.
    delta = torch.randint(-20, 40, (n,), generator=g).maximum(-old.min(dim=0).values)
    uniform = old + delta
    expected = mrope_rotate(model, keys, uniform)
    torch.testing.assert_close(scheme.shift(rotated, old, uniform), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(one_d.shift(rotated, old[:1], uniform[:1]), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        one_d.shift(rotated, torch.zeros_like(delta)[None], delta[None]), expected, atol=ATOL, rtol=0
    )

    torch.testing.assert_close(scheme.unrotate(rotated, old), keys, atol=ATOL, rtol=0)


def test_mrope_shift_refuses_scaled_rope() -> None:
    scheme = MultimodalRopePositions(torch.ones(16), (4, 6, 6), attention_scaling=1.2)
    positions = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="scales attention"):
        scheme.shift(torch.zeros(2, 32), positions, positions + 1)


def test_mrope_rejects_sections_that_do_not_cover_the_slots() -> None:
    inv_freq = torch.ones(16)
    with pytest.raises(ValueError, match="do not cover"):
        MultimodalRopePositions(inv_freq, (4, 6, 5))
    with pytest.raises(ValueError, match="do not fit"):
        MultimodalRopePositions(inv_freq, (2, 7, 7), interleaved=True)


# ------------------------------------------------------------------------------------- wrong schemes fail


def test_wrong_schemes_do_not_match_get_rope_index(
    qwen25: transformers.Qwen2_5_VLModel, qwen3: transformers.Qwen3VLModel
) -> None:
    """A 1-D scheme, a wrong time step and the 4.x "text after the largest position" rule give other
    positions than the models: the checks above can fail."""
    layout = FrameLayout((2, 3), frames_per_unit=2)
    seconds = [1.0]
    right = qwen25_scheme(qwen25, video_time_scale(qwen25, torch.tensor(seconds)))

    class AfterLargest(MultimodalRopePositions):
        def visual(
            self, start: int, layout: FrameLayout, units: int, device: torch.device | str = "cpu"
        ) -> tuple[torch.Tensor, int]:
            positions, _ = super().visual(start, layout, units, device)
            return positions, self.after(positions)

    wrong = [
        RopePositions(qwen25.language_model.rotary_emb.inv_freq),
        qwen25_scheme(qwen25, time_scale=1.0),
        AfterLargest(right.inv_freq, right.sections, time_scale=right.time_scale),
    ]

    def build(scheme: PositionScheme) -> Prompt:
        prompt = Prompt().text(scheme, 3, last=VISION_START).visual(scheme, layout, 3)
        return prompt.text(scheme, 1, last=VISION_END).text(scheme, 3)

    expected, _ = qwen25_rope_index(qwen25, build(right), videos=[grid_thw(3, layout)], seconds=seconds)
    assert torch.equal(build(right).all_positions(), expected)
    for scheme in wrong:
        assert not torch.equal(build(scheme).all_positions(), expected), type(scheme).__name__

    # Qwen3-VL: a 1-D scheme over the same per-group prompt.
    grid = [grid_thw(2, layout)]

    def build_qwen3(scheme: PositionScheme) -> Prompt:
        prompt = Prompt().text(scheme, 2)
        for _ in range(2):
            prompt.text(scheme, 4, last=VISION_START).visual(scheme, layout, 1).text(scheme, 1, last=VISION_END)
        return prompt

    input_ids, types = build_qwen3(qwen3_scheme(qwen3)).inputs()
    expected = qwen3.get_rope_index(input_ids, types, video_grid_thw=torch.tensor(grid))[0][:, 0]
    assert torch.equal(build_qwen3(qwen3_scheme(qwen3)).all_positions(), expected)
    one_d = RopePositions(qwen3.language_model.rotary_emb.inv_freq)
    assert not torch.equal(build_qwen3(one_d).all_positions(), expected)
