"""Training a tiny LLaVA-OneVision on synthetic streams, on CPU, in three stages.

- stage 0: the vision tower alone learns colour, shape and position through linear heads on the
  features LLaVA-OneVision feeds its projector (per-frame main object, per-quadrant small one);
- stage 1: single-frame questions (``frame`` and ``patch`` kinds), tower at a low learning rate;
- stage 2: a curriculum over clip length (2 .. ``max_frames``, short clips kept in the mix) with
  all three kinds; half of the batches use a frame-isolated mask (frame tokens see the system
  prompt and their own frame only, all frames at the same positions, as independently
  prefilled blocks are; no order questions there, since such frames carry no order) and half
  ordinary causal attention;
- stage 3 (optional, ``stage3_steps``): long, sparse and re-positioned contexts, the shapes memory
  methods answer from. A curriculum grows dense clips from ``max_frames`` to ``long_frames``
  frames (``full`` over a long stream), mixed with sparse subsets of longer streams (up to
  ``sparse_frames`` frames, the question's evidence always among them: what ``uniform`` samples
  and retrieval finds); each batch is laid out causally, frame-isolated, or **placed**: every frame
  encoded on its own after the system prompt, then its keys re-rotated to sit one after another
  (exactly what :meth:`mukv.memory.blocks.BlockMemory.assemble` does with ``reposition=True`` for
  MuKV's ``order=temporal``, ReKV and the study's oracle). Batches hold about ``stage3_tokens``
  visual tokens (fewer clips when they are long).

Placed batches cannot be one forward (a frame's keys are computed at one position and read at
another), so they run as inference does: the frames' KV from one batched forward of
``[system | frame]`` sequences, re-rotated by the position scheme, then the question and answer
over that cache, with gradients through both.

A run is resumable: its whole state (weights, optimizer, data-order random state, step) is saved
to ``OUT/progress`` every ``checkpoint_every`` steps and when SIGINT or SIGTERM arrives (the step
under way is rewound: its data is drawn again on resume), and ``train_tiny(OUT, resume=OUT)``
(``mukv train-tiny OUT --resume OUT``) continues it at the same step with the same data order,
ending with the same weights as an uninterrupted run.

The sequence format is exactly the one :class:`mukv.engine.StreamSession` builds: system
prompt, the visual tokens of every frame (16 at 112 px), the question template, then the
one-word answer and ``<|im_end|>``. Batches are built through the inference backend
(:class:`~mukv.backends.llava_onevision.LlavaOnevisionBackend` wrapping the model being trained):
its frame encoding, prompt template and position scheme, so training and inference cannot
drift apart. Everything is deterministic by seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mukv.backends.llava_onevision import LlavaOnevisionBackend, video_tokens_per_frame
from mukv.backends.tiny import TinyModelSpec, create_tiny_model, save_checkpoint
from mukv.video.preprocess import FramePreprocessor
from mukv.video.streams import COLOURS, COMMON_SHAPES, KINDS, RARE_SHAPES, Thing, make_stream, render

log = logging.getLogger(__name__)

SHAPES = COMMON_SHAPES + RARE_SHAPES
COLOUR_NAMES = tuple(COLOURS)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Sizes, steps and learning rates of the three stages."""

    seed: int = 0
    spec: TinyModelSpec = field(
        default_factory=lambda: TinyModelSpec(
            vision_hidden=128, vision_layers=4, vision_heads=4, text_hidden=256, text_layers=4, text_heads=4
        )
    )
    stage0_steps: int = 1500
    stage0_batch: int = 32
    stage0_lr: float = 1e-3
    stage1_steps: int = 1500
    stage1_batch: int = 32
    stage1_lr: float = 5e-4
    stage2_steps: int = 3000
    stage2_batch: int = 8
    stage2_lr: float = 3e-4
    tower_lr: float = 3e-5
    max_frames: int = 24
    isolated_share: float = 0.5
    # Order questions in frame-isolated batches too (they are unanswerable there: the frames carry
    # no order). Off by default; the first stage-2 run of the shipped checkpoint had it on.
    isolated_order: bool = False
    # Rare targets per stage-2 and evaluation clip (one per kind); the first two stage-2 runs of
    # the shipped checkpoint used 1, which left the model unable to tell rare shapes apart.
    clip_targets: int = 3
    eval_clips: int = 60
    # Share of stage-2 and stage-3 batches laid out as placed (independently encoded frames,
    # re-positioned one after another); the rest of the non-isolated ones are causal.
    placed_share: float = 0.0
    stage3_steps: int = 0
    # At most this many clips per stage-3 batch; fewer when they are long (``stage3_tokens``).
    stage3_batch: int = 8
    stage3_lr: float = 2e-4
    # Visual tokens per stage-3 batch (clips = this // (frames * P), at least 1).
    stage3_tokens: int = 4096
    # Longest dense stage-3 clip (the curriculum grows to it over the first 70% of the steps).
    long_frames: int = 256
    # Largest sparse subset (frames kept of a longer stream, the evidence among them).
    sparse_frames: int = 48
    # Share of stage-3 batches that are sparse subsets.
    sparse_share: float = 0.5
    # Steps between saved training states (OUT/progress), for resuming an interrupted run.
    checkpoint_every: int = 100
    # Steps between progress reports.
    report_every: int = 50

    def __post_init__(self) -> None:
        for name in ("stage0_steps", "stage1_steps", "stage2_steps", "stage3_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.max_frames < 2:
            raise ValueError("max_frames: must be >= 2")
        for name in ("isolated_share", "placed_share", "sparse_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1]")
        if self.isolated_share + self.placed_share > 1.0:
            raise ValueError("isolated_share + placed_share: must be <= 1")
        if self.long_frames < self.max_frames:
            raise ValueError("long_frames: must be >= max_frames")
        if self.sparse_frames < 2:
            raise ValueError("sparse_frames: must be >= 2 (an order question's evidence is two frames)")
        for name in ("stage3_batch", "stage3_tokens", "checkpoint_every", "report_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if not 1 <= self.clip_targets <= len(KINDS):
            raise ValueError(f"clip_targets: must be in 1..{len(KINDS)}")


# --------------------------------------------------------------------------- stage 0 data


def sample_frames(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Frames with a random main object (any shape) and, half the time, a small rare one in a
    random quadrant; labels for the vision heads."""
    frames, labels = [], {k: [] for k in ("shape", "colour", "present", "small_colour", "small_shape")}
    for _ in range(n):
        main = Thing(
            SHAPES[int(rng.integers(len(SHAPES)))],
            COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))],
            float(rng.uniform(0.4, 0.6)),
            float(rng.uniform(0.4, 0.6)),
            float(rng.uniform(0.3, 0.5)),
        )
        present = np.zeros(4, dtype=np.int64)
        small_colour = np.zeros(4, dtype=np.int64)
        small_shape = np.zeros(4, dtype=np.int64)
        small = None
        if rng.random() < 0.5:
            quadrant = int(rng.integers(4))
            x = (0.2 if quadrant % 2 == 0 else 0.8) + float(rng.uniform(-0.04, 0.04))
            y = (0.2 if quadrant < 2 else 0.8) + float(rng.uniform(-0.04, 0.04))
            shape = int(rng.integers(len(RARE_SHAPES)))
            colour = int(rng.integers(len(COLOUR_NAMES)))
            small = Thing(RARE_SHAPES[shape], COLOUR_NAMES[colour], x, y, 0.22)
            main = Thing(main.shape, main.colour, 0.5, 0.5, 0.3)
            present[quadrant], small_colour[quadrant], small_shape[quadrant] = 1, colour, shape
        frames.append(render(main, small, size, rng))
        labels["shape"].append(SHAPES.index(main.shape))
        labels["colour"].append(COLOUR_NAMES.index(main.colour))
        labels["present"].append(present)
        labels["small_colour"].append(small_colour)
        labels["small_shape"].append(small_shape)
    return np.stack(frames), {k: np.asarray(v) for k, v in labels.items()}


class VisionHeads(torch.nn.Module):
    """Linear heads on the vision features: main shape/colour from the mean over patches, small
    object presence/colour/shape per quadrant from the mean over that quadrant's patches."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shape = torch.nn.Linear(width, len(SHAPES))
        self.colour = torch.nn.Linear(width, len(COLOUR_NAMES))
        self.present = torch.nn.Linear(width, 2)
        self.small_colour = torch.nn.Linear(width, len(COLOUR_NAMES))
        self.small_shape = torch.nn.Linear(width, len(RARE_SHAPES))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        n, patches, width = features.shape
        side = math.isqrt(patches)
        grid = features.reshape(n, side, side, width)
        half = side // 2
        quadrants = torch.stack(
            [grid[:, r : r + half, c : c + half].mean(dim=(1, 2)) for r in (0, half) for c in (0, half)], dim=1
        )
        pooled = features.mean(dim=1)
        return {
            "shape": self.shape(pooled),
            "colour": self.colour(pooled),
            "present": self.present(quadrants),
            "small_colour": self.small_colour(quadrants),
            "small_shape": self.small_shape(quadrants),
        }


def vision_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The tower output LLaVA-OneVision projects (``vision_feature_layer`` of the config)."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer]


def heads_loss(outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    present = labels["present"].bool()
    loss = F.cross_entropy(outputs["shape"], labels["shape"]) + F.cross_entropy(outputs["colour"], labels["colour"])
    loss = loss + F.cross_entropy(outputs["present"].reshape(-1, 2), labels["present"].reshape(-1))
    if present.any():
        loss = loss + F.cross_entropy(outputs["small_colour"][present], labels["small_colour"][present])
        loss = loss + F.cross_entropy(outputs["small_shape"][present], labels["small_shape"][present])
    accuracy = {
        "shape": (outputs["shape"].argmax(-1) == labels["shape"]).float().mean().item(),
        "colour": (outputs["colour"].argmax(-1) == labels["colour"]).float().mean().item(),
        "present": (outputs["present"].argmax(-1) == labels["present"]).float().mean().item(),
    }
    if present.any():
        accuracy["small_shape"] = (
            (outputs["small_shape"][present].argmax(-1) == labels["small_shape"][present]).float().mean().item()
        )
        accuracy["small_colour"] = (
            (outputs["small_colour"][present].argmax(-1) == labels["small_colour"][present]).float().mean().item()
        )
    return loss, accuracy


# --------------------------------------------------------------------------- QA data


@dataclass
class Clip:
    frames: np.ndarray  # [T, S, S, 3]
    question: str
    answer: str
    kind: str
    #: For a sparse subset: the stream frames it holds (time order) and the stream's length.
    frame_ids: tuple[int, ...] | None = None
    stream_frames: int | None = None


def sample_clip(rng: np.random.Generator, frames: int, kind: str, size: int, *, targets: int = 3) -> Clip:
    """A clip of ``frames`` frames with one question of ``kind`` about it (``frames`` may be 1
    for the single-frame kinds: the evidence frame alone). The clip holds up to ``targets`` rare
    targets (one per question kind, as the evaluation streams do), so the model has to tell the
    asked-for shape from the other rare ones."""
    if not 1 <= targets <= len(KINDS):
        raise ValueError(f"targets: must be in 1..{len(KINDS)}, got {targets}")
    length = max(frames, 2)
    others = [k for k in KINDS if k != kind]
    stream = make_stream(length, seed=int(rng.integers(2**31)), size=size, kinds=(kind, *others[: targets - 1]))
    question = stream.questions[0]
    images = stream.frames
    if frames == 1:
        images = images[question.first_frame : question.first_frame + 1]
    return Clip(images, question.question, question.answer, kind)


def sample_sparse_clip(
    rng: np.random.Generator, stream_frames: int, keep: int, kind: str, size: int, *, targets: int = 3
) -> Clip:
    """``keep`` frames of a ``stream_frames``-frame stream, in time order, with one question of
    ``kind``: the question's evidence frames (both of an ``order`` question's, so they stay
    neighbours) and frames drawn at random from the rest, as a sampled or retrieved subset holds
    them. The stream holds up to ``targets`` rare targets, which the subset may or may not keep."""
    if not 1 <= targets <= len(KINDS):
        raise ValueError(f"targets: must be in 1..{len(KINDS)}, got {targets}")
    if not 2 <= keep < stream_frames:
        raise ValueError(f"keep: must be in 2..{stream_frames - 1}, got {keep}")
    others = [k for k in KINDS if k != kind]
    stream = make_stream(stream_frames, seed=int(rng.integers(2**31)), size=size, kinds=(kind, *others[: targets - 1]))
    question = stream.questions[0]
    evidence = list(range(question.first_frame, question.last_frame + 1))
    rest = [f for f in range(stream_frames) if f not in evidence]
    drawn = rng.choice(len(rest), size=keep - len(evidence), replace=False)
    frames = sorted([*evidence, *(rest[int(i)] for i in drawn)])
    return Clip(stream.frames[frames], question.question, question.answer, kind, tuple(frames), stream_frames)


LAYOUTS = ("causal", "isolated", "placed")


class SequenceBuilder:
    """Turns clips into training batches in the session's exact sequence format.

    Every piece comes from the inference backend, so training sees what a session feeds the model:
    visual tokens from :meth:`LlavaOnevisionBackend.visual_tokens` (vision tower, projector and
    pooling, with gradients), the token count from ``backend.layout``, the system prompt and
    question text from ``backend.prompts``, token ids from ``backend.tokenize`` and positions from
    ``backend.positions``. The language model then runs over the whole sequence at once (a training
    forward needs no cache), which supports 1-D RoPE models only: their positions are ``[B, L]``.
    """

    def __init__(self, backend: LlavaOnevisionBackend) -> None:
        if backend.positions.rows != 1:
            raise ValueError(
                f"SequenceBuilder supports 1-D RoPE models (one row of positions); {backend.model_id!r} places "
                f"tokens with {backend.positions.rows} rows ({type(backend.positions).__name__})"
            )
        self.backend = backend
        self.model = backend.model
        self.tokenizer = backend.tokenizer
        self.preprocessor = backend.preprocessor
        self.prompts = backend.prompts
        self.layout = backend.layout
        self.system_ids = self._ids(self.prompts.system)
        # Answers end with the chat format's end of turn, which must be one of the tokens generation
        # stops on: a trained answer then ends a decoded one.
        end = self._ids("<|im_end|>")
        if len(end) != 1 or end[0] not in backend.eos_token_ids:
            raise ValueError(f"{backend.model_id!r}: <|im_end|> is not a single end-of-sequence token ({end})")
        self.eos = end[0]

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame (``backend.layout.tokens``)."""
        return self.layout.tokens

    def _ids(self, text: str) -> list[int]:
        return self.backend.tokenize(text)[0].tolist()

    def visual(self, clips: list[Clip]) -> torch.Tensor:
        """Visual tokens ``[B, T*P, d]`` of equal-length clips (frames ``[T, S, S, 3]`` each), through
        the backend's frame encoding, with gradients."""
        t = clips[0].frames.shape[0]
        if any(c.frames.shape[0] != t for c in clips):
            raise ValueError("one clip length per batch")
        pixels = self.preprocessor(
            np.concatenate([c.frames for c in clips]), device=self.backend.device, dtype=self.backend.dtype
        )
        tokens = self.backend.visual_tokens(pixels.reshape(len(clips), t, *pixels.shape[1:]))  # [B, T, P, d]
        return tokens.flatten(1, 2)

    def positions(self, frames: int, text: int, *, isolated: bool) -> torch.Tensor:
        """Positions ``[L]`` of one sequence: the system prompt, ``frames`` frames and ``text`` tokens
        (question, answer and padding), from the backend's scheme.

        Causal: the frames follow the system prompt as one visual sequence. Isolated: every frame
        sits where an independently encoded block sits, right after the system prompt. Either way
        the text starts at the cursor after all frames, where memory methods put the question (the
        length of a cache holding the system prompt and every frame's tokens).
        """
        scheme = self.backend.positions
        init = len(self.system_ids)
        visual, cursor = scheme.visual(init, self.layout, frames)
        if isolated:
            block, _ = scheme.visual(init, self.layout, 1)
            visual = block.repeat(1, frames)
        return torch.cat([scheme.text(0, init), visual, scheme.text(cursor, text)], dim=1)[0]

    def placed_context(self, visual: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """The answering cache a block memory assembles from ``visual [B, T*P, d]`` (``T`` frames):
        per layer ``(keys, values)`` ``[B, Hkv, init + T*P, D]``, with gradients, and the cursor
        after the blocks (where the question goes).

        Each frame is fed on its own after the system prompt at the positions a frame block is
        encoded at (``positions.block``), in one batched forward of ``B*T`` sequences; its keys are
        then re-rotated to the places ``positions.place_blocks`` gives the blocks laid one after
        another from the end of the system prompt (:meth:`BlockMemory.assemble` with ``reposition``).
        """
        scheme, layout, p = self.backend.positions, self.layout, self.layout.tokens
        embed = self.model.model.language_model.get_input_embeddings()
        b, t = visual.shape[0], visual.shape[1] // p
        init = len(self.system_ids)
        frames = visual.reshape(b * t, p, -1)
        system = embed(torch.tensor(self.system_ids)).unsqueeze(0).expand(b * t, -1, -1)
        block, _ = scheme.block(init, layout, 1, torch.arange(p))
        positions = torch.cat([scheme.text(0, init), block], dim=1)  # [1, init + P]
        cache = DynamicCache()
        self.model.model.language_model(
            inputs_embeds=torch.cat([system, frames], dim=1),
            position_ids=positions.expand(b * t, -1),
            cache=cache,
            use_cache=True,
        )
        old = block.repeat(1, t)
        new, cursor = scheme.place_blocks([block] * t, init)
        cos, sin = scheme.rotation(old, new)
        layers = []

        def blocks(x: torch.Tensor) -> torch.Tensor:
            # The frames' part [B*T, Hkv, P, D] of a layer's keys or values -> [B, Hkv, T*P, D], in order.
            hkv, d = x.shape[1], x.shape[3]
            return x[:, :, init:].reshape(b, t, hkv, p, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, t * p, d)

        for layer in cache.layers:
            keys, values = layer.keys, layer.values  # [B*T, Hkv, init + P, D]
            moved = scheme.rotate(blocks(keys), cos.to(keys.device), sin.to(keys.device))
            # Every sequence starts with the same system prompt: its KV is the first sequence's.
            system_k, system_v = keys[:1, :, :init].expand(b, -1, -1, -1), values[:1, :, :init].expand(b, -1, -1, -1)
            layers.append((torch.cat([system_k, moved], dim=2), torch.cat([system_v, blocks(values)], dim=2)))
        return layers, cursor

    def batch(self, clips: list[Clip], *, isolated: bool = False, layout: str | None = None) -> dict[str, torch.Tensor]:
        """Embeddings ``[B, L, d]``, labels ``[B, L]`` (-100 outside answers), positions ``[B, L]``
        and a boolean attention mask ``[B, 1, L, L]`` for equal-length clips.

        ``layout`` (default ``isolated`` when ``isolated`` is set, else ``causal``): ``causal``,
        ``isolated`` (one forward, frames at the same positions, each seeing the system prompt and
        itself) or ``placed``: then ``past`` holds the context's per-layer KV from
        :meth:`placed_context`, and embeddings, labels, positions ``[B, Lt]`` and mask
        ``[B, 1, Lt, C + Lt]`` cover the question and answer only (``C``: the context's length)."""
        layout = layout or ("isolated" if isolated else "causal")
        if layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        isolated = layout == "isolated"
        embed = self.model.model.language_model.get_input_embeddings()
        t = clips[0].frames.shape[0]
        visual = self.visual(clips)
        init = len(self.system_ids)
        context = init + visual.shape[1]  # system prompt and every frame's tokens
        p = self.layout.tokens
        tails = [self._ids(self.prompts.render_question(c.question)) for c in clips]
        answers = [[*self._ids(c.answer), self.eos] for c in clips]
        length = context + max(len(q) + len(a) for q, a in zip(tails, answers, strict=True))
        b = len(clips)
        pad = self.tokenizer.pad_token_id
        text_ids = torch.full((b, length - context), pad, dtype=torch.long)
        labels = torch.full((b, length), -100, dtype=torch.long)
        valid = torch.zeros(b, length, dtype=torch.bool)
        for i, (q, a) in enumerate(zip(tails, answers, strict=True)):
            text_ids[i, : len(q) + len(a)] = torch.tensor(q + a)
            start = context + len(q)
            # The token before each answer token predicts it.
            labels[i, start - 1 : start - 1 + len(a)] = torch.tensor(a)
            valid[i, : context + len(q) + len(a)] = True
        if layout == "placed":
            past, cursor = self.placed_context(visual)
            text = length - context
            # The question and answer see the whole context and, causally, each other.
            allowed = torch.cat(
                [torch.ones(text, context, dtype=torch.bool), torch.ones(text, text, dtype=torch.bool).tril()], dim=1
            )
            mask = allowed.unsqueeze(0).unsqueeze(0) & valid[:, None, None, :]
            mask[:, :, :, context:] |= torch.eye(text, dtype=torch.bool)  # padded rows attend to themselves only
            positions = self.backend.positions.text(cursor, text)[0].unsqueeze(0).repeat(b, 1)
            return {
                "embeds": embed(text_ids),
                "labels": labels[:, context:],
                "positions": positions,
                "mask": mask,
                "past": past,
            }
        system = embed(torch.tensor(self.system_ids)).unsqueeze(0).expand(b, -1, -1)
        embeds = torch.cat([system, visual, embed(text_ids)], dim=1)
        positions = self.positions(t, length - context, isolated=isolated).unsqueeze(0).repeat(b, 1)
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        if isolated:
            # A frame sees the system prompt and itself (causally), as an independently encoded block.
            for f in range(t):
                rows = slice(init + f * p, init + (f + 1) * p)
                allowed[rows, init:context] = False
                allowed[rows, rows] = torch.ones(p, p, dtype=torch.bool).tril()
        mask = allowed.unsqueeze(0).unsqueeze(0) & valid[:, None, None, :]
        mask = mask | torch.eye(length, dtype=torch.bool)  # padded rows attend to themselves only
        return {"embeds": embeds, "labels": labels, "positions": positions, "mask": mask}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy on answer tokens, and per-sample exactness (every answer token right)."""
        lm = self.model.model.language_model
        # A placed batch continues its context's cache (a fresh one: the update never touches ``past``).
        cache = DynamicCache(ddp_cache_data=batch["past"]) if "past" in batch else None
        hidden = lm(
            inputs_embeds=batch["embeds"],
            attention_mask=batch["mask"],
            position_ids=batch["positions"],
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state
        labels = batch["labels"]
        picked = labels != -100
        logits = self.model.lm_head(hidden[picked])
        loss = F.cross_entropy(logits, labels[picked])
        right = torch.zeros_like(labels, dtype=torch.bool)
        right[picked] = logits.argmax(-1) == labels[picked]
        exact = (right | ~picked).all(dim=1)
        return loss, exact


# --------------------------------------------------------------------------- progress and resuming


PROGRESS = "progress"  # OUT/progress: the state of an unfinished run


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; the run's state was saved to ``OUT/progress``."""

    def __init__(self, signum: int, out: Path, stage: str, step: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: training state saved at {stage} step {step} in {out / PROGRESS}; "
            f"continue with `mukv train-tiny {out} --resume {out}`"
        )
        self.signum, self.out, self.stage, self.step = signum, out, stage, step


class _Stop(BaseException):
    """Raised by the signal handler outside critical sections (caught by :func:`train_tiny`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Progress:
    """The resumable state of a run and what saves it.

    Invariant: ``(stage, step, rng_state)`` always describe the model and optimizer as they are:
    ``step`` steps of ``stage`` are done and ``rng_state`` is the data-order random state at the
    start of the next one. They change together with the weights, inside :meth:`critical`, where a
    signal only sets a flag; elsewhere the handler raises at once, abandoning the step under way
    (its data is drawn again on resume from ``rng_state``).
    """

    def __init__(self, out: Path, cfg: TrainConfig, rng: np.random.Generator, record: dict, stages: list[str]):
        self.out, self.cfg, self.rng, self.record, self.stages = out, cfg, rng, record, stages
        self.stage, self.step = stages[0] if stages else "done", 0
        self.rng_state = rng.bit_generator.state
        self.seconds = 0.0  # spent in earlier sessions of this run
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.heads: torch.nn.Module | None = None
        self.window: list[float] = []
        self._critical = False
        self._signal: int | None = None
        self._loaded: dict | None = None

    # ------------------------------------------------------------------ signals

    def _handler(self, signum: int, frame) -> None:
        self._signal = signum
        if not self._critical:
            raise _Stop(signum)

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM stop the run at a consistent state (main thread only; elsewhere the
        default handling stays)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section a signal does not interrupt: it stops the run right after it."""
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._signal is not None:
            raise _Stop(self._signal)

    # ------------------------------------------------------------------ stages

    def begin(self, stage: str, model, optimizer, heads=None) -> int:
        """Enter ``stage`` with its optimizer (and stage 0's heads); returns the first step to run:
        0, or where a loaded state stopped."""
        with self.critical():
            self.model, self.optimizer, self.heads = model, optimizer, heads
            if self._loaded is not None and self._loaded["stage"] == stage:
                state, self._loaded = self._loaded, None
                optimizer.load_state_dict(state["optimizer"])
                if heads is not None:
                    heads.load_state_dict(state["heads"])
                self.window = list(state["window"])
            else:
                self.stage, self.step, self.window = stage, 0, []
                self.rng_state = self.rng.bit_generator.state
            return self.step

    def stepped(self, step: int, exact: float) -> None:
        """Call inside :meth:`critical`, right after ``optimizer.step()`` of ``step``."""
        self.step = step + 1
        self.rng_state = self.rng.bit_generator.state
        self.window = [*self.window[-49:], exact]
        if self.step % self.cfg.checkpoint_every == 0:
            self.save()

    # ------------------------------------------------------------------ saving and loading

    def save(self) -> None:
        """Write the state to ``OUT/progress/state.pt`` (atomically: a kill while writing leaves the
        previous state)."""
        directory = self.out / PROGRESS
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "config": asdict(self.cfg),
            "record": self.record,
            "stages": self.stages,
            "stage": self.stage,
            "step": self.step,
            "rng": self.rng_state,
            "torch_rng": torch.get_rng_state(),
            "model": None if self.model is None else self.model.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "heads": None if self.heads is None else self.heads.state_dict(),
            "window": self.window,
            "seconds": self.seconds,
        }
        tmp = directory / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(directory / "state.pt")

    def restore(self, state: dict, model) -> None:
        """Take a saved state (:func:`load_progress`): weights now, optimizer and heads when their
        stage begins."""
        self.record.clear()
        self.record.update(state["record"])
        self.stages[:] = state["stages"]
        self.stage, self.step, self.rng_state = state["stage"], state["step"], state["rng"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if state["model"] is not None:
            model.load_state_dict(state["model"], strict=True)
        self.window, self.seconds = list(state["window"]), float(state["seconds"])
        self._loaded = state


def load_progress(out: str | Path) -> dict | None:
    """The saved state of an unfinished run in ``out`` (``None`` if there is none)."""
    path = Path(out) / PROGRESS / "state.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None


class StepClock:
    """Steps per second over the last ``window`` steps of a stage, and the stage's ETA."""

    def __init__(self, total: int, window: int = 50) -> None:
        self.total, self.window = total, window
        self.times: list[tuple[int, float]] = []

    def tick(self, step: int) -> dict:
        """After ``step`` (0-based) finished: ``steps_per_s`` and ``eta`` (h:mm:ss of this stage)."""
        self.times = [*self.times[-self.window :], (step, time.perf_counter())]
        if len(self.times) < 2:
            return {}
        (s0, t0), (s1, t1) = self.times[0], self.times[-1]
        rate = (s1 - s0) / max(t1 - t0, 1e-9)
        left = round((self.total - step - 1) / rate) if rate > 0 else 0
        return {"steps_per_s": rate, "eta": f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"}


# --------------------------------------------------------------------------- loops


def _schedule(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _set_lr(optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = _schedule(step, total, group["base_lr"])


Report = Callable[[str, int, dict], None]


def _standalone(cfg: TrainConfig, rng) -> Progress:
    """A progress that saves nothing (a stage run on its own, outside :func:`train_tiny`)."""
    progress = Progress(Path(), cfg, rng, {}, [])
    progress.save = lambda: None  # type: ignore[method-assign]
    return progress


def train_stage0(
    model, preprocessor, cfg: TrainConfig, rng, report: Report, *, progress: Progress | None = None
) -> dict:
    progress = progress or _standalone(cfg, rng)
    heads = VisionHeads(model.config.vision_config.hidden_size)
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": params, "base_lr": cfg.stage0_lr, "lr": cfg.stage0_lr}], weight_decay=0.01
    )
    model.train()
    stats: dict = {}
    clock = StepClock(cfg.stage0_steps)
    for step in range(progress.begin("stage0", model, optimizer, heads), cfg.stage0_steps):
        _set_lr(optimizer, step, cfg.stage0_steps)
        frames, labels = sample_frames(rng, cfg.stage0_batch, cfg.spec.image_size)
        outputs = heads(vision_features(model, preprocessor(frames)))
        loss, accuracy = heads_loss(outputs, {k: torch.from_numpy(v) for k, v in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        with progress.critical():
            optimizer.step()
            progress.stepped(step, accuracy["shape"])
        timing = clock.tick(step)
        if step % cfg.report_every == 0 or step == cfg.stage0_steps - 1:
            stats = {"loss": loss.item(), **accuracy}
            report("stage0", step, {**stats, **timing})
    model.eval()
    with torch.no_grad():
        frames, labels = sample_frames(np.random.default_rng(cfg.seed + 99), 256, cfg.spec.image_size)
        _, accuracy = heads_loss(
            heads(vision_features(model, preprocessor(frames))), {k: torch.from_numpy(v) for k, v in labels.items()}
        )
    return accuracy


def _qa_optimizer(model, lr: float, tower_lr: float) -> torch.optim.Optimizer:
    tower = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    return torch.optim.AdamW(
        [{"params": rest, "base_lr": lr, "lr": lr}, {"params": tower, "base_lr": tower_lr, "lr": tower_lr}],
        weight_decay=0.01,
    )


def _clip_lengths(step: int, total: int, max_frames: int, rng) -> int:
    """Curriculum: the longest length grows linearly from 2 to ``max_frames``; a third of the
    batches stay short (2-4 frames)."""
    top = 2 + round((max_frames - 2) * min(1.0, step / max(1, total * 0.7)))
    if rng.random() < 1 / 3:
        return int(rng.integers(2, min(4, top) + 1))
    return int(rng.integers(2, top + 1))


def _layout(cfg: TrainConfig, rng) -> str:
    draw = rng.random()
    if draw < cfg.isolated_share:
        return "isolated"
    return "placed" if draw < cfg.isolated_share + cfg.placed_share else "causal"


@dataclass(frozen=True)
class BatchPlan:
    """One stage-3 batch: ``clips`` clips of ``frames`` context frames laid out as ``layout``; a
    sparse batch keeps ``frames`` frames of ``stream_frames``-frame streams."""

    layout: str
    frames: int
    clips: int
    sparse: bool
    stream_frames: int


def plan_stage3(step: int, cfg: TrainConfig, rng) -> BatchPlan:
    """The stage-3 batch of ``step``. Dense clips: a quarter short (2 .. ``max_frames``), the rest
    from ``max_frames`` to a top that grows to ``long_frames`` over the first 70% of the steps.
    Sparse: 2 .. ``sparse_frames`` frames kept of a stream up to four times longer (and up to
    ``long_frames``). Clips per batch: ``stage3_tokens`` visual tokens' worth, 1 to ``stage3_batch``."""
    layout = _layout(cfg, rng)
    p = video_tokens_per_frame(cfg.spec.image_size, cfg.spec.patch_size)
    if rng.random() < cfg.sparse_share:
        frames = int(rng.integers(2, cfg.sparse_frames + 1))
        stream = int(rng.integers(frames + 1, max(frames + 1, min(4 * frames, cfg.long_frames)) + 1))
        sparse = True
    else:
        grown = min(1.0, step / max(1, cfg.stage3_steps * 0.7))
        top = cfg.max_frames + round((cfg.long_frames - cfg.max_frames) * grown)
        if rng.random() < 1 / 4:
            frames = int(rng.integers(2, cfg.max_frames + 1))
        else:
            frames = int(rng.integers(cfg.max_frames, top + 1))
        stream, sparse = frames, False
    clips = max(1, min(cfg.stage3_batch, cfg.stage3_tokens // (frames * p)))
    return BatchPlan(layout, frames, clips, sparse, stream)


def _kinds(layout: str, cfg: TrainConfig) -> tuple[str, ...]:
    if layout == "isolated" and not cfg.isolated_order:
        # Isolated frames sit at the same positions and do not see each other, so their order is
        # not in the sequence: an order question would only teach guessing.
        return tuple(k for k in KINDS if k != "order")
    return KINDS


def _stage_clips(step: int, steps: int, cfg: TrainConfig, rng, stage: int) -> tuple[list[Clip], str]:
    """The clips and layout of one stage-1/2/3 step."""
    size = cfg.spec.image_size
    if stage == 1:
        kinds = ("frame", "patch")
        return [sample_clip(rng, 1, kinds[int(rng.integers(2))], size, targets=1) for _ in range(cfg.stage1_batch)], (
            "causal"
        )
    if stage == 2:
        frames = _clip_lengths(step, steps, cfg.max_frames, rng)
        layout = _layout(cfg, rng)
        kinds = _kinds(layout, cfg)
        clips = [
            sample_clip(rng, frames, kinds[int(rng.integers(len(kinds)))], size, targets=cfg.clip_targets)
            for _ in range(cfg.stage2_batch)
        ]
        return clips, layout
    plan = plan_stage3(step, cfg, rng)
    kinds = _kinds(plan.layout, cfg)
    clips = []
    for _ in range(plan.clips):
        kind = kinds[int(rng.integers(len(kinds)))]
        if plan.sparse:
            clips.append(sample_sparse_clip(rng, plan.stream_frames, plan.frames, kind, size, targets=cfg.clip_targets))
        else:
            clips.append(sample_clip(rng, plan.frames, kind, size, targets=cfg.clip_targets))
    return clips, plan.layout


def train_qa(
    builder: SequenceBuilder, cfg: TrainConfig, rng, report: Report, *, stage: int, progress: Progress | None = None
) -> None:
    """Stage 1, 2 or 3 (see the module docstring); continues where ``progress`` stopped."""
    progress = progress or _standalone(cfg, rng)
    model = builder.model
    steps = {1: cfg.stage1_steps, 2: cfg.stage2_steps, 3: cfg.stage3_steps}[stage]
    lr = {1: cfg.stage1_lr, 2: cfg.stage2_lr, 3: cfg.stage3_lr}[stage]
    optimizer = _qa_optimizer(model, lr, cfg.tower_lr)
    model.train()
    clock = StepClock(steps)
    for step in range(progress.begin(f"stage{stage}", model, optimizer), steps):
        _set_lr(optimizer, step, steps)
        clips, layout = _stage_clips(step, steps, cfg, rng, stage)
        loss, exact = builder.loss(builder.batch(clips, layout=layout))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with progress.critical():
            optimizer.step()
            progress.stepped(step, exact.float().mean().item())
        timing = clock.tick(step)
        if step % cfg.report_every == 0 or step == steps - 1:
            stats = {"loss": loss.item(), "exact": float(np.mean(progress.window)), "frames": clips[0].frames.shape[0]}
            if stage == 3:
                stats |= {"layout": layout, "clips": len(clips)}
            report(f"stage{stage}", step, {**stats, **timing})
    model.eval()


@torch.no_grad()
def evaluate(
    builder: SequenceBuilder,
    lengths: tuple[int, ...],
    clips: int,
    seed: int,
    *,
    targets: int = 3,
    layout: str = "causal",
    keep: int | None = None,
) -> dict[str, dict[str, float]]:
    """Answer exactness (every answer token right, i.e. greedy decoding gives the answer) by
    question kind and clip length, with full causal attention (or ``layout``); with ``keep``,
    clips are sparse subsets of ``keep`` frames of streams of each length."""
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, float]] = {}
    size = builder.model.config.vision_config.image_size
    for length in lengths:
        kinds = ("frame", "patch") if length == 1 else KINDS
        for kind in kinds:
            right = 0
            for start in range(0, clips, 8):
                n = min(8, clips - start)
                if keep is not None and keep < length:
                    batch = [sample_sparse_clip(rng, length, keep, kind, size, targets=targets) for _ in range(n)]
                else:
                    batch = [sample_clip(rng, length, kind, size, targets=targets) for _ in range(n)]
                _, exact = builder.loss(builder.batch(batch, layout=layout))
                right += int(exact.sum())
            results.setdefault(kind, {})[str(length)] = right / clips
    return results


def _stages(cfg: TrainConfig, resume: Path | None) -> list[str]:
    stages = [] if resume is not None else ["stage0", "stage1"]
    return [*stages, "stage2", *(["stage3"] if cfg.stage3_steps else [])]


def train_tiny(
    out: str | Path, cfg: TrainConfig | None = None, report: Report | None = None, *, resume: str | Path | None = None
) -> dict:
    """Train all stages and save the checkpoint with a ``training.json`` record into ``out``;
    each finished stage is also saved under ``out/stages/``.

    ``resume``: ``out`` itself when it holds an unfinished run (``out/progress``): that run goes on
    at the step it stopped at, with its own settings (``cfg`` may be left out; given, it must be
    the same) and the same data order. Otherwise ``out/stages/stage1`` of an earlier run, or a
    finished run's ``out``: only stages 2 (and 3) run, starting from its weights.

    SIGINT and SIGTERM save the state and raise :class:`TrainingInterrupted`."""
    out = Path(out)
    saved = load_progress(resume) if resume is not None else None
    if saved is not None:
        if Path(resume).resolve() != out.resolve():
            raise ValueError(f"--resume {resume}: an unfinished run continues in its own directory (OUT = {resume})")
        stored = TrainConfig(**{**saved["config"], "spec": TinyModelSpec(**saved["config"]["spec"])})
        if cfg is not None and cfg != stored:
            changed = [f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(stored, f.name)]
            raise ValueError(f"--resume {resume}: the unfinished run has other settings ({', '.join(changed)})")
        cfg, previous = stored, None
    else:
        if load_progress(out) is not None:
            raise ValueError(
                f"{out} holds an unfinished run ({out / PROGRESS}): continue it with --resume {out}, "
                "or choose another OUT"
            )
        cfg = cfg or TrainConfig()
        previous = _previous_record(Path(resume), cfg) if resume is not None else None
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model, tokenizer = create_tiny_model(seed=cfg.seed, spec=cfg.spec)
    # The inference backend wraps the model being trained: batches are built through its frame
    # encoding, prompts and positions. It puts the model in eval mode; each stage sets train mode.
    backend = LlavaOnevisionBackend(
        model, tokenizer, FramePreprocessor(size=cfg.spec.image_size), model_id="mukv-tiny-training"
    )
    preprocessor = backend.preprocessor
    report = report or (lambda stage, step, stats: log.info("%s step %d: %s", stage, step, stats))
    started = time.time()
    record: dict = {"config": asdict(cfg)}
    progress = Progress(out, cfg, rng, record, _stages(cfg, Path(resume) if previous is not None else None))
    progress.model = model  # saved from the start: a run started from other weights keeps them

    def checkpoint(name: str) -> None:
        # Each finished stage is kept, so a later stage can be re-run (``resume``) without the
        # earlier ones.
        save_checkpoint(model, tokenizer, out / "stages" / name)
        (out / "stages" / name / "training.json").write_text(json.dumps(record, indent=2) + "\n")

    builder = SequenceBuilder(backend)
    if saved is not None:
        progress.restore(saved, model)
    elif previous is not None:
        for key in ("stage0_accuracy", "stage1_accuracy"):
            record[key] = previous.get(key)
        record["resumed_from"] = {
            "path": str(resume),
            # A finished run has stage-2 accuracy; a stages/stage1 checkpoint does not.
            "stage": "final" if "accuracy" in previous else "stage1",
            "config": previous.get("config"),
            "resumed_from": previous.get("resumed_from"),
        }
        load_weights(model, Path(resume))
    try:
        with progress.signals():
            _run_stages(progress, model, builder, preprocessor, cfg, rng, report, checkpoint)
            record["accuracy"] = evaluate(builder, (1, 4, 16), cfg.eval_clips, cfg.seed + 2, targets=cfg.clip_targets)
            if cfg.stage3_steps:
                long = tuple(t for t in (64, 256) if t <= cfg.long_frames)
                record["accuracy_long"] = evaluate(
                    builder, long, cfg.eval_clips, cfg.seed + 3, targets=cfg.clip_targets
                )
                # The shape of the study's oracle: a budget of 42 frames of each stream, evidence
                # among them, encoded on their own and re-positioned.
                record["accuracy_placed"] = evaluate(
                    builder, (64, 256), cfg.eval_clips, cfg.seed + 4, targets=cfg.clip_targets, layout="placed", keep=42
                )
    except _Stop as stop:
        # The invariant of Progress: the weights and optimizer are those of ``progress.step`` steps,
        # and the saved random state is the one at the start of the next step (the step under way
        # is drawn again on resume).
        progress.seconds += time.time() - started
        with progress.signals(), progress.critical():
            progress.save()
            progress._signal = None  # the signal that stopped the run, handled here
        raise TrainingInterrupted(stop.signum, out, progress.stage, progress.step) from None
    record["seconds"] = progress.seconds + time.time() - started
    save_checkpoint(model, tokenizer, out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(model_card(record))
    shutil.rmtree(out / PROGRESS, ignore_errors=True)
    return record


def _run_stages(progress: Progress, model, builder, preprocessor, cfg, rng, report, checkpoint) -> None:
    """The run's stages from where ``progress`` stands (a stage's evaluation and saved copy are
    redone when the run stopped after its last step)."""
    record = progress.record
    stages = progress.stages
    first = stages.index(progress.stage) if progress.stage in stages else len(stages)
    for name in stages[first:]:
        if name == "stage0":
            record["stage0_accuracy"] = train_stage0(model, preprocessor, cfg, rng, report, progress=progress)
            checkpoint("stage0")
        elif name == "stage1":
            train_qa(builder, cfg, rng, report, stage=1, progress=progress)
            record["stage1_accuracy"] = evaluate(builder, (1,), cfg.eval_clips, cfg.seed + 1)
            checkpoint("stage1")
        else:
            train_qa(builder, cfg, rng, report, stage=int(name[-1]), progress=progress)
            if name == "stage2" and "stage3" in stages:
                checkpoint("stage2")


def _train_command(cfg: dict, out: str, resume: str | None = None) -> str:
    parts = [f"mukv train-tiny {out}"]
    if resume:
        parts.append(f"--resume {resume}")
    parts.append(f"--seed {cfg['seed']}")
    if not resume:
        parts.append(f"--stage0-steps {cfg['stage0_steps']} --stage1-steps {cfg['stage1_steps']}")
    parts.append(f"--stage2-steps {cfg['stage2_steps']} --max-frames {cfg['max_frames']}")
    # Records from before these options existed: order questions in isolated batches, one target.
    if cfg.get("isolated_order", True):
        parts.append("--isolated-order")
    if cfg.get("clip_targets", 1) != 3:
        parts.append(f"--clip-targets {cfg.get('clip_targets', 1)}")
    if cfg.get("isolated_share", 0.5) != 0.5:
        parts.append(f"--isolated-share {cfg['isolated_share']:g}")
    if cfg.get("placed_share", 0.0):
        parts.append(f"--placed-share {cfg['placed_share']:g}")
    if cfg.get("stage3_steps", 0):
        parts.append(
            f"--stage3-steps {cfg['stage3_steps']} --long-frames {cfg['long_frames']} "
            f"--sparse-frames {cfg['sparse_frames']} --stage3-tokens {cfg['stage3_tokens']}"
        )
    return " ".join(parts)


def _stage2_line(cfg: dict) -> str:
    order = "all kinds in both" if cfg.get("isolated_order", True) else "order questions only in the causal ones"
    targets = cfg.get("clip_targets", 1)
    return (
        f"stage 2: clips of 2 to {cfg['max_frames']} frames (curriculum, a third of the batches 2-4 frames), "
        f"{cfg['stage2_steps']} steps of {cfg['stage2_batch']}, lr {cfg['stage2_lr']:g}; "
        f"{cfg['isolated_share']:.0%} of the batches frame-isolated (frames see the system prompt and "
        f"themselves, at the same positions, as independently encoded blocks do), the rest causal; {order}; "
        f"{targets} rare target{'s' if targets > 1 else ''} per clip"
        + (
            f"; {cfg['placed_share']:.0%} placed (encoded on their own, re-positioned)"
            if cfg.get("placed_share")
            else ""
        )
    )


def _stage3_line(cfg: dict) -> str:
    return (
        f"stage 3: dense clips growing from {cfg['max_frames']} to {cfg['long_frames']} frames and sparse subsets "
        f"of up to {cfg['sparse_frames']} frames ({cfg['sparse_share']:.0%} of the batches, evidence kept), "
        f"{cfg['stage3_steps']} steps of about {cfg['stage3_tokens']} visual tokens (at most {cfg['stage3_batch']} "
        f"clips), lr {cfg['stage3_lr']:g}; layouts: {cfg['isolated_share']:.0%} isolated, {cfg['placed_share']:.0%} "
        "placed (encoded on their own, re-positioned), the rest causal"
    )


def model_card(record: dict, *, name: str = "mukv-tiny") -> str:
    """A Markdown model card from a ``training.json`` record: sizes, data, stages, steps, seeds,
    the commands that reproduce it, and the measured accuracy per question kind and clip length."""
    cfg = record["config"]
    spec = cfg["spec"]
    # The lineage, first run first: each resumed run records the one it started from.
    runs = [record]
    while runs[-1].get("resumed_from"):
        runs.append(runs[-1]["resumed_from"])
    runs.reverse()
    first = runs[0]["config"]
    resumed = len(runs) > 1
    commands, stage2 = [], []
    for k, run in enumerate(runs, start=1):
        out = "OUT" if k == len(runs) else f"RUN{k}"
        if k == 1:
            commands.append(f"{k}. `{_train_command(run['config'], out)}`")
        else:
            # runs[k - 2] describes run k - 1, including which of its checkpoints run k loaded.
            final = runs[k - 2].get("stage", "final") == "final"
            source = f"RUN{k - 1}" if final else f"RUN{k - 1}/stages/stage1"
            how = f"from run {k - 1}'s final weights" if final else f"from run {k - 1}'s stage-1 weights"
            which = "stage 3 only" if not run["config"]["stage2_steps"] else "stage 2 again" if final else "stage 2"
            commands.append(f"{k}. `{_train_command(run['config'], out, resume=source)}` ({which}, {how})")
        if run["config"].get("stage2_steps", 1):
            stage2.append(f"- run {k} {_stage2_line(run['config'])}")
        if run["config"].get("stage3_steps"):
            stage2.append(f"- run {k} {_stage3_line(run['config'])}")
    if not resumed:
        commands = [commands[0].removeprefix("1. ")]
        stage2 = [f"- {_stage2_line(cfg)}", *([f"- {_stage3_line(cfg)}"] if cfg.get("stage3_steps") else [])]
    lines = [
        f"# {name}",
        "",
        "A tiny LLaVA-OneVision (the real `transformers` classes: SigLIP vision tower, 2x2 bilinear",
        "pooling, Qwen2 language model) trained on CPU on synthetic video streams",
        "(`mukv.video.streams`): coloured common shapes, with rare targets whose questions have",
        "one-word answers and known evidence frames. It is the offline demo model of `mukv` and the",
        "testbed of its accuracy study; it knows nothing about real video.",
        "",
        "## Architecture",
        "",
        f"- {spec['image_size']} px frames, patch {spec['patch_size']}: "
        f"{video_tokens_per_frame(spec['image_size'], spec['patch_size'])} visual tokens per frame",
        f"- vision: {spec['vision_layers']} layers, width {spec['vision_hidden']}, {spec['vision_heads']} heads",
        f"- language: {spec['text_layers']} layers, width {spec['text_hidden']}, {spec['text_heads']} heads, "
        f"{spec['text_kv_heads']} KV heads, RoPE theta {spec['rope_theta']:g}, vocabulary {spec['vocab_size']} "
        "(byte-level BPE trained on a fixed corpus)",
        "- chat template: exactly the session's prompt (the Qwen2 format of the MuKV/ReKV releases)",
        "",
        "## Training",
        "",
        "Reproduce with:",
        "",
        *commands,
        "",
        "Every stream and clip is generated from the seed; weights are initialised from it.",
        "",
        f"- stage 0: vision tower alone with linear colour/shape/position heads, "
        f"{first['stage0_steps']} steps of {first['stage0_batch']} frames, lr {first['stage0_lr']:g}",
        f"- stage 1: single-frame questions (`frame`, `patch`), {first['stage1_steps']} steps of "
        f"{first['stage1_batch']}, lr {first['stage1_lr']:g}, tower lr {first['tower_lr']:g}",
        *stage2,
        f"- wall time{' of the last run' if resumed else ''}: {record.get('seconds', float('nan')) / 60:.0f} min",
        "",
        "## Measured accuracy",
        "",
        "Greedy answer exactly right (every answer token), full causal context, fresh clips "
        f"({cfg['eval_clips']} per cell, seed {cfg['seed'] + 2}, up to {cfg.get('clip_targets', 1)} rare "
        "target(s) per clip); length 1 is the evidence frame alone.",
        "",
    ]
    accuracy = record.get("accuracy", {})
    lengths = sorted({int(t) for by_length in accuracy.values() for t in by_length})
    lines += ["| kind | " + " | ".join(f"{t} frame{'s' if t > 1 else ''}" for t in lengths) + " |"]
    lines += ["|---|" + "---:|" * len(lengths)]
    for kind, by_length in accuracy.items():
        cells = [f"{by_length[str(t)]:.2f}" if str(t) in by_length else "-" for t in lengths]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    for key, what in (
        ("accuracy_long", "Long causal clips (seed {seed}), the whole clip in context:"),
        (
            "accuracy_placed",
            "The oracle's shape (seed {seed}): 42 frames of each clip, the evidence among them, each "
            "encoded on its own after the system prompt and re-positioned one after another:",
        ),
    ):
        table = record.get(key)
        if not table:
            continue
        seed = cfg["seed"] + (3 if key == "accuracy_long" else 4)
        lengths = sorted({int(t) for by_length in table.values() for t in by_length})
        lines += ["", what.format(seed=seed), ""]
        lines += ["| kind | " + " | ".join(f"{t} frames" for t in lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for kind, by_length in table.items():
            cells = [f"{by_length[str(t)]:.2f}" if str(t) in by_length else "-" for t in lengths]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    stage0 = record.get("stage0_accuracy") or {}
    if stage0:
        lines += ["", "Vision heads after stage 0: " + ", ".join(f"{k} {v:.2f}" for k, v in stage0.items()) + "."]
    return "\n".join(lines) + "\n"


def _previous_record(resume: Path, cfg: TrainConfig) -> dict:
    """The ``training.json`` of a checkpoint to resume from, checked before any work starts."""
    record_path = resume / "training.json"
    if not record_path.is_file() or not (resume / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a saved training checkpoint (needs training.json and model.safetensors; "
            "use OUT/stages/stage1 or a finished OUT of `mukv train-tiny`)"
        )
    previous = json.loads(record_path.read_text())
    if previous.get("stage1_accuracy") is None:
        raise ValueError(f"--resume {resume}: stage 1 has not run for this checkpoint (use OUT/stages/stage1)")
    spec = (previous.get("config") or {}).get("spec")
    if spec != json.loads(json.dumps(asdict(cfg.spec))):
        raise ValueError(f"--resume {resume}: trained with model sizes {spec}, not {asdict(cfg.spec)}")
    return previous


def load_weights(model, directory: Path) -> None:
    """Load a saved checkpoint's weights into ``model`` (same architecture), strictly, through
    the normal loading path (which knows the stored key layout)."""
    saved = type(model).from_pretrained(directory)
    model.load_state_dict(saved.state_dict(), strict=True)
