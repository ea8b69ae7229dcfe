"""Every method answers on CUDA with the same tokens as on CPU (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from mukv import StreamSession
from mukv.backends import load_backend
from mukv.memory import available_methods
from tests.conftest import make_frames


@pytest.mark.gpu
@pytest.mark.parametrize("method", available_methods())
def test_method_answers_on_cuda_like_on_cpu(tiny_model_dir, backend, method):
    gpu = load_backend(tiny_model_dir, device="cuda", dtype="float32")
    frames = make_frames(9, seed=41)
    answers = []
    for model in (backend, gpu):
        session = StreamSession(model, method)
        session.ingest(frames, np.arange(9.0))
        answers.append(session.ask("What is shown?", max_new_tokens=4, output_logits=True))
    cpu, cuda = answers
    assert cuda.context_tokens == cpu.context_tokens
    assert [b.first_frame for b in cuda.retrieved] == [b.first_frame for b in cpu.retrieved]
    assert (cuda.first_logits - cpu.first_logits).abs().max().item() < 1e-3
