"""The layering contracts: positions come from the backend's scheme only, a method or a model
family is one new module, and the question-time step is explicit."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from mukv import StreamSession
from mukv.backends.positions import RopePositions
from mukv.memory import Query, available_methods, create_memory
from tests.conftest import make_frames

QUESTION = "What colour was the triangle?"
# Small budgets so that every method compresses, retrieves or drops something on 8 frames.
OVERRIDES = {
    "mukv": {"segment_frames": 2},
    "rekv": {"n_local": 48, "retrieve_blocks": 3},
    "recent": {"num_frames": 3},
    "uniform": {"num_frames": 3},
}


class OffsetPositions(RopePositions):
    """1-D RoPE with every position moved by ``offset``: the same model up to rounding (attention
    only sees differences of positions), as long as every position comes from the scheme."""

    def __init__(self, inv_freq: torch.Tensor, offset: int, *, text_only: bool = False) -> None:
        super().__init__(inv_freq)
        self.offset = offset
        self.text_only = text_only

    def text(self, start, n, device="cpu"):
        return super().text(start, n, device) + self.offset

    def visual(self, start, layout, units, device="cpu"):
        positions, cursor = super().visual(start, layout, units, device)  # 1-D visual = text positions
        return positions - (self.offset if self.text_only else 0), cursor

    def block(self, start, layout, units, tokens, device="cpu"):
        positions, cursor = super().block(start, layout, units, tokens, device)
        return positions - (self.offset if self.text_only else 0), cursor

    @staticmethod
    def after(positions):
        raise AssertionError("1-D RoPE methods never need after()")


def _backend_with(backend, positions):
    from mukv.backends.llava_onevision import LlavaOnevisionBackend

    other = LlavaOnevisionBackend(backend.model, backend.tokenizer, backend.preprocessor, model_id="offset")
    other.positions = positions
    return other


def _first_logits(backend, method: str, features) -> torch.Tensor:
    session = StreamSession(backend, method, overrides=OVERRIDES.get(method))
    session.memory.ingest(features, np.arange(features.shape[0]) * 2.0)
    return session.ask(QUESTION, max_new_tokens=1, output_logits=True).first_logits


@pytest.fixture(scope="module")
def trained():
    """The shipped model: trained, so its answers depend on where tokens sit (a random tiny model
    barely does)."""
    from mukv.backends import load_backend

    return load_backend("mukv-tiny")


@pytest.mark.parametrize("method", available_methods())
def test_every_position_comes_from_the_backends_scheme(trained, method):
    """Moving every position by 64 leaves every method's answer unchanged up to rounding; moving
    text but not visual tokens changes it: so no method, nor the decoder, places a token by itself."""
    features = trained.encode_frames(make_frames(8, height=112, width=112, seed=41))
    inv_freq = trained.positions.inv_freq.float()
    reference = _first_logits(trained, method, features)
    moved = _first_logits(_backend_with(trained, OffsetPositions(inv_freq, 64)), method, features)
    assert (moved - reference).abs().max().item() < 1e-4  # logits of about 15; measured <= 3.8e-6
    broken = _first_logits(_backend_with(trained, OffsetPositions(inv_freq, 64, text_only=True)), method, features)
    # Measured >= 2.7e-3 (ReKV, whose 64 retrieved frames barely move the question's logits; the
    # other methods 0.3-2.3): far above what moving everything does.
    assert (broken - reference).abs().max().item() > 1e-3


def _new_module(tmp_path, package, name: str, source: str) -> None:
    """Put ``name.py`` on ``package``'s path, as a file added to the package would be."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    package.__path__.append(str(tmp_path))


def test_a_method_is_one_new_module(tmp_path, backend):
    import mukv.memory
    from mukv.memory import discover_methods, registry

    _new_module(
        tmp_path,
        mukv.memory,
        "newest_frame",
        '''
        from dataclasses import dataclass

        from mukv.memory.base import AnswerContext, MemoryMethod, MemoryStats, prefill_frames
        from mukv.memory.registry import register_method


        @dataclass(frozen=True, kw_only=True)
        class NewestConfig:
            chunk_tokens: int = 64


        @register_method
        class NewestFrame(MemoryMethod):
            """Answers from the newest frame only."""

            name = "newest-frame"
            config_class = NewestConfig

            def _ingest(self, features, timestamps):
                self._last = features[-1:].clone()

            def prepare(self, query):
                cache, cursor = self.backend.system_cache()
                cursor = prefill_frames(self.backend, cache, self._last, cursor, self.config.chunk_tokens)
                length = cache.get_seq_length()
                return AnswerContext(cache, cursor, length, self.frame_blocks([self.frames - 1]))

            def stats(self):
                return MemoryStats(frames=self.frames)
        ''',
    )
    try:
        discover_methods()
        assert "newest-frame" in available_methods()
        session = StreamSession(backend, "newest-frame", overrides={"chunk_tokens": "8"})
        session.ingest(make_frames(3), [0.0, 1.0, 2.0])
        answer = session.ask(QUESTION, max_new_tokens=2)
        assert [b.first_frame for b in answer.retrieved] == [2] and answer.generated_tokens >= 1
    finally:
        mukv.memory.__path__.remove(str(tmp_path))
        registry._METHODS.pop("newest-frame", None)
        sys.modules.pop("mukv.memory.newest_frame", None)


def test_a_model_family_is_one_new_module(tmp_path, tiny_model_dir):
    import mukv.backends
    from mukv.backends import load_backend, registry, supported_model_types
    from mukv.errors import ModelLoadError

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "toy_family"}))
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'toy_family' \(supported: .*llava_onevision"):
        load_backend(checkpoint)
    family = tmp_path / "family"
    family.mkdir()
    _new_module(
        family,
        mukv.backends,
        "toy_family",
        f"""
        from mukv.backends.llava_onevision import LlavaOnevisionBackend
        from mukv.backends.registry import register_backend


        @register_backend("toy_family")
        class ToyBackend(LlavaOnevisionBackend):
            @classmethod
            def from_pretrained(cls, config, *, directory):
                # The toy family reads the tiny LLaVA-OneVision checkpoint's weights.
                return super().from_pretrained(config.__class__(model={str(tiny_model_dir)!r}))
        """,
    )
    try:
        backend = load_backend(checkpoint)
        assert type(backend).__name__ == "ToyBackend" and "toy_family" in supported_model_types()
    finally:
        mukv.backends.__path__.remove(str(family))
        registry._BACKENDS.pop("toy_family", None)
        sys.modules.pop("mukv.backends.toy_family", None)


@pytest.mark.parametrize("method", ["mukv", "rekv"])
def test_prepare_changes_nothing_and_needs_the_question_time_step(backend, method):
    overrides = {"mukv": {"segment_frames": 4}, "rekv": {"block_frames": 4}}[method]
    memory = create_memory(method, backend, overrides=overrides)
    memory.ingest(backend.encode_frames(make_frames(6, seed=42)), np.arange(6.0))
    query = Query(text=QUESTION, ids=backend.tokenize(QUESTION), time=5.0)
    with pytest.raises(RuntimeError, match=r"call materialize\(5.0\) before prepare"):
        memory.prepare(query)
    before = memory.store.records()
    memory.materialize(5.0)
    provisional = [r for r in memory.store.records() if r.provisional]
    assert provisional and all(r.last_frame == 5 for r in provisional)  # the open group, frames 4-5
    held = memory.store.records()
    first = memory.prepare(query)
    second = memory.prepare(query)
    assert memory.store.records() == held  # prepare stored and removed nothing
    assert [r.block_id for r in first.retrieved] == [r.block_id for r in second.retrieved]
    # The cache is the answer's own: writing into it leaves the stored payloads untouched.
    payloads = {r.block_id: memory.store.payload(r.block_id).kv.clone() for r in held}
    with torch.inference_mode():
        for layer in first.cache.layers:
            layer.keys.add_(1.0)
            layer.values.add_(1.0)
    assert all(torch.equal(memory.store.payload(i).kv, kv) for i, kv in payloads.items())
    # The next ingest replaces the provisional blocks.
    memory.ingest(backend.encode_frames(make_frames(1, seed=43)), np.array([6.0]))
    assert not any(r.provisional for r in memory.store.records())
    assert {r.block_id for r in before} <= {r.block_id for r in memory.store.records()}


def test_restored_blocks_answer_like_ingested_ones(backend):
    """``restore`` adopts encoded blocks and the clock: a memory rebuilt from another's blocks
    retrieves the same blocks and gives the same first logits."""
    from mukv.memory.blocks import EncodedBlock

    features = backend.encode_frames(make_frames(8, seed=44))
    times = np.arange(8.0) * 2.0
    original = StreamSession(backend, "mukv", overrides={"segment_frames": 4})
    original.memory.ingest(features, times)
    store = original.memory.store
    blocks = [
        EncodedBlock(
            r.granularity,
            r.first_frame,
            r.last_frame,
            r.part,
            r.start_time,
            r.end_time,
            store.payload(r.block_id),
            store.representative(r.block_id),
        )
        for r in store.records()
    ]
    copy = StreamSession(backend, "mukv", overrides={"segment_frames": 4})
    with pytest.raises(ValueError, match="outside the adopted frames 0-6"):
        copy.memory.restore(blocks, times[:7])
    assert copy.memory.frames == 0 and len(copy.memory.store) == 0  # nothing was adopted
    copy.memory.restore(blocks, times)
    a = original.ask(QUESTION, max_new_tokens=1, output_logits=True)
    b = copy.ask(QUESTION, max_new_tokens=1, output_logits=True)
    assert [(r.granularity, r.first_frame, r.tokens) for r in a.retrieved] == [
        (r.granularity, r.first_frame, r.tokens) for r in b.retrieved
    ]
    assert torch.equal(a.first_logits, b.first_logits)
    with pytest.raises(ValueError, match="strictly increasing"):
        copy.memory.restore([], [times[-1]])


def test_restored_full_cache_answers_like_the_ingested_one(backend):
    """``FullMemory.restore`` adopts another cache's visual KV run by run: questions at the end and
    in the middle of the stream give the same first logits as the memory that ingested the frames,
    and a refused restore (wrong shapes, timestamps not after the stream's time) changes nothing."""
    features = backend.encode_frames(make_frames(8, seed=45))
    times = np.arange(8.0) * 2.0
    original = StreamSession(backend, "full")
    original.memory.ingest(features[:5], times[:5])
    original.memory.ingest(features[5:], times[5:])
    init = original.memory._init_len
    per_frame = backend.tokens_per_frame

    def frames_kv(first: int, last: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        span = slice(init + first * per_frame, init + last * per_frame)
        return [(layer.keys[:, :, span], layer.values[:, :, span]) for layer in original.memory._cache.layers]

    copy = StreamSession(backend, "full")
    copy.memory.restore(frames_kv(0, 5), times[:5])
    with pytest.raises(ValueError, match="expected"):
        copy.memory.restore(frames_kv(5, 7), times[5:])
    with pytest.raises(ValueError, match="strictly increasing"):
        copy.memory.restore(frames_kv(5, 8), times[2:5])
    assert copy.memory.frames == 5 and copy.memory._cache.get_seq_length() == init + 5 * per_frame
    copy.memory.restore(frames_kv(5, 8), times[5:])
    # Mid-stream (a cursor inside the first run, and inside the second) and at the end.
    for at in (times[3], times[6]):
        query = Query(text=QUESTION, ids=backend.tokenize(QUESTION), time=float(at))
        a, b = original.memory.prepare(query), copy.memory.prepare(query)
        assert (a.next_position, a.context_tokens) == (b.next_position, b.context_tokens)
        assert all(torch.equal(x.keys, y.keys) for x, y in zip(a.cache.layers, b.cache.layers, strict=True))
    a = original.ask(QUESTION, max_new_tokens=1, output_logits=True)
    b = copy.ask(QUESTION, max_new_tokens=1, output_logits=True)
    assert a.frames_seen == b.frames_seen == 8
    assert torch.equal(a.first_logits, b.first_logits)
