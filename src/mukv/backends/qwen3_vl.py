"""Qwen3-VL through transformers 5.x (``Qwen3VLForConditionalGeneration``).

What differs from Qwen2.5-VL (:mod:`mukv.backends.qwen2_5_vl`):

- **Timestamps in the text.** The processor writes every temporal group of a video as its own
  span: ``<{t:.1f} seconds><|vision_start|>`` + the group's visual tokens + ``<|vision_end|>``, ``t``
  the mean time of the group's frames (``Qwen3VLProcessor._calculate_timestamps``). A unit is thus
  fed with text before and after it (:meth:`Qwen3VLBackend.unit_text`); how many text tokens depends
  on ``t`` (``<9.5 seconds>`` and ``<10.5 seconds>`` tokenise to different lengths), so a unit's
  place in a stream is a cursor, not a multiple of a fixed size.
- **Positions.** Interleaved M-RoPE; every group is a span of its own from the cursor (time, height
  and width all start at it), and text continues after the larger grid side
  (``MultimodalRopePositions(interleaved=True, span_per_unit=True)``): the stream's rate does not
  enter the positions, only the timestamp text.
- **DeepStack.** The vision tower also returns one feature map per
  ``vision_config.deepstack_visual_indexes`` layer; the language model adds map ``k`` to the hidden
  states of the visual tokens after its decoder layer ``k``. A unit's visual features are therefore
  ``[P, (1 + K) * d]``: the input embedding, then the ``K`` DeepStack embeddings, side by side in the
  channel dimension (:attr:`Qwen3VLBackend.deepstack_layers` is ``K``). Whatever selects or moves
  tokens (patch blocks, sampling, windows) carries a token's DeepStack embeddings with it, unchanged;
  :meth:`Qwen3VLBackend.forward` splits them off again. Text embeddings stay ``d`` wide; in a
  sequence that mixes text and visual tokens, text rows carry zeros there, and only the visual rows
  get DeepStack added (``visual_pos_masks``), as in the model's own forward.

Nothing here patches the model: the language model is called with ``visual_pos_masks`` and
``deepstack_visual_embeds``, its own arguments.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoConfig, DynamicCache, Qwen3VLForConditionalGeneration

from mukv.backends.base import Logits
from mukv.backends.positions import MultimodalRopePositions
from mukv.backends.qwen_vl import VIDEO_PREPROCESSOR_FILES, QwenVLBackend, _first_json
from mukv.backends.registry import register_backend, resolve_model_dir
from mukv.config import BackendConfig, check_fps

# Qwen3VLVideoProcessor.max_video_tokens: the per-frame token ceiling when the checkpoint names none.
DEFAULT_MAX_VIDEO_TOKENS = 768


@register_backend("qwen3_vl")
class Qwen3VLBackend(QwenVLBackend):
    """A loaded Qwen3-VL checkpoint; one visual unit is a temporal group of two frames fed between
    its timestamp text and ``<|vision_end|>`` (see the module docstring)."""

    model_type = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
    # The processor's markers around each temporal group (Qwen3VLProcessor's defaults).
    vision_start = "<|vision_start|>"
    vision_end = "<|vision_end|>"

    def __init__(self, model, tokenizer, preprocessor, **kwargs) -> None:
        super().__init__(model, tokenizer, preprocessor, **kwargs)
        vision = model.config.vision_config
        #: DeepStack feature maps per visual token (``K``): visual features are ``(1 + K) * d`` wide.
        self.deepstack_layers = len(vision.deepstack_visual_indexes)
        if self.deepstack_layers > self.text.num_layers:
            raise ValueError(f"{self.deepstack_layers} DeepStack maps for {self.text.num_layers} language layers")

    @classmethod
    def from_pretrained(
        cls,
        config: BackendConfig | None = None,
        *,
        directory: Path | None = None,
        frame_shape: tuple[int, int] | None = None,
        **overrides,
    ) -> Qwen3VLBackend:
        """Like :meth:`QwenVLBackend.from_pretrained`; the default frame budget is the video processor's
        per-frame ceiling, ``max_video_tokens`` merged tokens (its ``size.longest_edge`` is a whole
        video's budget, not a frame's)."""
        config = config or BackendConfig(**overrides)
        directory = directory or resolve_model_dir(config.model)
        if config.frame_pixels is None and frame_shape is None:
            vision = AutoConfig.from_pretrained(directory).vision_config
            video = _first_json(directory, VIDEO_PREPROCESSOR_FILES)
            factor = vision.patch_size * vision.spatial_merge_size
            tokens = int(video.get("max_video_tokens", DEFAULT_MAX_VIDEO_TOKENS))
            config = dataclasses.replace(config, frame_pixels=tokens * factor * factor)
        return super().from_pretrained(config, directory=directory, frame_shape=frame_shape)

    def position_scheme(self) -> MultimodalRopePositions:
        """Interleaved M-RoPE, one span per unit (no time step: the rate is in the timestamp text)."""
        rotary = self._lm.rotary_emb
        return MultimodalRopePositions(
            rotary.inv_freq,
            tuple(rotary.mrope_section),
            interleaved=True,
            span_per_unit=True,
            attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        )

    def stream_positions(self, fps: float | None) -> MultimodalRopePositions:
        """Every stream is placed alike: a unit's time lives in its timestamp text, not its positions."""
        check_fps(fps)
        return self.positions

    @property
    def feature_width(self) -> int:
        """Channels of a visual token's features: ``(1 + K) * d``."""
        return (1 + self.deepstack_layers) * self.text.hidden_size

    # ------------------------------------------------------------------ text around a unit

    def unit_text(self, time: float) -> tuple[str, str]:
        """The text before and after a unit whose frames' mean time is ``time`` seconds (the
        processor's ``<{t:.1f} seconds><|vision_start|>`` and ``<|vision_end|>``); memory methods feed
        a unit with it (:func:`mukv.memory.base.unit_sequence`)."""
        return f"<{time:.1f} seconds>{self.vision_start}", self.vision_end

    # ------------------------------------------------------------------ vision

    def visual_tokens(self, pixels: torch.Tensor, units: int) -> torch.Tensor:
        """Patches ``[units * h * w, C']`` -> features ``[units, P, (1 + K) * d]``: the merger's tokens
        then the ``K`` DeepStack maps, per token."""
        out = self.model.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=self.video_grid(units))
        maps = [torch.cat(tuple(out.pooler_output), dim=0)]
        maps += [torch.cat(tuple(feature), dim=0) for feature in out.deepstack_features]
        p = self.layout.tokens
        if maps[0].shape[0] != units * p or len(maps) != 1 + self.deepstack_layers:
            raise RuntimeError(
                f"vision features have {maps[0].shape[0]} tokens and {len(maps) - 1} DeepStack maps for {units} "
                f"units; expected {p} per unit and {self.deepstack_layers} maps"
            )
        return torch.cat(maps, dim=-1).reshape(units, p, -1)

    # ------------------------------------------------------------------ language model

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        cache: DynamicCache,
        position_ids: torch.Tensor,
        logits: Logits = "last",
    ) -> torch.Tensor | None:
        """Language model over ``embeds [B, n, d]`` (text) or ``[B, n, (1+K)d]`` (visual features, or
        a unit's :meth:`unit_sequence`) at ``position_ids [3, n]``: the first ``d`` channels are the
        input embeddings; the DeepStack maps are added after the first ``K`` layers at the tokens
        that carry them (rows that are zero there are text)."""
        self.check_positions(embeds, position_ids)
        d = self.text.hidden_size
        embeds = embeds.to(device=self.device, dtype=self.dtype)
        extra = {}
        if embeds.shape[-1] == self.feature_width and self.deepstack_layers:
            deepstack = embeds[..., d:]
            mask = deepstack.ne(0).any(dim=-1)  # [B, n]: the visual tokens
            if bool(mask.any()):
                rows = deepstack[mask]  # [n_visual, K * d], in the mask's row-major order
                extra = {"visual_pos_masks": mask, "deepstack_visual_embeds": list(rows.split(d, dim=-1))}
            embeds = embeds[..., :d]
        elif embeds.shape[-1] != d:
            raise ValueError(f"embeds: expected {d} or {self.feature_width} channels, got {embeds.shape[-1]}")
        return self._run_language_model(embeds.contiguous(), cache, position_ids, logits, **extra)
