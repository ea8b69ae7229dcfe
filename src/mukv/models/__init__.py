"""Checkpoints shipped inside the package, addressable by name (``--model mukv-tiny``).

``mukv-tiny`` is a 3.5M-parameter LLaVA-OneVision (SigLIP + Qwen2, the real classes) trained on
the synthetic streams of :mod:`mukv.video.streams`; see its ``README.md`` (the model card)
for how it was trained and what it answers correctly.
"""

from __future__ import annotations

from pathlib import Path

from mukv.errors import ModelLoadError

_ROOT = Path(__file__).resolve().parent
SHIPPED_MODELS: tuple[str, ...] = ("mukv-tiny",)
# What loading needs; a partial installation is reported by name instead of failing later.
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
)


def shipped_model_dir(name: str) -> Path | None:
    """The directory of the shipped checkpoint ``name``, or ``None`` if ``name`` is not one.

    Raises :class:`ModelLoadError` if ``name`` is shipped but its files are missing (a broken or
    partial installation).
    """
    if name not in SHIPPED_MODELS:
        return None
    directory = _ROOT / name
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        raise ModelLoadError(
            f"model {name!r} ships with mukv but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"missing under {directory}: the installation is incomplete; reinstall mukv from its source "
            "(for a checkout: pip install --force-reinstall -e .)"
        )
    return directory
