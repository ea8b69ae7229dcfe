"""What the Qwen-VL families' integration tests share (:mod:`tests.integration.test_qwen_backends`,
:mod:`tests.integration.test_qwen3_vl`): loading a tiny checkpoint, streaming frames through a
session, the model's own ``generate`` as a reference, and the checks every family passes alike.

Each family's module keeps its own reference inputs (how its processor writes a video) and hands its
``reference_logits`` to the checks that compare against the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mukv import StreamSession
from tests.conftest import greedy_generate, make_frames

FPS = 0.5
QUESTION = "What colour was the triangle?"

ReferenceLogits = Callable[..., torch.Tensor]


def small_settings(n_local: int) -> dict[str, dict]:
    """Every method with small settings, so that retrieval has to choose on a short stream;
    ``n_local`` is ReKV's window in tokens."""
    return {
        "uniform": {"num_frames": 2},
        "mukv": {"top_k.patch": 3, "top_k.frame": 2, "top_k.segment": 1, "segment_frames": 2},
        "rekv": {"retrieve_blocks": 2, "n_local": n_local},
        "recent": {"num_frames": 2},
        "full": {},
    }


def load_tiny(directory: Path, frame_shape: tuple[int, int]):
    """The backend of the tiny checkpoint in ``directory``, chosen by its ``model_type``, frames
    resized to ``frame_shape``; torch on at most two threads."""
    from mukv.backends.registry import backend_class, read_model_type

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cls = backend_class(read_model_type(directory, str(directory)))
    return cls.from_pretrained(directory=directory, model=str(directory), frame_shape=frame_shape)


def padded(frames: np.ndarray, per_unit: int = 2) -> np.ndarray:
    """The processor's rule for a clip that does not fill its last temporal group: repeat the last frame."""
    missing = -len(frames) % per_unit
    return np.concatenate([frames, np.repeat(frames[-1:], missing, axis=0)]) if missing else frames


def generated(backend, inputs: dict, max_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """The model's own greedy ``generate`` over ``inputs``: its new tokens (end-of-sequence ids
    dropped) and every step's logits."""
    out = greedy_generate(backend, max_new, **inputs)
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return [t for t in tokens if t not in backend.eos_token_ids], [step[0].float() for step in out.logits]


def stream(
    backend,
    frames: np.ndarray,
    chunks: list[int],
    method: str = "full",
    overrides: dict | None = None,
    max_new_tokens: int = 6,
    fps: float = FPS,
    frame_seconds: float | None = None,
):
    """A session sampled at ``fps`` fed ``frames`` in ``chunks``, frame ``i`` stamped ``i *
    frame_seconds`` (default ``i / fps``), and its answer to :data:`QUESTION` with logits."""
    session = StreamSession(backend, method, overrides=overrides, fps=fps)
    start = 0
    for size in chunks:
        index = np.arange(start, start + size, dtype=float)
        session.ingest(frames[start : start + size], index / fps if frame_seconds is None else index * frame_seconds)
        start += size
    assert start == len(frames)
    return session, session.ask(QUESTION, max_new_tokens=max_new_tokens, output_logits=True)


class Proxy:
    """A backend proxy that passes everything to ``inner``; a sabotage overrides what it breaks."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


# ------------------------------------------------------------------------------ shared checks


def check_full_first_logits(backend, count: int, reference_logits: ReferenceLogits) -> None:
    """``count`` frames fed in two pieces through ``full``: the first logits equal the model's."""
    frames = make_frames(count, seed=1)
    _, answer = stream(backend, frames, [2, count - 2])
    error = (answer.first_logits - reference_logits(backend, frames)).abs().max().item()
    assert error < 1e-4
    assert answer.frames_seen == count


def check_chunked_ingestion_equals_one_shot(backend, chunks: list[int]) -> None:
    frames = make_frames(6, seed=2)
    _, whole = stream(backend, frames, [6])
    _, chunked = stream(backend, frames, chunks)
    assert (whole.first_logits - chunked.first_logits).abs().max().item() < 1e-5
    assert whole.token_ids == chunked.token_ids


def check_lossless_temporal_mukv_equals_full(backend, encode: str):
    """Keep ratio 1, segment blocks only, every one retrieved in time order: the full context.
    Returns ``full``'s answer and ``mukv``'s."""
    frames = make_frames(8, seed=5)
    _, full = stream(backend, frames, [3, 5])
    lossless = {
        "encode": encode,
        "order": "temporal",
        "segment_frames": 4,
        "keep_ratio.segment": 1.0,
        "granularities.frame": False,
        "granularities.patch": False,
        "top_k.segment": 4,
    }
    _, answer = stream(backend, frames, [3, 5], "mukv", lossless)
    assert [b.granularity for b in answer.retrieved] == ["segment"]
    assert (answer.first_logits - full.first_logits).abs().max().item() < 1e-4
    assert answer.token_ids == full.token_ids
    return full, answer


def check_rekv_without_eviction_equals_full(backend, overrides: dict) -> None:
    frames = make_frames(7, seed=6)
    _, full = stream(backend, frames, [4, 3])
    _, answer = stream(backend, frames, [4, 3], "rekv", {"retrieve_blocks": 8, **overrides})
    assert (answer.first_logits - full.first_logits).abs().max().item() < 1e-4
    assert answer.token_ids == full.token_ids


def check_rekv_with_eviction_answers(backend, n_local: int) -> None:
    frames = make_frames(8, seed=7)
    session, answer = stream(backend, frames, [8], "rekv", {"retrieve_blocks": 2, "n_local": n_local})
    assert session.memory.window.length == n_local and len(answer.token_ids) >= 1


@torch.inference_mode()
def check_moving_keys_equals_recomputing_them(backend, old: torch.Tensor) -> None:
    """First-layer keys of two frames' features computed at positions ``old``, re-rotated to others
    that move each axis differently (time, height, width sections), equal the keys the model computes
    at the new positions (deeper layers' keys depend on the other tokens' positions too)."""
    features = backend.encode_frames(make_frames(2, seed=8))
    embeds = features.reshape(1, -1, features.shape[-1])
    n = embeds.shape[1]
    new = old.clone()
    new[0] += 37  # time only
    new[1] += torch.arange(n) % 5  # height, unevenly per token
    new[2] -= 3
    keys = []
    for positions in (old, new):
        cache, _ = backend.system_cache()
        backend.forward(embeds, cache, positions, logits="none")
        keys.append(cache.layers[0].keys[:, :, -n:])
    moved = backend.positions.shift(keys[0], old, new)
    assert (moved - keys[1]).abs().max().item() < 1e-4
    assert (keys[0] - keys[1]).abs().max().item() > 1e-2


def check_every_method_answers(backend, method: str, overrides: dict) -> None:
    """Nine frames in two pieces through ``method``: an open and a multiple-choice answer."""
    session = StreamSession(backend, method, overrides=overrides, fps=FPS)
    frames = make_frames(9, seed=9)
    assert session.ingest(frames[:5], np.arange(5) * 2.0) == 5
    assert session.ingest(frames[5:], np.arange(5, 9) * 2.0) == 4
    answer = session.ask("What is shown?", max_new_tokens=3)
    assert answer.method == method and answer.frames_seen == 9 and answer.time == 16.0
    assert 1 <= len(answer.token_ids) <= 3 and answer.retrieved
    # Units: four pairs stored, and the ninth frame's padded unit (index 4), provisional, answered from.
    assert session.stats().frames == 4
    assert all(block.last_frame <= 4 for block in answer.retrieved)
    assert max(block.last_frame for block in answer.retrieved) == 4
    choice = session.ask("Which colour?", ["red", "blue"], max_new_tokens=2)
    assert len(choice.token_ids) <= 2


def ask_between_the_frames_of_a_group(backend, method: str, overrides: dict, copy_after: float):
    """Eight frames, 2 s apart, and three sessions of ``method``, each fed the first five: ``asked``
    is then asked (``answer``); ``stored`` gets frame 4 again ``copy_after`` s later (the padded group
    stored for good) and is asked (``expected``), and the two answers' logits must agree; ``never``
    is not asked. Returns ``frames, times, asked, never, answer, expected``."""
    frames = make_frames(8, seed=13)
    times = np.arange(8) * 2.0
    asked = StreamSession(backend, method, overrides=overrides, fps=FPS)
    asked.ingest(frames[:5], times[:5])
    answer = asked.ask(QUESTION, max_new_tokens=2, output_logits=True)
    stored = StreamSession(backend, method, overrides=overrides, fps=FPS)
    stored.ingest(np.concatenate([frames[:5], frames[4:5]]), [*times[:5], times[4] + copy_after])
    expected = stored.ask(QUESTION, max_new_tokens=2, output_logits=True)
    assert (answer.first_logits - expected.first_logits).abs().max().item() < 1e-5
    never = StreamSession(backend, method, overrides=overrides, fps=FPS)
    never.ingest(frames[:5], times[:5])
    return frames, times, asked, never, answer, expected


def check_later_answers_equal(asked: StreamSession, never: StreamSession) -> None:
    """The two sessions hold the same and answer alike, to the bit."""
    assert asked.stats() == never.stats()
    a = asked.ask(QUESTION, max_new_tokens=2, output_logits=True)
    b = never.ask(QUESTION, max_new_tokens=2, output_logits=True)
    assert torch.equal(a.first_logits, b.first_logits) and a.token_ids == b.token_ids


def check_comparison_detects(backend, broken, reference_logits: ReferenceLogits) -> None:
    """The session over ``backend`` equals the model, and over the sabotaged ``broken`` does not."""
    frames = make_frames(6, seed=11)
    reference = reference_logits(backend, frames)
    _, right = stream(backend, frames, [6], max_new_tokens=1)
    _, wrong = stream(broken, frames, [6], max_new_tokens=1)
    assert (right.first_logits - reference).abs().max().item() < 1e-4
    assert (wrong.first_logits - reference).abs().max().item() > 1e-3


def check_tiny_model_command(tmp_path: Path, family: str, title: str):
    """``mukv tiny-model --family family`` writes a checkpoint (announced as ``title``) that ``ask``
    loads; returns the CLI runner."""
    from typer.testing import CliRunner

    from mukv.cli import app

    runner = CliRunner()
    directory = tmp_path / f"tiny-{family}"
    result = runner.invoke(app, ["tiny-model", str(directory), "--family", family])
    assert result.exit_code == 0, result.output
    assert title in result.output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "video_preprocessor_config.json"):
        assert (directory / name).is_file()
    video = tmp_path / "frames.npy"
    np.save(video, make_frames(3, seed=12))
    args = ["ask", str(video), "-q", "What colour?", "--npy-fps", "0.5", "--model", str(directory)]
    result = runner.invoke(app, [*args, "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert '"frames_seen": 3' in result.output
    return runner
