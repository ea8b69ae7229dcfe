"""Tiny Qwen-VL checkpoints built offline, deterministically, with the real classes.

Like :mod:`mukv.backends.tiny` (whose tokenizer builder they reuse): an ordinary checkpoint
directory in the hub's layout (config, safetensors weights, tokenizer with the Qwen-VL chat
template, image and video processor configs) that :func:`mukv.backends.load_backend` loads like a
hub checkpoint. The language model keeps the real head dimension (128) so that the real M-RoPE
sections apply; everything else is small. Random weights: it answers nonsense.

The tiny Qwen3-VL's vision tower has two layers, and both feed DeepStack maps
(``deepstack_visual_indexes = [0, 1]``), so the first two language layers get visual features
added; its patches are 16 px, merged 2 x 2 (a 64 x 64 px frame is a 2 x 2 token grid).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from mukv.backends.qwen_vl import CLIP_MEAN, CLIP_STD
from mukv.backends.tiny import build_tokenizer

QWEN_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Both families' chat templates after the loop over messages opens: each turn as
# <|im_start|>role ... <|im_end|>, visual placeholders inside <|vision_start|>...<|vision_end|>,
# newlines after each role and turn.
_CHAT_TURNS = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The Qwen2-VL / Qwen2.5-VL chat template (the hub checkpoints' own, without tool calls): a
# default system turn, then the turns.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" + _CHAT_TURNS
)
FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True, kw_only=True)
class TinyQwenSpec:
    """Sizes of a tiny Qwen-VL. ``frame_pixels`` is the per-frame pixel budget written to the video
    processor config (the backend's default resolution): 56 x 56 px, a 2 x 2 merged grid."""

    text_hidden: int = 256
    text_layers: int = 3
    text_heads: int = 2
    text_kv_heads: int = 1
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    frame_pixels: int = 56 * 56
    max_positions: int = 32768
    rope_theta: float = 1_000_000.0
    vocab_size: int = 512


def _vl_config(
    config_class: type,
    spec: TinyQwenSpec | TinyQwen3Spec,
    tokenizer,
    *,
    text: dict | None = None,
    rope: dict | None = None,
    vision: dict | None = None,
):
    """A ``config_class`` (Qwen2.5-VL or Qwen3-VL config) from the sizes in ``spec`` both families
    share, with the family's own ``text``, ``rope`` (``rope_parameters``) and ``vision`` entries, and
    the chat format's special token ids."""
    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": 2 * spec.text_hidden,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        **(text or {}),
        "max_position_embeddings": spec.max_positions,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": spec.rope_theta,
            "mrope_section": list(spec.mrope_section),
            **(rope or {}),
        },
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": spec.vision_layers,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": 2 * spec.vision_hidden,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.text_hidden,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        **(vision or {}),
    }
    return config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _seeded_model(model_class: type, config, seed: int):
    """A random ``model_class`` of ``config`` drawn with ``seed`` (the global RNG left as it was), in
    eval mode, generation stopping at the text config's end-of-sequence id."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        # float32 explicitly: a config naming another dtype can give a mixed-precision model.
        model = model_class._from_config(config, dtype=torch.float32).eval()
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model


def _write_checkpoint(
    model,
    tokenizer,
    directory: str | Path,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    patches: tuple[int, int, int],
    image: dict,
    video: dict,
) -> Path:
    """Write ``model``, ``tokenizer`` and the image and video processor configs to ``directory`` in
    the hub's file layout: both configs normalise with ``mean`` and ``std`` and cut ``patches`` (patch
    size, merge size, temporal patch size), then add their own ``image`` and ``video`` entries."""
    patch_size, merge_size, temporal_patch_size = patches
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    common = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "rescale_factor": 1 / 255,
        "resample": 3,
        "patch_size": patch_size,
        "merge_size": merge_size,
        "temporal_patch_size": temporal_patch_size,
    }
    (out / "preprocessor_config.json").write_text(json.dumps({**common, **image}, indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps({**common, **video}, indent=2) + "\n")
    return out


def _qwen25_config(spec: TinyQwenSpec, tokenizer) -> Qwen2_5_VLConfig:
    vision = {
        "tokens_per_second": spec.tokens_per_second,
        "window_size": 2 * spec.patch_size * spec.merge_size,
        "fullatt_block_indexes": [spec.vision_layers - 1],
    }
    return _vl_config(Qwen2_5_VLConfig, spec, tokenizer, vision=vision)


def create_tiny_qwen(family: str = "qwen2_5_vl", *, seed: int = 0, spec: TinyQwenSpec | None = None):
    """A tiny random Qwen2.5-VL (``family``) and its tokenizer, in memory (deterministic); Qwen3-VL:
    :func:`create_tiny_qwen3`."""
    if family != "qwen2_5_vl":
        raise ValueError(f"family: this builds qwen2_5_vl (create_tiny_qwen3 builds qwen3_vl), got {family!r}")
    spec = spec or TinyQwenSpec()
    tokenizer = build_tokenizer(spec.vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, chat_template=QWEN_CHAT_TEMPLATE)
    return _seeded_model(Qwen2_5_VLForConditionalGeneration, _qwen25_config(spec, tokenizer), seed), tokenizer


def save_tiny_qwen(model, tokenizer, directory: str | Path, spec: TinyQwenSpec | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` with the processors' configs, in the hub's file layout."""
    spec = spec or TinyQwenSpec()
    vision = model.config.vision_config
    patches = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    image = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64}
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": 56 * 56, "longest_edge": spec.frame_pixels},
    }
    return _write_checkpoint(
        model, tokenizer, directory, mean=CLIP_MEAN, std=CLIP_STD, patches=patches, image=image, video=video
    )


def build_tiny_qwen(
    directory: str | Path, family: str = "qwen2_5_vl", *, seed: int = 0, spec: TinyQwenSpec | None = None
) -> Path:
    """Write a tiny random Qwen-VL checkpoint of ``family`` to ``directory`` and return its path."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "qwen3_vl":
        return build_tiny_qwen3(directory, seed=seed)
    model, tokenizer = create_tiny_qwen(family, seed=seed, spec=spec)
    return save_tiny_qwen(model, tokenizer, directory, spec)


# transformers' IMAGENET_STANDARD_MEAN / _STD, which Qwen3VLVideoProcessor normalises with.
QWEN3_MEAN = (0.5, 0.5, 0.5)
QWEN3_STD = (0.5, 0.5, 0.5)
# The Qwen3-VL chat template (the hub checkpoints' own, without tools and reasoning): no default
# system turn, a video as <|vision_start|><|video_pad|><|vision_end|> that the processor expands into
# one timestamped span per temporal group.
QWEN3_CHAT_TEMPLATE = "{% for message in messages %}" + _CHAT_TURNS


@dataclass(frozen=True, kw_only=True)
class TinyQwen3Spec:
    """Sizes of a tiny Qwen3-VL. ``frame_pixels`` is the per-frame pixel budget written to the video
    processor config (``max_video_tokens`` merged tokens' worth): 64 x 64 px, a 2 x 2 merged grid."""

    text_hidden: int = 256
    text_layers: int = 3
    text_heads: int = 2
    text_kv_heads: int = 1
    head_dim: int = 128
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    deepstack_indexes: tuple[int, ...] = (0, 1)
    num_position_embeddings: int = 16
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    max_video_tokens: int = 4
    max_positions: int = 32768
    rope_theta: float = 5_000_000.0
    vocab_size: int = 512


def _qwen3_config(spec: TinyQwen3Spec, tokenizer) -> Qwen3VLConfig:
    vision = {
        "num_position_embeddings": spec.num_position_embeddings,
        "deepstack_visual_indexes": list(spec.deepstack_indexes),
    }
    text = {"head_dim": spec.head_dim}
    return _vl_config(Qwen3VLConfig, spec, tokenizer, text=text, rope={"mrope_interleaved": True}, vision=vision)


def create_tiny_qwen3(*, seed: int = 0, spec: TinyQwen3Spec | None = None):
    """A tiny random Qwen3-VL model and its tokenizer, in memory (deterministic)."""
    spec = spec or TinyQwen3Spec()
    tokenizer = build_tokenizer(spec.vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, chat_template=QWEN3_CHAT_TEMPLATE)
    return _seeded_model(Qwen3VLForConditionalGeneration, _qwen3_config(spec, tokenizer), seed), tokenizer


def build_tiny_qwen3(directory: str | Path, *, seed: int = 0, spec: TinyQwen3Spec | None = None) -> Path:
    """Write a tiny random Qwen3-VL checkpoint to ``directory`` (weights, tokenizer, image and video
    processor configs in the hub's layout) and return its path."""
    spec = spec or TinyQwen3Spec()
    model, tokenizer = create_tiny_qwen3(seed=seed, spec=spec)
    factor = spec.patch_size * spec.merge_size
    patches = (spec.patch_size, spec.merge_size, spec.temporal_patch_size)
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "size": {"shortest_edge": factor * factor, "longest_edge": 64 * factor * factor},
    }
    # ``longest_edge`` is a whole video's budget; a stream's frames take ``max_video_tokens`` each.
    video = {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "size": {"shortest_edge": factor * factor, "longest_edge": 256 * factor * factor},
        "max_video_tokens": spec.max_video_tokens,
        "fps": 2,
    }
    return _write_checkpoint(
        model, tokenizer, directory, mean=QWEN3_MEAN, std=QWEN3_STD, patches=patches, image=image, video=video
    )
