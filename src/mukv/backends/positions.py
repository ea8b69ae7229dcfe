"""Positions and frame layouts: what a backend says about where tokens sit.

Memory methods and the decoder never build positions themselves. They hold a *cursor* (an int:
the position at which the next text token goes, the same on every axis) and ask the backend's
:class:`PositionScheme` for the positions of visual tokens, of text and of a continuation after
a cache, and to move stored keys from old to new positions.

Positions are ``[R, n]`` long tensors: ``R = 1`` for 1-D RoPE (LLaVA-OneVision's Qwen2), ``R = 3``
(time, height, width) for multimodal RoPE (Qwen2.5-VL, Qwen3-VL). Text tokens have the same
position on every axis. Where visual tokens go is the model's rule: consecutive positions for
1-D RoPE; for M-RoPE, time from the frame group and height/width from the token grid, offset by
the cursor, with text continuing where the model's own rule puts it (see
:class:`MultimodalRopePositions`).

A :class:`FrameLayout` says what one *visual unit* is: the rows of ``Backend.encode_frames``'
output. For LLaVA-OneVision a unit is one frame; for Qwen-VL, whose vision tower merges
``temporal_patch_size`` frames into one set of tokens, a unit is that temporal group. Memory
methods count units as their "frames": a frame block is one unit, patch blocks are spatial parts
of its token grid, and a segment is a whole number of units.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The pairing transformers' Qwen2/Llama RoPE uses: (x1, x2) -> (-x2, x1) over the two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_angles(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[n, D]`` for integer ``positions [n]`` (float64 angles, then float32): rotations
    compose, R(p + d) = R(d) R(p), so moving a key by ``d`` is exact up to float32 rounding."""
    freqs = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


@dataclass(frozen=True)
class FrameLayout:
    """The visual tokens one unit (a frame, or a temporal group of frames) yields.

    ``grid`` is ``(rows, cols)`` of the unit's tokens in raster order (``rows * cols == tokens``);
    ``frames_per_unit`` is how many video frames the vision tower merges into one unit (1 for
    LLaVA-OneVision, 2 for Qwen2.5-VL / Qwen3-VL). Resolution-dependent models build one layout
    per resolution: every unit of a stream then has the same token count.
    """

    grid: tuple[int, int]
    frames_per_unit: int = 1

    def __post_init__(self) -> None:
        rows, cols = self.grid
        if rows < 1 or cols < 1 or self.frames_per_unit < 1:
            raise ValueError(f"FrameLayout: grid and frames_per_unit must be positive, got {self}")

    @property
    def tokens(self) -> int:
        """Visual tokens per unit."""
        return self.grid[0] * self.grid[1]

    @classmethod
    def square(cls, tokens: int, frames_per_unit: int = 1) -> FrameLayout:
        """A square grid of ``tokens`` tokens (``ValueError`` if ``tokens`` is not a square)."""
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"FrameLayout.square: {tokens} tokens is not a square grid")
        return cls((side, side), frames_per_unit)

    def token_rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column ``[P]`` of every token of a unit, in raster order."""
        rows, cols = self.grid
        index = torch.arange(rows * cols)
        return index // cols, index % cols


class PositionScheme(ABC):
    """How one model family places tokens and moves cached keys (see the module docstring)."""

    #: Rows of a positions tensor: 1 for 1-D RoPE, 3 for M-RoPE.
    rows: int

    def __init__(self, inv_freq: torch.Tensor, *, attention_scaling: float = 1.0) -> None:
        # RoPE inverse frequencies [D/2], float64 on CPU: shifting keys recomputes angles from them.
        self.inv_freq = inv_freq.detach().to("cpu", torch.float64)
        # Scaled RoPE (YaRN and the like) multiplies cos/sin: moving cached keys is then not exact.
        self.attention_scaling = float(attention_scaling)

    def check_exact(self) -> None:
        """Raise ``ValueError`` if stored keys cannot be moved exactly (scaled RoPE)."""
        if self.attention_scaling != 1.0:
            raise ValueError("this model's RoPE scales attention, so cached keys cannot be re-positioned exactly")

    def text(self, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Positions ``[R, n]`` of ``n`` text tokens from ``start`` (equal on every axis); also the
        positions of a continuation after a cache whose cursor is ``start``."""
        return torch.arange(start, start + n, device=device).unsqueeze(0).repeat(self.rows, 1)

    @abstractmethod
    def visual(
        self, start: int, layout: FrameLayout, units: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, int]:
        """Positions ``[R, units * P]`` of ``units`` consecutive visual units fed as one sequence
        from cursor ``start``, and the cursor after them (where text continues).

        A block made of some of those tokens (say a spatial part of each unit) fed on its own takes
        the matching columns: see :meth:`block`.
        """

    def visual_run(
        self, start: int, layout: FrameLayout, units: int, device: torch.device | str = "cpu", *, first_unit: int = 0
    ) -> tuple[torch.Tensor, int]:
        """Like :meth:`visual` for units that continue a run begun at cursor ``start`` which holds
        ``first_unit`` units already (a stream fed in several calls): the positions and cursor of
        units ``first_unit .. first_unit + units - 1`` of one run, so that a run fed in pieces is
        placed exactly as when fed at once. The default continues from the cursor after the first
        ``first_unit`` units (right where the units' tokens follow each other, as with 1-D RoPE);
        a scheme whose positions count units from the run's start overrides it."""
        if first_unit:
            start = self.visual(start, layout, first_unit)[1]
        return self.visual(start, layout, units, device)

    def block(
        self, start: int, layout: FrameLayout, units: int, tokens: torch.Tensor, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, int]:
        """Positions ``[R, n]`` of a block of visual tokens fed on its own from cursor ``start``:
        tokens ``tokens [n]`` (ascending indices into ``units`` units' ``units * P`` tokens), and
        the cursor after them. The default packs them like a sequence of their own (1-D RoPE
        has no grid to keep); grid-aware schemes keep each token's place in its unit."""
        n = int(tokens.shape[0])
        return self.text(start, n, device), start + n

    @staticmethod
    def after(positions: torch.Tensor) -> int:
        """The cursor after tokens at ``positions [R, n]``: one past the largest position."""
        return int(positions.max()) + 1 if positions.numel() else 0

    def place_blocks(self, olds: list[torch.Tensor], start: int) -> tuple[torch.Tensor, int]:
        """Positions ``[R, total]`` of stored blocks (keys at ``olds``, each ``[R, n_i]``) placed one
        after another from cursor ``start`` with :meth:`place`, and the cursor after them."""
        pieces = []
        cursor = start
        for old in olds:
            new, cursor = self.place(old, cursor)
            pieces.append(new)
        if not pieces:
            return torch.empty(self.rows, 0, dtype=torch.long), start
        return torch.cat(pieces, dim=1), cursor

    def place_run(self, olds: list[torch.Tensor], start: int) -> tuple[torch.Tensor, int]:
        """Like :meth:`place_blocks`, for blocks cut in time order from one run of units (ReKV's
        sliding window). 1-D RoPE packs them one after another (:meth:`place_blocks`); a scheme
        whose positions within a run are not a plain sequence may keep their relative layout
        instead (:class:`MultimodalRopePositions`)."""
        return self.place_blocks(olds, start)

    def place(self, old: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        """Where a stored block whose keys sit at ``old [R, n]`` goes when placed from cursor
        ``start``, and the cursor after it. The default moves the block as a whole by the same
        amount on every axis (its inner layout kept: exact for every RoPE variant)."""
        if old.numel() == 0:
            return old.clone(), start
        new = old - old.min() + start
        return new, self.after(new)

    def shift(self, states: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Move post-RoPE ``states [..., n, D]`` (keys, or queries) from positions ``old [R, n]``
        to ``new [R, n]`` exactly (rotations compose). Computed in float32, returned in the
        states' dtype. ``new`` all zero un-rotates."""
        cos, sin = self.rotation(old, new)
        return self.rotate(states, cos.to(states.device), sin.to(states.device))

    @abstractmethod
    def rotation(self, old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[n, D]`` (float32, CPU) of the rotation from ``old [R, n]`` to ``new [R, n]``
        (angles in float64): compute once, :meth:`rotate` many tensors (every layer's keys)."""

    @staticmethod
    def rotate_into(out: torch.Tensor, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Write :meth:`rotate`'s result into ``out`` (same shape as ``states``, not overlapping it).
        In float32 it is three passes over the data and no temporaries: ``rotate_half`` is applied
        half by half instead of being materialised."""
        if out.dtype != torch.float32 or states.dtype != torch.float32:
            out.copy_(PositionScheme.rotate(states, cos, sin))
            return
        half = states.shape[-1] // 2
        torch.mul(states, cos, out=out)
        out[..., :half].addcmul_(states[..., half:], sin[:, :half], value=-1.0)
        out[..., half:].addcmul_(states[..., :half], sin[:, half:])

    @staticmethod
    def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``states [..., n, D]`` rotated by ``cos``/``sin`` ``[n, D]`` (from :meth:`rotation`, on
        the states' device), in float32, returned in the states' dtype."""
        x = states.float()
        return (x * cos + rotate_half(x) * sin).to(states.dtype)

    def unrotate(self, states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``states [..., n, D]`` as they were before RoPE at ``positions [R, n]``."""
        return self.shift(states, positions, torch.zeros_like(positions))


class RopePositions(PositionScheme):
    """1-D RoPE (Llama / Qwen2 pairing): visual tokens take consecutive positions like text."""

    rows = 1

    def visual(
        self, start: int, layout: FrameLayout, units: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, int]:
        n = units * layout.tokens
        return self.text(start, n, device), start + n

    def visual_run(
        self, start: int, layout: FrameLayout, units: int, device: torch.device | str = "cpu", *, first_unit: int = 0
    ) -> tuple[torch.Tensor, int]:
        """The units' tokens follow the run's earlier tokens directly."""
        return self.visual(start + first_unit * layout.tokens, layout, units, device)

    def place(self, old: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        """Packs the block's tokens at consecutive positions from ``start``: a pruned block's
        gaps close, as a sequence of only its kept tokens would have had."""
        n = int(old.shape[-1])
        return self.text(start, n, old.device), start + n

    def rotation(self, old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_exact()
        return rope_angles(self.inv_freq, (new[0] - old[0]).cpu())


class MultimodalRopePositions(PositionScheme):
    """Multimodal RoPE (Qwen2.5-VL, Qwen3-VL): each frequency slot of the head dimension rotates by
    one axis (time, height or width) of the token's position.

    ``axis_of_slot [D/2]`` names the axis of every frequency slot, as the model's rotary embedding
    recomposes its cos/sin: ``sections`` (``mrope_section``) gives consecutive runs of T, H, W slots
    (Qwen2.5-VL, ``[16, 24, 24]``: ``Qwen2_5_VLRotaryEmbedding.recomposition_frequencies``);
    ``interleaved=True`` (Qwen3-VL, ``[24, 20, 20]``: ``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``)
    gives H to slots ``1, 4, 7, ...`` below ``3 * sections[1]``, W to slots ``2, 5, 8, ...`` below
    ``3 * sections[2]`` and T to all the others.

    Positions follow transformers 5.24's ``get_rope_index`` and ``get_vision_position_ids``
    (``models/qwen2_5_vl/modeling_qwen2_5_vl.py`` and ``models/qwen3_vl/modeling_qwen3_vl.py``, class
    ``Qwen2_5_VLModel`` / ``Qwen3VLModel``):

    * Text tokens, ``<|vision_start|>``, ``<|vision_end|>`` and Qwen3-VL's timestamps included, take
      consecutive positions, equal on all axes, from the cursor.
    * A vision span (one run of visual tokens) fed from cursor ``s`` puts the token at row ``r``,
      column ``c`` of unit ``u`` at ``(s + floor(u * time_scale), s + r, s + c)``; ``floor(u *
      time_scale)`` is computed in float32 as the model does, so equal inputs give equal positions.
    * Text after the span continues at ``s + max(rows, cols)``, whatever the number of units: *not*
      after the largest position (transformers 4.x did that). With several units and ``time_scale >
      1`` the time axis of a video runs past the text that follows it.
    * Qwen2.5-VL (default): a whole video is one span, ``time_scale = tokens_per_second *
      second_per_grid_ts`` with ``second_per_grid_ts = temporal_patch_size / fps`` (one value per
      video); still images use ``time_scale = 1``. The time step is a property of the video, not of
      the model: ``time_scale=None`` makes a scheme for text and for moving keys only (a backend's
      :attr:`~mukv.backends.base.Backend.positions`), which refuses to place visual tokens; one
      stream's scheme is :meth:`with_time_scale` of it (``Backend.stream_positions(fps)``).
    * Qwen3-VL (``span_per_unit=True``): every temporal group is a span of its own, preceded by its
      timestamp text ``"<{t:.1f} seconds><|vision_start|>"`` and followed by ``<|vision_end|>``, so its
      time position is the span's start and ``time_scale`` is not used. Callers compose
      ``text`` / ``visual(cursor, layout, 1)`` / ``text`` per group; ``visual`` with several units lays
      them out as consecutive spans with nothing in between (unit ``u`` from ``s + u * max(rows,
      cols)``).

    After a whole prompt, ``get_rope_index``'s ``rope_deltas`` put a continuation at one past the
    *largest* position of the prompt (:meth:`PositionScheme.after`), beyond the cursor when a Qwen2.5-VL
    video's time axis runs past the text after it; that is what the model's forward uses when called
    with a cache and no ``position_ids``. transformers 5.24's ``generate`` does not: it passes the
    prompt's ``position_ids`` and advances them by one per token, so generated tokens continue right
    after the prompt's last token (measured against ``generate`` in ``tests/integration/test_qwen_backends.py``),
    and so does this package's decoder.
    """

    rows = 3

    def __init__(
        self,
        inv_freq: torch.Tensor,
        sections: tuple[int, int, int],
        *,
        interleaved: bool = False,
        time_scale: float | None = 1.0,
        span_per_unit: bool = False,
        attention_scaling: float = 1.0,
    ) -> None:
        super().__init__(inv_freq, attention_scaling=attention_scaling)
        slots = self.inv_freq.shape[0]
        if len(sections) != 3 or sum(sections) != slots:
            raise ValueError(f"mrope sections {sections} do not cover the {slots} frequency slots")
        if interleaved and any(a + 3 * (sections[a] - 1) >= slots for a in (1, 2) if sections[a]):
            raise ValueError(f"interleaved mrope sections {sections} do not fit {slots} frequency slots")
        self.sections = tuple(sections)
        self.interleaved = interleaved
        # A 0-d tensor (the model's tokens_per_second * second_per_grid_ts) converts exactly.
        self.time_scale = None if time_scale is None else float(time_scale)
        if self.time_scale is not None and not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"time_scale: must be a positive number, got {time_scale}")
        self.span_per_unit = span_per_unit
        if interleaved:
            axis = torch.zeros(slots, dtype=torch.long)
            for a in (1, 2):
                axis[a : 3 * sections[a] : 3] = a
        else:
            axis = torch.cat([torch.full((s,), a, dtype=torch.long) for a, s in enumerate(sections)])
        self.axis_of_slot = axis

    def with_time_scale(self, time_scale: float) -> MultimodalRopePositions:
        """The same scheme with the time step ``time_scale`` per unit (one video's, or stream's)."""
        return MultimodalRopePositions(
            self.inv_freq,
            self.sections,
            interleaved=self.interleaved,
            time_scale=time_scale,
            span_per_unit=self.span_per_unit,
            attention_scaling=self.attention_scaling,
        )

    def _span_advance(self, layout: FrameLayout) -> int:
        """How far one vision span moves the cursor: the larger side of its token grid."""
        return max(layout.grid)

    def visual(
        self, start: int, layout: FrameLayout, units: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, int]:
        return self.visual_run(start, layout, units, device)

    def visual_run(
        self, start: int, layout: FrameLayout, units: int, device: torch.device | str = "cpu", *, first_unit: int = 0
    ) -> tuple[torch.Tensor, int]:
        """A Qwen2.5-VL video's time axis counts units from the span's start, so a continued run
        keeps counting (``floor(u * time_scale)`` with ``u`` the unit's place in the run)."""
        rows, cols = layout.token_rows_cols()
        advance = self._span_advance(layout)
        index = torch.arange(first_unit, first_unit + units)  # the units' places in their run
        if self.span_per_unit:
            span_start = start + advance * index  # [units]
            span = span_start.repeat_interleave(layout.tokens)  # [units * P]
            positions = torch.stack((span, span + rows.repeat(units), span + cols.repeat(units)))
            return positions.to(device), start + (first_unit + units) * advance
        if self.time_scale is None:
            raise ValueError(
                "this position scheme has no time step: a video's visual tokens are placed by the scheme of "
                "its stream (Backend.stream_positions(fps)), which knows the rate its frames were sampled at"
            )
        # float32 product then truncation, as the model's get_vision_position_ids computes it; a
        # run continued over several calls keeps counting units from the run's start.
        t = (index * self.time_scale).long()
        positions = torch.stack((t.repeat_interleave(layout.tokens), rows.repeat(units), cols.repeat(units)))
        return (positions + start).to(device), start + advance

    def block(
        self, start: int, layout: FrameLayout, units: int, tokens: torch.Tensor, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, int]:
        """The columns ``tokens`` of :meth:`visual`'s positions, and :meth:`visual`'s cursor: every token
        keeps its place in the grid, and the cursor does not depend on which tokens a block holds, so
        feeding all blocks of some units gives what feeding the units does."""
        positions, cursor = self.visual(start, layout, units)
        return positions[:, tokens.cpu()].to(device), cursor

    @staticmethod
    def text_after(positions: torch.Tensor) -> int:
        """Where text continues after visual tokens at ``positions [3, n]``: one past the largest
        height/width position, the model's rule after a vision span (``s + max(rows, cols)`` for a
        span from ``s``); the time axis may run beyond it."""
        return int(positions[1:].max()) + 1 if positions.numel() else 0

    def place(self, old: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        """Moves the block as a whole (every axis by the same amount, exact); text or the next block
        continues after it by the model's rule (:meth:`text_after`), not after its time axis."""
        if old.numel() == 0:
            return old.clone(), start
        new = old - old.min() + start
        return new, self.text_after(new)

    def place_run(self, olds: list[torch.Tensor], start: int) -> tuple[torch.Tensor, int]:
        """Blocks of one run keep their relative layout: all move by one shift, the earliest
        position to ``start``. Units of a run share the height/width positions and differ in time,
        so packing them block after block would not give the run back; with every block of a run
        placed, this is the run's own layout (moved to ``start``). Exact like any equal shift."""
        if not olds:
            return torch.empty(self.rows, 0, dtype=torch.long), start
        old = torch.cat(olds, dim=1)
        if old.numel() == 0:
            return old.clone(), start
        new = old - old.min() + start
        return new, self.text_after(new)

    def rotation(self, old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_exact()
        delta = (new - old).to(torch.float64).cpu()  # [3, n]
        # Angle of slot j for token i: delta[axis_of_slot[j], i] * inv_freq[j].
        freqs = delta[self.axis_of_slot].T * self.inv_freq[None, :]  # [n, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().float(), emb.sin().float()
