"""Shared fixtures: a tiny LLaVA-OneVision built offline once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# No test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():
    SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
LEGACY_CHECKPOINT = SHARED / "data" / "checkpoints" / "tiny-llava-ov-legacy"
ANNOTATIONS = SHARED / "data" / "annotations"
# CI sets this: there, a test that needs the shared data fails when it is missing instead of skipping.
REQUIRE_SHARED = os.environ.get("MUKV_REQUIRE_SHARED") == "1"


def shared_or_skip(path: Path, what: str) -> Path:
    """``path`` if it exists; otherwise skip the test, or fail it where the shared data is required."""
    if not path.exists():
        message = f"shared {what} not found at {path}"
        if REQUIRE_SHARED:
            pytest.fail(message + " (MUKV_REQUIRE_SHARED=1)")
        pytest.skip(message)
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from mukv.backends.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def backend(tiny_model_dir):
    from mukv.backends import load_backend

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_backend(tiny_model_dir)


@pytest.fixture(scope="session")
def legacy_dir() -> Path:
    return shared_or_skip(LEGACY_CHECKPOINT, "legacy checkpoint")


def make_frames(n: int, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """Random uint8 frames [n, H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def greedy_generate(backend, max_new: int, **inputs):
    """The plain model's own ``generate`` over ``inputs``, greedy, stopping at the backend's
    end-of-sequence ids, with every step's logits."""
    return backend.model.generate(
        **inputs,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=sorted(backend.eos_token_ids),
        pad_token_id=backend.tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )


@pytest.fixture
def frames() -> np.ndarray:
    return make_frames(6)


@pytest.fixture(scope="session")
def backend_196(backend):
    """The tiny language model behind the real 384 px vision geometry: 196 tokens per frame."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    from mukv.backends.llava_onevision import LlavaOnevisionBackend
    from mukv.video.preprocess import FramePreprocessor

    tiny = backend.model.config
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=384, patch_size=14
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=tiny.text_config,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_token_index=tiny.image_token_index,
        video_token_index=tiny.video_token_index,
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    # Same language model weights as the tiny backend, so answers are comparable.
    model.model.language_model.load_state_dict(backend.model.model.language_model.state_dict())
    model.lm_head.load_state_dict(backend.model.lm_head.state_dict())
    return LlavaOnevisionBackend(model.eval(), backend.tokenizer, FramePreprocessor(size=384), model_id="geometry-384")


def recount_stored_bytes(store) -> int:
    """The bytes a byte budget counts, from scratch: every non-provisional record's ``nbytes`` of
    ``store`` (a ``BlockStore``), each checked against its payload and representative, so that a
    stale record cannot hide a stale running count."""
    total = 0
    for record in store.records():
        held = store.payload(record.block_id).nbytes + store.representative(record.block_id).nbytes
        assert record.nbytes == held
        if not record.provisional:
            total += record.nbytes
    return total
