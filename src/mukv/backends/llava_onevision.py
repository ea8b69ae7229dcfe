"""LLaVA-OneVision through transformers 5.x: the reference backend.

Uses the model's own vision tower, projector and bilinear pooling
(``model.model.get_video_features``) and runs ``model.model.language_model`` plus ``lm_head``
over embeddings with a ``DynamicCache`` and explicit ``position_ids``. Nothing here patches the
model.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from mukv.backends.common import LanguageModelOps, eos_token_ids, load_pretrained, text_model_spec
from mukv.backends.positions import FrameLayout, RopePositions
from mukv.backends.prompts import PromptTemplate
from mukv.backends.registry import register_backend, resolve_device, resolve_dtype, resolve_model_dir
from mukv.compress.attention import use_hooked_attention
from mukv.config import BackendConfig
from mukv.video.preprocess import PREPROCESSOR_FILES, FramePreprocessor, as_frames

log = logging.getLogger(__name__)


def video_tokens_per_frame(image_size: int, patch_size: int) -> int:
    """Visual tokens per video frame: ``get_video_features`` pools the grid x grid patch
    features bilinearly to ``ceil(grid / 2) ** 2`` (196 at 384 px / patch 14, 16 at 112 px)."""
    grid = image_size // patch_size
    return math.ceil(grid / 2) ** 2


@register_backend("llava_onevision")
class LlavaOnevisionBackend(LanguageModelOps):
    """A loaded LLaVA-OneVision checkpoint (see :class:`mukv.backends.base.Backend`).

    One visual unit is one frame: the vision tower's patch grid pooled 2x2 (bilinear) to a square
    grid of ``ceil(grid / 2) ** 2`` tokens; positions are 1-D RoPE (Qwen2).
    """

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
        self.text = text_model_spec(text)
        self.layout = FrameLayout.square(
            video_tokens_per_frame(config.vision_config.image_size, config.vision_config.patch_size)
        )
        rotary = self._lm.rotary_emb
        self.positions = RopePositions(
            rotary.inv_freq, attention_scaling=float(getattr(rotary, "attention_scaling", 1.0))
        )
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self._init_system_prompt()
        # Configured once, here: scoring and retrieval hooks then never change the model's config.
        use_hooked_attention(model)

    @classmethod
    def from_pretrained(
        cls, config: BackendConfig | None = None, *, directory: Path | None = None, **overrides
    ) -> LlavaOnevisionBackend:
        """Load from a hub id or a local directory (``BackendConfig.model``; ``directory`` if the
        caller has resolved it already).

        Raises :class:`ModelLoadError` for unknown ids, missing files and unsupported
        architectures, and ``ValueError`` for invalid device/dtype values.
        """
        config = config or BackendConfig(**overrides)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        directory = directory or resolve_model_dir(config.model)
        model, tokenizer, model_config = load_pretrained(
            config,
            directory,
            model_type="llava_onevision",
            model_class=LlavaOnevisionForConditionalGeneration,
            dtype=dtype,
        )
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
        """uint8 frames ``[T, H, W, 3]`` -> visual tokens ``[T, P, d]`` (P = ``layout.tokens``).

        Frames are encoded independently by the vision tower, so encoding in batches of
        ``vision_batch_frames`` gives the same tokens as one call.
        """
        frames = as_frames(frames)
        chunks = []
        for start in range(0, frames.shape[0], self.vision_batch_frames):
            pixels = self.preprocessor(
                frames[start : start + self.vision_batch_frames], device=self.device, dtype=self.dtype
            )
            chunks.append(self.visual_tokens(pixels.unsqueeze(0))[0])
        return torch.cat(chunks)

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed clips ``[B, T, 3, S, S]`` -> visual tokens ``[B, T, P, d]`` through the model's
        vision tower, projector and pooling. Differentiable (the trainer uses it with gradients);
        :meth:`encode_frames` is the inference entry point."""
        b, t = pixels.shape[:2]
        out = self.model.model.get_video_features(pixel_values_videos=pixels)
        # pooler_output is [B, T*P + 1, d]: the trailing image_newline closes a whole video, it is
        # not part of any frame, so it is dropped here.
        tokens = out.pooler_output[:, :-1]
        p = self.layout.tokens
        if tokens.shape[1] != t * p:
            raise RuntimeError(
                f"vision features have {tokens.shape[1]} tokens for {t} frames; expected {p} per frame from the config"
            )
        return tokens.reshape(b, t, p, -1)

    def model_position_ids(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """1-D RoPE takes ``[B, n]``: every sequence of a batch sits at the same positions."""
        return position_ids.expand(batch, -1)
