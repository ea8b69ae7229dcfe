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
    if not LEGACY_CHECKPOINT.is_dir():
        pytest.skip(f"shared legacy checkpoint not found at {LEGACY_CHECKPOINT}")
    return LEGACY_CHECKPOINT


def make_frames(n: int, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """Random uint8 frames [n, H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.fixture
def frames() -> np.ndarray:
    return make_frames(6)
