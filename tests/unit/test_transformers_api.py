"""The transformers floor and the forward's cache contract fail loudly, never silently."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mukv.backends.transformers_api import MIN_TRANSFORMERS, check_cache_grew, check_transformers


@pytest.mark.parametrize("version", ["5.23.0", "5.0.0", "4.57.1", "5.23.0.dev0"])
def test_an_older_transformers_is_refused_naming_the_fix(version):
    with pytest.raises(ImportError, match=rf"needs transformers >= 5\.24 \(found {version}\).*pip install"):
        check_transformers(version)


@pytest.mark.parametrize("version", ["5.24.0", "5.24.1", "5.30.0.dev0", "5.100.0"])
def test_the_floor_and_newer_are_accepted(version):
    check_transformers(version)
    assert MIN_TRANSFORMERS == (5, 24)


def test_a_forward_that_did_not_extend_the_cache_is_an_error():
    cache = DynamicCache()
    check_cache_grew(cache, 0, 0)
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    check_cache_grew(cache, 0, 3)
    with pytest.raises(RuntimeError, match=r"did not extend the cache \(0 \+ 5 tokens expected, 3 held\)"):
        check_cache_grew(cache, 0, 5)


def test_the_backend_forward_checks_the_cache(backend):
    """A model forward that ignores the cache it is given (as 5.23 does with ``cache=``) is caught."""
    cache, length = backend.system_cache()
    embeds = backend.embed_ids(backend.tokenize("hello"))
    positions = torch.arange(length, length + embeds.shape[1]).unsqueeze(0)
    language_model = backend._lm
    original = language_model.forward

    def forgetful(*args, cache=None, **kwargs):  # what an unknown keyword does on an older release
        return original(*args, cache=DynamicCache(), **kwargs)

    language_model.forward = forgetful
    try:
        with pytest.raises(RuntimeError, match="did not extend the cache"):
            backend.forward(embeds, cache, positions)
    finally:
        del language_model.forward
    assert backend.forward(embeds, cache, positions).shape[-1] > 0
