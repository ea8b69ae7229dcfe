"""Training a tiny LLaVA-OneVision on synthetic streams, on CPU, in three stages.

- stage 0: the vision tower alone learns colour, shape and position through linear heads on the
  features LLaVA-OneVision feeds its projector (per-frame main object, per-quadrant small one);
- stage 1: single-frame questions (``frame`` and ``patch`` kinds), tower at a low learning rate;
- stage 2: a curriculum over clip length (2 .. ``max_frames``, short clips kept in the mix) with
  all three kinds; half of the batches use a frame-isolated mask (frame tokens see the system
  prompt and their own frame only, all frames at the same positions, as independently
  prefilled blocks are; no order questions there, since such frames carry no order) and half
  ordinary causal attention.

The sequence format is exactly the one :class:`mukv.engine.StreamSession` builds: system
prompt, the visual tokens of every frame (16 at 112 px), the question template, then the
one-word answer and ``<|im_end|>``. Batches are built through the inference backend
(:class:`~mukv.backends.llava_onevision.LlavaOnevisionBackend` wrapping the model being trained):
its frame encoding, prompt template and position scheme, so training and inference cannot
drift apart. Everything is deterministic by seed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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

    def __post_init__(self) -> None:
        for name in ("stage0_steps", "stage1_steps", "stage2_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.max_frames < 2:
            raise ValueError("max_frames: must be >= 2")
        if not 0.0 <= self.isolated_share <= 1.0:
            raise ValueError("isolated_share: must be in [0, 1]")
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

    def batch(self, clips: list[Clip], *, isolated: bool) -> dict[str, torch.Tensor]:
        """Embeddings ``[B, L, d]``, labels ``[B, L]`` (-100 outside answers), positions ``[B, L]``
        and a boolean attention mask ``[B, 1, L, L]`` for equal-length clips."""
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
        hidden = lm(
            inputs_embeds=batch["embeds"], attention_mask=batch["mask"], position_ids=batch["positions"]
        ).last_hidden_state
        labels = batch["labels"]
        picked = labels != -100
        logits = self.model.lm_head(hidden[picked])
        loss = F.cross_entropy(logits, labels[picked])
        right = torch.zeros_like(labels, dtype=torch.bool)
        right[picked] = logits.argmax(-1) == labels[picked]
        exact = (right | ~picked).all(dim=1)
        return loss, exact


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


def train_stage0(model, preprocessor, cfg: TrainConfig, rng, report: Report) -> dict:
    heads = VisionHeads(model.config.vision_config.hidden_size)
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": params, "base_lr": cfg.stage0_lr, "lr": cfg.stage0_lr}], weight_decay=0.01
    )
    model.train()
    stats: dict = {}
    for step in range(cfg.stage0_steps):
        _set_lr(optimizer, step, cfg.stage0_steps)
        frames, labels = sample_frames(rng, cfg.stage0_batch, cfg.spec.image_size)
        outputs = heads(vision_features(model, preprocessor(frames)))
        loss, accuracy = heads_loss(outputs, {k: torch.from_numpy(v) for k, v in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == cfg.stage0_steps - 1:
            stats = {"loss": loss.item(), **accuracy}
            report("stage0", step, stats)
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


def train_qa(builder: SequenceBuilder, cfg: TrainConfig, rng, report: Report, *, stage: int) -> None:
    model = builder.model
    steps = cfg.stage1_steps if stage == 1 else cfg.stage2_steps
    lr = cfg.stage1_lr if stage == 1 else cfg.stage2_lr
    optimizer = _qa_optimizer(model, lr, cfg.tower_lr)
    model.train()
    window: list[float] = []
    for step in range(steps):
        _set_lr(optimizer, step, steps)
        if stage == 1:
            frames, kinds, isolated, batch = 1, ("frame", "patch"), False, cfg.stage1_batch
        else:
            frames, kinds, batch = _clip_lengths(step, steps, cfg.max_frames, rng), KINDS, cfg.stage2_batch
            isolated = bool(rng.random() < cfg.isolated_share)
            if isolated and not cfg.isolated_order:
                # Isolated frames sit at the same positions and do not see each other, so their
                # order is not in the sequence: an order question would only teach guessing.
                kinds = tuple(k for k in KINDS if k != "order")
        targets = 1 if stage == 1 else cfg.clip_targets
        clips = [
            sample_clip(rng, frames, kinds[int(rng.integers(len(kinds)))], cfg.spec.image_size, targets=targets)
            for _ in range(batch)
        ]
        loss, exact = builder.loss(builder.batch(clips, isolated=isolated))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(exact.float().mean().item())
        if step % 50 == 0 or step == steps - 1:
            report(
                f"stage{stage}", step, {"loss": loss.item(), "exact": float(np.mean(window[-50:])), "frames": frames}
            )
    model.eval()


@torch.no_grad()
def evaluate(
    builder: SequenceBuilder, lengths: tuple[int, ...], clips: int, seed: int, *, targets: int = 3
) -> dict[str, dict[str, float]]:
    """Answer exactness (every answer token right, i.e. greedy decoding gives the answer) by
    question kind and clip length, with full causal attention."""
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, float]] = {}
    size = builder.model.config.vision_config.image_size
    for length in lengths:
        kinds = ("frame", "patch") if length == 1 else KINDS
        for kind in kinds:
            right = 0
            for start in range(0, clips, 8):
                batch = [sample_clip(rng, length, kind, size, targets=targets) for _ in range(min(8, clips - start))]
                _, exact = builder.loss(builder.batch(batch, isolated=False))
                right += int(exact.sum())
            results.setdefault(kind, {})[str(length)] = right / clips
    return results


def train_tiny(
    out: str | Path, cfg: TrainConfig | None = None, report: Report | None = None, *, resume: str | Path | None = None
) -> dict:
    """Train all stages and save the checkpoint with a ``training.json`` record into ``out``;
    each finished stage is also saved under ``out/stages/``. With ``resume`` (``out/stages/stage1``
    of an earlier run, or a finished run's ``out``) only stage 2 runs, starting from its weights."""
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
    out = Path(out)
    record: dict = {"config": asdict(cfg)}

    def checkpoint(name: str) -> None:
        # Each finished stage is kept, so a later stage can be re-run (``resume``) without the
        # earlier ones.
        save_checkpoint(model, tokenizer, out / "stages" / name)
        (out / "stages" / name / "training.json").write_text(json.dumps(record, indent=2) + "\n")

    builder = SequenceBuilder(backend)
    if resume is None:
        record["stage0_accuracy"] = train_stage0(model, preprocessor, cfg, rng, report)
        checkpoint("stage0")
        train_qa(builder, cfg, rng, report, stage=1)
        record["stage1_accuracy"] = evaluate(builder, (1,), cfg.eval_clips, cfg.seed + 1)
        checkpoint("stage1")
    else:
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
    train_qa(builder, cfg, rng, report, stage=2)
    record["accuracy"] = evaluate(builder, (1, 4, 16), cfg.eval_clips, cfg.seed + 2, targets=cfg.clip_targets)
    record["seconds"] = time.time() - started
    save_checkpoint(model, tokenizer, out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(model_card(record))
    return record


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
            how = f"again, from run {k - 1}'s final weights" if final else f"from run {k - 1}'s stage-1 weights"
            commands.append(f"{k}. `{_train_command(run['config'], out, resume=source)}` (stage 2 {how})")
        stage2.append(f"- run {k} {_stage2_line(run['config'])}")
    if not resumed:
        commands = [commands[0].removeprefix("1. ")]
        stage2 = [f"- {_stage2_line(cfg)}"]
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
