"""The ``slow`` marker as configured in pyproject.toml: the default run (``make test``, CI) leaves
slow tests out, ``-m slow`` (``make test-slow``) selects only them and ``make test-all``'s
expression selects both. Checked by collecting a two-test file with the project's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
EXAMPLE = """
import pytest


@pytest.mark.slow
def test_slow():
    pass


def test_fast():
    pass
"""


@pytest.mark.parametrize(
    ("options", "selected"),
    [([], ["test_fast"]), (["-m", "slow"], ["test_slow"]), (["-m", "slow or not slow"], ["test_fast", "test_slow"])],
    ids=["default", "make-test-slow", "make-test-all"],
)
def test_slow_tests_are_left_out_unless_asked_for(pytester, options, selected):
    pytester.makepyfile(test_example=EXAMPLE)
    result = pytester.runpytest_inprocess(
        "-c", str(PYPROJECT), "--rootdir", str(pytester.path), "-p", "no:cacheprovider", "--collect-only", "-q",
        *options,
    )  # fmt: skip
    assert result.ret == 0, result.outlines
    collected = sorted(line.rpartition("::")[2] for line in result.outlines if "::" in line)
    assert collected == selected, result.outlines
