"""Qwen2.5-VL through transformers 5.x (``Qwen2_5_VLForConditionalGeneration``).

A whole stream is one video: its units continue one vision span from the end of the system
prompt, the time position of unit ``u`` being ``floor(u * tokens_per_second * second_per_grid_ts)``
from the span's start (``second_per_grid_ts = temporal_patch_size / video_fps``), height and width
the unit's token grid; text after the video continues at the span's start plus the larger grid side
(transformers 5.x ``get_rope_index``). See :mod:`mukv.backends.qwen_vl` for what is shared.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLForConditionalGeneration

from mukv.backends.positions import MultimodalRopePositions
from mukv.backends.qwen_vl import QwenVLBackend
from mukv.backends.registry import register_backend


@register_backend("qwen2_5_vl")
class Qwen25VLBackend(QwenVLBackend):
    """A loaded Qwen2.5-VL checkpoint; one visual unit is a temporal group of two frames."""

    model_type = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration

    def position_scheme(self) -> MultimodalRopePositions:
        rotary = self._lm.rotary_emb
        # float32 product, as get_rope_index multiplies tokens_per_second by second_per_grid_ts.
        time_scale = self.model.config.vision_config.tokens_per_second * self.second_per_grid()
        return MultimodalRopePositions(
            rotary.inv_freq,
            tuple(rotary.mrope_section),
            time_scale=float(time_scale),
            attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        )
