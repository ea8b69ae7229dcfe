"""What the Qwen-VL families share: frame preprocessing into the vision tower's patch layout, the
frame layout of a temporal group, prompt pieces from the checkpoint's chat template, loading, and
the language model run over embeddings with explicit M-RoPE positions.

A visual unit is one temporal group of ``temporal_patch_size`` frames (2): the vision tower merges
it into one grid of ``rows x cols`` tokens (the patch grid divided by ``spatial_merge_size``). Every
frame of a stream is resized to one resolution (``frame_shape``), so every unit has the same token
count. The families differ in positions (:mod:`mukv.backends.positions`) and, for Qwen3-VL, in
DeepStack features; a family is a thin subclass (:mod:`mukv.backends.qwen2_5_vl`).

Nothing here patches the model: the vision tower runs through ``model.model.get_video_features``
and the language model is ``model.model.language_model`` plus ``lm_head``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mukv.backends.common import LanguageModelOps, eos_token_ids, load_pretrained, text_model_spec
from mukv.backends.positions import FrameLayout, MultimodalRopePositions
from mukv.backends.prompts import PromptTemplate
from mukv.backends.registry import resolve_device, resolve_dtype, resolve_model_dir
from mukv.compress.attention import use_hooked_attention
from mukv.config import BackendConfig, check_fps
from mukv.errors import ModelLoadError
from mukv.video.preprocess import as_frames

log = logging.getLogger(__name__)

# transformers' Qwen2-VL video processor defaults (``Qwen2VLVideoProcessor.size``): a frame's pixels
# are capped at 768 merged tokens' worth when the checkpoint names no budget of its own.
DEFAULT_MAX_PIXELS = 28 * 28 * 768
DEFAULT_MIN_PIXELS = 128 * 28 * 28
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Files with preprocessing parameters, video first (the image processor's budget is for images).
VIDEO_PREPROCESSOR_FILES = ("video_preprocessor_config.json", "video_processor/preprocessor_config.json")
IMAGE_PREPROCESSOR_FILE = "preprocessor_config.json"
_SENTINEL = "\x00QUESTION\x00"


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen-VL processors' resize rule (``smart_resize``): both sides multiples of ``factor``,
    aspect ratio kept as closely as possible, pixels within ``[min_pixels, max_pixels]``."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def square_frame_shape(pixels: int, factor: int, min_pixels: int = 0) -> tuple[int, int]:
    """The square frame shape of about ``pixels`` pixels the processor's rule gives."""
    side = max(factor, math.isqrt(max(pixels, 1)))
    return smart_resize(side, side, factor, min_pixels, pixels)


@dataclass(frozen=True, kw_only=True)
class QwenFramePreprocessor:
    """Frames -> the vision tower's flattened patches, as transformers' Qwen2-VL video processor
    lays them out: resize to ``shape`` (antialiased bicubic), rescale, normalise, group
    ``temporal_patch_size`` frames, and flatten every ``merge x merge`` block of patches together.
    """

    shape: tuple[int, int]
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        factor = self.patch_size * self.merge_size
        if any(side < factor or side % factor for side in self.shape):
            raise ValueError(f"frame shape {self.shape}: each side must be a positive multiple of {factor}")

    @property
    def grid(self) -> tuple[int, int]:
        """Merged token grid ``(rows, cols)`` of one unit."""
        factor = self.patch_size * self.merge_size
        return self.shape[0] // factor, self.shape[1] // factor

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of one frame (``video_grid_thw``'s last two entries)."""
        return self.shape[0] // self.patch_size, self.shape[1] // self.patch_size

    def __call__(
        self, frames: np.ndarray | torch.Tensor, *, device: torch.device | str = "cpu", dtype=torch.float32
    ) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` (``T`` a multiple of ``temporal_patch_size``) -> patches
        ``[T / tp * h * w, 3 * tp * p * p]`` in ``dtype`` on ``device``."""
        x = as_frames(frames).to(device).permute(0, 3, 1, 2).float()
        t = x.shape[0]
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if t % tp:
            raise ValueError(f"frames: {t} frames do not fill whole groups of {tp}")
        if tuple(x.shape[-2:]) != self.shape:
            x = F.interpolate(x, size=self.shape, mode="bicubic", antialias=True, align_corners=False)
        x = x * self.rescale_factor
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        gh, gw = self.patch_grid
        # Qwen2VLVideoProcessor.patchify: (t, tp, C, gh/m, m, p, gw/m, m, p) -> (t, gh/m, gw/m, m, m, C, tp, p, p).
        patches = x.view(t // tp, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(t // tp * gh * gw, 3 * tp * p * p).to(dtype)

    @classmethod
    def from_directory(
        cls,
        directory: Path,
        vision_config,
        *,
        frame_pixels: int | None = None,
        frame_shape: tuple[int, int] | None = None,
    ) -> QwenFramePreprocessor:
        """Parameters from the checkpoint's processor configs; the tower's patch sizes win. The frame
        shape: ``frame_shape`` if given, else a square of ``frame_pixels`` (default: the video
        processor's per-frame pixel cap)."""
        video = _first_json(directory, VIDEO_PREPROCESSOR_FILES)
        image = _first_json(directory, (IMAGE_PREPROCESSOR_FILE,))
        data = video or image
        patch = int(vision_config.patch_size)
        merge = int(vision_config.spatial_merge_size)
        temporal = int(vision_config.temporal_patch_size)
        factor = patch * merge
        if frame_shape is None:
            size = video.get("size") or {} if video else {}
            budget = frame_pixels or size.get("longest_edge") or (video or {}).get("max_pixels") or DEFAULT_MAX_PIXELS
            frame_shape = square_frame_shape(int(budget), factor)
        mean = tuple(float(v) for v in data.get("image_mean", CLIP_MEAN))
        std = tuple(float(v) for v in data.get("image_std", CLIP_STD))
        rescale = float(data.get("rescale_factor", 1 / 255)) if data.get("do_rescale", True) else 1.0
        return cls(
            shape=tuple(frame_shape),
            patch_size=patch,
            merge_size=merge,
            temporal_patch_size=temporal,
            mean=mean,
            std=std,
            rescale_factor=rescale,
        )


def _first_json(directory: Path, names: tuple[str, ...]) -> dict:
    for name in names:
        path = directory / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError as exc:
                raise ModelLoadError(f"unreadable {name} in {directory}: {exc}") from exc
    return {}


def prompts_from_chat_template(tokenizer, video_placeholder: str) -> PromptTemplate:
    """The session's prompt pieces cut from the checkpoint's chat template: a user turn holding a
    video then the question, rendered once; the system piece ends where the video's placeholder
    tokens start, the question piece starts after them (``video_placeholder`` is the token the
    processor expands into the visual tokens, e.g. ``<|video_pad|>``)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _SENTINEL}]}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        raise ModelLoadError(f"the checkpoint's chat template cannot render a video turn: {exc}") from exc
    if text.count(video_placeholder) != 1 or text.count(_SENTINEL) != 1:
        raise ModelLoadError(f"the chat template's video turn has no single {video_placeholder!r}: {text!r}")
    system, rest = text.split(video_placeholder)
    before, after = rest.split(_SENTINEL)
    escape = str.maketrans({"{": "{{", "}": "}}"})
    head, tail = before.translate(escape), after.translate(escape)
    return PromptTemplate(
        system=system,
        question=head + "{question}" + tail,
        choice_question=head + "{question}\n{options}\nOnly give the best option." + tail + "Best option: (",
    )


class QwenVLBackend(LanguageModelOps):
    """A loaded Qwen-VL checkpoint (see :class:`mukv.backends.base.Backend`); families subclass it
    with their ``model_type``, model class and position scheme."""

    model_type: str
    model_class: type

    def __init__(
        self,
        model,
        tokenizer,
        preprocessor: QwenFramePreprocessor,
        *,
        model_id: str,
        prompts: PromptTemplate | None = None,
        vision_batch_frames: int = 16,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.model_id = model_id
        self.prompts = prompts or prompts_from_chat_template(tokenizer, self.video_placeholder)
        self.vision_batch_frames = max(vision_batch_frames, preprocessor.temporal_patch_size)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._lm = model.model.language_model
        self._embed = self._lm.get_input_embeddings()
        text = model.config.text_config
        vision = model.config.vision_config
        if preprocessor.patch_size != vision.patch_size or preprocessor.merge_size != vision.spatial_merge_size:
            raise ValueError(f"preprocessor {preprocessor} does not match the vision tower's patch sizes")
        self.text = text_model_spec(text)
        self.layout = FrameLayout(preprocessor.grid, frames_per_unit=preprocessor.temporal_patch_size)
        self.positions = self.position_scheme()
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self._init_system_prompt()
        use_hooked_attention(model)

    # ------------------------------------------------------------------ family specifics

    video_placeholder = "<|video_pad|>"

    def position_scheme(self) -> MultimodalRopePositions:
        """The family's M-RoPE scheme, from the language model's rotary embedding (for text and
        moving keys; a family whose video positions depend on the stream's rate leaves the time step
        to :meth:`stream_positions`)."""
        raise NotImplementedError

    def stream_positions(self, fps: float | None) -> MultimodalRopePositions:
        """The scheme of a stream sampled at ``fps`` frames per second (see the protocol)."""
        check_fps(fps)
        return self.positions

    def second_per_grid(self, fps: float) -> torch.Tensor:
        """Seconds one unit of a stream sampled at ``fps`` spans (``second_per_grid_ts``:
        ``temporal_patch_size / fps``), float32 as the processor returns it."""
        check_fps(fps)
        return torch.tensor(self.preprocessor.temporal_patch_size / fps, dtype=torch.float32)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        config: BackendConfig | None = None,
        *,
        directory: Path | None = None,
        frame_shape: tuple[int, int] | None = None,
        **overrides,
    ) -> QwenVLBackend:
        """Load from a hub id or a local directory (see
        :meth:`mukv.backends.llava_onevision.LlavaOnevisionBackend.from_pretrained`). Frames are
        resized to ``frame_shape`` if given, else to a square of ``config.frame_pixels`` pixels
        (default: the checkpoint's video processor cap)."""
        config = config or BackendConfig(**overrides)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        directory = directory or resolve_model_dir(config.model)
        model, tokenizer, model_config = load_pretrained(
            config, directory, model_type=cls.model_type, model_class=cls.model_class, dtype=dtype
        )
        preprocessor = QwenFramePreprocessor.from_directory(
            directory, model_config.vision_config, frame_pixels=config.frame_pixels, frame_shape=frame_shape
        )
        log.debug("preprocessing for %s: %s", directory, preprocessor)
        return cls(
            model.to(device),
            tokenizer,
            preprocessor,
            model_id=config.model,
            vision_batch_frames=config.vision_batch_frames,
        )

    # ------------------------------------------------------------------ vision

    def video_grid(self, units: int) -> torch.Tensor:
        """``video_grid_thw [1, 3]`` of ``units`` units at this backend's resolution."""
        return torch.tensor([[units, *self.preprocessor.patch_grid]], device=self.device)

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[T, H, W, 3]`` (``T`` a multiple of ``layout.frames_per_unit``) -> visual
        tokens ``[T / frames_per_unit, P, d]``. The tower attends within each temporal group only,
        so encoding in batches gives the same tokens as one call."""
        frames = as_frames(frames)
        per_unit = self.layout.frames_per_unit
        if frames.shape[0] % per_unit:
            raise ValueError(f"frames: {frames.shape[0]} frames do not fill whole groups of {per_unit}")
        step = self.vision_batch_frames - self.vision_batch_frames % per_unit
        chunks = []
        for start in range(0, frames.shape[0], step):
            pixels = self.preprocessor(frames[start : start + step], device=self.device, dtype=self.dtype)
            chunks.append(self.visual_tokens(pixels, (frames[start : start + step].shape[0]) // per_unit))
        return torch.cat(chunks)

    def visual_tokens(self, pixels: torch.Tensor, units: int) -> torch.Tensor:
        """Patches ``[units * h * w, C']`` -> visual tokens ``[units, P, d]`` (the model's vision
        tower and merger)."""
        out = self.model.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=self.video_grid(units))
        tokens = torch.cat(tuple(out.pooler_output), dim=0)
        p = self.layout.tokens
        if tokens.shape[0] != units * p:
            raise RuntimeError(
                f"vision features have {tokens.shape[0]} tokens for {units} units; expected {p} per unit"
            )
        return tokens.reshape(units, p, -1)

    # ------------------------------------------------------------------ language model

    def model_position_ids(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """M-RoPE takes ``[3, B, n]``; a 2-D tensor would be read as text positions on every axis."""
        return position_ids[:, None, :].expand(-1, batch, -1)
