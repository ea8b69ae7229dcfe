"""InfiniPot-V (``infinipot``) on the tiny models: lossless below its cap, bounded above it, and
keeping exactly what its scores select, at the positions the tokens were computed at.

The selection is checked against a plain re-computation of the spec (``docs/peers.md``): loops over
heads and tokens, ``torch.nn.functional.cosine_similarity`` for TaR, value norms for VaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mukv import StreamSession
from mukv.errors import StreamError
from mukv.memory import Query, create_memory, method_config
from mukv.memory.infinipot import InfiniPotConfig
from tests.conftest import make_frames
from tests.integration import qwen_helpers as shared
from tests.integration.qwen_helpers import FPS, QUESTION, load_tiny, stream

# First compression before unit 9 (the region holds 8 units), then every 4 units; TaR keeps the
# newest unit whole and picks 16 older tokens of the 32 it chooses, VaN the other 32.
SELECTING = {"max_units": 8, "keep_units": 4, "recent_ratio": 0.125, "tar_ratio": 0.5}


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    """A tiny Qwen2.5-VL: 56 x 84 px frames, 6 tokens per unit of two frames, M-RoPE."""
    from mukv.backends.tiny_qwen import build_tiny_qwen

    return load_tiny(build_tiny_qwen(tmp_path_factory.mktemp("qwen2_5_vl"), "qwen2_5_vl"), (56, 84))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3-VL: 64 x 96 px frames, 6 visual tokens per unit plus its timestamp text, DeepStack."""
    from mukv.backends.tiny_qwen import build_tiny_qwen3

    return load_tiny(build_tiny_qwen3(tmp_path_factory.mktemp("qwen3_vl")), (64, 96))


def feed_units(memory, features: torch.Tensor, first: int = 0) -> None:
    """Ingest units ``features [U, P, w]`` one at a time, unit ``i`` at ``2 i`` seconds."""
    for i in range(features.shape[0]):
        memory.ingest(features[i : i + 1], np.array([2.0 * (first + i)]))


def unit_length(backend, stamp: float) -> int:
    """Tokens a unit stamped ``stamp`` takes in a cache: its visual tokens and the text around it."""
    return backend.tokens_per_frame + sum(backend.tokenize(t).shape[1] for t in backend.unit_text(stamp) if t)


def reference_keep(keys, values, unit, patch, recent_units, budget, tar_budget) -> list[list[int]]:
    """The spec's choice for one layer, per KV head: indices into the region (``keys``/``values``
    ``[Hkv, L, D]``, ``unit``/``patch`` ``[Hkv, L]``), ``recent_units`` the units TaR compares with."""
    chosen = []
    for h in range(keys.shape[0]):
        tokens = range(keys.shape[1])
        recent = [i for i in tokens if int(unit[h, i]) in recent_units and patch[h, i] >= 0]
        kept = set()
        if tar_budget:
            kept = set(recent)
            scores = {}
            for i in tokens:
                if i in kept or patch[h, i] < 0:
                    continue
                same_patch = [j for j in recent if patch[h, j] == patch[h, i]]
                sims = [torch.nn.functional.cosine_similarity(keys[h, i], keys[h, j], dim=0) for j in same_patch]
                scores[i] = -torch.stack(sims).mean().item()
            kept |= set(sorted(scores, key=scores.get, reverse=True)[: tar_budget - len(recent)])
        norms = {i: values[h, i].norm().item() for i in tokens if i not in kept}
        kept |= set(sorted(norms, key=norms.get, reverse=True)[: budget - len(kept)])
        chosen.append(sorted(kept))
    return chosen


def snapshot(memory) -> list[tuple[torch.Tensor, ...]]:
    """Per layer: the region's keys, values ``[Hkv, L, D]`` and unit, patch ``[Hkv, L]`` (the stored
    tensors are never written in place, so references are a snapshot)."""
    init = memory.stats().tokens["init"]
    return [
        (memory._region.keys[i][0, :, init:], memory._region.values[i][0, :, init:], *memory.kept(i))
        for i in range(len(memory._region.keys))
    ]


# ------------------------------------------------------------------------------ equals full below the cap


@pytest.mark.parametrize("chunks", [[6], [2, 3, 1]])
def test_with_a_cap_above_the_stream_it_equals_full(backend, chunks):
    frames = make_frames(6, seed=31)
    answers = {}
    for method in ("full", "infinipot"):
        session = StreamSession(backend, method)
        start = 0
        for size in chunks:
            session.ingest(frames[start : start + size], np.arange(start, start + size) * 2.0)
            start += size
        answers[method] = session.ask(QUESTION, max_new_tokens=6, output_logits=True)
    full, infinipot = answers["full"], answers["infinipot"]
    assert torch.equal(infinipot.first_logits, full.first_logits)
    assert infinipot.token_ids == full.token_ids
    assert infinipot.context_tokens == full.context_tokens
    assert [b.first_frame for b in infinipot.retrieved] == list(range(6))


@pytest.mark.parametrize("family", ["qwen25", "qwen3"])
@pytest.mark.parametrize("count", [8, 7])
def test_qwen_with_a_cap_above_the_stream_equals_full(request, family, count):
    """Units of two frames with M-RoPE (and Qwen3-VL's timestamp text and DeepStack); with an odd
    frame count the question comes between the frames of a unit (answered from a provisional one)."""
    backend = request.getfixturevalue(family)
    frames = make_frames(count, seed=32)
    _, full = stream(backend, frames, [3, count - 3])
    session, answer = stream(backend, frames, [3, count - 3], "infinipot")
    assert (answer.first_logits - full.first_logits).abs().max().item() < 1e-5
    assert answer.token_ids == full.token_ids
    assert session.memory.compressions == 0 and session.stats().frames == count // 2


# ------------------------------------------------------------------------------ bounded by the cap


@pytest.mark.parametrize("family", ["backend", "qwen3"])
def test_stored_tokens_never_exceed_the_cap_and_stats_are_exact(request, family):
    backend = request.getfixturevalue(family)
    # A tiny Qwen3-VL unit is 6 visual tokens and 13 of text: it fits between keep and cap (36 tokens).
    overrides = {"max_units": 12, "keep_units": 6, "recent_ratio": 0.1, "tar_ratio": 0.75}
    memory = create_memory("infinipot", backend, overrides=overrides, fps=FPS)
    p = backend.tokens_per_frame
    per_token = backend.text.kv_bytes_per_token(backend.dtype)
    features = backend.encode_frames(make_frames(6 * backend.layout.frames_per_unit, seed=33))
    units, compressed = 0, []
    for size in [3, 1, 5, 2, 7, 4, 6, 3, 9]:  # 40 units, in uneven pieces
        chunk = features[torch.arange(size) % features.shape[0]]
        memory.ingest(chunk, np.arange(units, units + size) * 2.0 + 1.0)
        units += size
        stats = memory.stats()
        region = stats.tokens["frame"]
        assert region <= memory.cap_tokens == 12 * p
        for layer in range(backend.text.num_layers):
            keys = memory._region.keys[layer]
            assert keys.shape[2] == stats.tokens["init"] + region
            assert memory.kept(layer)[0].shape == (backend.text.num_kv_heads, region)
        assert stats.bytes["init"] + stats.bytes["frame"] == memory._region.kv_bytes
        assert stats.bytes["frame"] == region * per_token
        assert stats.frames == units
        compressed.append(memory.compressions)
    assert compressed[-1] >= 4 and compressed == sorted(compressed)
    if not memory.units_have_text:
        # The release's schedule: a block of 12 units, then blocks of 12 - 6; compression before the unit
        # that does not fit, so after ``n`` units ``ceil((n - 12) / 6)`` compressions have run.
        counts = np.cumsum([3, 1, 5, 2, 7, 4, 6, 3, 9])
        assert compressed == [max(0, math.ceil((n - 12) / 6)) for n in counts]
    query = Query(text=QUESTION, ids=backend.tokenize(QUESTION), time=float(units * 2 - 1))
    memory.materialize(query.time)
    context = memory.prepare(query)
    assert context.context_tokens == stats.tokens["init"] + stats.tokens["frame"]
    assert context.retrieved[-1].last_frame == units - 1


# ------------------------------------------------------------------------------ what is kept, and where


# Qwen3-VL: 6 visual tokens and 13 of text a unit; 36 tokens kept, TaR choosing 27 of them. Two
# recent units, but after the first compression only one unit fits before the next: TaR then
# compares with that one alone.
WITH_TEXT = {"max_units": 12, "keep_units": 6, "recent_ratio": 0.17, "tar_ratio": 0.75}


@pytest.mark.parametrize(
    ("family", "overrides", "units"),
    [
        ("backend", SELECTING, 13),
        ("backend", {**SELECTING, "tar_ratio": 0.0}, 13),
        ("backend", {**SELECTING, "tar_ratio": 1.0, "recent_ratio": 0.25}, 13),
        ("qwen3", WITH_TEXT, 7),
    ],
    ids=["tar+van", "van", "tar", "qwen3-text"],
)
def test_kept_tokens_are_the_ones_the_scores_select(request, family, overrides, units):
    """Every compression of a stream fed unit by unit keeps what the spec's scores select: the
    first on whole units, later ones on kept tokens of earlier units too (compared with the recent
    units' keys at their own patch), and with Qwen3-VL's text around units (VaN alone ranks it)."""
    backend = request.getfixturevalue(family)
    config = InfiniPotConfig(**overrides)
    memory = create_memory("infinipot", backend, config=config, fps=FPS)
    budget = config.keep_units * backend.tokens_per_frame
    tar_budget = budget - round((1 - config.tar_ratio) * budget) if config.tar_ratio else 0
    features = backend.encode_frames(make_frames(units * backend.layout.frames_per_unit, seed=34))
    since, checked = 0, 0
    for u in range(units):
        region = memory.stats().tokens["frame"]
        length = unit_length(backend, 2.0 * u)
        triggers = region + length > memory.cap_tokens
        before = snapshot(memory)
        feed_units(memory, features[u : u + 1], first=u)
        assert memory.unit_tokens(u) == length
        if not triggers:
            assert memory.stats().tokens["frame"] == region + length
            continue
        # The recent units: the newest recent_units ones, among those added since the last compression.
        recent = set(range(max(u - config.recent_units, since), u))
        since, checked = u, checked + 1
        init = memory.stats().tokens["init"]
        for layer, (keys, values, unit, patch) in enumerate(before):
            expected = reference_keep(keys, values, unit, patch, recent, budget, tar_budget)
            kept_unit, kept_patch = memory.kept(layer)
            kept_keys = memory._region.keys[layer][0, :, init : init + budget]
            for h, indices in enumerate(expected):
                index = torch.tensor(indices)
                assert kept_unit[h, :budget].tolist() == unit[h, index].tolist()
                assert kept_patch[h, :budget].tolist() == patch[h, index].tolist()
                # Kept keys are the stored ones, not moved to new positions.
                assert torch.equal(kept_keys[h], keys[h, index])
            # The unit that did not fit follows, whole, in every head.
            assert kept_unit.shape[1] == budget + length and kept_unit[:, budget:].eq(u).all()
    assert checked >= 2 and memory.compressions == checked


def test_kept_tokens_keep_their_positions_and_the_question_follows_the_stream(backend):
    """After a compression, every layer's kept keys are ``full``'s at the same stream index (computed
    once, never moved), later units' first-layer keys are ``full``'s (placed where the uncompressed
    stream puts them), and the question continues at ``full``'s cursor, not after the cache length."""
    features = backend.encode_frames(make_frames(10, seed=35))
    full = create_memory("full", backend)
    memory = create_memory("infinipot", backend, overrides=SELECTING)
    for m in (full, memory):
        feed_units(m, features)
    assert memory.compressions == 1
    init, p = full.stats().tokens["init"], backend.tokens_per_frame
    for layer in range(backend.text.num_layers):
        unit, patch = memory.kept(layer)
        # Stream index of each kept token (every one is visual here), per head, as a gather index.
        index = (unit * p + patch).long()[..., None].expand(-1, -1, backend.text.head_dim)
        stored = memory._region.keys[layer][0, :, init:]
        at_index = full._cache.layers[layer].keys[0, :, init:].gather(1, index)
        compressed = memory.keep_tokens
        assert torch.equal(stored[:, :compressed], at_index[:, :compressed])
        if layer == 0:
            assert (stored[:, compressed:] - at_index[:, compressed:]).abs().max().item() < 1e-5
    query = Query(text=QUESTION, ids=backend.tokenize(QUESTION), time=18.0)
    contexts = []
    for m in (full, memory):
        m.materialize(query.time)
        contexts.append(m.prepare(query))
    assert contexts[1].next_position == contexts[0].next_position == init + 10 * p
    assert contexts[1].context_tokens == init + memory.keep_tokens + 2 * p < contexts[0].context_tokens


def test_every_position_comes_from_the_backends_scheme_across_compressions():
    """On the shipped (trained) tiny model, whose answers depend on where tokens sit: moving every
    position by 64 leaves the answer after two compressions unchanged up to rounding (TaR's cosines
    of rotated keys depend only on differences of positions); moving text but not visual tokens
    changes it. So nothing is placed by a rule of the method's own."""
    from mukv.backends import load_backend
    from tests.integration.test_architecture import OffsetPositions, _backend_with

    trained = load_backend("mukv-tiny")
    features = trained.encode_frames(make_frames(8, height=112, width=112, seed=41))
    inv_freq = trained.positions.inv_freq.float()

    def first_logits(backend) -> torch.Tensor:
        session = StreamSession(backend, "infinipot", overrides={"max_units": 4, "keep_units": 2})
        session.memory.ingest(features, np.arange(8) * 2.0)
        assert session.memory.compressions == 2
        return session.ask(QUESTION, max_new_tokens=1, output_logits=True).first_logits

    reference = first_logits(trained)
    moved = first_logits(_backend_with(trained, OffsetPositions(inv_freq, 64)))
    assert (moved - reference).abs().max().item() < 1e-3
    broken = first_logits(_backend_with(trained, OffsetPositions(inv_freq, 64, text_only=True)))
    assert (broken - reference).abs().max().item() > 1e-2


def test_qwen_kept_keys_keep_their_mrope_positions(qwen25):
    """The same on M-RoPE: the region's first-layer keys equal ``full``'s at each kept token's index."""
    features = qwen25.encode_frames(make_frames(14, seed=36))
    overrides = {"max_units": 4, "keep_units": 2, "recent_ratio": 0.25, "tar_ratio": 0.5}
    full = create_memory("full", qwen25, fps=FPS)
    memory = create_memory("infinipot", qwen25, overrides=overrides, fps=FPS)
    for m in (full, memory):
        feed_units(m, features)
    assert memory.compressions == 2
    init, p = full.stats().tokens["init"], qwen25.tokens_per_frame
    unit, patch = memory.kept(0)
    index = (unit * p + patch).long()
    stored = memory._region.keys[0][0, :, init:]
    reference = full._cache.layers[0].keys[0, :, init:]
    dim = reference.shape[-1]
    assert (reference.gather(1, index[..., None].expand(-1, -1, dim)) - stored).abs().max().item() < 1e-5


def test_a_question_between_the_frames_of_a_unit_changes_no_state(qwen25):
    """A question after an odd frame whose provisional unit does not fit: the answer's copy is
    compressed as the stored memory is once the unit arrives (same logits), and nothing is stored."""
    overrides = {"max_units": 2, "keep_units": 1, "recent_ratio": 0.5, "tar_ratio": 1.0}
    frames, times, asked, never, _, _ = shared.ask_between_the_frames_of_a_group(qwen25, "infinipot", overrides, 0.5)
    assert asked.memory.compressions == never.memory.compressions == 0
    for session in (asked, never):
        session.ingest(frames[5:], times[5:])
    assert asked.memory.compressions == never.memory.compressions == 2
    shared.check_later_answers_equal(asked, never)


def test_a_question_before_the_newest_frame_is_refused(backend):
    memory = create_memory("infinipot", backend, overrides=SELECTING)
    feed_units(memory, backend.encode_frames(make_frames(3, seed=37)))
    query = Query(text=QUESTION, ids=backend.tokenize(QUESTION), time=2.0)
    memory.materialize(query.time)
    with pytest.raises(StreamError, match="before the newest frame"):
        memory.prepare(query)


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_units": "1"}, "max_units"),
        ({"keep_units": "32"}, "keep_units"),
        ({"keep_units": "0"}, "keep_units"),
        ({"tar_ratio": "1.5"}, "tar_ratio"),
        ({"recent_ratio": "0"}, "recent_ratio"),
        ({"recent_ratio": "0.01"}, "recent_ratio"),  # no recent unit
        ({"recent_ratio": "0.5"}, "recent_ratio"),  # 16 recent units > 32 - 24 added between compressions
        ({"prefill_chunk_tokens": "0"}, "prefill_chunk_tokens"),
        ({"max_units": "many"}, "max_units"),
    ],
)
def test_invalid_options_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        method_config("infinipot", overrides)


def test_options_that_only_fail_on_a_model_name_the_field(backend, qwen3):
    # 2 recent units (32 tokens) do not fit TaR's 8 of the 16 kept (tiny LLaVA-OneVision: 16 tokens a frame).
    with pytest.raises(ValueError, match=r"^recent_ratio:"):
        create_memory("infinipot", backend, overrides={"max_units": 4, "keep_units": 1, "recent_ratio": 0.5})
    # A Qwen3-VL unit (6 visual tokens and its text) is more than the 6 tokens between keep and cap.
    memory = create_memory("infinipot", qwen3, overrides={"max_units": 3, "keep_units": 2, "tar_ratio": 0}, fps=FPS)
    with pytest.raises(ValueError, match=r"^max_units:"):
        memory.ingest(qwen3.encode_frames(make_frames(2, seed=38)), np.array([1.0]))
    assert memory.frames == 0 and memory.stats().tokens["frame"] == 0


def test_the_method_is_chosen_by_name_with_string_options(backend):
    config = method_config("infinipot", {"max_units": "6", "keep_units": "3", "tar_ratio": "0.25"})
    assert (config.max_units, config.keep_units, config.tar_ratio, config.recent_ratio) == (6, 3, 0.25, 0.25)
    session = StreamSession(backend, "infinipot", overrides={"max_units": "4", "keep_units": "2"})
    session.ingest(make_frames(6, seed=39), np.arange(6.0))
    answer = session.ask(QUESTION, max_new_tokens=2)
    assert answer.method == "infinipot" and session.memory.compressions == 1
    # Before the fifth frame the 4 frames were compressed to 2 frames' worth; the fifth and sixth follow.
    assert answer.memory.tokens["frame"] == 4 * backend.tokens_per_frame
