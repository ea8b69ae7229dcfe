"""Tiny LLaVA-OneVision checkpoints built offline, deterministically, with the real classes.

The result is an ordinary checkpoint directory (config, safetensors weights, tokenizer,
preprocessing config) that :func:`mukv.backends.load_backend` loads like a hub checkpoint. Its
weights are random: it exercises every code path at full fidelity but answers nonsense.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    Qwen2Tokenizer,
    SiglipVisionConfig,
)

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# The chat format the tiny model is trained in, which is the session's prompt format
# (:class:`mukv.backends.prompts.PromptTemplate`, the Qwen2 format of the MuKV/ReKV releases with
# the space after ``system`` and ``user``): no newline between turns, visual placeholders right
# after ``user ``, each text part after a newline. One line, no whitespace control, so that no
# newline is added or lost; a test renders it against the session's prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system {{ '\\n' }}You are a helpful assistant.<|im_end|>{% endif %}"
    "<|im_start|>{{ message['role'] }}{% if message['role'] == 'user' %} "
    "{% elif message['role'] == 'system' %} {{ '\\n' }}{% else %}{{ '\\n' }}{% endif %}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% endif %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'video' %}<video>"
    "{% elif content['type'] == 'text' %}{% if message['role'] == 'user' %}{{ '\\n' }}{% endif %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)

# Training text for the tiny tokenizer: enough English to give it real merges. Fixed, so the
# tokenizer is the same on every machine.
_CORPUS = (
    "You are a helpful assistant. What colour was the triangle? What colour was the circle?",
    "What appeared right after the red circle? What is in the top left corner of the frame?",
    "Which object moved to the left? How many squares were there? What did the person hold?",
    "Where is the cup? What happened before the door opened? Describe the scene in the video.",
    "The red circle moved left. A blue square appeared in the corner. The green triangle was small.",
    "A yellow star, a white box, a black cat, an orange ball and a purple hat were on the table.",
    "Answer with one word. Only give the best option. Best option: (A) (B) (C) (D) (E)",
    "yes no one two three four five six seven eight nine ten first last before after",
)


@dataclass(frozen=True, kw_only=True)
class TinyModelSpec:
    """Sizes of a tiny LLaVA-OneVision. ``image_size // patch_size`` patches per side are pooled
    to ``ceil(side / 2) ** 2`` tokens per frame (16 at 112 px, patch 14)."""

    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 32768
    rope_theta: float = 1_000_000.0
    vocab_size: int = 512


def build_tokenizer(
    vocab_size: int = 512, *, special_tokens: Sequence[str] = SPECIAL_TOKENS, chat_template: str = CHAT_TEMPLATE
) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer in the Qwen2 format, trained on a fixed corpus, with
    ``special_tokens`` and ``chat_template`` (LLaVA-OneVision's by default)."""
    alphabet = sorted(ByteLevel.alphabet())
    base = Qwen2Tokenizer(
        vocab={"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}},
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    corpus = list(_CORPUS) * 4
    tokenizer = base.train_new_from_iterator(corpus, vocab_size=vocab_size, new_special_tokens=list(special_tokens))
    tokenizer.chat_template = chat_template
    return tokenizer


def create_tiny_model(
    *, seed: int = 0, spec: TinyModelSpec | None = None, tokenizer: Qwen2Tokenizer | None = None
) -> tuple[LlavaOnevisionForConditionalGeneration, Qwen2Tokenizer]:
    """A tiny random LLaVA-OneVision and its tokenizer, in memory (deterministic by ``seed``)."""
    spec = spec or TinyModelSpec()
    if spec.image_size % spec.patch_size:
        raise ValueError(f"image_size: {spec.image_size} is not a multiple of patch_size {spec.patch_size}")
    tokenizer = tokenizer or build_tokenizer(spec.vocab_size)
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    side = spec.image_size
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = text.eos_token_id
    return model, tokenizer


def save_checkpoint(model, tokenizer, directory: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` as a checkpoint directory the normal loading path reads."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    side = model.config.vision_config.image_size
    preprocessing = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255,
        "resample": 3,
        "size": {"height": side, "width": side},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessing, indent=2) + "\n")
    return out


def build_tiny_model(directory: str | Path, *, seed: int = 0, spec: TinyModelSpec | None = None) -> Path:
    """Write a tiny random LLaVA-OneVision checkpoint to ``directory`` and return its path.

    Deterministic: the same ``seed`` and ``spec`` give byte-identical weights and tokenizer.
    """
    model, tokenizer = create_tiny_model(seed=seed, spec=spec)
    return save_checkpoint(model, tokenizer, directory)
