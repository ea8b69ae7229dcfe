"""Loading through the normal path (tiny, legacy layout, errors) and visual encoding."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mukv.backends import build_tiny_model, load_backend
from mukv.errors import ModelLoadError
from tests.conftest import make_frames


def test_tiny_model_has_16_tokens_per_frame_from_its_config(backend):
    assert backend.tokens_per_frame == 16
    assert backend.text.num_layers == 3 and backend.text.num_kv_heads == 2 and backend.text.head_dim == 16
    assert backend.device.type == "cpu" and backend.dtype == torch.float32


def test_real_384px_geometry_gives_196_tokens_per_frame(backend_196):
    """The 0.5B/7B vision geometry (384 px, patch 14: 27x27 patches pooled to 14x14), narrow widths."""
    assert backend_196.tokens_per_frame == 196
    assert backend_196.encode_frames(make_frames(2, height=240, width=320)).shape == (2, 196, 64)


def test_tiny_model_build_is_deterministic(tmp_path):
    def digest(directory):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}

    first = digest(build_tiny_model(tmp_path / "a", seed=3))
    second = digest(build_tiny_model(tmp_path / "b", seed=3))
    other = digest(build_tiny_model(tmp_path / "c", seed=4))
    assert first == second
    assert first["model.safetensors"] != other["model.safetensors"]


def test_legacy_checkpoint_loads_with_its_weights(legacy_dir):
    backend = load_backend(legacy_dir)
    assert backend.tokens_per_frame == 16
    assert backend.preprocessor.size == 112
    stored = load_file(legacy_dir / "model.safetensors")
    # Older releases saved the language model under language_model.model.*; every stored tensor
    # must have arrived in the loaded model (not a fresh random init).
    params = dict(backend.model.named_parameters())
    loaded = params["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(loaded, stored["language_model.model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(params["lm_head.weight"], stored["language_model.lm_head.weight"])
    assert torch.equal(params["model.image_newline"], stored["image_newline"])
    vision = [k for k in stored if k.startswith("vision_tower.")]
    assert vision
    for key in vision:
        name = key.replace("vision_tower.vision_model.", "model.vision_tower.")
        assert torch.equal(params[name], stored[key]), key
    assert backend.eos_token_ids == frozenset({2})
    features = backend.encode_frames(make_frames(2))
    assert features.shape == (2, 16, 64)


def test_encode_frames_equals_the_models_own_video_features(backend):
    frames = make_frames(3, height=70, width=90)
    features = backend.encode_frames(frames)
    pixels = backend.preprocessor(frames)
    with torch.inference_mode():
        reference = backend.model.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output[0]
    assert features.shape == (3, 16, backend.text.hidden_size)
    assert torch.equal(features.reshape(-1, features.shape[-1]), reference[:-1])


def test_vision_batching_does_not_change_features(tiny_model_dir, backend):
    small = load_backend(tiny_model_dir, vision_batch_frames=2)
    frames = make_frames(5)
    assert (small.encode_frames(frames) - backend.encode_frames(frames)).abs().max().item() < 1e-5


def test_unknown_hub_id_offline_names_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_backend("no-such-org/no-such-model")
    message = str(info.value)
    assert "no-such-org/no-such-model" in message
    assert str(tmp_path / "no-such-org" / "no-such-model") in message
    assert "Hugging Face Hub" in message


def test_directory_without_weights_is_a_clear_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="could not load weights"):
        load_backend(broken)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_backend(tmp_path)


def test_unsupported_architecture_is_named(tiny_model_dir, tmp_path):
    other = tmp_path / "qwen"
    other.mkdir()
    text_config = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]
    (other / "config.json").write_text(json.dumps({**text_config, "model_type": "qwen2"}))
    supported = r"\(supported: llava_onevision, qwen2_5_vl"
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'qwen2' " + supported):
        load_backend(other)


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_backend(path)


def test_missing_tokenizer_is_a_clear_error(tiny_model_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (partial / name).unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_backend(partial)


@pytest.mark.parametrize(("kwargs", "field"), [({"dtype": "int8"}, "dtype"), ({"device": "tpu:x"}, "device")])
def test_invalid_device_or_dtype(tiny_model_dir, kwargs, field):
    with pytest.raises(ValueError, match=field):
        load_backend(tiny_model_dir, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(tiny_model_dir):
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_backend(tiny_model_dir, device="cuda")


def test_bfloat16_loading_runs(tiny_model_dir):
    backend = load_backend(tiny_model_dir, dtype="bfloat16")
    assert backend.dtype == torch.bfloat16
    assert backend.encode_frames(np.zeros((1, 32, 32, 3), dtype=np.uint8)).dtype == torch.bfloat16


@pytest.mark.gpu
def test_cuda_backend_matches_cpu(tiny_model_dir, backend):
    gpu = load_backend(tiny_model_dir, device="cuda", dtype="float32")
    frames = make_frames(2)
    diff = (gpu.encode_frames(frames).cpu() - backend.encode_frames(frames)).abs().max().item()
    assert diff < 1e-3
