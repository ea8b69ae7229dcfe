from __future__ import annotations

import dataclasses

import pytest

from mukv.config import (
    BackendConfig,
    GenerationConfig,
    SessionConfig,
    apply_overrides,
    config_to_dict,
    parse_assignments,
)
from mukv.memory import available_methods, method_config


def test_defaults_are_cpu_float_auto_and_the_real_checkpoint():
    config = BackendConfig()
    assert config.model == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    assert (config.device, config.dtype) == ("cpu", "auto")


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: BackendConfig(dtype="float8"), "dtype"),
        (lambda: BackendConfig(model="  "), "model"),
        (lambda: BackendConfig(vision_batch_frames=0), "vision_batch_frames"),
        (lambda: GenerationConfig(max_new_tokens=0), "max_new_tokens"),
        (lambda: SessionConfig(encode_batch_frames=0), "encode_batch_frames"),
        (lambda: method_config("uniform", {"num_frames": "0"}), "num_frames"),
        (lambda: method_config("full", {"prefill_chunk_tokens": -1}), "prefill_chunk_tokens"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(factory, field):
    with pytest.raises(ValueError, match=field):
        factory()


def test_configs_are_frozen_and_keyword_only():
    config = GenerationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_new_tokens = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        GenerationConfig(3)  # type: ignore[misc]


def test_overrides_convert_strings_to_field_types_and_nest():
    config = apply_overrides(SessionConfig(), {"encode_batch_frames": "4", "generation.max_new_tokens": "7"})
    assert config.encode_batch_frames == 4
    assert config.generation.max_new_tokens == 7
    assert config.generation.max_new_tokens_choice == GenerationConfig().max_new_tokens_choice


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nope": "1"}, "nope: unknown field"),
        ({"encode_batch_frames": "four"}, "encode_batch_frames: expected int"),
        ({"generation.nope": "1"}, "generation.nope: unknown field"),
        ({"encode_batch_frames.x": "1"}, "encode_batch_frames: is not a nested config"),
    ],
)
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(SessionConfig(), overrides)


def test_parse_assignments():
    assert parse_assignments(["a=1", " b.c = x "]) == {"a": "1", "b.c": "x"}
    assert parse_assignments(None) == {}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["novalue"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["=3"])


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: full, infinipot, mukv, recent, rekv, uniform"):
        method_config("nope")


def test_every_method_config_round_trips_to_a_dict():
    for name in available_methods():
        data = config_to_dict(method_config(name))
        assert data["__class__"].endswith("Config")
