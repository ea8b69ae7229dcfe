"""The transformers API this package is written against, in one place.

Supported: transformers >= 5.24, < 6 (the floor the tests run on). 5.24 renamed the model
forward's ``past_key_values`` keyword to ``cache``; older releases swallow ``cache=`` silently
in ``**kwargs`` and answer with no video context, so an older release is refused at once
(:func:`check_transformers`), and every forward checks that the cache grew by the tokens passed
in (:func:`check_cache_grew`), so that a future silent change fails loudly too.

Public APIs used elsewhere: ``DynamicCache`` (and its ``layers[i].keys/values``, ``crop``,
``get_seq_length``; a cache is assembled by setting its ``layers`` list, because building one from
``ddp_cache_data`` copies every tensor), ``DynamicLayer`` (subclassed by
:class:`mukv.kv.cache.GrowingLayer`, whose layers grow in place: ``lazy_initialization``,
``update``, ``keys``/``values``), ``AttentionInterface`` /
``AttentionMaskInterface`` registration, the LLaVA-OneVision / Qwen2 model classes and
``AutoConfig`` / ``AutoTokenizer``.

Internal modules still used, and why (re-exported here so that a move is one edit):

- ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` and ``repeat_kv``: attention
  hooks (scoring, ReKV's per-layer retrieval) call the very kernel an unhooked forward runs, so a
  hooked forward's outputs stay identical to a plain one; no public entry point exposes it.
- ``transformers.masking_utils.sdpa_mask``: the mask function registered next to the hooked
  attention under its own name; without it chunked prefill would lose causality. Not exported at
  the top level.
"""

from __future__ import annotations

import transformers
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

__all__ = [
    "MIN_TRANSFORMERS",
    "check_cache_grew",
    "check_transformers",
    "repeat_kv",
    "sdpa_attention_forward",
    "sdpa_mask",
]

MIN_TRANSFORMERS = (5, 24)


def _version(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``5.24.0`` or ``5.30.0.dev0``."""
    major, _, rest = text.partition(".")
    minor = rest.partition(".")[0]
    return int("".join(ch for ch in major if ch.isdigit()) or 0), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_transformers(version: str | None = None) -> None:
    """Raise ``ImportError`` naming the fix when the installed transformers is older than the floor."""
    found = version or transformers.__version__
    if _version(found) < MIN_TRANSFORMERS:
        floor = ".".join(map(str, MIN_TRANSFORMERS))
        raise ImportError(
            f"mukv needs transformers >= {floor} (found {found}): older releases ignore the model forward's "
            f"`cache` argument and would answer without the video. Upgrade: pip install 'transformers>={floor},<6'"
        )


def check_cache_grew(cache: DynamicCache, before: int, added: int) -> None:
    """Raise ``RuntimeError`` unless ``cache`` holds at least ``before + added`` tokens after a
    forward (an attention hook may insert more: ReKV's retrieval adds the blocks it picks)."""
    after = cache.get_seq_length()
    if after < before + added:
        raise RuntimeError(
            f"the model forward did not extend the cache ({before} + {added} tokens expected, {after} held): "
            f"transformers {transformers.__version__} may have changed its forward API"
        )


check_transformers()  # on import: an older transformers would run without the video context, silently
