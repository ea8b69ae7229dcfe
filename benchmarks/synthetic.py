"""Random-weight models at real sizes and synthetic stream states of the cost benchmarks.

- :func:`build_backend`: a model with the dimensions of ``llava-onevision-qwen2-0.5b-ov`` and random
  weights (nothing downloaded), wrapped as ``load_backend`` wraps a checkpoint;
  :func:`build_qwen25_vl_3b` and :func:`build_qwen3_vl_2b` the same for ``Qwen2.5-VL-3B-Instruct``
  and ``Qwen3-VL-2B-Instruct``; :data:`REAL_MODELS` names the three.
- Synthetic states, through the package's public API only: :func:`fill_mukv` and :func:`fill_rekv`
  adopt encoded blocks of the exact kept sizes (random K/V, the positions the backend's scheme
  gives, random representatives) with ``BlockMemory.restore``; :func:`fill_full` adopts a random
  K/V cache with ``FullMemory.restore``; :func:`fill_ingest` feeds random visual features to
  ``memory.ingest`` (``uniform``, ``recent``: their ingest is cheap or bounded).
- :func:`clone_groups`: extends a block store by copies of blocks a method really encoded, at later
  frames and times, sharing their K/V (for hours of stream state at sizes that do not fit in RAM).
- :class:`Scenario`: a method, its overrides and how to fill its state, so that a benchmark
  iterates over data instead of branching per method.
- Question timing: :func:`timed_ask`, :func:`warm_asks`, :func:`summarize_asks` (medians of the
  answer's timings, including ``answer.timings.stages``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen3VLConfig,
    SiglipVisionConfig,
)

import mukv
from mukv.backends.llava_onevision import LlavaOnevisionBackend
from mukv.backends.qwen2_5_vl import Qwen25VLBackend
from mukv.backends.qwen3_vl import DEFAULT_MAX_VIDEO_TOKENS, Qwen3VLBackend
from mukv.backends.qwen_vl import DEFAULT_MAX_PIXELS, QwenFramePreprocessor, square_frame_shape
from mukv.backends.tiny import build_tokenizer
from mukv.backends.tiny_qwen import (
    QWEN3_CHAT_TEMPLATE,
    QWEN3_MEAN,
    QWEN3_STD,
    QWEN_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
)
from mukv.compress.scorers import keep_count
from mukv.kv.blocks import BlockPayload
from mukv.memory.blocks import EncodedBlock
from mukv.memory.granularity import patch_token_indices
from mukv.video.preprocess import FramePreprocessor

MODEL_ID = "random-llava-onevision-0.5b"
QUESTION = "What happened in the video?"
IMAGE_SIZE = 384
TRAINED_POSITIONS = 32768  # max_position_embeddings of llava-onevision-qwen2-0.5b-ov

# --------------------------------------------------------------------------- model


def build_config(tokenizer, max_positions: int = TRAINED_POSITIONS) -> LlavaOnevisionConfig:
    """The llava-onevision-qwen2-0.5b-ov architecture, with the package's tiny tokenizer's special ids.

    ``max_positions`` (``max_position_embeddings``) changes no weight and no cost, only how long a
    context the package admits: a cost benchmark of caches longer than the real model's 32,768
    trained positions raises it (with real weights such answers would degrade)."""
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=IMAGE_SIZE,
        patch_size=14,
    )
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = Qwen2Config(
        vocab_size=151936,  # the real vocabulary, so embedding and lm_head cost what they really cost
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )


def build_backend(
    device: torch.device,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vision_batch_frames: int = 16,
    max_positions: int = TRAINED_POSITIONS,
) -> LlavaOnevisionBackend:
    """Random weights built directly in ``dtype`` on ``device``, wrapped as the loader would wrap them
    (``max_positions``: see :func:`build_config`)."""
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, max_positions)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if not isinstance(model, LlavaOnevisionForConditionalGeneration):
        raise TypeError(f"expected LlavaOnevisionForConditionalGeneration, got {type(model).__name__}")
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return LlavaOnevisionBackend(
        model,
        tokenizer,
        FramePreprocessor(size=IMAGE_SIZE),
        model_id=MODEL_ID,
        vision_batch_frames=vision_batch_frames,
    )


# The Qwen-VL checkpoints' language and vision sizes (their hub ``config.json``). Both tie the
# output head to the input embedding.
QWEN25_VL_3B = {
    "text": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
}
QWEN3_VL_2B = {
    "text": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 262144,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    },
    "vision": {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
    },
}


def qwen_model(config_class: type, sizes: dict, tokenizer, device: torch.device, dtype: torch.dtype, **kwargs):
    """A random ``config_class`` model of ``sizes`` built directly in ``dtype`` on ``device``, with the
    real vocabulary and the chat format's special ids from ``tokenizer``."""
    ids = tokenizer.convert_tokens_to_ids
    eos = ids("<|im_end|>")
    text = {
        **sizes["text"],
        "vocab_size": 151936,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    config = config_class(
        text_config=text,
        vision_config=dict(sizes["vision"]),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, **kwargs)
    model.generation_config.eos_token_id = eos
    return model


def build_qwen25_vl_3b(
    device: torch.device, dtype: torch.dtype, *, seed: int = 0, attn_implementation: str = "sdpa", **backend_kwargs
) -> Qwen25VLBackend:
    """``Qwen2.5-VL-3B-Instruct``'s dimensions (675 M vision, 3.1 B language parameters), random
    weights, frames at the backend's default resolution (756 x 756 px: the video processor's cap)."""
    tokenizer = build_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS, chat_template=QWEN_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = qwen_model(
        Qwen2_5_VLConfig, QWEN25_VL_3B, tokenizer, device, dtype, attn_implementation=attn_implementation
    )
    vision = model.config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    preprocessor = QwenFramePreprocessor(
        shape=square_frame_shape(DEFAULT_MAX_PIXELS, factor),
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
    )
    return Qwen25VLBackend(model, tokenizer, preprocessor, model_id="random-qwen2.5-vl-3b", **backend_kwargs)


def build_qwen3_vl_2b(
    device: torch.device, dtype: torch.dtype, *, seed: int = 0, attn_implementation: str = "sdpa", **backend_kwargs
) -> Qwen3VLBackend:
    """``Qwen3-VL-2B-Instruct``'s dimensions (about 0.4 B vision, 1.7 B language parameters, three
    DeepStack maps), random weights, frames at the backend's default resolution (864 x 864 px: the
    video processor's ceiling of 768 merged tokens per frame)."""
    tokenizer = build_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS, chat_template=QWEN3_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = qwen_model(Qwen3VLConfig, QWEN3_VL_2B, tokenizer, device, dtype, attn_implementation=attn_implementation)
    vision = model.config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    preprocessor = QwenFramePreprocessor(
        shape=square_frame_shape(DEFAULT_MAX_VIDEO_TOKENS * factor * factor, factor),
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        mean=QWEN3_MEAN,
        std=QWEN3_STD,
    )
    return Qwen3VLBackend(model, tokenizer, preprocessor, model_id="random-qwen3-vl-2b", **backend_kwargs)


def _build_llava(device: torch.device, dtype: torch.dtype, **kwargs) -> LlavaOnevisionBackend:
    # Admits caches past the checkpoint's 32,768 trained positions (``full`` at 10 minutes holds
    # 58,820 tokens): the cost is what such a cache costs; real weights would answer worse.
    return build_backend(device, dtype, max_positions=1 << 20, **kwargs)


#: Real-size random-weight models by name: ``build(device, dtype, *, seed, attn_implementation,
#: vision_batch_frames)``.
REAL_MODELS: dict[str, Callable[..., Any]] = {
    "llava-onevision-0.5b": _build_llava,
    "qwen2.5-vl-3b": build_qwen25_vl_3b,
    "qwen3-vl-2b": build_qwen3_vl_2b,
}


def frame_shape(backend: Any) -> tuple[int, int]:
    """The ``(height, width)`` frames are resized to before the vision tower."""
    pre = backend.preprocessor
    shape = getattr(pre, "shape", None)
    return tuple(shape) if shape is not None else (pre.size, pre.size)


def parameter_counts(backend: Any) -> dict[str, int]:
    """Parameters of the whole model, its vision tower (with the projector or merger) and language model."""
    model = backend.model

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    inner = model.model
    if hasattr(inner, "vision_tower"):  # LLaVA-OneVision: tower and projector apart
        vision = count(inner.vision_tower) + count(inner.multi_modal_projector)
    else:  # Qwen-VL: the merger is part of ``visual``
        vision = count(inner.visual)
    lm_head = 0 if model.lm_head.weight is inner.language_model.get_input_embeddings().weight else count(model.lm_head)
    return {
        "total": count(model),
        "vision": vision,
        "language_model": count(inner.language_model),
        "lm_head": lm_head,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def disable_eos(backend: Any) -> None:
    """Every answer then decodes exactly ``max_new_tokens`` tokens: methods do equal decoding work."""
    backend.eos_token_ids = frozenset()


# --------------------------------------------------------------------------- inputs


def timestamps(first: int, count: int, interval: float) -> np.ndarray:
    return np.arange(first, first + count, dtype=np.float64) * interval


def random_features(backend: Any, count: int, seed: int) -> torch.Tensor:
    """Random visual tokens ``[count, P, w]`` of ``count`` units in the model dtype, on the model
    device (``w``: the backend's ``feature_width`` where its tokens carry more than an embedding,
    Qwen3-VL's DeepStack maps, else the hidden size)."""
    g = torch.Generator().manual_seed(seed)
    p = backend.tokens_per_frame
    width = getattr(backend, "feature_width", backend.text.hidden_size)
    return torch.randn(count, p, width, generator=g).to(device=backend.device, dtype=backend.dtype)


def ingest_features(session: mukv.StreamSession, features: torch.Tensor, times: np.ndarray) -> None:
    """``memory.ingest`` in batches of ``SessionConfig.encode_batch_frames``, as ``ingest_source``
    hands frames to the memory (which keeps the stream's clock)."""
    batch = session.config.encode_batch_frames
    for start in range(0, features.shape[0], batch):
        session.memory.ingest(features[start : start + batch], times[start : start + batch])


def generic_warmup(backend: Any) -> None:
    """One small language-model prefill after the system prompt, so kernels are initialised
    before any measured region (common to every method)."""
    cache, init_len = backend.system_cache()
    g = torch.Generator().manual_seed(12345)
    embeds = torch.randn(1, backend.tokens_per_frame, backend.text.hidden_size, generator=g)
    embeds = embeds.to(device=backend.device, dtype=backend.dtype)
    positions = backend.positions.text(init_len, embeds.shape[1], backend.device)
    backend.forward(embeds, cache, positions, logits="last")
    synchronize(backend.device)


# --------------------------------------------------------------------------- synthetic states


def _random_kv(spec: Any, tokens: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    kv = torch.randn(spec.num_layers, 2, spec.num_kv_heads, tokens, spec.head_dim, generator=g)
    return kv.to(dtype)


def mukv_block_tokens(backend: Any, config: Any) -> dict[str, tuple[int, list[torch.Tensor]]]:
    """``granularity -> (units per block, token indices [n] of each part within its units)``."""
    layout = backend.layout
    p, f = layout.tokens, config.segment_frames
    return {
        "patch": (1, patch_token_indices(layout, config.patch_layout)),
        "frame": (1, [torch.arange(p)]),
        "segment": (f, [torch.arange(f * p)]),
    }


def fill_mukv(session: mukv.StreamSession, first: int, count: int, interval: float, seed: int) -> None:
    """Frames ``first .. first+count-1`` (whole segments) of a MuKV store as an ``independent``-
    encoded stream would hold them: per frame four patch blocks and a frame block, per segment a
    segment block, each with random K/V of the exact kept size, random kept tokens at the positions
    the backend's scheme gives a block prefilled on its own after the system prompt, random scores
    and a random representative; adopted with ``BlockMemory.restore``."""
    memory = session.memory
    backend = memory.backend
    cfg = memory.config
    f = cfg.segment_frames
    if first != memory.frames or count % f:
        raise ValueError("fill_mukv: whole segments, continuing the stream")
    spec = backend.text
    scheme, layout = backend.positions, backend.layout
    g = torch.Generator().manual_seed(seed + first)
    reps = spec.num_kv_heads * spec.head_dim
    wanted = {name for name in ("patch", "frame", "segment") if cfg.granularities.get(name)}
    layouts = {}
    for name, (units, parts) in mukv_block_tokens(backend, cfg).items():
        if name in wanted:
            ratio = cfg.keep_ratio.get(name)
            layouts[name] = [(scheme.block(memory.init_len, layout, units, idx)[0], ratio) for idx in parts]

    def block(name: str, part: int, first_frame: int, last_frame: int) -> EncodedBlock:
        positions, keep_ratio = layouts[name][part]
        n = positions.shape[1]
        keep = keep_count(n, keep_ratio)
        kept = torch.randperm(n, generator=g)[:keep].sort().values
        payload = BlockPayload(
            kv=_random_kv(spec, keep, backend.dtype, g),
            positions=positions[:, kept],
            kept=kept,
            scores=torch.rand(n, generator=g),
        )
        return EncodedBlock(
            granularity=name,
            first_frame=first_frame,
            last_frame=last_frame,
            part=part,
            start_time=first_frame * interval,
            end_time=last_frame * interval,
            payload=payload,
            representative=torch.randn(reps, generator=g),
        )

    blocks = []
    for segment_start in range(first, first + count, f):
        for frame in range(segment_start, segment_start + f):
            if "frame" in layouts:
                blocks.append(block("frame", 0, frame, frame))
            for part in range(len(layouts.get("patch", []))):
                blocks.append(block("patch", part, frame, frame))
        if "segment" in layouts:
            blocks.append(block("segment", 0, segment_start, segment_start + f - 1))
    memory.restore(blocks, timestamps(first, count, interval).tolist())


def fill_rekv(session: mukv.StreamSession, first: int, count: int, interval: float, seed: int) -> None:
    """Frames ``first .. first+count-1`` of a ReKV store: blocks of ``block_frames`` frames with
    every token kept, random K/V at the positions the sliding window computes them at (the
    backend's scheme, consecutive from the system prompt), random per-layer representatives;
    adopted with ``BlockMemory.restore``."""
    memory = session.memory
    backend = memory.backend
    frames_per_block = memory.config.block_frames
    if first != memory.frames or count % frames_per_block:
        raise ValueError("fill_rekv: whole blocks, continuing the stream")
    spec = backend.text
    scheme, layout = backend.positions, backend.layout
    g = torch.Generator().manual_seed(seed + first)
    cursor = memory.init_len + first * layout.tokens
    blocks = []
    for start in range(first, first + count, frames_per_block):
        last = start + frames_per_block - 1
        positions, cursor = scheme.visual(cursor, layout, frames_per_block)
        tokens = positions.shape[1]
        payload = BlockPayload(
            kv=_random_kv(spec, tokens, backend.dtype, g),
            positions=positions,
            kept=torch.arange(tokens),
            scores=torch.empty(0),
        )
        blocks.append(
            EncodedBlock(
                granularity=memory.store_granularity,
                first_frame=start,
                last_frame=last,
                part=0,
                start_time=start * interval,
                end_time=last * interval,
                payload=payload,
                representative=torch.randn(spec.num_layers, spec.num_kv_heads * spec.head_dim, generator=g),
            )
        )
    memory.restore(blocks, timestamps(first, count, interval).tolist())


def fill_full(session: mukv.StreamSession, first: int, count: int, interval: float, seed: int) -> None:
    """Frames ``first .. first+count-1`` of a ``full`` cache: random K/V of ``count * P`` tokens per
    layer, adopted with ``FullMemory.restore``."""
    memory = session.memory
    backend = memory.backend
    if first != memory.frames:
        raise ValueError("fill_full: continuing the stream")
    spec = backend.text
    tokens = count * backend.tokens_per_frame
    g = torch.Generator(device=backend.device).manual_seed(seed + first)
    shape = (1, spec.num_kv_heads, tokens, spec.head_dim)
    layers = []
    for _ in range(spec.num_layers):
        pair = tuple(
            torch.empty(shape, device=backend.device, dtype=backend.dtype).normal_(generator=g) for _ in range(2)
        )
        layers.append(pair)
    memory.restore(layers, timestamps(first, count, interval).tolist())


def fill_ingest(session: mukv.StreamSession, first: int, count: int, interval: float, seed: int) -> None:
    """Frames ``first .. first+count-1`` as random visual features through ``memory.ingest`` (the
    method's own ingest, in chunks of 64 frames)."""
    backend = session.memory.backend
    for start in range(first, first + count, 64):
        n = min(64, first + count - start)
        ingest_features(session, random_features(backend, n, seed + start), timestamps(start, n, interval))


def clone_groups(
    session: mukv.StreamSession, template: list[EncodedBlock], group: int, groups: int, interval: float, seed: int
) -> None:
    """Extend a block store by ``groups`` copies of ``template`` (the blocks a method encoded for the
    units ``0 .. group-1``, e.g. one MuKV segment, ``interval`` seconds apart), each ``group`` units
    later than the one before:
    frame indices and times shifted, each copy given its own random representative (so retrieval
    ranks distinct blocks), its K/V, positions and kept indices **shared** with the template's
    (views, no copy). ``stats()`` counts every copy's bytes as stored; the process holds one.
    Ranking sees distinct representatives, and assembly copies the chosen blocks' K/V out of the
    store as it would from distinct blocks, with one difference: every copy reads the template's
    memory, so where the template fits in the CPU's last-level cache (one LLaVA-OneVision 0.5B
    segment: 19 MB in float32; a Qwen-VL one is 215 MB or more) assembly reads from cache rather
    than from DRAM and is timed faster than on distinct blocks. The stage is reported apart
    (``answer.timings.stages["assemble"]``)."""
    memory = session.memory
    if memory.frames % group:
        raise ValueError(f"clone_groups: the store holds {memory.frames} units, not whole groups of {group}")
    g = torch.Generator().manual_seed(seed + memory.frames)
    for _ in range(groups):
        shift = memory.frames
        dt = shift * interval
        blocks = [
            EncodedBlock(
                granularity=b.granularity,
                first_frame=b.first_frame + shift,
                last_frame=b.last_frame + shift,
                part=b.part,
                start_time=b.start_time + dt,
                end_time=b.end_time + dt,
                payload=b.payload,
                representative=torch.randn(b.representative.shape, generator=g).to(b.representative.dtype),
            )
            for b in template
        ]
        memory.restore(blocks, [memory.timestamp(i) + dt for i in range(group)])


def stored_blocks(session: mukv.StreamSession) -> list[EncodedBlock]:
    """The stored (not provisional) blocks of a block-based method, as :class:`EncodedBlock` s
    (payloads and representatives are the store's own tensors)."""
    store = session.memory.store
    provisional = set(session.memory.provisional_ids)
    return [
        EncodedBlock(
            granularity=r.granularity,
            first_frame=r.first_frame,
            last_frame=r.last_frame,
            part=r.part,
            start_time=r.start_time,
            end_time=r.end_time,
            payload=store.payload(r.block_id),
            representative=store.representative(r.block_id),
        )
        for r in store.records()
        if r.block_id not in provisional
    ]


# --------------------------------------------------------------------------- memory and stats


def meminfo_bytes(field: str) -> int | None:
    """A ``/proc/meminfo`` field (``MemAvailable``, ``Cached``) in bytes; ``None`` where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes() -> int | None:
    return meminfo_bytes("MemAvailable")


def free_memory_bytes(backend: Any) -> int | None:
    if backend.device.type == "cuda":
        return torch.cuda.mem_get_info(backend.device)[0]
    return available_memory_bytes()


def stats_dict(stats: Any) -> dict[str, Any]:
    return {
        "frames": stats.frames,
        "blocks": dict(stats.blocks),
        "tokens": dict(stats.tokens),
        "bytes": dict(stats.bytes),
        "total_bytes": stats.total_bytes,
    }


def full_cache_need(backend: Any, frames: int) -> int:
    """Bytes a ``full`` cache of ``frames`` frames needs while answering: held three times over (the
    stored cache, plus the old and new copy of each decoding step's ``DynamicCache`` concatenation)."""
    return 3 * frames * backend.tokens_per_frame * backend.text.kv_bytes_per_token(backend.dtype)


@dataclass(frozen=True)
class Scenario:
    """One configuration of a benchmark: ``method`` with ``overrides``, whose state ``fill(session,
    first, count, interval, seed)`` extends by ``count`` frames. ``need(backend, frames)``, when
    given, is the memory the state needs while answering (a length that does not fit is skipped)."""

    name: str
    method: str
    fill: Callable[..., None]
    overrides: dict[str, Any] = field(default_factory=dict)
    need: Callable[[Any, int], int] | None = None

    def session(self, backend: Any) -> mukv.StreamSession:
        return mukv.StreamSession(backend, self.method, overrides=dict(self.overrides) or None)


# --------------------------------------------------------------------------- questions


def answer_dict(answer: Any, init_len: int, wall: float) -> dict[str, Any]:
    t = answer.timings
    by_g: dict[str, dict[str, int]] = {}
    for block in answer.retrieved:
        entry = by_g.setdefault(block.granularity, {"blocks": 0, "tokens": 0})
        entry["blocks"] += 1
        entry["tokens"] += block.tokens
    decode_steps = answer.generated_tokens - 1
    return {
        "timings": t.to_dict(),
        "ask_wall_seconds": wall,
        "context_tokens": answer.context_tokens,
        "visual_context_tokens": answer.context_tokens - init_len,
        "retrieved": by_g,
        "generated_tokens": answer.generated_tokens,
        "stop_reason": answer.stop_reason,
        "decode_seconds_per_token": (t.total - t.first_token) / decode_steps if decode_steps > 0 else None,
        "stored_bytes": answer.memory.total_bytes,
    }


def timed_ask(session: mukv.StreamSession, max_new_tokens: int) -> dict[str, Any]:
    """One ``session.ask`` of :data:`QUESTION`, timed (on CUDA, synchronised around it)."""
    synchronize(session.backend.device)
    start = time.perf_counter()
    answer = session.ask(QUESTION, max_new_tokens=max_new_tokens)
    synchronize(session.backend.device)
    return answer_dict(answer, session.backend.system_cache()[1], time.perf_counter() - start)


def warm_asks(session: mukv.StreamSession, count: int) -> None:
    """Untimed short questions on a freshly filled state: the first questions after a large fill
    pay one-off allocator and page-fault costs that a long-running stream has long paid."""
    for _ in range(count):
        session.ask(QUESTION, max_new_tokens=2)


def summarize_asks(asks: list[dict[str, Any]]) -> dict[str, Any]:
    """The first ask's record, plus every ask and the medians over all of them (timings, decode
    seconds per token, and each of ``timings.stages``)."""
    out = dict(asks[0])
    out["asks"] = asks
    out["median"] = {
        key: statistics.median(a["timings"][key] for a in asks) for key in ("prepare", "first_token", "total")
    }
    steps = [a["decode_seconds_per_token"] for a in asks if a["decode_seconds_per_token"] is not None]
    out["median"]["decode_seconds_per_token"] = statistics.median(steps) if steps else None
    stages = list(dict.fromkeys(k for a in asks for k in a["timings"].get("stages", {})))
    out["median_stages"] = {k: statistics.median(a["timings"]["stages"].get(k, 0.0) for a in asks) for k in stages}
    return out
