"""Qwen2.5-VL through transformers 5.x (``Qwen2_5_VLForConditionalGeneration``).

A whole stream is one video: its units continue one vision span from the end of the system
prompt, the time position of unit ``u`` being ``floor(u * tokens_per_second * second_per_grid_ts)``
from the span's start (``second_per_grid_ts = temporal_patch_size / fps``, ``fps`` the rate the
stream is sampled at), height and width the unit's token grid; text after the video continues at
the span's start plus the larger grid side (transformers 5.x ``get_rope_index``). The rate is the
stream's: :meth:`Qwen25VLBackend.stream_positions` gives the scheme of a stream sampled at ``fps``,
and refuses a stream whose rate is not known. See :mod:`mukv.backends.qwen_vl` for what is shared.
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
        """Text and moving keys only: a video's time step is its stream's (:meth:`stream_positions`)."""
        rotary = self._lm.rotary_emb
        return MultimodalRopePositions(
            rotary.inv_freq,
            tuple(rotary.mrope_section),
            time_scale=None,
            attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        )

    def stream_positions(self, fps: float | None) -> MultimodalRopePositions:
        """The scheme of a stream sampled at ``fps`` frames per second: time step
        ``tokens_per_second * temporal_patch_size / fps`` per unit. ``ValueError`` without ``fps``:
        the time positions of a video depend on its rate, and no rate is right for every stream."""
        if fps is None:
            raise ValueError(
                f"{self.model_type}: the stream's sampling rate is needed (fps=...): the model places each "
                "temporal group of frames in time by it"
            )
        # float32 product, as get_rope_index multiplies tokens_per_second by second_per_grid_ts.
        time_scale = self.model.config.vision_config.tokens_per_second * self.second_per_grid(fps)
        return self.positions.with_time_scale(float(time_scale))
