"""Checkpoints shipped with the package resolve by name, offline."""

from __future__ import annotations

import pytest

import mukv.models
from mukv.backends.llava_onevision import resolve_model_dir
from mukv.errors import ModelLoadError


def test_mukv_tiny_resolves_to_the_package_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = resolve_model_dir("mukv-tiny")
    assert directory == mukv.models._ROOT / "mukv-tiny"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (directory / name).is_file(), name
    # Shipped small: the card promises at most 20 MB of weights.
    assert (directory / "model.safetensors").stat().st_size <= 20 * 2**20


def test_a_local_directory_of_the_same_name_wins(tmp_path, monkeypatch):
    (tmp_path / "mukv-tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("mukv-tiny") == tmp_path / "mukv-tiny"


def test_a_broken_installation_is_named(tmp_path, monkeypatch):
    (tmp_path / "mukv-tiny").mkdir()
    monkeypatch.setattr(mukv.models, "_ROOT", tmp_path)
    with pytest.raises(ModelLoadError, match=r"config\.json and model\.safetensors are missing.*reinstall"):
        mukv.models.shipped_model_dir("mukv-tiny")
    assert mukv.models.shipped_model_dir("llava-hf/llava-onevision-qwen2-0.5b-ov-hf") is None
