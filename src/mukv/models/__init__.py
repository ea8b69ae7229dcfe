"""Checkpoints shipped inside the package, addressable by name (``--model mukv-tiny``).

``mukv-tiny`` is a 3.5M-parameter LLaVA-OneVision (SigLIP + Qwen2, the real classes) trained on
the synthetic streams of :mod:`mukv.training.streams`; see its ``README.md`` (the model card)
for how it was trained and what it answers correctly.
"""

from __future__ import annotations

from pathlib import Path

from mukv.errors import ModelLoadError

_ROOT = Path(__file__).resolve().parent
SHIPPED_MODELS: tuple[str, ...] = ("mukv-tiny",)


def shipped_model_dir(name: str) -> Path | None:
    """The directory of the shipped checkpoint ``name``, or ``None`` if ``name`` is not one.

    Raises :class:`ModelLoadError` if ``name`` is shipped but its files are missing (a broken or
    partial installation).
    """
    if name not in SHIPPED_MODELS:
        return None
    directory = _ROOT / name
    missing = [f for f in ("config.json", "model.safetensors") if not (directory / f).is_file()]
    if missing:
        raise ModelLoadError(
            f"model {name!r} ships with mukv but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"missing under {directory}; "
            "reinstall the package (pip install --force-reinstall mukv)"
        )
    return directory
