"""MuKV configuration: presets of method.md section 6, validation, overrides, paper accounting."""

from __future__ import annotations

import dataclasses
import re

import pytest

from mukv.compress.scorers import keep_count
from mukv.config import apply_overrides
from mukv.memory import method_config
from mukv.memory.mukv_config import (
    PRESETS,
    MukvConfig,
    PerGranularityBool,
    PerGranularityFloat,
    PerGranularityInt,
    paper_preset,
    release_preset,
)

GRANULARITIES = ("patch", "frame", "segment")


def per(obj) -> tuple:
    return tuple(obj.get(g) for g in GRANULARITIES)


# --- presets -------------------------------------------------------------------------------


def test_defaults_are_the_paper_preset():
    cfg = MukvConfig()
    assert cfg == paper_preset()
    assert cfg.preset == "paper"
    assert per(cfg.keep_ratio) == (0.1, 0.1, 0.8)
    assert per(cfg.top_k) == (20, 32, 12)
    assert per(cfg.alpha) == (0.5, 0.7, 0.8)
    assert cfg.frequency == "fft"
    assert per(cfg.rerank_weight) == (0.3, 0.3, 0.0)
    assert cfg.rerank_top_n == 5
    assert cfg.over_retrieve == 2.0
    assert cfg.dedup is False
    assert cfg.dedup_threshold == 0.9
    assert cfg.dedup_candidates == 1.2
    assert cfg.attention_layer == "last"
    assert cfg.causal_correction is False
    assert (cfg.encode, cfg.order, cfg.query, cfg.patch_layout) == ("independent", "reference", "last_key", "raster")
    assert cfg.retrieval == "semi_hierarchical"
    assert cfg.segment_frames == 4
    assert per(cfg.granularities) == (True, True, True)


def test_release_preset():
    cfg = release_preset()
    assert cfg.preset == "release"
    assert per(cfg.keep_ratio) == (0.7, 0.5, 0.3)
    assert per(cfg.top_k) == (49, 12, 3)
    assert cfg.frequency == "diff"
    assert cfg.dedup is True
    assert cfg.dedup_threshold == 0.9
    assert per(cfg.rerank_weight) == (0.6, 0.5, 0.0)
    # Same as the paper preset: alpha, attention layer, encode / order / query / patch layout, N, segment.
    assert per(cfg.alpha) == (0.5, 0.7, 0.8)
    assert cfg.attention_layer == "last"
    assert (cfg.encode, cfg.order, cfg.query, cfg.patch_layout) == ("independent", "reference", "last_key", "raster")
    assert cfg.segment_frames == 4
    assert cfg.rerank_top_n == 5


def test_presets_registry():
    assert set(PRESETS) == {"paper", "release"}
    assert PRESETS["paper"]() == MukvConfig()
    assert PRESETS["release"]() == release_preset()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MukvConfig().frequency = "diff"  # type: ignore[misc]


# --- validation ----------------------------------------------------------------------------


def floats(**kw) -> PerGranularityFloat:
    return PerGranularityFloat(**{"patch": 0.1, "frame": 0.1, "segment": 0.8, **kw})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"keep_ratio": floats(patch=0.0)}, "keep_ratio.patch"),
        ({"keep_ratio": floats(patch=1.5)}, "keep_ratio.patch"),
        ({"keep_ratio": floats(frame=-0.1)}, "keep_ratio.frame"),
        ({"keep_ratio": floats(segment=1.01)}, "keep_ratio.segment"),
        ({"alpha": floats(frame=1.1)}, "alpha.frame"),
        ({"alpha": floats(patch=-0.5)}, "alpha.patch"),
        ({"rerank_weight": floats(patch=-0.1)}, "rerank_weight.patch"),
        ({"top_k": PerGranularityInt(patch=20, frame=32, segment=-1)}, "top_k.segment"),
        ({"encode": "joint"}, "encode"),
        ({"order": "random"}, "order"),
        ({"query": "first_key"}, "query"),
        ({"retrieval": "flat"}, "retrieval"),
        ({"frequency": "wavelet"}, "frequency"),
        ({"attention_layer": "first"}, "attention_layer"),
        ({"patch_layout": "diagonal"}, "patch_layout"),
        ({"granularities": PerGranularityBool(patch=False, frame=False, segment=False)}, "granularities"),
        ({"segment_frames": 0}, "segment_frames"),
        ({"dedup_threshold": 1.5}, "dedup_threshold"),
        ({"dedup_candidates": 0.5}, "dedup_candidates"),
        ({"over_retrieve": 0.5}, "over_retrieve"),
        ({"rerank_top_n": 0}, "rerank_top_n"),
        ({"encode_batch_blocks": 0}, "encode_batch_blocks"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: "):
        MukvConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_ratio": floats(patch=1.0, frame=1.0, segment=1.0)},
        {"keep_ratio": floats(patch=1e-3)},
        {"alpha": floats(patch=0.0, frame=1.0)},
        {"top_k": PerGranularityInt(patch=0, frame=0, segment=0)},
        {"granularities": PerGranularityBool(patch=False, frame=False, segment=True)},
        {"segment_frames": 1},
        {"over_retrieve": 1.0},
        {"dedup_threshold": -1.0},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    MukvConfig(**kwargs)


def test_unknown_option_message_lists_the_choices():
    with pytest.raises(ValueError, match=r"retrieval: must be one of semi_hierarchical, parallel, hierarchical"):
        MukvConfig(retrieval="flat")


# --- overrides -----------------------------------------------------------------------------


def test_overrides_nested_per_granularity_fields_from_strings():
    cfg = apply_overrides(MukvConfig(), {"keep_ratio.patch": "0.2", "top_k.frame": "8", "granularities.patch": "false"})
    assert per(cfg.keep_ratio) == (0.2, 0.1, 0.8)
    assert per(cfg.top_k) == (20, 8, 12)
    assert per(cfg.granularities) == (False, True, True)
    assert isinstance(cfg.keep_ratio.patch, float)
    assert isinstance(cfg.top_k.frame, int)
    # Everything else keeps its paper value.
    assert (
        dataclasses.replace(
            cfg, keep_ratio=MukvConfig().keep_ratio, top_k=MukvConfig().top_k, granularities=PerGranularityBool()
        )
        == MukvConfig()
    )


def test_overrides_of_top_level_fields():
    cfg = apply_overrides(
        MukvConfig(), {"frequency": "diff", "dedup": "true", "segment_frames": "2", "over_retrieve": "3"}
    )
    assert (cfg.frequency, cfg.dedup, cfg.segment_frames, cfg.over_retrieve) == ("diff", True, 2, 3.0)


def test_method_config_applies_overrides_to_the_mukv_defaults():
    cfg = method_config("mukv", {"keep_ratio.segment": "0.5", "retrieval": "parallel"})
    assert isinstance(cfg, MukvConfig)
    assert per(cfg.keep_ratio) == (0.1, 0.1, 0.5)
    assert cfg.retrieval == "parallel"
    assert method_config("mukv") == MukvConfig()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"keep_ratio.patch": "1.5"}, "keep_ratio.patch"),
        ({"keep_ratio.patch": "lots"}, "keep_ratio.patch"),
        ({"top_k.frame": "-2"}, "top_k.frame"),
        ({"granularities.patch": "maybe"}, "granularities.patch"),
        ({"keep_ratio.tube": "0.5"}, "keep_ratio.tube"),
        ({"retrieval": "flat"}, "retrieval"),
        ({"nope": "1"}, "nope"),
    ],
)
def test_invalid_overrides_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: "):
        apply_overrides(MukvConfig(), overrides)


def test_overrides_turning_every_granularity_off_are_rejected():
    with pytest.raises(ValueError, match=r"^granularities: "):
        apply_overrides(
            MukvConfig(),
            {"granularities.patch": "false", "granularities.frame": "false", "granularities.segment": "false"},
        )


def test_method_config_selects_the_release_preset():
    assert method_config("mukv", preset="release") == release_preset()
    assert method_config("mukv", preset="paper") == MukvConfig()


def test_method_config_applies_overrides_on_top_of_a_preset():
    cfg = method_config("mukv", {"top_k.patch": "10", "dedup": "false"}, preset="release")
    assert per(cfg.top_k) == (10, 12, 3)
    assert cfg.dedup is False
    assert cfg.frequency == "diff"
    assert per(cfg.keep_ratio) == (0.7, 0.5, 0.3)


def test_method_config_with_an_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"^preset: .*'nope'.*paper, release"):
        method_config("mukv", preset="nope")


def test_an_unknown_preset_label_is_rejected():
    with pytest.raises(ValueError, match=r"^preset: "):
        MukvConfig(preset="bogus")


def test_overriding_the_preset_label_does_not_mislabel_paper_values():
    try:
        cfg = method_config("mukv", {"preset": "release"})
    except ValueError:
        return  # rejecting the override is fine too
    assert cfg == release_preset()


# --- paper accounting (method.md section 4) --------------------------------------------------


def block_tokens(cfg: MukvConfig, tokens_per_frame: int = 196) -> dict[str, int]:
    return {
        "patch": keep_count(tokens_per_frame // 4, cfg.keep_ratio.patch),
        "frame": keep_count(tokens_per_frame, cfg.keep_ratio.frame),
        "segment": keep_count(cfg.segment_frames * tokens_per_frame, cfg.keep_ratio.segment),
    }


def test_paper_tokens_per_frame_at_196():
    cfg = paper_preset()
    kept = block_tokens(cfg)
    assert kept == {"patch": 4, "frame": 19, "segment": 627}
    assert 4 * kept["patch"] + kept["frame"] + kept["segment"] / cfg.segment_frames == 191.75


def test_paper_answering_tokens_for_64_blocks():
    cfg = paper_preset()
    kept = block_tokens(cfg)
    assert sum(per(cfg.top_k)) == 64
    assert sum(cfg.top_k.get(g) * kept[g] for g in GRANULARITIES) == 20 * 4 + 32 * 19 + 12 * 627 == 8212


def test_release_accounting_at_196():
    cfg = release_preset()
    kept = block_tokens(cfg)
    assert kept == {"patch": 34, "frame": 98, "segment": 235}
    assert 4 * kept["patch"] + kept["frame"] + kept["segment"] / cfg.segment_frames == 292.75
    assert sum(cfg.top_k.get(g) * kept[g] for g in GRANULARITIES) == 49 * 34 + 12 * 98 + 3 * 235 == 3547


def test_answer_tokens_of_the_presets():
    from mukv.memory.mukv_config import MukvConfig, release_preset

    # 20 x 4 + 32 x 19 + 12 x 627 at P = 196 (the paper's 8.2K); 20 x 1 + 32 x 1 + 12 x 51 at P = 16.
    assert MukvConfig().answer_tokens(196) == 8212
    assert MukvConfig().answer_tokens(16) == 664
    # 49 x 34 + 12 x 98 + 3 x 235
    assert release_preset().answer_tokens(196) == 49 * 34 + 12 * 98 + 3 * 235
    off = MukvConfig(granularities=PerGranularityBool(patch=False, frame=False, segment=True))
    assert off.answer_tokens(16) == 12 * 51
