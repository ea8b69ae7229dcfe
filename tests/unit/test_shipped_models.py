"""Checkpoints shipped with the package resolve by name, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

import mukv.models
from mukv.backends.registry import resolve_model_dir
from mukv.errors import ModelLoadError


def _no_hub(*args, **kwargs):
    raise AssertionError("the hub was contacted")


def test_mukv_tiny_resolves_to_the_package_directory(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    directory = resolve_model_dir("mukv-tiny")
    assert directory == mukv.models._ROOT / "mukv-tiny"
    for name in (*mukv.models.REQUIRED_FILES, "README.md", "training.json"):
        assert (directory / name).is_file(), name
    # Shipped small: the card promises at most 20 MB of weights.
    assert (directory / "model.safetensors").stat().st_size <= 20 * 2**20


def test_a_local_directory_of_the_same_name_wins(tmp_path, monkeypatch):
    (tmp_path / "mukv-tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("mukv-tiny").resolve() == (tmp_path / "mukv-tiny").resolve()


def test_a_broken_installation_is_named(tmp_path, monkeypatch):
    (tmp_path / "mukv-tiny").mkdir()
    monkeypatch.setattr(mukv.models, "_ROOT", tmp_path)
    with pytest.raises(ModelLoadError, match=r"config\.json, model\.safetensors, .* are missing.*reinstall"):
        mukv.models.shipped_model_dir("mukv-tiny")
    assert mukv.models.shipped_model_dir("llava-hf/llava-onevision-qwen2-0.5b-ov-hf") is None


def test_package_data_globs_cover_the_checkpoint_files():
    # A wheel carries only files matching the package-data globs of pyproject.toml.
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mukv.models"]
    directory = mukv.models._ROOT / "mukv-tiny"
    for file in directory.iterdir():
        if file.is_file():
            relative = f"mukv-tiny/{file.name}"
            assert any(fnmatch.fnmatch(relative, g) for g in globs), relative
