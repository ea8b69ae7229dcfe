"""The random-weight LLaVA-OneVision 0.5B model and synthetic stream states of the cost benchmarks.

- :func:`build_backend`: a model with the dimensions of ``llava-onevision-qwen2-0.5b-ov`` and random
  weights (nothing downloaded), wrapped as ``load_backend`` wraps a checkpoint.
- Synthetic states, through the package's public API only: :func:`fill_mukv` and :func:`fill_rekv`
  adopt encoded blocks of the exact kept sizes (random K/V, the positions the backend's scheme
  gives, random representatives) with ``BlockMemory.restore``; :func:`fill_full` adopts a random
  K/V cache with ``FullMemory.restore``; :func:`fill_ingest` feeds random visual features to
  ``memory.ingest`` (``uniform``, ``recent``: their ingest is cheap or bounded).
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
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

import mukv
from mukv.backends.llava_onevision import LlavaOnevisionBackend
from mukv.backends.tiny import build_tokenizer
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


def parameter_counts(backend: LlavaOnevisionBackend) -> dict[str, int]:
    model = backend.model

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "total": count(model),
        "vision_tower": count(model.model.vision_tower),
        "projector": count(model.model.multi_modal_projector),
        "language_model": count(model.model.language_model),
        "lm_head": count(model.lm_head),
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
    """Random visual tokens ``[count, P, d]`` in the model dtype, on the model device."""
    g = torch.Generator().manual_seed(seed)
    p, d = backend.tokens_per_frame, backend.text.hidden_size
    return torch.randn(count, p, d, generator=g).to(device=backend.device, dtype=backend.dtype)


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
    embeds = random_features(backend, 1, seed=12345).reshape(1, -1, backend.text.hidden_size)
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
