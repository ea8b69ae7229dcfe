"""Quantized K/V payloads (``mukv.kv.quant``): the KIVI split (keys per channel over ``group``
tokens, values per token over ``min(group, D)`` channels; with ``keys="compact"``, keys per token
in blocks shorter than a group), the error bound of min/max quantization, int4 packing, exact save/restore of the held
tensors, and the bytes held."""

from __future__ import annotations

import math

import pytest
import torch

from mukv.kv.blocks import BlockPayload, BlockStore, layer_to_device
from mukv.kv.quant import (
    TENSOR_NAMES,
    QuantizedKV,
    _pack4,
    _unpack4,
    keys_per_token,
    move_quantized,
    quantize_kv,
    scale_dtype,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (L, 2, Hkv, n, D): one token, an odd count, n a multiple of the group, n not one, D not a
# multiple of the group, D below the group.
SHAPES = ((2, 2, 3, 1, 8), (2, 2, 2, 67, 64), (1, 2, 2, 128, 64), (2, 2, 1, 130, 96), (1, 2, 2, 5, 10))


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` near ``|x|`` (float32 tensor): what rounding the read-back value costs."""
    return torch.finfo(dtype).eps * x.abs().clamp_min(torch.finfo(dtype).tiny)


def _group_bounds(q: QuantizedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Each element's ``scale / 2`` ``[L, 2, Hkv, n, D]`` (float32), from the reference grouping:
    keys by ``token // group`` at every channel (by ``channel // min(group, D)`` at every token in
    the per-token layout), values by ``channel // min(group, D)`` at every token."""
    _, _, _, n, dim = q.shape
    tokens = torch.arange(n) // q.group
    channels = torch.arange(dim) // min(q.group, dim)
    keys = q.k_scale.float()[..., channels] if q.keys == "token" else q.k_scale.float()[:, :, tokens, :]
    values = q.v_scale.float()[:, :, :, channels]
    return torch.stack((keys, values), dim=1) / 2, tokens


def _assert_within_bound(kv: torch.Tensor, q: QuantizedKV) -> None:
    dense = q.dequantize()
    assert dense.shape == kv.shape and dense.dtype == kv.dtype
    error = (dense.float() - kv.float()).abs()
    half, _ = _group_bounds(q)
    allowed = half + 2 * _ulp(kv.float(), kv.dtype) + 1e-6
    assert bool((error <= allowed).all()), f"max excess {(error - allowed).max().item()}"


def _reference_extremes(x: torch.Tensor, dim: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum over groups of ``group`` along ``dim``, computed group by group."""
    lows, highs = [], []
    for start in range(0, x.shape[dim], group):
        part = x.narrow(dim, start, min(group, x.shape[dim] - start))
        lows.append(part.amin(dim=dim, keepdim=True))
        highs.append(part.amax(dim=dim, keepdim=True))
    return torch.cat(lows, dim=dim), torch.cat(highs, dim=dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("shape", SHAPES)
def test_error_is_within_half_a_step_of_each_group(dtype, bits, shape):
    g = torch.Generator().manual_seed(sum(shape) + bits)
    kv = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    q = quantize_kv(kv, bits, 64)
    _assert_within_bound(kv, q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (8, 4))
def test_groups_are_keys_per_channel_and_values_per_token(dtype, bits):
    """The held minimums are the reference groups' minimums exactly; the scales their ranges over
    the codes, rounded up to the storage dtype (by less than one step of it)."""
    group = 16
    kv = torch.randn((2, 2, 3, 37, 24), generator=torch.Generator().manual_seed(1)).to(dtype)
    q = quantize_kv(kv, bits, group)
    levels = 2**bits - 1
    assert q.k_min.dtype == q.k_scale.dtype == scale_dtype(dtype)
    low, high = _reference_extremes(kv[:, 0].float(), 2, group)  # keys: [L, Hkv, ceil(n/G), D]
    assert torch.equal(q.k_min.float(), low)
    want = (high - low) / levels
    assert bool((q.k_scale.float() >= want).all())
    assert bool((q.k_scale.float() <= want * (1 + 2 * torch.finfo(q.k_scale.dtype).eps) + 1e-30).all())
    low, high = _reference_extremes(kv[:, 1].float(), 3, group)  # values: [L, Hkv, n, ceil(D/G)]
    assert torch.equal(q.v_min.float(), low)
    assert bool((q.v_scale.float() >= (high - low) / levels).all())


@pytest.mark.parametrize(
    ("n", "dim", "group", "per_token"),
    [
        (4, 64, 64, True),  # a MuKV patch block: 4 numbers a head instead of 64
        (63, 64, 64, True),
        (64, 64, 64, False),  # one whole group: per channel, as KIVI
        (65, 64, 64, False),  # a short last group does not switch a long block
        (20, 64, 32, True),  # 40 per-token numbers (two channel groups) < 64
        (31, 64, 16, False),  # fills groups of 16 tokens
        (100, 64, 128, False),  # shorter than the group, but 100 per-token numbers > 64 per-channel
        (0, 64, 64, False),
    ],
)
def test_compact_keys_choose_the_layout_with_fewer_numbers(n, dim, group, per_token):
    assert keys_per_token(n, dim, group) is per_token
    kv = torch.randn((1, 2, 2, n, dim), generator=torch.Generator().manual_seed(n))
    assert quantize_kv(kv, 4, group, keys="compact").keys == ("token" if per_token else "channel")
    # KIVI's split (the default) and a forced layout do not depend on the block's length.
    assert quantize_kv(kv, 4, group).keys == "channel"
    assert quantize_kv(kv, 4, group, keys="token").keys == "token"
    with pytest.raises(ValueError, match="keys must be one of"):
        quantize_kv(kv, 4, group, keys="short")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (8, 4))
def test_compact_short_blocks_group_keys_per_token(dtype, bits):
    """``keys="compact"``, a block shorter than a group: its keys are grouped like its values (per
    token, over ``min(group, D)`` channels), minimums exact, scales covering each group; fewer bytes
    held than per-channel statistics take."""
    group = 64
    kv = torch.randn((2, 2, 2, 5, 24), generator=torch.Generator().manual_seed(11)).to(dtype)
    kv[:, 0, :, :, 3] *= 50  # an outlier channel: per-token groups share it with the others
    q = quantize_kv(kv, bits, group, keys="compact")
    assert q.keys == "token" and q.k_scale.shape == (2, 2, 5, 1)
    levels = 2**bits - 1
    low, high = _reference_extremes(kv[:, 0].float(), 3, group)
    assert torch.equal(q.k_min.float(), low)
    assert bool((q.k_scale.float() >= (high - low) / levels).all())
    _assert_within_bound(kv, q)
    scale_bytes = 2 if dtype != torch.float32 else 4
    assert q.nbytes == _expected_nbytes(kv.shape, bits, group, scale_bytes, keys="token")
    per_channel = quantize_kv(kv, bits, group)
    assert per_channel.nbytes == _expected_nbytes(kv.shape, bits, group, scale_bytes)
    assert q.nbytes < per_channel.nbytes


@pytest.mark.parametrize("bits", (8, 4))
def test_an_outlier_channel_costs_only_its_own_keys(bits):
    """Keys with one channel 100x larger (what per-channel grouping is for): the other channels'
    error stays within half of their own step; values with one outlier token likewise."""
    g = torch.Generator().manual_seed(2)
    kv = torch.randn((1, 2, 2, 64, 32), generator=g)
    kv[:, 0, :, :, 5] *= 100
    kv[:, 1, :, 7, :] *= 100
    q = quantize_kv(kv, bits, 64)
    _assert_within_bound(kv, q)
    error = (q.dequantize() - kv).abs()
    levels = 2**bits - 1
    others = [c for c in range(32) if c != 5]
    key_range = kv[:, 0][..., others].amax(dim=2) - kv[:, 0][..., others].amin(dim=2)  # [L, Hkv, D-1]
    assert bool((error[:, 0][..., others] <= (key_range / levels / 2 * 1.001 + 1e-6)[:, :, None]).all())
    rows = [t for t in range(64) if t != 7]
    value_range = kv[:, 1][:, :, rows].amax(dim=3) - kv[:, 1][:, :, rows].amin(dim=3)  # [L, Hkv, n-1]
    assert bool((error[:, 1][:, :, rows] <= (value_range / levels / 2 * 1.001 + 1e-6)[..., None]).all())


@pytest.mark.parametrize("bits", (8, 4))
def test_constant_groups_and_single_tokens_are_exact(bits):
    kv = torch.randn((2, 2, 2, 70, 16), generator=torch.Generator().manual_seed(3)).half()
    kv[:, 0, :, :64] = 0.75  # first key group of every channel constant
    kv[:, 0, :, 64:, 3] = -2.5  # last (short) key group of channel 3 constant
    kv[:, 1, :, 10] = 1.5  # one token's values constant
    q = quantize_kv(kv, bits, 64)
    dense = q.dequantize()
    assert torch.equal(dense[:, 0, :, :64], kv[:, 0, :, :64])
    assert torch.equal(dense[:, 0, :, 64:, 3], kv[:, 0, :, 64:, 3])
    assert torch.equal(dense[:, 1, :, 10], kv[:, 1, :, 10])
    assert bool((q.k_scale[:, :, 0] == 0).all())
    # One token: every key group (per channel) holds one element, read back exactly.
    single = kv[:, :, :, :1].contiguous()
    assert torch.equal(quantize_kv(single, bits, 64).dequantize()[:, 0], single[:, 0])


@pytest.mark.parametrize("count", (1, 2, 7, 64))
def test_int4_packing_round_trips_codes(count):
    codes = torch.randint(0, 16, (3, 2, count), dtype=torch.uint8, generator=torch.Generator().manual_seed(count))
    packed = _pack4(codes)
    assert packed.shape == (3, 2, math.ceil(count / 2)) and packed.dtype == torch.uint8
    assert torch.equal(_unpack4(packed, count), codes)
    # The first code of a pair sits in the low nibble.
    assert int(packed[0, 0, 0]) & 15 == int(codes[0, 0, 0])


def test_int4_codes_are_the_rounded_steps():
    """Unpacked int4 codes equal round((x - m) / s) of the reference grouping."""
    kv = torch.randn((1, 2, 1, 9, 5), generator=torch.Generator().manual_seed(4))
    q = quantize_kv(kv, 4, 4)
    codes = _unpack4(q.codes, 9 * 5).reshape(1, 2, 1, 9, 5)
    tokens = torch.arange(9) // 4
    channels = torch.arange(5) // 4
    # The last key group holds one token: scale 0, code 0.
    want_k = ((kv[:, 0] - q.k_min[:, :, tokens]) / q.k_scale[:, :, tokens]).nan_to_num(0).round().clamp(0, 15)
    want_v = ((kv[:, 1] - q.v_min[..., channels]) / q.v_scale[..., channels]).nan_to_num(0).round().clamp(0, 15)
    assert bool((q.k_scale[:, :, -1] == 0).all())
    assert torch.equal(codes[:, 0].float(), want_k) and torch.equal(codes[:, 1].float(), want_v)


@pytest.mark.parametrize("bits", (8, 4))
def test_layers_devices_and_out(bits):
    kv = torch.randn((3, 2, 2, 11, 8), generator=torch.Generator().manual_seed(5)).bfloat16()
    q = quantize_kv(kv, bits, 4)
    dense = q.dequantize()
    for layer in range(3):
        assert torch.equal(q.dequantize(layer), dense[layer])
        assert torch.equal(q.dequantize(layer, "cpu"), dense[layer])
    # Computed where asked: on the meta device only shapes exist (the codes were moved there first).
    meta = q.dequantize(1, device="meta")
    assert meta.device.type == "meta" and meta.shape == (2, 2, 11, 8) and meta.dtype == torch.bfloat16
    # Into a view of a larger buffer, untouched around it.
    buffer = torch.zeros((3, 2, 2, 20, 8), dtype=torch.bfloat16)
    q.dequantize(out=buffer[:, :, :, 4:15])
    assert torch.equal(buffer[:, :, :, 4:15], dense)
    assert not buffer[:, :, :, :4].any() and not buffer[:, :, :, 15:].any()
    one = torch.zeros((2, 2, 11, 8), dtype=torch.bfloat16)
    q.dequantize(2, out=one)
    assert torch.equal(one, dense[2])
    moved = move_quantized([q, q], torch.device("cpu"), layer=1)
    assert all(m.shape[0] == 1 and torch.equal(m.dequantize(0), dense[1]) for m in moved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", (8, 4))
def test_dequantize_on_cuda(bits):
    kv = torch.randn((2, 2, 2, 33, 64), generator=torch.Generator().manual_seed(6)).half()
    q = quantize_kv(kv, bits, 32)
    on_device = q.dequantize(device="cuda")
    assert on_device.device.type == "cuda"
    assert torch.allclose(on_device.cpu().float(), q.dequantize().float(), atol=1e-3)
    moved = move_quantized([q, q], torch.device("cuda"))
    assert all(m.device.type == "cuda" for m in moved)
    assert torch.equal(moved[1].dequantize(), on_device)


def test_tensors_round_trip_and_map():
    kv = torch.randn((2, 2, 2, 9, 12), generator=torch.Generator().manual_seed(7)).half()
    q = quantize_kv(kv, 4, 8)
    tensors = {name: t.clone() for name, t in q.tensors().items()}
    assert tuple(tensors) == TENSOR_NAMES
    back = QuantizedKV.from_tensors(tensors, q.meta())
    assert back.shape == q.shape and back.dtype == q.dtype and back.form == "int4"
    assert torch.equal(back.dequantize(), q.dequantize())
    calls = []
    mapped = q.map_tensors(lambda t: calls.append(t) or t.clone())
    assert len(calls) == len(TENSOR_NAMES)
    pairs = zip(mapped.tensors().values(), q.tensors().values(), strict=True)
    assert all(a.data_ptr() != b.data_ptr() for a, b in pairs)
    assert torch.equal(mapped.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="k_scale"):
        QuantizedKV.from_tensors({**tensors, "k_scale": tensors["k_scale"][:, :1]}, q.meta())
    with pytest.raises(ValueError, match="bits"):
        QuantizedKV.from_tensors(tensors, {**q.meta(), "bits": 3})
    # Written before the key layout was recorded: per channel.
    old = {k: v for k, v in q.meta().items() if k != "keys"}
    assert QuantizedKV.from_tensors(tensors, old).keys == "channel"
    with pytest.raises(ValueError, match="key layout"):
        QuantizedKV.from_tensors(tensors, {**q.meta(), "keys": "diagonal"})
    # A per-token payload round-trips with its layout; read as per channel, its shapes disagree.
    short = quantize_kv(kv[:, :, :, :3].contiguous(), 4, 8, keys="compact")
    assert short.keys == "token"
    short_tensors = {name: t.clone() for name, t in short.tensors().items()}
    back = QuantizedKV.from_tensors(short_tensors, short.meta())
    assert back.keys == "token" and torch.equal(back.dequantize(), short.dequantize())
    with pytest.raises(ValueError, match="k_scale"):
        QuantizedKV.from_tensors(short_tensors, {**short.meta(), "keys": "channel"})


def _expected_nbytes(shape, bits: int, group: int, scale_bytes: int, keys: str = "channel") -> int:
    """Codes (per layer and K/V: ``Hkv*n*D`` bytes at 8 bits, half of it rounded up at 4), plus a
    scale and a minimum per key group (``[L, Hkv, ceil(n/G), D]``, or ``[L, Hkv, n, ceil(D/G')]``
    for keys per token) and per value group ``[L, Hkv, n, ceil(D/G')]``."""
    layers, _, heads, n, dim = shape
    count = heads * n * dim
    codes = layers * 2 * (count if bits == 8 else math.ceil(count / 2))
    per_token = n * math.ceil(dim / min(group, dim))
    key_groups = per_token if keys == "token" else math.ceil(n / group) * dim
    groups = layers * heads * (key_groups + per_token)
    return codes + 2 * groups * scale_bytes


@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("group", (32, 64, 128))
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
def test_bytes_held(bits, group, dtype):
    """At LLaVA-OneVision 0.5B sizes (24 layers, 2 KV heads, D 64, a 196-token frame) the payload
    holds the exact byte count; int8 is ~2x / ~4x, int4 ~4x / ~8x smaller than float16 / float32."""
    shape = (24, 2, 2, 196, 64)
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    q = quantize_kv(kv, bits, group)
    scale_bytes = 2 if dtype == torch.float16 else 4
    assert q.nbytes == _expected_nbytes(shape, bits, group, scale_bytes)
    ratio = kv.nbytes / q.nbytes
    ideal = kv.element_size() * 8 / bits
    # A scale and a minimum per group of both K and V: 2 * scale_bytes / group bytes per element
    # each (a 196-token frame's last key group is short): int4 at group 64 is 3.5x below float16.
    floor = {32: 0.65, 64: 0.75, 128: 0.8}[group]
    assert ideal * floor < ratio < ideal, ratio


@pytest.mark.parametrize("bits", (8, 4))
def test_payload_reads_and_counts_the_quantized_form(bits):
    kv = torch.randn((2, 2, 2, 6, 8), generator=torch.Generator().manual_seed(9))
    extra = {"positions": torch.arange(6)[None], "kept": torch.arange(6), "scores": torch.rand(10)}
    native = BlockPayload(kv=kv, **extra)
    quantized = BlockPayload(kv=quantize_kv(kv, bits, 64), **extra)
    assert native.form == "native" and quantized.form == f"int{bits}"
    assert quantized.tokens == 6
    assert quantized.nbytes == quantized.kv.nbytes + sum(t.nbytes for t in extra.values())
    assert quantized.nbytes < native.nbytes
    assert native.dense() is kv and torch.equal(native.dense(1), kv[1])
    assert torch.equal(quantized.dense(1), quantized.kv.dequantize()[1])
    mapped = quantized.map_tensors(torch.clone)
    assert isinstance(mapped.kv, QuantizedKV) and torch.equal(mapped.dense(), quantized.dense())
    store = BlockStore()
    representative = torch.zeros(4)
    record = store.add(
        granularity="frame",
        first_frame=0,
        last_frame=0,
        part=0,
        start_time=0.0,
        end_time=0.0,
        payload=quantized,
        representative=representative,
    )
    assert isinstance(store.payload(record.block_id).kv, QuantizedKV)
    assert record.nbytes == quantized.nbytes + representative.nbytes and record.tokens == 6
    both = layer_to_device([quantized, native], 1, torch.device("cpu"))
    assert torch.equal(both, torch.cat((quantized.dense(1), kv[1]), dim=2))
