"""Quantized block payloads: K/V held as 8- or 4-bit codes with a scale and a minimum per group.

The split follows KIVI (asymmetric min/max quantization): **keys per channel**, since a few
channels of the keys carry outliers across all tokens, so a group of ``group`` consecutive tokens
of one channel (at one layer and head) shares a scale and a minimum; **values per token**, whose
outliers are not channel-aligned, so a group of ``min(group, D)`` consecutive channels of one token
shares them. A group that does not fill up (the last tokens of a block whose length is not a
multiple of ``group``, the last channels when ``D`` is not a multiple of the group) is a shorter
group: its scale and minimum come from its own elements only; nothing is padded in what is stored
(but the last nibble of an odd count of int4 codes).

With ``keys="compact"`` (the ``kv_keys`` storage option), a block shorter than a group stores its
**keys per token** too, like its values. Per-channel statistics cost ``ceil(n / group) * D``
numbers per head however few tokens share them, so for the short blocks of fine-grained memories
(MuKV's patch blocks keep about four tokens at real sizes, its frame blocks about twenty) they
weigh as much as the codes they scale; per-token statistics cost ``n * ceil(D / min(group, D))``.
Keys are grouped per token when the block does not fill one group of tokens and per-token
statistics are the fewer numbers (:func:`keys_per_token`). The price is accuracy: per-token key
groups share a scale with outlier channels (about twice the key error of per-channel groups at
int4 on ``mukv-tiny``'s stored K/V; ``benchmarks/bench_quant.py``), which is why the default
(``keys="channel"``) keeps KIVI's split in every block. The layout is part of :meth:`QuantizedKV.meta`.

Each element ``x`` of a group with minimum ``m`` and scale ``s`` is stored as the code
``c = round((x - m) / s)`` in ``0 .. 2**bits - 1`` and read back as ``m + c * s``, so the error is
at most ``s / 2`` (plus the rounding of the read-back value to the source dtype). A constant group
has ``s = 0`` and is read back exactly. int4 codes are packed two per byte (the first code of a
pair in the low nibble).

Scales and minimums are held in the source dtype when it is a 16-bit float (float16 or bfloat16)
and in float32 otherwise: the minimum is one of the group's own elements, so it is exact in the
source dtype (bfloat16 minimums would overflow or round in float16), and two bytes per number keep
the overhead at 4 bytes per group. The scale is rounded *up* to the storage dtype, so that the
grid ``m + c * s`` still covers the group and the ``s / 2`` bound holds for the stored scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = [
    "KEY_LAYOUTS",
    "KEY_POLICIES",
    "QUANT_BITS",
    "TENSOR_NAMES",
    "QuantizedKV",
    "key_layout",
    "keys_per_token",
    "move_quantized",
    "quantize_kv",
]

#: Bits of each quantized ``kv_dtype``.
QUANT_BITS = {"int8": 8, "int4": 4}

#: Names of the tensors a :class:`QuantizedKV` holds (:meth:`QuantizedKV.tensors`).
TENSOR_NAMES = ("codes", "k_scale", "k_min", "v_scale", "v_min")
#: How a payload's keys are grouped: over ``group`` tokens of one channel, or over channels of one token.
KEY_LAYOUTS = ("channel", "token")
#: ``keys`` of :func:`quantize_kv`: a layout for every block, or ``"compact"`` (chosen per block).
KEY_POLICIES = ("channel", "compact", "token")
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
# Byte alignment of each tensor inside a batched transfer buffer (a view as a wider dtype needs it).
_ALIGN = 16


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"quantized kv: unknown dtype {name!r}")
    return dtype


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the scales and minimums of ``dtype`` K/V (see the module docstring)."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype quantization and dequantization compute in (float64 sources keep their precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _round_up(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Non-negative ``s`` cast to ``dtype``, rounded up where the cast rounded down: incrementing
    the bit pattern of a non-negative finite float gives the next representable one."""
    stored = s.to(dtype)
    low = stored.to(s.dtype) < s
    if bool(low.any()):
        bumped = (stored.view(_INT_VIEW[dtype]) + 1).view(dtype)
        stored = torch.where(low, bumped, stored)
    return stored


def _round_down(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``m`` cast to ``dtype``, rounded down where the cast rounded up (only a float64 source in
    float32 storage can round; 16-bit and float32 minimums are exact)."""
    stored = m.to(dtype)
    high = stored.to(m.dtype) > m
    if bool(high.any()):
        stored = torch.where(high, torch.nextafter(stored, torch.full_like(stored, -math.inf)), stored)
    return stored


def _grid(low: torch.Tensor, high: torch.Tensor, levels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``(minimum, scale)`` in ``dtype`` of groups spanning ``low..high`` with ``levels + 1`` codes."""
    minimum = _round_down(low, dtype)
    scale = _round_up((high - minimum.to(high.dtype)) / levels, dtype)
    return minimum, scale


def _codes(x: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 codes of ``x`` on the grid ``minimum + c * scale`` (broadcast to ``x``); 0 where the scale is 0."""
    s = scale.to(x.dtype)
    t = torch.where(s > 0, (x - minimum.to(x.dtype)) / torch.where(s > 0, s, 1), 0)
    return t.round_().clamp_(0, levels).to(torch.uint8)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., M]`` 4-bit codes as ``[..., ceil(M / 2)]`` bytes, the first of a pair in the low nibble."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` 4-bit codes ``[..., count]`` of ``packed [..., ceil(count / 2)]``."""
    pairs = torch.stack((packed & 15, packed >> 4), dim=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :count]


def _group_extremes(x: torch.Tensor, dim: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of ``x`` over consecutive groups of ``group`` along ``dim`` (a shorter
    last group when the size is not a multiple; it is padded with copies of its last element, which
    change neither). ``dim`` of the results has ``ceil(size / group)`` entries."""
    size = x.shape[dim]
    groups = -(-size // group)
    pad = groups * group - size
    if pad:
        edge = x.narrow(dim, size - 1, 1)
        x = torch.cat((x, edge.expand(*x.shape[:dim], pad, *x.shape[dim + 1 :])), dim=dim)
    grouped = x.unflatten(dim, (groups, group))
    return grouped.amin(dim=dim + 1), grouped.amax(dim=dim + 1)


def keys_per_token(n: int, dim: int, group: int) -> bool:
    """Whether the keys of a block of ``n`` tokens of ``dim`` channels are grouped per token: the
    block is shorter than one group and per-token statistics are fewer numbers than per-channel
    ones (see the module docstring)."""
    return 0 < n < group and n * -(-dim // max(min(group, dim), 1)) < dim


@dataclass(frozen=True, eq=False)
class QuantizedKV:
    """A block's K/V ``[L, 2, Hkv, n, D]`` quantized (see the module docstring).

    ``codes``: ``[L, 2, M]`` uint8, each layer's keys then values flattened ``[Hkv, n, D]``
    (``M = Hkv * n * D`` for 8 bits, ``ceil(Hkv * n * D / 2)`` for 4 bits: two codes a byte);
    ``k_scale``/``k_min``: ``[L, Hkv, ceil(n / group), D]`` (``keys == "channel"``: per channel,
    over ``group`` tokens) or ``[L, Hkv, n, ceil(D / min(group, D))]`` (``keys == "token"``);
    ``v_scale``/``v_min``: ``[L, Hkv, n, ceil(D / min(group, D))]`` (per token, over channels).
    ``shape`` and ``dtype`` are those of the dense tensor it stands for.
    """

    codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    bits: int
    group: int
    shape: torch.Size
    dtype: torch.dtype
    keys: str = "channel"

    @property
    def form(self) -> str:
        """The ``kv_dtype`` this payload is stored as (``"int8"`` or ``"int4"``)."""
        return f"int{self.bits}"

    @property
    def nbytes(self) -> int:
        """Bytes actually held (codes, scales and minimums)."""
        return sum(t.nbytes for t in self.tensors().values())

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor held, by name (for saving; :meth:`from_tensors` rebuilds it exactly)."""
        return {name: getattr(self, name) for name in TENSOR_NAMES}

    def meta(self) -> dict[str, Any]:
        """JSON-ready description besides the tensors: ``bits``, ``group``, dense ``shape`` and ``dtype``,
        the ``keys`` layout."""
        return {
            "bits": self.bits,
            "group": self.group,
            "shape": list(self.shape),
            "dtype": _dtype_name(self.dtype),
            "keys": self.keys,
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> QuantizedKV:
        """The payload :meth:`tensors` and :meth:`meta` describe; ``ValueError`` when they disagree."""
        bits, group = int(meta["bits"]), int(meta["group"])
        if bits not in (4, 8) or group < 1:
            raise ValueError(f"quantized kv: bits {bits}, group {group}")
        shape = torch.Size(int(s) for s in meta["shape"])
        if len(shape) != 5 or shape[1] != 2:
            raise ValueError(f"quantized kv: dense shape {list(shape)} is not [L, 2, Hkv, n, D]")
        dtype = _dtype_of(str(meta["dtype"]))
        # Payloads written before per-token keys existed have no "keys": they are all per channel.
        keys = str(meta.get("keys", "channel"))
        if keys not in KEY_LAYOUTS:
            raise ValueError(f"quantized kv: unknown key layout {keys!r}")
        out = cls(
            **{name: tensors[name] for name in TENSOR_NAMES},
            bits=bits,
            group=group,
            shape=shape,
            dtype=dtype,
            keys=keys,
        )
        expected = _expected_shapes(shape, bits, group, keys)
        for name, want in expected.items():
            got = tuple(out.tensors()[name].shape)
            if got != want:
                raise ValueError(f"quantized kv: {name} has shape {list(got)}, expected {list(want)}")
        if out.codes.dtype != torch.uint8:
            raise ValueError(f"quantized kv: codes are {out.codes.dtype}, not uint8")
        return out

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedKV:
        """A copy with every tensor replaced by ``fn(tensor)`` (moved, memory-mapped, ...)."""
        return replace(self, **{name: fn(t) for name, t in self.tensors().items()})

    def layer_slice(self, layer: int) -> QuantizedKV:
        """Layer ``layer`` alone, as a one-layer payload of views (``shape[0] == 1``)."""
        return replace(
            self,
            **{name: t[layer : layer + 1] for name, t in self.tensors().items()},
            shape=torch.Size((1, *self.shape[1:])),
        )

    def dequantize(
        self,
        layer: int | None = None,
        device: torch.device | str | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The dense K/V in :attr:`dtype`: ``[L, 2, Hkv, n, D]``, or ``[2, Hkv, n, D]`` of ``layer``.

        Computed on ``device`` (default: where the codes are): the codes, scales and minimums are
        moved there first, so only the compressed bytes cross a bus. ``out`` (of the result's
        shape, on ``device``; a view into a larger buffer is fine) receives the result.
        """
        source = self if layer is None else self.layer_slice(layer)
        device = torch.device(device) if device is not None else (out.device if out is not None else self.device)
        if source.device != device:
            source = source.map_tensors(lambda t: t.to(device, non_blocking=True))
        layers, _, heads, n, dim = source.shape
        work = _work_dtype(self.dtype)
        count = heads * n * dim
        codes = source.codes if self.bits == 8 else _unpack4(source.codes, count)
        codes = codes.reshape(layers, 2, heads, n, dim).to(work)
        channels = torch.arange(dim, device=device) // min(self.group, dim)
        if self.keys == "token":
            keys = codes[:, 0] * source.k_scale[..., channels].to(work) + source.k_min[..., channels].to(work)
        else:
            tokens = torch.arange(n, device=device) // self.group
            keys = codes[:, 0] * source.k_scale[:, :, tokens].to(work) + source.k_min[:, :, tokens].to(work)
        values = codes[:, 1] * source.v_scale[..., channels].to(work) + source.v_min[..., channels].to(work)
        if out is None:
            dense = torch.stack((keys, values), dim=1).to(self.dtype)
            return dense if layer is None else dense[0]
        target = out if layer is None else out.unsqueeze(0)
        target[:, 0].copy_(keys)
        target[:, 1].copy_(values)
        return out


def _expected_shapes(shape: Sequence[int], bits: int, group: int, keys: str) -> dict[str, tuple[int, ...]]:
    layers, _, heads, n, dim = shape
    count = heads * n * dim
    per_kind = count if bits == 8 else -(-count // 2)
    channel_groups = -(-dim // min(group, dim)) if dim else 0
    k_shape = (layers, heads, n, channel_groups) if keys == "token" else (layers, heads, -(-n // group), dim)
    return {
        "codes": (layers, 2, per_kind),
        "k_scale": k_shape,
        "k_min": k_shape,
        "v_scale": (layers, heads, n, channel_groups),
        "v_min": (layers, heads, n, channel_groups),
    }


def key_layout(keys: str, n: int, dim: int, group: int) -> str:
    """The layout (``"channel"`` or ``"token"``) the key policy ``keys`` gives a block of ``n`` tokens."""
    if keys not in KEY_POLICIES:
        raise ValueError(f"quantize_kv: keys must be one of {', '.join(KEY_POLICIES)}, got {keys!r}")
    if keys == "compact":
        return "token" if keys_per_token(n, dim, group) else "channel"
    return keys


def quantize_kv(kv: torch.Tensor, bits: int, group: int, *, keys: str = "channel") -> QuantizedKV:
    """``kv [L, 2, Hkv, n, D]`` quantized to ``bits`` (8 or 4) in groups of ``group`` (see the
    module docstring), computed where ``kv`` is. ``keys``: ``"channel"`` (KIVI's split),
    ``"compact"`` (per token in blocks shorter than a group, :func:`keys_per_token`) or ``"token"``
    (every block; for comparisons)."""
    if bits not in (4, 8):
        raise ValueError(f"quantize_kv: bits must be 8 or 4, got {bits}")
    if group < 1:
        raise ValueError(f"quantize_kv: group must be >= 1, got {group}")
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"quantize_kv: expected kv [L, 2, Hkv, n, D], got {list(kv.shape)}")
    if not kv.dtype.is_floating_point:
        raise ValueError(f"quantize_kv: expected floating-point K/V, got {kv.dtype}")
    layers, _, _, n, dim = kv.shape
    levels = 2**bits - 1
    stored, work = scale_dtype(kv.dtype), _work_dtype(kv.dtype)
    layout = key_layout(keys, n, dim, group)
    if n == 0 or dim == 0:
        empty = _expected_shapes(kv.shape, bits, group, layout)
        tensors = {
            name: torch.zeros(s, dtype=torch.uint8 if name == "codes" else stored, device=kv.device)
            for name, s in empty.items()
        }
        return QuantizedKV(**tensors, bits=bits, group=group, shape=kv.shape, dtype=kv.dtype, keys=layout)
    keys, values = kv[:, 0].to(work), kv[:, 1].to(work)  # [L, Hkv, n, D]
    width = min(group, dim)
    channels = torch.arange(dim, device=kv.device) // width
    if layout == "token":
        # Keys of a block shorter than a group: per token, like the values.
        k_min, k_scale = _grid(*_group_extremes(keys, 3, width), levels, stored)  # [L, Hkv, n, gd]
        k_codes = _codes(keys, k_min[..., channels], k_scale[..., channels], levels)
    else:
        # Keys per channel: groups of ``group`` tokens.
        k_min, k_scale = _grid(*_group_extremes(keys, 2, group), levels, stored)  # [L, Hkv, gk, D]
        tokens = torch.arange(n, device=kv.device) // group
        k_codes = _codes(keys, k_min[:, :, tokens], k_scale[:, :, tokens], levels)
    # Values per token: groups of ``min(group, D)`` channels.
    v_min, v_scale = _grid(*_group_extremes(values, 3, width), levels, stored)  # [L, Hkv, n, gd]
    v_codes = _codes(values, v_min[..., channels], v_scale[..., channels], levels)
    codes = torch.stack((k_codes, v_codes), dim=1).reshape(layers, 2, -1)
    if bits == 4:
        codes = _pack4(codes)
    return QuantizedKV(
        codes=codes.contiguous(),
        k_scale=k_scale.contiguous(),
        k_min=k_min.contiguous(),
        v_scale=v_scale.contiguous(),
        v_min=v_min.contiguous(),
        bits=bits,
        group=group,
        shape=kv.shape,
        dtype=kv.dtype,
        keys=layout,
    )


def move_quantized(
    items: Sequence[QuantizedKV], device: torch.device, *, layer: int | None = None
) -> list[QuantizedKV]:
    """``items`` (or their layer ``layer`` alone, as one-layer payloads) on ``device``.

    To CUDA, every tensor of every item is gathered into one pinned byte buffer and copied with one
    asynchronous host-to-device copy (the host allocator keeps the buffer alive until it is done);
    the results are views into the device copy. Elsewhere each tensor is moved on its own.
    """
    parts = [item if layer is None else item.layer_slice(layer) for item in items]
    if device.type != "cuda":
        return [p if p.device == device else p.map_tensors(lambda t: t.to(device)) for p in parts]
    offsets: list[dict[str, int]] = []
    total = 0
    for part in parts:
        where = {}
        for name, tensor in part.tensors().items():
            where[name] = total
            total += -(-tensor.nbytes // _ALIGN) * _ALIGN
        offsets.append(where)
    staging = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
    for part, where in zip(parts, offsets, strict=True):
        for name, tensor in part.tensors().items():
            flat = tensor.contiguous().reshape(-1).view(torch.uint8)
            staging[where[name] : where[name] + flat.numel()].copy_(flat)
    moved = staging.to(device, non_blocking=True)

    def view(part: QuantizedKV, where: dict[str, int]) -> QuantizedKV:
        tensors = part.tensors()
        return replace(
            part,
            **{
                name: moved[where[name] : where[name] + t.nbytes].view(t.dtype).view(t.shape)
                for name, t in tensors.items()
            },
        )

    return [view(part, where) for part, where in zip(parts, offsets, strict=True)]
