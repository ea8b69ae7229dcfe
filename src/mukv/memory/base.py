"""The interface every memory method implements, and the typed results it returns.

A memory method turns a stream of visual tokens into retrievable state (``ingest``) and, for a
question at time ``t``, assembles the KV cache the answer is generated from: first
``materialize(t)`` (the only state change a question may cause, made explicit so that the session
can hold its lock over it), then ``prepare(query)``, which returns a cache of the answer's own. The
engine appends the question after that cache and decodes; it never looks inside a method.

A method serves one stream: it places that stream's visual tokens with the stream's position
scheme (:attr:`MemoryMethod.positions`, ``backend.stream_positions(fps)`` for the stream's sampling
rate ``fps``), never with a scheme of its own making.

**Provisional units.** Where a visual unit is a group of frames (Qwen-VL: two), a question may come
while a group is incomplete. The session then completes it for that answer only (padding it as
the model's processor pads a clip) and hands it to ``materialize(t, pending=PendingUnit(...))``:
the unit is part of the answers prepared until the next ``ingest`` or ``materialize`` (which drop
it), and never part of the stream. Stored state (frames, blocks, encoding state, what later answers
see) is exactly what it would be had the question not been asked; the real frames arrive later, in
whole units, through ``ingest``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import DynamicCache

from mukv.backends.base import Backend
from mukv.backends.positions import PositionScheme


@dataclass(frozen=True)
class RetrievedBlock:
    """A piece of the stream placed in the answering cache: frames ``first_frame..last_frame``."""

    granularity: str
    first_frame: int
    last_frame: int
    start_time: float
    end_time: float
    tokens: int
    score: float | None = None
    block_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Any, score: float | None = None) -> RetrievedBlock:
        """From a stored block's record (:class:`mukv.kv.blocks.BlockRecord`)."""
        return cls(
            granularity=record.granularity,
            first_frame=record.first_frame,
            last_frame=record.last_frame,
            start_time=record.start_time,
            end_time=record.end_time,
            tokens=record.tokens,
            score=score,
            block_id=record.block_id,
        )


@dataclass(frozen=True)
class MemoryStats:
    """What a method holds, by granularity (``init`` is the system prompt's KV).

    ``consolidated``: what a byte budget (``memory_budget``) re-pruned and evicted so far, as
    ``"repruned.<granularity>"``, ``"evicted.<granularity>"`` and ``"freed_bytes.<granularity>"``
    counts; ``None`` (and absent from :meth:`to_dict`) for methods without a budget.

    ``disk_bytes``: how many of the stored bytes (counted in ``bytes`` and ``total_bytes`` like the
    rest) are payloads in memory-mapped files (``ram_budget``'s disk tier) rather than in RAM."""

    frames: int
    blocks: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    consolidated: dict[str, int] | None = None
    disk_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["consolidated"] is None:
            del data["consolidated"]
        data.update(total_bytes=self.total_bytes, total_tokens=self.total_tokens)
        return data


@dataclass(frozen=True)
class Query:
    """A question as memory methods see it: bare text, its token ids ``[1, n]``, and its time."""

    text: str
    ids: torch.Tensor
    time: float


@dataclass
class AnswerContext:
    """An assembled cache to append the question to.

    ``next_position`` is the cursor of the first question token (the backend's position scheme
    turns it into positions). Every built-in method uses the cache length, as transformers does by
    default (so MuKV's ``reference`` order, whose blocks keep overlapping baked-in positions, puts
    the question after the cache length like the release does); a method may choose otherwise.
    ``stages`` holds seconds spent in named parts of ``prepare`` (for profiling).
    """

    cache: DynamicCache
    next_position: int
    context_tokens: int
    retrieved: tuple[RetrievedBlock, ...] = ()
    stages: dict[str, float] = field(default_factory=dict)


class StageClock:
    """Seconds spent in named stages of ``prepare``, for :attr:`AnswerContext.stages` (waits for
    the device at each lap, so the numbers are real on asynchronous devices too)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        now = self._now()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by all keys and values of ``cache``."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


@dataclass(frozen=True)
class PendingUnit:
    """A visual unit that is not part of the stream (yet): ``features [P, d]``, taken at ``time``
    (seconds, after every ingested unit), to be answered from provisionally (see the module
    docstring): the session's incomplete temporal group, completed for one question."""

    features: torch.Tensor
    time: float
    #: The time a model that writes timestamps writes for the unit (its frames' mean, see
    #: :meth:`MemoryMethod.ingest`); ``None``: ``time``.
    stamp: float | None = None


@dataclass(frozen=True)
class UnitTokens:
    """Where one visual unit's tokens lie in a sequence fed to the model: from ``offset``, ``prefix``
    text tokens, the unit's ``P`` visual tokens, then ``suffix`` text tokens (text the model writes
    around every unit, e.g. Qwen3-VL's timestamp; none for the other families)."""

    offset: int
    prefix: int
    suffix: int
    #: The cursor after the unit and its text (where text, or the next unit, continues).
    cursor: int

    def length(self, p: int) -> int:
        """Tokens of the unit with its text, for ``p`` visual tokens."""
        return self.prefix + p + self.suffix

    def indices(self, visual: torch.Tensor, p: int) -> torch.Tensor:
        """Indices in the sequence of the unit's text and of its visual tokens ``visual [k]`` (indices
        into its ``p``): a block of the unit keeps the unit's text with it, in sequence order."""
        start = self.offset + self.prefix
        device = visual.device
        return torch.cat(
            (
                torch.arange(self.offset, start, device=device),
                start + visual,
                torch.arange(start + p, start + p + self.suffix, device=device),
            )
        )


def unit_sequence(
    backend: Backend,
    scheme: PositionScheme,
    features: torch.Tensor,
    stamps: Sequence[float],
    start: int,
    *,
    first_unit: int = 0,
    cursor: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, list[UnitTokens]]:
    """Visual units ``features [U, P, w]`` (unit ``u`` stamped ``stamps[u]``) as the model takes them:
    embeddings ``[n, w]``, positions ``[R, n]``, the cursor after them, and each unit's tokens.

    Without unit text (``backend.unit_text`` empty) this is :meth:`PositionScheme.visual_run` from
    ``start`` with ``first_unit`` units of the run before (``n = U * P``). With it, every unit is fed
    ``[prefix | unit | suffix]`` (text, visual, text positions) from ``cursor`` (default ``start``),
    the cursor after one unit's text being where the next begins: text lengths vary with the stamp,
    so a unit's place is a cursor, not a multiple of a size.
    """
    p, width = backend.layout.tokens, features.shape[-1]
    device = backend.device
    texts = [backend.unit_text(float(t)) for t in stamps]
    if not any(a or b for a, b in texts):
        positions, after = scheme.visual_run(start, backend.layout, features.shape[0], device, first_unit=first_unit)
        units = [
            UnitTokens(u * p, 0, 0, scheme.visual_run(start, backend.layout, 1, first_unit=first_unit + u)[1])
            for u in range(len(texts))
        ]
        return features.reshape(-1, width), positions, after, units
    cursor = start if cursor is None else cursor
    embeds, positions, units, offset = [], [], [], 0
    for unit, (before, after) in zip(features, texts, strict=True):
        ids = [backend.tokenize(text) for text in (before, after)]
        a, b = ids[0].shape[1], ids[1].shape[1]
        visual, end = scheme.visual(cursor + a, backend.layout, 1, device)
        positions += [scheme.text(cursor, a, device), visual, scheme.text(end, b, device)]
        # Text rows are as wide as the unit's features (zero beyond the embedding: no DeepStack).
        text = [torch.nn.functional.pad(backend.embed_ids(i)[0], (0, width - backend.text.hidden_size)) for i in ids]
        embeds += [text[0].to(unit.dtype), unit.to(device), text[1].to(unit.dtype)]
        cursor = end + b
        units.append(UnitTokens(offset, a, b, cursor))
        offset += a + p + b
    return torch.cat(embeds), torch.cat(positions, dim=1), cursor, units


def prefill_frames(
    backend: Backend,
    cache: DynamicCache,
    features: torch.Tensor,
    start: int,
    chunk_tokens: int,
    *,
    first_unit: int = 0,
    scheme: PositionScheme | None = None,
    stamps: Sequence[float] | None = None,
    cursor: int | None = None,
) -> int:
    """Append visual units ``features [U, P, w]`` to ``cache`` as one sequence from cursor
    ``start`` (positions from ``scheme``, the stream's: a method passes its :attr:`MemoryMethod.positions`;
    default ``backend.positions``), in chunks of at most ``chunk_tokens`` tokens (bounds the attention
    workspace; results do not depend on it). ``first_unit``: the units continue a run from ``start``
    that holds that many units already (see ``PositionScheme.visual_run``). ``stamps``: the units'
    stamps, for a backend that writes text around each unit (then fed from ``cursor``, see
    :func:`unit_sequence`; needed there).

    Returns the cursor after them.
    """
    scheme = backend.positions if scheme is None else scheme
    if stamps is None:
        stamps = [0.0] * features.shape[0]
        if any(backend.unit_text(0.0)):
            raise ValueError("prefill_frames: this backend writes a stamp around each unit; pass the units' stamps")
    flat, positions, cursor, _ = unit_sequence(
        backend, scheme, features, stamps, start, first_unit=first_unit, cursor=cursor
    )
    feed(backend, cache, flat, positions, chunk_tokens)
    return cursor


def feed(
    backend: Backend, cache: DynamicCache, embeds: torch.Tensor, positions: torch.Tensor, chunk_tokens: int
) -> None:
    """Append ``embeds [n, w]`` at ``positions [R, n]`` to ``cache`` in chunks of at most ``chunk_tokens``."""
    embeds = embeds[None]
    for offset in range(0, embeds.shape[1], chunk_tokens):
        piece = embeds[:, offset : offset + chunk_tokens]
        backend.forward(piece, cache, positions[:, offset : offset + piece.shape[1]], logits="none")


class MemoryMethod(ABC):
    """Base of the memory methods; subclasses register with :func:`mukv.memory.register_method`.

    The base keeps the timestamps of ingested frames (strictly increasing, enforced by the
    session) so that every method can tell which frames a question at time ``t`` may use.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    # Whether ``prepare`` can answer at a time before the newest frame (a declared capability).
    answers_past_questions: ClassVar[bool] = True

    def __init__(self, backend: Backend, config: Any = None, *, fps: float | None = None) -> None:
        self.backend = backend
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ValueError(
                f"config: method {self.name!r} takes {self.config_class.__name__}, got {type(self.config).__name__}"
            )
        #: The rate the stream's frames are sampled at (frames per second; ``None``: not known).
        self.fps = fps
        #: The stream's position scheme: where its visual tokens go (``ValueError`` here when the
        #: backend needs the rate and ``fps`` is ``None``).
        self.positions: PositionScheme = backend.stream_positions(fps)
        #: Whether the model writes text around every unit (``backend.unit_text``): units are then fed
        #: with it (:func:`unit_sequence`) and a unit's blocks keep it.
        self.units_have_text = any(backend.unit_text(0.0))
        self._timestamps: list[float] = []
        # Each unit's stamp (see ``ingest``), where a model writes a time for every unit.
        self._stamps: list[float] = []
        # The provisional unit of the current question (see PendingUnit), until the next ingest.
        self._pending_unit: PendingUnit | None = None

    @property
    def frames(self) -> int:
        """Frames ingested so far."""
        return len(self._timestamps)

    def frames_until(self, time: float) -> int:
        """How many ingested frames have timestamp <= ``time`` (they are the first ones)."""
        return bisect.bisect_right(self._timestamps, time)

    @property
    def time(self) -> float | None:
        """Timestamp of the newest frame (``None`` before any): the stream's clock."""
        return self._timestamps[-1] if self._timestamps else None

    def timestamp(self, index: int) -> float:
        """Timestamp of unit ``index``; ``index == frames`` is the provisional unit while there is one."""
        if index == len(self._timestamps) and self._pending_unit is not None:
            return self._pending_unit.time
        return self._timestamps[index]

    def stamp(self, index: int) -> float:
        """Stamp of unit ``index`` (see :meth:`ingest`); ``index == frames`` is the provisional unit's."""
        if index == len(self._stamps) and self._pending_unit is not None:
            unit = self._pending_unit
            return unit.time if unit.stamp is None else unit.stamp
        return self._stamps[index]

    def stamps(self, first: int, count: int) -> list[float]:
        """Stamps of units ``first .. first + count - 1``."""
        return [self.stamp(i) for i in range(first, first + count)]

    def materialize(self, time: float, pending: PendingUnit | None = None) -> None:
        """The question-time step: make every frame up to ``time`` answerable, and ``pending`` (a unit
        after every ingested one, see :class:`PendingUnit`) answerable until the next ``ingest`` or
        ``materialize``, without making it part of the stream. The session calls it under its lock
        before :meth:`prepare`. The base keeps ``pending`` for :meth:`pending_unit`; block methods
        also store open groups (and the pending unit) as provisional blocks here
        (:class:`mukv.memory.blocks.BlockMemory`)."""
        if pending is not None and self.time is not None and pending.time <= self.time:
            raise ValueError(f"pending: a unit at {pending.time}s is not after the stream time {self.time}s")
        self._pending_unit = pending

    def pending_unit(self, time: float) -> PendingUnit | None:
        """The provisional unit a question at ``time`` sees (``None`` if none, or if it is later)."""
        unit = self._pending_unit
        return unit if unit is not None and unit.time <= time else None

    def frame_blocks(self, indices) -> tuple[RetrievedBlock, ...]:
        """Retrieved-block records for whole frames ``indices`` (methods that use frames as is)."""
        return tuple(
            RetrievedBlock(
                granularity="frame",
                first_frame=i,
                last_frame=i,
                start_time=self.timestamp(i),
                end_time=self.timestamp(i),
                tokens=self.unit_tokens(i),
                block_id=i,
            )
            for i in indices
        )

    def unit_tokens(self, index: int) -> int:
        """Tokens unit ``index`` takes in a cache: its ``P`` visual tokens, and the text the model
        writes around it (the layout's token count is the visual tokens alone)."""
        p = self.backend.tokens_per_frame
        if not self.units_have_text:
            return p
        return p + sum(self.backend.tokenize(text).shape[1] for text in self.backend.unit_text(self.stamp(index)))

    def ingest(self, features: torch.Tensor, timestamps: np.ndarray, stamps: Sequence[float] | None = None) -> None:
        """Add frames: visual tokens ``[T, P, d]`` and their timestamps ``[T]`` (seconds; a unit of
        several frames is at its last frame's). ``stamps [T]``: the time a model that writes one per
        unit writes for it (Qwen3-VL: its frames' mean); default ``timestamps``."""
        if features.ndim != 3 or features.shape[0] != len(timestamps):
            raise ValueError(f"features: expected [T, P, d] with T = {len(timestamps)}, got {list(features.shape)}")
        stamps = timestamps if stamps is None else stamps
        if len(stamps) != len(timestamps):
            raise ValueError(f"stamps: {len(stamps)} values for {len(timestamps)} units")
        self._pending_unit = None
        # Stamps first: ``_ingest`` feeds the new units' text (``self.frames`` is still the first's index).
        self._stamps.extend(float(t) for t in stamps)
        try:
            self._ingest(features, timestamps)
        except BaseException:
            del self._stamps[len(self._timestamps) :]
            raise
        self._timestamps.extend(float(t) for t in timestamps)

    def _advance_clock(self, timestamps: Sequence[float]) -> None:
        """Append the timestamps of frames whose state was adopted rather than ingested (``restore``):
        finite, strictly increasing, after the stream's time."""
        times = [float(t) for t in timestamps]
        previous = self.time
        for t in times:
            if not math.isfinite(t) or (previous is not None and t <= previous):
                raise ValueError(f"timestamps: must be finite and strictly increasing after {previous}, got {t}")
            previous = t
        self._pending_unit = None
        self._timestamps.extend(times)
        self._stamps.extend(times)

    # ------------------------------------------------------------------ saving (mukv.memory.persist)

    def import_clock(self, timestamps: Sequence[float], stamps: Sequence[float]) -> None:
        """Adopt a saved stream clock (every unit's timestamp and stamp, see :meth:`ingest`) into a
        memory that holds no frame yet; the method's own state comes with :meth:`import_state`."""
        if self._timestamps:
            raise ValueError(f"import_clock: the memory already holds {self.frames} frames")
        if len(stamps) != len(timestamps):
            raise ValueError(f"stamps: {len(stamps)} values for {len(timestamps)} units")
        times = [float(t) for t in timestamps]
        if any(not math.isfinite(t) for t in times) or any(b <= a for a, b in itertools.pairwise(times)):
            raise ValueError("timestamps: must be finite and strictly increasing")
        self._timestamps = times
        self._stamps = [float(t) for t in stamps]
        self._pending_unit = None

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What the method holds beyond the clock, to save it (:mod:`mukv.memory.persist`): tensors
        by name and JSON-ready metadata, such that :meth:`import_state` on a fresh memory with the same
        backend and config makes it answer, and go on ingesting, exactly as this one. Question-time
        state (provisional blocks, the provisional unit) is not part of it. A method that cannot be
        saved raises ``NotImplementedError`` (the default)."""
        raise NotImplementedError(f"method {self.name!r} cannot be saved")

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Adopt what :meth:`export_state` returned (after :meth:`import_clock`); tensors may be on
        any device (moved where the method keeps them)."""
        raise NotImplementedError(f"method {self.name!r} cannot be loaded")

    @abstractmethod
    def _ingest(self, features: torch.Tensor, timestamps: np.ndarray) -> None:
        """Method-specific part of :meth:`ingest` (``self.frames`` is the first new frame's index)."""

    @abstractmethod
    def prepare(self, query: Query) -> AnswerContext:
        """Assemble the answering cache for ``query`` from frames with timestamp <= ``query.time``,
        after :meth:`materialize` for that time, and from the materialized provisional unit if it is
        not later (:meth:`pending_unit`).

        Must not modify stored state: the same question asked twice gets the same cache, and the
        cache is the answer's own (decoding into it never changes what is stored, so it may run
        while more frames are ingested).
        """

    @abstractmethod
    def stats(self) -> MemoryStats:
        """Exact accounting of what is held."""

    def close(self) -> None:
        """Release what outlives the object otherwise (files of a disk tier); also done when the
        memory is garbage-collected. The memory should not be used afterwards."""
        return None  # nothing to release by default
