"""LLaVA-OneVision through transformers 5.x: the reference backend.

Uses the model's own vision tower, projector and bilinear pooling
(``model.model.get_video_features``) and runs ``model.model.language_model`` plus ``lm_head``
over embeddings with a ``DynamicCache`` and explicit ``position_ids``. Nothing here patches the
model.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, DynamicCache, LlavaOnevisionForConditionalGeneration

from mukv.backends.base import Logits, TextModelSpec
from mukv.backends.prompts import PromptTemplate
from mukv.backends.transformers_api import check_cache_grew
from mukv.compress.attention import attention_hook, capture_attention, use_hooked_attention
from mukv.config import BackendConfig
from mukv.errors import ModelLoadError
from mukv.models import shipped_model_dir
from mukv.video.preprocess import PREPROCESSOR_FILES, FramePreprocessor, as_frames

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llava_onevision",)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "video_processor/*"]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Map a dtype name to torch; ``auto`` is float32 on CPU and bfloat16 (or float16) on CUDA."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_device(device: str) -> torch.device:
    """Parse ``device``; a CUDA device on a machine without CUDA is a ``ValueError``."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available on this machine")
    return parsed


def video_tokens_per_frame(image_size: int, patch_size: int) -> int:
    """Visual tokens per video frame: ``get_video_features`` pools the grid x grid patch
    features bilinearly to ``ceil(grid / 2) ** 2`` (196 at 384 px / patch 14, 16 at 112 px)."""
    grid = image_size // patch_size
    return math.ceil(grid / 2) ** 2


def resolve_model_dir(model: str) -> Path:
    """A local directory for ``model``: the directory itself, a checkpoint shipped with the
    package (``mukv-tiny``; a local directory of the same name wins, as it does over hub ids), or
    a hub snapshot.

    Raises :class:`ModelLoadError` naming both the local path and the hub id that were tried.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    shipped = shipped_model_dir(model)
    if shipped is not None:
        return shipped
    if path.exists():
        raise ModelLoadError(f"model {model!r}: {path.resolve()} is a file; expected a model directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # hub errors come in many types; all mean "not loadable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load model {model!r}: no local directory at {path.resolve()}, and the Hugging Face "
            f"Hub id {model!r} could not be fetched ({type(exc).__name__}: {reason}). Pass a local "
            "checkpoint directory, or build an offline model with `mukv tiny-model DIR`."
        ) from exc


class LlavaOnevisionBackend:
    """A loaded LLaVA-OneVision checkpoint (see :class:`mukv.backends.base.Backend`)."""

    def __init__(
        self,
        model: LlavaOnevisionForConditionalGeneration,
        tokenizer,
        preprocessor: FramePreprocessor,
        *,
        model_id: str,
        prompts: PromptTemplate | None = None,
        vision_batch_frames: int = 16,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.model_id = model_id
        self.prompts = prompts or PromptTemplate()
        self.vision_batch_frames = vision_batch_frames
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._lm = model.model.language_model
        self._embed = self._lm.get_input_embeddings()
        config = model.config
        text = config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rope = getattr(text, "rope_parameters", None) or {}
        self.text = TextModelSpec(
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=head_dim,
            hidden_size=text.hidden_size,
            max_positions=text.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
        )
        self.tokens_per_frame = video_tokens_per_frame(config.vision_config.image_size, config.vision_config.patch_size)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._system_lock = threading.Lock()
        # Configured once, here: scoring and retrieval hooks then never change the model's config.
        use_hooked_attention(model)
        self._system: tuple[list[tuple[torch.Tensor, torch.Tensor]], int] | None = None

    @classmethod
    def from_pretrained(cls, config: BackendConfig | None = None, **overrides) -> LlavaOnevisionBackend:
        """Load from a hub id or a local directory (``BackendConfig.model``).

        Raises :class:`ModelLoadError` for unknown ids, missing files and unsupported
        architectures, and ``ValueError`` for invalid device/dtype values.
        """
        config = config or BackendConfig(**overrides)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        directory = resolve_model_dir(config.model)
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"model {config.model!r}: {directory} has no config.json")
        try:
            model_config = AutoConfig.from_pretrained(directory)
        except Exception as exc:
            raise ModelLoadError(f"model {config.model!r}: unreadable config.json in {directory}: {exc}") from exc
        if model_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"model {config.model!r}: unsupported architecture {model_config.model_type!r} "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            model = LlavaOnevisionForConditionalGeneration.from_pretrained(
                directory, dtype=dtype, attn_implementation=config.attn_implementation
            )
        except Exception as exc:
            raise ModelLoadError(f"model {config.model!r}: could not load weights from {directory}: {exc}") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as exc:
            raise ModelLoadError(
                f"model {config.model!r}: could not load the tokenizer from {directory}: {exc}"
            ) from exc
        preprocessor = FramePreprocessor.from_directory(directory, tower_size=model_config.vision_config.image_size)
        log.debug(
            "preprocessing from %s: %s", [f for f in PREPROCESSOR_FILES if (directory / f).is_file()], preprocessor
        )
        return cls(
            model.to(device),
            tokenizer,
            preprocessor,
            model_id=config.model,
            vision_batch_frames=config.vision_batch_frames,
        )

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[T, H, W, 3]`` -> visual tokens ``[T, P, d]`` (P = tokens_per_frame).

        Frames are encoded independently by the vision tower, so encoding in batches of
        ``vision_batch_frames`` gives the same tokens as one call.
        """
        frames = as_frames(frames)
        chunks = []
        for start in range(0, frames.shape[0], self.vision_batch_frames):
            pixels = self.preprocessor(
                frames[start : start + self.vision_batch_frames], device=self.device, dtype=self.dtype
            )
            out = self.model.model.get_video_features(pixel_values_videos=pixels.unsqueeze(0))
            # pooler_output is [1, T*P + 1, d]: the trailing image_newline closes a whole video, it
            # is not part of any frame, so it is dropped here.
            tokens = out.pooler_output[0, :-1]
            n = pixels.shape[0]
            if tokens.shape[0] != n * self.tokens_per_frame:
                raise RuntimeError(
                    f"vision features have {tokens.shape[0]} tokens for {n} frames; expected "
                    f"{self.tokens_per_frame} per frame from the config"
                )
            chunks.append(tokens.reshape(n, self.tokens_per_frame, -1))
        return torch.cat(chunks)

    def tokenize(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids.to(self.device)

    @torch.inference_mode()
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embed(ids.to(self.device))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        cache: DynamicCache,
        position_ids: torch.Tensor,
        logits: Logits = "last",
    ) -> torch.Tensor | None:
        """Language model over ``embeds [1, n, d]`` at ``position_ids [1, n]``; see the protocol."""
        before = cache.get_seq_length()
        out = self._lm(
            inputs_embeds=embeds.to(device=self.device, dtype=self.dtype),
            cache=cache,
            position_ids=position_ids.to(self.device),
            use_cache=True,
        )
        check_cache_grew(cache, before, embeds.shape[1])
        if logits == "none":
            return None
        hidden = out.last_hidden_state if logits == "all" else out.last_hidden_state[:, -1:]
        return self.model.lm_head(hidden).float()

    @property
    def rope_inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies ``[D/2]`` of the language model (for exact key re-rotation)."""
        rotary = self._lm.rotary_emb
        if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            raise ValueError("this model's RoPE scales attention, so cached keys cannot be re-rotated exactly")
        return rotary.inv_freq

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
                positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
                self.forward(self.embed_ids(ids), cache, positions, logits="none")
                layers = [(layer.keys, layer.values) for layer in cache.layers]
                self._system = (layers, ids.shape[1])
        layers, length = self._system
        return DynamicCache(ddp_cache_data=layers), length


def _eos_ids(model: LlavaOnevisionForConditionalGeneration, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config.text_config):
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


def load_backend(model: str | os.PathLike | None = None, **kwargs) -> LlavaOnevisionBackend:
    """Load a backend by hub id or directory; keyword arguments are :class:`BackendConfig` fields."""
    if model is not None:
        kwargs["model"] = str(model)
    return LlavaOnevisionBackend.from_pretrained(BackendConfig(**kwargs))
