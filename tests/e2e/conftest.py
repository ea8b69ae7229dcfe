"""Fixtures of the end-to-end tests: a synthetic benchmark and a tiny checkpoint, both written by
the ``mukv`` command itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_cli import mukv


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    result = mukv("make-benchmark", str(root), "--videos", "2", "--duration", "24")
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model") / "tiny"
    assert mukv("tiny-model", str(directory)).returncode == 0
    return directory
