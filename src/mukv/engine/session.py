"""A streaming session: one video stream, its memory, and questions asked as it advances."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mukv.backends.base import Backend
from mukv.backends.prompts import validate_question
from mukv.config import SessionConfig, check_fps
from mukv.engine.events import Answer, DoneEvent, Event, Timings, TokenEvent
from mukv.engine.generate import IncrementalDecoder, greedy_decode
from mukv.errors import StreamError
from mukv.memory import MemoryMethod, MemoryStats, Query, create_memory
from mukv.memory.base import PendingUnit
from mukv.video.preprocess import as_frames
from mukv.video.sources import FrameStream


class StreamSession:
    """Owns all mutable per-stream state: the clock, the memory, and timing counters.

    ``ingest`` adds frames (timestamps strictly increasing); ``ask`` answers at the current
    stream time, from frames up to then only. Methods are serialised by a lock, so one thread
    may ingest a live stream while another asks questions.

    ``fps`` is the rate the stream's frames are sampled at (frames per second). Models that place
    frames in time by it (Qwen2.5-VL) need it, and creating a session for one without it is a
    ``ValueError``; for the others it is optional (checked against sources when given). It is the
    stream's, not the backend's: sessions at different rates may share one backend.

    A backend whose visual unit is a group of frames (``layout.frames_per_unit > 1``, Qwen-VL's
    temporal patches) gets whole groups: frames of an incomplete group wait here. When a question
    comes while a group is incomplete, the group is completed for that answer only, by repeating its
    last frame as the model's own processor pads a clip with an odd frame count, and handed to the
    memory as a provisional unit (:class:`mukv.memory.base.PendingUnit`): the answer is the one a
    plain forward over the frames seen so far gives, asking again gives it again, and nothing is
    stored: the next frame completes the real group (after frames 0-4, a question and frame 5, the
    memory holds units (0 1) (2 3) (4 5), as without the question). The memory counts units;
    ``frames_seen`` counts frames.

    Example::

        backend = load_backend("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
        session = StreamSession(backend, "full", fps=0.5)
        session.ingest_source(open_video("walk.mp4", sample_fps=0.5), until=60.0)
        print(session.ask("What did I pick up?").text)
    """

    def __init__(
        self,
        backend: Backend,
        method: str | MemoryMethod = "full",
        *,
        method_config: Any = None,
        overrides: dict[str, Any] | None = None,
        config: SessionConfig | None = None,
        fps: float | None = None,
    ) -> None:
        self.backend = backend
        check_fps(fps)
        if isinstance(method, MemoryMethod):
            if method_config is not None or overrides:
                raise ValueError("method_config/overrides: only valid with a method name")
            if fps is not None and method.fps != fps:
                raise ValueError(f"fps: the memory was made for a stream at {method.fps} fps, not {fps}")
            self.memory = method
        else:
            self.memory = create_memory(method, backend, method_config, overrides, fps=fps)
        self.config = config or SessionConfig()
        # Held for state changes only (ingest, assembling an answering cache), never across a
        # ``yield``: a generator may be advanced by a thread other than the one that started it.
        self._lock = threading.RLock()
        self._vision_seconds = 0.0
        self._memory_seconds = 0.0
        self._frames_encoded = 0
        self._system_tokens: int | None = None
        # Frames of an incomplete visual unit ([k, H, W, 3], k < frames_per_unit) and their times.
        self._pending: torch.Tensor | None = None
        self._pending_times: list[float] = []
        # Those frames completed into a unit and encoded, for questions until the next frame.
        self._pending_unit: PendingUnit | None = None
        self._frames = 0
        # Directory -> id of the save this session last wrote there or was loaded from: saving there
        # again writes only what is new (see mukv.memory.persist).
        self._saved_as: dict[Path, str] = {}

    def save(self, path: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
        """Save the stream's memory to directory ``path``: everything needed to answer, and to go on
        ingesting, exactly as this session would (blocks, the method's open groups or window, the
        clock, the stream's rate, frames of an incomplete group), with the method's config and the
        model's identity, written atomically and checksummed. Saving again to the same directory
        writes only what is new. ``extra``: JSON-ready facts kept in the manifest. Block-based methods
        (``mukv``, ``rekv``) can be saved. See :mod:`mukv.memory.persist` for the format.

        Example::

            session.save("walk.mem")
            later = StreamSession.load(backend, "walk.mem")
            print(later.ask("What did I pick up?").text)  # the answer the saved session gives
        """
        from mukv.memory.persist import save_session

        return save_session(self, path, extra=extra)

    @classmethod
    def load(
        cls,
        backend: Backend,
        path: str | Path,
        *,
        method: str | None = None,
        method_config: Any = None,
        fps: float | None = None,
        config: SessionConfig | None = None,
    ) -> StreamSession:
        """The session saved in ``path`` (by :meth:`save`) on ``backend``: it answers with the same
        tokens and logits as the saved one, and ingesting more frames continues the stream as if it
        had never been saved. ``method``, ``method_config`` and ``fps``, when given, must match the
        saved ones. Raises :class:`mukv.errors.MemoryFileError` (missing, damaged, truncated, or a
        newer format version) or :class:`mukv.errors.MemoryMismatchError` (another model, method,
        config or rate), each naming the problem."""
        from mukv.memory.persist import load_session

        return load_session(backend, path, method=method, method_config=method_config, fps=fps, config=config)

    @property
    def fps(self) -> float | None:
        """The rate the stream's frames are sampled at (``None``: not stated)."""
        return self.memory.fps

    @property
    def time(self) -> float | None:
        """Timestamp of the last ingested frame (``None`` before any frame); the memory keeps the
        stream's one clock (frames waiting for their group are newer)."""
        return self._pending_times[-1] if self._pending_times else self.memory.time

    @property
    def frames_seen(self) -> int:
        if self.backend.layout.frames_per_unit == 1:
            return self.memory.frames
        return self._frames

    def _clock(self) -> float:
        """``perf_counter`` after the device has finished queued work (CUDA is asynchronous)."""
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)
        return time.perf_counter()

    def stats(self) -> MemoryStats:
        with self._lock:
            return self.memory.stats()

    def ingest(self, frames: np.ndarray | torch.Tensor, timestamps: Sequence[float] | np.ndarray) -> int:
        """Encode and store uint8 frames ``[T, H, W, 3]`` taken at ``timestamps`` (seconds).

        Timestamps must be finite and strictly increasing, also across calls. Returns ``T``.
        """
        tensor = as_frames(frames)
        times = np.asarray(timestamps, dtype=np.float64).reshape(-1)
        if times.shape[0] != tensor.shape[0]:
            raise ValueError(f"timestamps: {times.shape[0]} values for {tensor.shape[0]} frames")
        if not np.all(np.isfinite(times)):
            raise ValueError("timestamps: must be finite")
        if np.any(np.diff(times) <= 0):
            raise StreamError("timestamps: must be strictly increasing")
        with self._lock:
            now = self.time
            if now is not None and times[0] <= now:
                raise StreamError(f"timestamps: frame at {times[0]:.3f}s is not after the stream time {now:.3f}s")
            count = int(tensor.shape[0])
            per_unit = self.backend.layout.frames_per_unit
            if per_unit > 1:
                self._pending_unit = None
                if self._pending is not None:
                    tensor = torch.cat((self._pending, tensor.to(self._pending.device)))
                    times = np.concatenate((np.asarray(self._pending_times), times))
                whole = tensor.shape[0] - tensor.shape[0] % per_unit
                self._pending = tensor[whole:].clone() if whole < tensor.shape[0] else None
                self._pending_times = [float(t) for t in times[whole:]]
                # A unit's stamp is its frames' mean time, as Qwen3-VL's processor writes it.
                stamps = (times[0:whole:per_unit] + times[per_unit - 1 : whole : per_unit]) / 2
                tensor, times = tensor[:whole], times[per_unit - 1 : whole : per_unit]
            else:
                stamps = times
            if tensor.shape[0]:
                self._store_units(tensor, times, count, stamps)
            else:
                self._frames_encoded += count
            self._frames += count
        return count

    def _store_units(
        self, frames: torch.Tensor, times: np.ndarray, count: int, stamps: np.ndarray | None = None
    ) -> None:
        """Encode whole units of ``frames`` and hand them to the memory, each unit at the time of its
        last frame (``times``, one per unit) and stamped with its frames' mean time (``stamps``,
        default ``times``); ``count`` new frames are accounted."""
        start = self._clock()
        features = self.backend.encode_frames(frames)
        encoded = self._clock()
        self.memory.ingest(features, times, stamps)
        self._vision_seconds += encoded - start
        self._memory_seconds += self._clock() - encoded
        self._frames_encoded += count

    def _provisional_unit(self) -> PendingUnit | None:
        """The incomplete unit completed for a question: padded with its last frame (the model's
        processor pads an odd frame count so) and encoded once until the next frame arrives; never
        stored (the memory answers from it provisionally)."""
        if self._pending is None:
            return None
        if self._pending_unit is None:
            frames = self._pending
            pad = self.backend.layout.frames_per_unit - frames.shape[0]
            frames = torch.cat((frames, frames[-1:].expand(pad, *frames.shape[1:])))
            start = self._clock()
            features = self.backend.encode_frames(frames)  # [1, P, d]
            self._vision_seconds += self._clock() - start
            # Padding repeats the last frame, so the unit's frames' mean time is of its real first and last.
            stamp = (self._pending_times[0] + self._pending_times[-1]) / 2
            self._pending_unit = PendingUnit(features=features[0], time=self._pending_times[-1], stamp=stamp)
        return self._pending_unit

    def ingest_source(
        self,
        source: FrameStream,
        until: float | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Ingest frames from ``source`` with timestamp <= ``until`` (all if ``None``).

        Frames after ``until`` stay in the source for a later call. ``progress`` is called with
        the number of frames of each ingested batch. Returns the number of frames ingested. A source
        that states its sampling rate (``source.sample_fps``) must sample at the session's ``fps``
        when the session has one (``ValueError`` otherwise: positions would be wrong).
        """
        if until is not None and not math.isfinite(until):
            raise ValueError(f"until: must be a finite time in seconds, got {until}")
        rate = getattr(source, "sample_fps", None)
        if rate is not None and self.fps is not None and not math.isclose(rate, self.fps, rel_tol=1e-6):
            raise ValueError(
                f"fps: {source.name} is sampled at {rate:g} frames per second, but this session's stream is at "
                f"{self.fps:g} (StreamSession(..., fps=...))"
            )
        total = 0
        while (batch := source.next_batch(self.config.encode_batch_frames, until)) is not None:
            total += self.ingest(batch.frames, batch.timestamps)
            if progress is not None:
                progress(len(batch))
        return total

    def check_question(
        self, question: str, choices: Sequence[str] | None = None, *, max_new_tokens: int | None = None
    ) -> None:
        """Raise ``ValueError`` if :meth:`ask` would refuse this question (empty or undecodable text,
        bad choices, a bad ``max_new_tokens``, or more tokens than the model's context can take).
        Costs one tokenization: call it before encoding a video for a question."""
        self._checked(question, choices, max_new_tokens)

    def _checked(
        self, question: str, choices: Sequence[str] | None, max_new_tokens: int | None
    ) -> tuple[str, torch.Tensor, int]:
        """The stripped question, its prompt's token ids ``[1, n]`` and the answer length limit.

        Checked before any work: a question longer than the model's context would otherwise run
        the retrieval pass and the prefill over it before failing (or exhaust memory)."""
        question = validate_question(question)
        prompt = self.backend.prompts.render_question(question, choices)
        generation = self.config.generation
        if max_new_tokens is None:
            max_new_tokens = generation.max_new_tokens if choices is None else generation.max_new_tokens_choice
        limit = self.backend.text.max_positions
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens: expected an integer, got {max_new_tokens!r}")
        if not 1 <= max_new_tokens < limit:
            raise ValueError(
                f"max_new_tokens: must be between 1 and {limit - 1} (the model's context), got {max_new_tokens}"
            )
        return question, self._question_ids(prompt, max_new_tokens), max_new_tokens

    def _question_ids(self, prompt: str, max_new_tokens: int) -> torch.Tensor:
        """Token ids ``[1, n]`` of the question ``prompt``; ``ValueError`` when they cannot fit in the
        model's context next to the system prompt and ``max_new_tokens``. A text many times longer in
        characters than that room is refused before it is tokenized."""
        if self._system_tokens is None:
            self._system_tokens = int(self.backend.tokenize(self.backend.prompts.system).shape[1])
        limit = self.backend.text.max_positions
        room = limit - self._system_tokens - max_new_tokens
        where = (
            f"the model's context is {limit:,} positions; the system prompt takes {self._system_tokens:,} and "
            f"max_new_tokens={max_new_tokens:,}, leaving {max(room, 0):,} for the question"
        )
        if len(prompt) > 16 * max(room, 1):
            raise ValueError(
                f"question: {len(prompt):,} characters is longer than the model's context can take ({where})"
            )
        ids = self.backend.tokenize(prompt)
        if ids.shape[1] > room:
            raise ValueError(f"question: {ids.shape[1]:,} tokens is longer than the model's context can take ({where})")
        return ids

    def ask(
        self,
        question: str,
        choices: Sequence[str] | None = None,
        *,
        max_new_tokens: int | None = None,
        output_logits: bool = False,
        at: float | None = None,
    ) -> Answer:
        """Answer ``question`` (optionally multiple choice) at time ``at`` (default: the stream
        time). ``at`` may not be earlier than the newest frame; with ``at`` a question can be
        asked before any frame arrived (it is then answered from the prompt alone)."""
        for event in self.ask_stream(
            question, choices, max_new_tokens=max_new_tokens, output_logits=output_logits, at=at
        ):
            if isinstance(event, DoneEvent):
                return event.answer
        raise RuntimeError("decoding ended without a result")  # unreachable: ask_stream always finishes

    def ask_stream(
        self,
        question: str,
        choices: Sequence[str] | None = None,
        *,
        max_new_tokens: int | None = None,
        output_logits: bool = False,
        at: float | None = None,
    ) -> Iterator[Event]:
        """Like :meth:`ask`, yielding a :class:`TokenEvent` per generated token, then a :class:`DoneEvent`.

        The session is locked only while the answering cache is assembled: decoding runs without
        the lock, on a cache of its own, so frames can be ingested while an answer streams, and the
        generator may be advanced from any thread and closed halfway.
        """
        question, prompt_ids, max_new_tokens = self._checked(question, choices, max_new_tokens)
        if at is not None and not math.isfinite(at):
            raise ValueError(f"at: must be a finite time in seconds, got {at}")
        with self._lock:
            if at is None:
                if self.time is None:
                    raise StreamError("no frames ingested yet: ingest video before asking (or pass at=)")
                at = self.time
            elif self.time is not None and at < self.time:
                raise StreamError(f"at: {at:.3f}s is before the newest frame ({self.time:.3f}s)")
            started = self._clock()
            query = Query(text=question, ids=self.backend.tokenize(question), time=at)
            # The only state change a question makes: open groups of the memory, and an incomplete
            # unit completed for this answer, are materialised provisionally.
            self.memory.materialize(at, self._provisional_unit())
            context = self.memory.prepare(query)
            needed = context.next_position + prompt_ids.shape[1] + max_new_tokens
            limit = self.backend.text.max_positions
            if needed > limit:
                raise ValueError(
                    f"question: the answering context holds {context.next_position} tokens; with the question's "
                    f"{prompt_ids.shape[1]} and max_new_tokens={max_new_tokens} it needs {needed} positions, more than "
                    f"the model's {limit} (use a smaller retrieval budget, a shorter question or fewer new tokens)"
                )
            # What the answer reports is taken at question time, before frames arriving during decoding.
            frames_seen = self.memory.frames_until(at) if self.backend.layout.frames_per_unit == 1 else self._frames
            stats = self.memory.stats()
            vision, memory, encoded = self._vision_seconds, self._memory_seconds, self._frames_encoded
            self._vision_seconds = self._memory_seconds = 0.0
            self._frames_encoded = 0
            prepared = self._clock()
        logits: list[torch.Tensor] = []
        decoder = IncrementalDecoder(self.backend)
        tokens: list[int] = []
        first_token = None
        pending: int | None = None
        for token in greedy_decode(
            self.backend,
            context.cache,
            prompt_ids,
            context.next_position,
            max_new_tokens,
            logits if output_logits else None,
        ):
            if output_logits and len(logits) > 1:
                del logits[1:]  # only the first token's distribution is kept
            if first_token is None:
                first_token = time.perf_counter()  # argmax -> int already waited for the device
            tokens.append(token)
            if token in self.backend.eos_token_ids:
                break
            # Events lag one token so that the last one can carry the decoder's remainder.
            if pending is not None:
                yield TokenEvent(pending, decoder.push(pending))
            pending = token
        if pending is not None:
            yield TokenEvent(pending, decoder.push(pending) + decoder.flush())
        finished = self._clock()
        answer_ids = [t for t in tokens if t not in self.backend.eos_token_ids]
        answer = Answer(
            question=question,
            choices=tuple(choices) if choices is not None else None,
            text=self.backend.decode(answer_ids).strip(),
            token_ids=tuple(answer_ids),
            time=at,
            frames_seen=frames_seen,
            context_tokens=context.context_tokens,
            timings=Timings(
                vision=vision,
                memory=memory,
                prepare=prepared - started,
                first_token=(first_token or finished) - started,
                total=finished - started,
                stages=dict(context.stages),
            ),
            retrieved=context.retrieved,
            memory=stats,
            method=self.memory.name,
            stop_reason="eos" if tokens and tokens[-1] in self.backend.eos_token_ids else "length",
            generated_tokens=len(tokens),
            frames_encoded=encoded,
            first_logits=logits[0] if logits else None,
        )
        yield DoneEvent(answer)
