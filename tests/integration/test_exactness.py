"""Reference equivalence: the streaming ``full`` method equals plain transformers.

These compare against ``LlavaOnevisionForConditionalGeneration`` itself (its own forward and its
own ``generate``), not against the backend's code path, so a wrong position, mask or cache
plumbing in the streaming path makes them fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mukv import StreamSession
from mukv.engine.generate import greedy_decode
from mukv.memory import Query
from tests.conftest import greedy_generate, make_frames

QUESTION = "What colour was the triangle?"


def reference_embeddings(backend, frames: np.ndarray, question: str, choices=None) -> torch.Tensor:
    """[1, n, d]: system prompt, every frame's visual tokens in order, question prompt."""
    system = backend.embed_ids(backend.tokenize(backend.prompts.system))
    visual = backend.encode_frames(frames).reshape(1, -1, backend.text.hidden_size)
    prompt = backend.embed_ids(backend.tokenize(backend.prompts.render_question(question, choices)))
    return torch.cat([system, visual, prompt], dim=1)


def stream_answer(backend, frames, chunks, method="full", max_new_tokens=6, **kw):
    session = StreamSession(backend, method, **kw)
    start = 0
    for size in chunks:
        session.ingest(frames[start : start + size], np.arange(start, start + size, dtype=float) * 2.0)
        start += size
    assert start == len(frames)
    return session.ask(QUESTION, max_new_tokens=max_new_tokens, output_logits=True)


@torch.inference_mode()
def test_full_first_logits_equal_plain_forward(backend):
    frames = make_frames(5)
    answer = stream_answer(backend, frames, [5])
    embeds = reference_embeddings(backend, frames, QUESTION)
    reference = backend.model(inputs_embeds=embeds).logits[0, -1].float()
    assert (
        answer.context_tokens + backend.tokenize(backend.prompts.render_question(QUESTION)).shape[1] == embeds.shape[1]
    )
    assert (answer.first_logits - reference).abs().max().item() < 1e-4


@torch.inference_mode()
def test_multiple_choice_first_logits_equal_a_plain_forward_over_the_lettered_options(backend):
    """The options are in the prompt the model reads: dropping them changes the logits."""
    frames = make_frames(3)
    choices = ["a red square", "a blue circle", "a green star"]
    session = StreamSession(backend, "full")
    session.ingest(frames, np.arange(3) * 2.0)
    answer = session.ask(QUESTION, choices, max_new_tokens=2, output_logits=True)
    embeds = reference_embeddings(backend, frames, QUESTION, choices)
    reference = backend.model(inputs_embeds=embeds).logits[0, -1].float()
    assert (answer.first_logits - reference).abs().max().item() < 1e-4
    without = backend.model(inputs_embeds=reference_embeddings(backend, frames, QUESTION)).logits[0, -1].float()
    assert (answer.first_logits - without).abs().max().item() > 1e-3  # the test can tell the two prompts apart


@torch.inference_mode()
def _decoding_error(backend, decode_backend, frames, max_new=12) -> tuple[float, list[int]]:
    """Max |logit difference| over every decoding step between the session's cache decoded by
    ``decode_backend`` and ``generate()`` on the plain model, and the number of steps compared.
    Token mismatches count as an error of 1."""
    session = StreamSession(backend, "full")
    session.ingest(frames, np.arange(len(frames)) * 2.0)
    session.memory.materialize(session.time)
    context = session.memory.prepare(Query(text=QUESTION, ids=backend.tokenize(QUESTION), time=session.time))
    prompt_ids = backend.tokenize(backend.prompts.render_question(QUESTION))
    steps: list[torch.Tensor] = []
    tokens = list(greedy_decode(decode_backend, context.cache, prompt_ids, context.next_position, max_new, steps))
    embeds = reference_embeddings(backend, frames, QUESTION)
    out = greedy_generate(
        backend, max_new, inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)
    )
    if tokens != out.sequences[0].tolist():
        return 1.0, tokens
    errors = [(mine - theirs[0].float()).abs().max().item() for mine, theirs in zip(steps, out.logits, strict=True)]
    return max(errors), tokens


def test_full_greedy_decoding_equals_generate(backend):
    """Tokens and every step's logits of the session's decoding equal ``generate()``."""
    frames = make_frames(4, seed=3)
    error, tokens = _decoding_error(backend, backend, frames)
    assert len(tokens) >= 4, "the check needs several decoding steps"
    assert error < 1e-4
    session = StreamSession(backend, "full")
    session.ingest(frames, np.arange(4) * 2.0)
    answer = session.ask(QUESTION, max_new_tokens=12)
    assert list(answer.token_ids) == [t for t in tokens if t not in backend.eos_token_ids]


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1, 1], [2, 3, 1], [4, 2]])
def test_chunked_ingestion_equals_one_shot(backend, chunks):
    frames = make_frames(6, seed=1)
    whole = stream_answer(backend, frames, [6])
    chunked = stream_answer(backend, frames, chunks)
    assert (whole.first_logits - chunked.first_logits).abs().max().item() < 1e-4
    assert whole.token_ids == chunked.token_ids


def test_prefill_chunk_size_does_not_change_answers(backend):
    frames = make_frames(4, seed=2)
    big = stream_answer(backend, frames, [4])
    small = stream_answer(backend, frames, [4], overrides={"prefill_chunk_tokens": 7})
    assert (big.first_logits - small.first_logits).abs().max().item() < 1e-4


def test_uniform_with_every_frame_equals_full(backend):
    frames = make_frames(5, seed=4)
    full = stream_answer(backend, frames, [2, 3])
    uniform = stream_answer(backend, frames, [2, 3], method="uniform", overrides={"num_frames": 8})
    assert (full.first_logits - uniform.first_logits).abs().max().item() < 1e-4
    assert full.token_ids == uniform.token_ids


@torch.inference_mode()
def test_uniform_subset_equals_plain_forward_over_sampled_frames(backend):
    frames = make_frames(9, seed=5)
    answer = stream_answer(backend, frames, [9], method="uniform", overrides={"num_frames": 3})
    used = [block.first_frame for block in answer.retrieved]
    assert used == [0, 4, 8]
    embeds = reference_embeddings(backend, frames[used], QUESTION)
    reference = backend.model(inputs_embeds=embeds).logits[0, -1].float()
    assert (answer.first_logits - reference).abs().max().item() < 1e-4


def test_stored_cache_is_unchanged_by_asking(backend):
    frames = make_frames(3, seed=6)
    session = StreamSession(backend, "full")
    session.ingest(frames, [0.0, 1.0, 2.0])
    first = session.ask(QUESTION, max_new_tokens=5, output_logits=True)
    second = session.ask(QUESTION, max_new_tokens=5, output_logits=True)
    assert torch.equal(first.first_logits, second.first_logits)
    assert first.token_ids == second.token_ids


class _Sabotaged:
    """A backend proxy with broken position plumbing, to show the comparisons above can fail."""

    def __init__(self, inner, mode: str) -> None:
        self._inner = inner
        self._mode = mode
        self._decode_position: int | None = None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def forward(self, embeds, cache, position_ids, logits="last"):
        if self._mode == "restart" and embeds.shape[1] > 1:
            # Every prefill call starts again right after the system prompt.
            position_ids = position_ids - position_ids[0, 0] + self._inner.system_cache()[1]
        if self._mode == "frozen_decode" and embeds.shape[1] == 1:
            self._decode_position = self._decode_position or int(position_ids[0, 0])
            position_ids = torch.full_like(position_ids, self._decode_position)
        return self._inner.forward(embeds, cache, position_ids, logits)


@torch.inference_mode()
def _max_error_against_generate(backend, frames, chunks, max_new=8) -> float:
    answer = stream_answer(backend, frames, chunks, max_new_tokens=max_new)
    embeds = reference_embeddings(backend, frames, QUESTION)
    out = backend.model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=sorted(backend.eos_token_ids),
        pad_token_id=backend.tokenizer.pad_token_id,
    )[0].tolist()
    reference_first = backend.model(inputs_embeds=embeds).logits[0, -1].float()
    first_error = (answer.first_logits - reference_first).abs().max().item()
    tokens_differ = list(answer.token_ids) != [t for t in out if t not in backend.eos_token_ids][: len(out)]
    return first_error + (1.0 if tokens_differ else 0.0)


def test_reference_comparison_detects_restarted_prefill_positions(backend):
    frames = make_frames(6, seed=9)
    assert _max_error_against_generate(backend, frames, [3, 3]) < 1e-4
    assert _max_error_against_generate(_Sabotaged(backend, "restart"), frames, [3, 3]) > 1e-3


def test_reference_comparison_detects_frozen_decoding_positions(backend):
    frames = make_frames(4, seed=3)
    error, tokens = _decoding_error(backend, _Sabotaged(backend, "frozen_decode"), frames)
    assert len(tokens) >= 3
    assert error > 1e-3
