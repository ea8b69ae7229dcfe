"""What every transformers-backed family shares: loading a checkpoint with clear errors, its
end-of-sequence ids, and the language-model operations of the backend protocol (tokens, embeddings,
the system prompt's cache, attention hooks)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, DynamicCache

from mukv.backends.base import Logits, TextModelSpec
from mukv.backends.positions import PositionScheme
from mukv.backends.prompts import PromptTemplate
from mukv.backends.transformers_api import check_cache_grew
from mukv.compress.attention import attention_hook, capture_attention
from mukv.config import BackendConfig, check_fps
from mukv.errors import ModelLoadError


def load_pretrained(config: BackendConfig, directory: Path, *, model_type: str, model_class: type, dtype: torch.dtype):
    """``(model, tokenizer, model_config)`` of the checkpoint in ``directory``, which must be a
    ``model_type`` checkpoint; :class:`ModelLoadError` names what is missing or wrong."""
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"model {config.model!r}: {directory} has no config.json")
    try:
        model_config = AutoConfig.from_pretrained(directory)
    except Exception as exc:
        raise ModelLoadError(f"model {config.model!r}: unreadable config.json in {directory}: {exc}") from exc
    if model_config.model_type != model_type:
        raise ModelLoadError(
            f"model {config.model!r}: this backend loads {model_type} checkpoints, not "
            f"{model_config.model_type!r} (load_backend picks the backend by model_type)"
        )
    try:
        model = model_class.from_pretrained(directory, dtype=dtype, attn_implementation=config.attn_implementation)
    except Exception as exc:
        raise ModelLoadError(f"model {config.model!r}: could not load weights from {directory}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:
        raise ModelLoadError(f"model {config.model!r}: could not load the tokenizer from {directory}: {exc}") from exc
    return model, tokenizer, model_config


def text_model_spec(text) -> TextModelSpec:
    """Shape facts of the language model from its config ``text``."""
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rope = getattr(text, "rope_parameters", None) or {}
    return TextModelSpec(
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        head_dim=head_dim,
        hidden_size=text.hidden_size,
        max_positions=text.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
    )


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """End-of-sequence ids from the generation config, the text config, the tokenizer and the chat
    format's ``<|im_end|>``."""
    ids: set[int] = set()
    text_config = model.config.get_text_config()
    for source in (getattr(model, "generation_config", None), text_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(ids)


class LanguageModelOps:
    """The protocol's language-model side, for a backend that sets ``model``, ``tokenizer``,
    ``prompts``, ``positions``, ``layout``, ``device``, ``dtype``, ``_lm`` (the language model) and
    ``_embed``, and says how its model takes positions (:meth:`model_position_ids`)."""

    model: torch.nn.Module
    prompts: PromptTemplate
    device: torch.device

    def _init_system_prompt(self) -> None:
        self._system_lock = threading.Lock()
        self._system: tuple[list[tuple[torch.Tensor, torch.Tensor]], int] | None = None

    def stream_positions(self, fps: float | None) -> PositionScheme:
        """The scheme of a stream sampled at ``fps`` frames per second: :attr:`positions` (1-D RoPE
        and other schemes without a time step place frames the same at any rate)."""
        check_fps(fps)
        return self.positions

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per unit (``layout.tokens``)."""
        return self.layout.tokens

    def unit_text(self, time: float) -> tuple[str, str]:
        """No text around a visual unit (see the protocol): a family that writes some overrides it."""
        return "", ""

    def tokenize(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids.to(self.device)

    @torch.inference_mode()
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embed(ids.to(self.device))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_positions(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> None:
        """``ValueError`` unless ``position_ids`` is ``[R, n]`` for ``embeds [B, n, d]``."""
        if position_ids.ndim != 2 or position_ids.shape != (self.positions.rows, embeds.shape[1]):
            raise ValueError(
                f"position_ids: expected [{self.positions.rows}, {embeds.shape[1]}], got {list(position_ids.shape)}"
            )

    def model_position_ids(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """The language model's ``position_ids`` for ``batch`` sequences at ``position_ids [R, n]``."""
        raise NotImplementedError

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        cache: DynamicCache,
        position_ids: torch.Tensor,
        logits: Logits = "last",
    ) -> torch.Tensor | None:
        """Language model over ``embeds [B, n, d]`` at ``position_ids [R, n]``; see the protocol."""
        self.check_positions(embeds, position_ids)
        return self._run_language_model(embeds.to(device=self.device, dtype=self.dtype), cache, position_ids, logits)

    def _run_language_model(
        self,
        embeds: torch.Tensor,
        cache: DynamicCache,
        position_ids: torch.Tensor,
        logits: Logits,
        **extra,
    ) -> torch.Tensor | None:
        """The language model over ``embeds [B, n, d]`` (on the backend's device and dtype, positions
        checked) with the model's own ``extra`` arguments: appends to ``cache`` and fails loudly if it
        did not grow by ``n``; the logits ``forward`` asks for."""
        before = cache.get_seq_length()
        out = self._lm(
            inputs_embeds=embeds,
            cache=cache,
            position_ids=self.model_position_ids(position_ids.to(self.device), embeds.shape[0]),
            use_cache=True,
            **extra,
        )
        check_cache_grew(cache, before, embeds.shape[1])
        if logits == "none":
            return None
        hidden = out.last_hidden_state if logits == "all" else out.last_hidden_state[:, -1:]
        return self.model.lm_head(hidden).float()

    def capture_attention(self, weights: dict[int, float], query_layer: int | None = None):
        """Context manager recording the named layers' attention (see :mod:`mukv.compress.attention`)."""
        return capture_attention(self.model, weights, query_layer)

    def attention_hook(self, hook):
        """Context manager routing every language-model attention call through ``hook``."""
        return attention_hook(self.model, hook)

    def system_cache(self) -> tuple[DynamicCache, int]:
        """A fresh cache holding the system prompt's KV (computed once, copied per call; thread-safe)."""
        with self._system_lock:
            if self._system is None:
                ids = self.tokenize(self.prompts.system)
                cache = DynamicCache()
                self.forward(self.embed_ids(ids), cache, self.positions.text(0, ids.shape[1], self.device), "none")
                layers = [(layer.keys, layer.values) for layer in cache.layers]
                self._system = (layers, ids.shape[1])
        layers, length = self._system
        return DynamicCache(ddp_cache_data=layers), length
