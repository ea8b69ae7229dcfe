"""``kv_dtype``: stored blocks of ``mukv`` and ``rekv`` quantized (``int8``, ``int4``) on the tiny
model: answers come from the dequantized K/V (on the model's device, whichever path reads them),
provisional blocks are quantized like stored ones, ``stats()`` counts the quantized bytes,
``native`` stores what was computed, and a quantized memory saves and loads exactly."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mukv import StreamSession
from mukv.config import apply_overrides
from mukv.errors import MemoryMismatchError
from mukv.kv.quant import QuantizedKV
from mukv.memory import method_config
from mukv.memory.blocks import BlockMemory
from mukv.memory.mukv_config import MukvConfig
from mukv.memory.persist import MANIFEST, read_manifest
from mukv.memory.rekv import RekvConfig
from tests.conftest import make_frames

QUESTION = "What colour was the triangle?"
FPS = 0.5
METHODS = {
    "mukv": {"top_k.patch": 3, "top_k.frame": 2, "top_k.segment": 1, "segment_frames": 4},
    "rekv": {"retrieve_blocks": 2, "block_frames": 2},
}


def session_with(backend, method: str, frames: np.ndarray, **storage) -> StreamSession:
    session = StreamSession(backend, method, overrides={**METHODS[method], **storage}, fps=FPS)
    session.ingest(frames, np.arange(len(frames), dtype=float) / FPS)
    return session


def ask(session: StreamSession):
    return session.ask(QUESTION, max_new_tokens=4, output_logits=True)


def test_overrides_set_and_check_the_storage_options():
    assert apply_overrides(MukvConfig(), {"kv_dtype": "int4"}).kv_dtype == "int4"
    assert apply_overrides(RekvConfig(), {"kv_dtype": "int8", "kv_group": 32}).kv_group == 32
    with pytest.raises(ValueError, match="kv_dtype"):
        apply_overrides(MukvConfig(), {"kv_dtype": "int3"})
    with pytest.raises(ValueError, match="kv_group"):
        apply_overrides(RekvConfig(), {"kv_group": 1})
    assert apply_overrides(MukvConfig(), {"kv_keys": "compact"}).kv_keys == "compact"
    with pytest.raises(ValueError, match="kv_keys"):
        apply_overrides(RekvConfig(), {"kv_keys": "token"})


@pytest.mark.parametrize(
    ("method", "extra"),
    [("mukv", {}), ("mukv", {"order": "temporal"}), ("mukv", {"kv_keys": "compact"}), ("rekv", {})],
    ids=["mukv", "mukv-temporal", "mukv-compact", "rekv"],
)
def test_int8_answers_from_the_dequantized_blocks(backend, method, extra):
    """Every stored and provisional block is held as int8 codes; the answer equals, logit for
    logit, the answer of the same store holding the dequantized blocks as plain tensors (assembly
    as computed and re-positioned, and ReKV's per-layer retrieval, dequantize what the store
    holds, nothing else)."""
    # 7 frames: an open segment (MuKV) and an open block (ReKV) become provisional blocks.
    session = session_with(backend, method, make_frames(7, seed=5), kv_dtype="int8", kv_group=16, **extra)
    answer = ask(session)
    assert answer.token_ids and answer.retrieved
    memory = session.memory
    assert isinstance(memory, BlockMemory) and memory.provisional_ids
    records = memory.store.records()
    for record in records:
        kv = memory.store.payload(record.block_id).kv
        assert isinstance(kv, QuantizedKV) and (kv.bits, kv.group) == (8, 16)
    # The same blocks, dequantized, held as plain tensors.
    for record in records:
        payload = memory.store.payload(record.block_id)
        memory.store.replace(record.block_id, dataclasses.replace(payload, kv=payload.dense()))
    dense = ask(session)
    assert dense.token_ids == answer.token_ids
    assert torch.equal(dense.first_logits, answer.first_logits)


@pytest.mark.parametrize("method", ["mukv", "rekv"])
def test_quantized_answers_stay_close_to_native(backend, method):
    frames = make_frames(8, seed=6)
    native = ask(session_with(backend, method, frames))
    int8 = ask(session_with(backend, method, frames, kv_dtype="int8"))
    # The same blocks are retrieved (the representatives are float32 from the computed K/V).
    assert [b.block_id for b in int8.retrieved] == [b.block_id for b in native.retrieved]
    spread = (native.first_logits.max() - native.first_logits.min()).item()
    assert (int8.first_logits - native.first_logits).abs().max().item() < 0.05 * spread
    assert not torch.equal(int8.first_logits, native.first_logits)


@pytest.mark.parametrize("method", ["mukv", "rekv"])
def test_native_stores_what_was_computed(backend, method, monkeypatch):
    frames = make_frames(7, seed=7)
    session = session_with(backend, method, frames, kv_dtype="native")
    answer = ask(session)
    memory = session.memory
    assert all(type(memory.store.payload(r.block_id).kv) is torch.Tensor for r in memory.store.records())
    payload = memory.store.payload(memory.store.records()[0].block_id)
    assert memory._stored_payload(payload) is payload
    # The storage hook as it was before quantized payloads existed: the same answer, bit for bit.
    monkeypatch.setattr(BlockMemory, "_stored_payload", lambda self, payload: payload)
    before = ask(session_with(backend, method, frames))
    assert before.token_ids == answer.token_ids and torch.equal(before.first_logits, answer.first_logits)


def _expected_kv_bytes(shape, bits: int, group: int, scale_bytes: int, compact: bool = False) -> int:
    layers, _, heads, n, dim = shape
    count = heads * n * dim
    codes = layers * 2 * (count if bits == 8 else math.ceil(count / 2))
    per_token = n * math.ceil(dim / min(group, dim))  # value groups per layer and head
    groups = math.ceil(n / group) * dim + per_token  # keys per channel (KIVI)
    if compact and 0 < n < group and per_token < dim:
        groups = 2 * per_token  # kv_keys="compact": a short block's keys per token too
    return codes + 2 * scale_bytes * layers * heads * groups


@pytest.mark.parametrize("method", ["mukv", "rekv"])
def test_stats_count_the_quantized_bytes(backend, method):
    frames = make_frames(8, seed=8)
    native = session_with(backend, method, frames)
    sessions = {dtype: session_with(backend, method, frames, kv_dtype=dtype) for dtype in ("int8", "int4")}
    compact = session_with(backend, method, frames, kv_dtype="int4", kv_keys="compact")
    element = backend.dtype.itemsize
    scale_bytes = 2 if element == 2 else 4
    native_kv = sum(native.memory.store.payload(r.block_id).kv.nbytes for r in native.memory.store.records())
    held_by: dict[str, int] = {}
    for dtype, session in sessions.items():
        bits = 8 if dtype == "int8" else 4
        store = session.memory.store
        held = 0
        for record in store.records():
            payload = store.payload(record.block_id)
            kv_bytes = _expected_kv_bytes(payload.kv.shape, bits, 64, scale_bytes)
            rest = payload.positions.nbytes + payload.kept.nbytes + payload.scores.nbytes
            assert record.nbytes == kv_bytes + rest + store.representative(record.block_id).nbytes
            held += kv_bytes
        blocks = {g: n for g, n in session.stats().bytes.items() if g in {"patch", "frame", "segment", "block"}}
        assert sum(blocks.values()) == sum(r.nbytes for r in store.records())
        assert all(store.payload(r.block_id).kv.keys == "channel" for r in store.records())
        held_by[dtype] = held
    # kv_keys="compact": blocks shorter than a group whose per-token statistics are fewer numbers
    # (at D 16: fewer than 16 tokens) hold their keys per token, and fewer bytes.
    store = compact.memory.store
    held = 0
    layouts = set()
    for record in store.records():
        payload = store.payload(record.block_id)
        _, _, _, n, dim = payload.kv.shape
        assert payload.kv.keys == ("token" if n < dim else "channel")
        layouts.add(payload.kv.keys)
        held += _expected_kv_bytes(payload.kv.shape, 4, 64, scale_bytes, compact=True)
    # MuKV's patch and frame blocks are short; ReKV's blocks are whole 16-token frames.
    assert ("token" in layouts) == (method == "mukv")
    assert held == sum(store.payload(r.block_id).kv.nbytes for r in store.records())
    assert held < held_by["int4"] if method == "mukv" else held == held_by["int4"]
    # The tiny model's blocks are small (MuKV keeps single-token patch blocks, D is 16): scales and
    # minimums weigh more than at real sizes (see tests/unit/test_quant.py).
    assert held_by["int4"] < held_by["int8"] < native_kv


@pytest.mark.parametrize("kv_keys", ["channel", "compact"])
def test_int4_memory_saves_and_loads_with_the_same_answer(backend, tmp_path, kv_keys):
    frames = make_frames(9, seed=9)
    saved = session_with(backend, "mukv", frames, kv_dtype="int4", kv_group=8, kv_keys=kv_keys)
    saved.save(tmp_path / "mem")
    manifest = read_manifest(tmp_path / "mem")
    count = len(saved.memory.saved_blocks())
    assert manifest["payloads"] == {"forms": {"int4": count}}
    chunk = tmp_path / "mem" / manifest["chunks"][0]["file"]
    with safe_open(str(chunk), framework="pt") as handle:
        names = set(handle.keys())
        assert handle.get_tensor("kv.codes").dtype == torch.uint8
        entry = json.loads(handle.metadata()["blocks"])[0]
    assert "kv" not in names and {"kv.codes", "kv.k_scale", "kv.k_min", "kv.v_scale", "kv.v_min"} <= names
    assert entry["kv_form"]["bits"] == 4 and entry["kv_form"]["group"] == 8
    layouts = {saved.memory.store.payload(r.block_id).kv.keys for r in saved.memory.saved_blocks()}
    assert layouts == ({"channel"} if kv_keys == "channel" else {"channel", "token"})
    loaded = StreamSession.load(backend, tmp_path / "mem")
    for record in saved.memory.saved_blocks():
        a, b = saved.memory.store.payload(record.block_id).kv, loaded.memory.store.payload(record.block_id).kv
        assert isinstance(b, QuantizedKV) and a.meta() == b.meta()
        assert all(torch.equal(a.tensors()[n], b.tensors()[n]) for n in a.tensors())
    one, two = ask(saved), ask(loaded)
    assert one.token_ids == two.token_ids and torch.equal(one.first_logits, two.first_logits)


@pytest.mark.parametrize("with_config", [False, True], ids=["saved-config", "given-config"])
def test_a_memory_saved_before_the_storage_options_still_loads(backend, tmp_path, with_config):
    """A manifest whose method config lacks storage options (saved before they existed) loads as
    saved with their defaults, also when the caller gives the config (as the server's reopen
    does); it still refuses a config that differs in one of them."""
    frames = make_frames(7, seed=11)
    saved = session_with(backend, "mukv", frames)
    saved.save(tmp_path / "mem")
    path = tmp_path / "mem" / MANIFEST
    manifest = json.loads(path.read_text())
    for name in ("kv_dtype", "kv_group", "kv_keys", "memory_budget", "ram_budget", "disk_dir"):
        del manifest["method"]["config"][name]
    path.write_text(json.dumps(manifest))
    given = method_config("mukv", METHODS["mukv"]) if with_config else None
    loaded = StreamSession.load(backend, tmp_path / "mem", method_config=given)
    assert loaded.memory.config.kv_keys == "channel" and loaded.memory.config.kv_dtype == "native"
    one, two = ask(saved), ask(loaded)
    assert one.token_ids == two.token_ids and torch.equal(one.first_logits, two.first_logits)
    loaded.memory.close()
    with pytest.raises(MemoryMismatchError, match="kv_dtype"):
        StreamSession.load(
            backend, tmp_path / "mem", method_config=method_config("mukv", {**METHODS["mukv"], "kv_dtype": "int8"})
        )


def test_a_native_memory_loads_under_any_quantization_grouping(backend, tmp_path):
    """kv_group and kv_keys shape quantized payloads only: a native memory saved with other values
    loads with the defaults; a quantized one does not."""
    frames = make_frames(7, seed=12)
    for kv_dtype in ("native", "int8"):
        saved = session_with(backend, "rekv", frames, kv_dtype=kv_dtype, kv_keys="compact", kv_group=16)
        saved.save(tmp_path / kv_dtype)
        given = method_config("rekv", {**METHODS["rekv"], "kv_dtype": kv_dtype})
        if kv_dtype == "native":
            loaded = StreamSession.load(backend, tmp_path / kv_dtype, method_config=given)
            assert ask(loaded).token_ids == ask(saved).token_ids
        else:
            with pytest.raises(MemoryMismatchError, match="kv_group") as refused:
                StreamSession.load(backend, tmp_path / kv_dtype, method_config=given)
            assert "kv_keys" in str(refused.value)


def test_a_native_memory_without_payload_forms_still_loads(backend, tmp_path):
    """A memory saved before quantized payloads existed (no ``payloads`` in its manifest, no
    ``kv_form`` in its block entries) loads as native."""
    frames = make_frames(7, seed=10)
    saved = session_with(backend, "rekv", frames)
    saved.save(tmp_path / "mem")
    path = tmp_path / "mem" / MANIFEST
    manifest = json.loads(path.read_text())
    assert manifest.pop("payloads") == {"forms": {"native": len(saved.memory.saved_blocks())}}
    path.write_text(json.dumps(manifest))  # the manifest itself is not checksummed
    loaded = StreamSession.load(backend, tmp_path / "mem")
    assert all(type(loaded.memory.store.payload(r.block_id).kv) is torch.Tensor for r in loaded.memory.saved_blocks())
    one, two = ask(saved), ask(loaded)
    assert one.token_ids == two.token_ids and torch.equal(one.first_logits, two.first_logits)
