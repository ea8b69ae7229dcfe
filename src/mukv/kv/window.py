"""A sliding-window KV cache: the system prompt plus the most recent ``n_local`` tokens.

New tokens attend to the system prompt and the window only. Window keys are kept right after
the system prompt (placed there by the backend's position scheme and re-rotated exactly when the
oldest tokens leave), so a stream of any length never goes beyond ``init + n_local + chunk``
positions (method.md section 7).

Memory: keys, values and the keys as computed live in buffers that are written in place and
grow by doubling up to ``init + n_local + chunk`` tokens, and on CPU eviction works through the
window in pieces of at most ``_PIECE_BYTES`` of temporaries. Growing the window by concatenation
and re-rotating it whole allocated new window-sized tensors for every layer at every frame; the
C allocator cannot hand those back while the blocks stored meanwhile sit between them, so the
process kept several times the bytes the method held, and more with every frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from mukv.backends.base import Backend
from mukv.backends.positions import PositionScheme
from mukv.kv.cache import GrowingLayer, cache_of, reserve

# Largest float32 temporary (per layer) that eviction creates on CPU.
_PIECE_BYTES = 1 << 18


class SlidingWindow:
    """``[init | window]`` with ``window`` at most ``n_local`` tokens after each append."""

    @torch.inference_mode()
    def __init__(
        self, backend: Backend, n_local: int, positions: PositionScheme | None = None, *, max_units: int | None = None
    ) -> None:
        """``positions``: the stream's scheme (its memory method's; default ``backend.positions``).
        ``max_units``: hold the last ``max_units`` whole units (with their text, where the model writes
        text around units: their lengths vary) instead of the last ``n_local`` tokens, which then
        only sizes the buffers."""
        if n_local < 1:
            raise ValueError(f"n_local: must be >= 1, got {n_local}")
        if max_units is not None and max_units < 1:
            raise ValueError(f"max_units: must be >= 1, got {max_units}")
        self.max_units = max_units
        # With ``max_units``, per unit held (oldest first): its tokens and the cursor after it (moved
        # with evictions).
        self.units: list[tuple[int, int]] = []
        self.backend = backend
        self.positions = backend.positions if positions is None else positions
        self.n_local = n_local
        self.cache, self.init_len = backend.system_cache()
        limit = self.init_len + n_local
        self.cache.layers = [GrowingLayer.copy_of(layer.keys, layer.values, limit) for layer in self.cache.layers]
        # Window keys as computed, and the positions they were computed at (the first ``length``
        # tokens of each buffer): every re-positioning rotates from these, so rounding never
        # accumulates over many evictions.
        self._computed_keys: list[torch.Tensor] = [layer.keys[:, :, :0].clone() for layer in self.cache.layers]
        self._computed_at = torch.empty(self.positions.rows, 0, dtype=torch.long, device=backend.device)
        # Where the window's keys sit now (moved by evictions): the next eviction places from here.
        self._live_at = self._computed_at.clone()
        self.cursor = self.init_len  # where the next frame's tokens go
        # The window's units form one run (see PositionScheme.visual): its start, moved with the
        # keys by each eviction, and the units appended so far. A Qwen2.5-VL video's time axis
        # counts units from the run's start, so without eviction the window holds exactly the
        # positions of one plain forward over the stream.
        self.run_start = self.init_len
        self.run_units = 0

    @property
    def length(self) -> int:
        """Tokens in the window (system prompt excluded)."""
        return self.cache.get_seq_length() - self.init_len

    def _sequence(self, features: torch.Tensor, stamps: Sequence[float] | None):
        """The units after the window as the model takes them (see :func:`mukv.memory.base.unit_sequence`)."""
        # Imported here: mukv.memory imports this module (its methods hold windows).
        from mukv.memory.base import unit_sequence

        stamps = [0.0] * features.shape[0] if stamps is None else stamps
        return unit_sequence(
            self.backend,
            self.positions,
            features,
            stamps,
            self.run_start,
            first_unit=self.run_units,
            cursor=self.cursor,
        )

    def append(
        self, features: torch.Tensor, stamps: Sequence[float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill visual units ``features [U, P, w]`` (stamped ``stamps``, where the model writes text
        around units) after the window; then evict beyond ``n_local`` tokens (or ``max_units`` units).

        Returns the new tokens' ``kv [L, 2, Hkv, m, D]`` (``m = U * P`` plus the units' text; keys
        rotated at the returned ``positions [R, m]``), copied out of the window.
        """
        flat, positions, self.cursor, units = self._sequence(features, stamps)
        embeds = flat[None]
        m = embeds.shape[1]
        n = self.length
        if self.max_units is not None:
            p = self.backend.layout.tokens
            self.units += [(u.length(p), u.cursor) for u in units]
        self.run_units += features.shape[0]
        self.backend.forward(embeds, self.cache, positions, logits="none")
        first = self.cache.layers[0].keys
        kv = first.new_empty((len(self.cache.layers), 2, first.shape[1], m, first.shape[3]))
        for i, layer in enumerate(self.cache.layers):
            kv[i, 0] = layer.keys[0, :, -m:]
            kv[i, 1] = layer.values[0, :, -m:]
        # The buffers are inference tensors (the backend's outputs are), written in place.
        with torch.inference_mode():
            for i, layer in enumerate(self.cache.layers):
                self._computed_keys[i] = reserve(self._computed_keys[i], n, n + m, self.n_local)
                self._computed_keys[i][:, :, n : n + m] = layer.keys[:, :, -m:]
            self._computed_at = reserve(self._computed_at, n, n + m, self.n_local, dim=1)
            self._computed_at[:, n : n + m] = positions
            self._live_at = reserve(self._live_at, n, n + m, self.n_local, dim=1)
            self._live_at[:, n : n + m] = positions
            self._evict()
        return kv, positions

    def peek(self, features: torch.Tensor, stamps: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`append` would return for ``features [U, P, w]`` (the new tokens' ``kv`` and
        ``positions``), the window left as it is: the units are prefilled over a cache of the
        window's keys and values that concatenates instead of writing in place."""
        backend = self.backend
        flat, positions, _, _ = self._sequence(features, stamps)
        embeds = flat[None]
        m = embeds.shape[1]
        cache = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in self.cache.layers])
        backend.forward(embeds, cache, positions, logits="none")
        kv = torch.stack([torch.stack((layer.keys[0, :, -m:], layer.values[0, :, -m:])) for layer in cache.layers])
        return kv, positions

    def copy(self) -> SlidingWindow:
        """An independent window in this one's state (buffers copied; appending to either leaves the
        other as it was)."""
        other = SlidingWindow.__new__(SlidingWindow)
        other.__dict__.update(self.__dict__)  # ints, the backend and the scheme are shared as they are
        limit = self.init_len + self.n_local
        other.cache = cache_of([GrowingLayer.copy_of(layer.keys, layer.values, limit) for layer in self.cache.layers])
        other._computed_keys = [keys.clone() for keys in self._computed_keys]
        other._computed_at = self._computed_at.clone()
        other._live_at = self._live_at.clone()
        other.units = list(self.units)
        return other

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """The window beyond the system prompt, to save it: per layer its keys and values ``[1, Hkv,
        n, D]`` and the keys as computed; the positions they were computed at and sit at ``[R, n]``;
        and the cursors (JSON-ready metadata). :meth:`import_state` on a fresh window of the same
        backend and size puts it back exactly."""
        n, init = self.length, self.init_len
        tensors: dict[str, torch.Tensor] = {}
        for i, (layer, computed) in enumerate(zip(self.cache.layers, self._computed_keys, strict=True)):
            tensors[f"keys.{i}"] = layer.keys[:, :, init:].contiguous()
            tensors[f"values.{i}"] = layer.values[:, :, init:].contiguous()
            tensors[f"computed_keys.{i}"] = computed[:, :, :n].contiguous()
        tensors["computed_at"] = self._computed_at[:, :n].contiguous()
        tensors["live_at"] = self._live_at[:, :n].contiguous()
        meta = {
            "init_len": init,
            "n_local": self.n_local,
            "max_units": self.max_units,
            "cursor": self.cursor,
            "run_start": self.run_start,
            "run_units": self.run_units,
            "units": [list(unit) for unit in self.units],
        }
        return tensors, meta

    @torch.inference_mode()
    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> None:
        """Adopt what :meth:`export_state` returned (``ValueError`` if it is of another window size or
        system prompt)."""
        for name in ("init_len", "n_local", "max_units"):
            if meta[name] != getattr(self, name):
                raise ValueError(f"window: saved with {name}={meta[name]}, this window has {getattr(self, name)}")
        device, init = self.backend.device, self.init_len
        limit = init + self.n_local
        layers = []
        for i, layer in enumerate(self.cache.layers):
            keys = torch.cat((layer.keys[:, :, :init], tensors[f"keys.{i}"].to(device, layer.keys.dtype)), dim=2)
            values = torch.cat(
                (layer.values[:, :, :init], tensors[f"values.{i}"].to(device, layer.values.dtype)), dim=2
            )
            layers.append(GrowingLayer(keys, values, keys.shape[2], limit))
            self._computed_keys[i] = tensors[f"computed_keys.{i}"].to(device, layer.keys.dtype).clone()
        self.cache.layers = layers
        self._computed_at = tensors["computed_at"].to(device).clone()
        self._live_at = tensors["live_at"].to(device).clone()
        self.cursor = int(meta["cursor"])  # type: ignore[arg-type]
        self.run_start = int(meta["run_start"])  # type: ignore[arg-type]
        self.run_units = int(meta["run_units"])  # type: ignore[arg-type]
        self.units = [(int(length), int(cursor)) for length, cursor in meta["units"]]  # type: ignore[union-attr]

    def _piece_tokens(self) -> int:
        """Tokens re-positioned at a time: all of them on an accelerator; on CPU as many as fit
        in ``_PIECE_BYTES`` of float32 keys of one layer."""
        if self.backend.device.type != "cpu":
            return self.n_local
        keys = self.cache.layers[0].keys
        return max(1, _PIECE_BYTES // (keys.shape[1] * keys.shape[3] * 4))

    def _evict(self) -> None:
        """Drop the oldest tokens beyond ``n_local`` and re-rotate the rest to where the position
        scheme places them right after the system prompt, moving everything in place, front to back."""
        n = self.length
        if self.max_units is None:
            excess = n - self.n_local
        else:
            gone = max(0, len(self.units) - self.max_units)
            excess = sum(length for length, _ in self.units[:gone])
            self.units = self.units[gone:]
        if excess <= 0:
            return
        init = self.init_len
        kept = n - excess
        scheme = self.positions
        live = self._live_at[:, excess:n]
        new, self.cursor = scheme.place(live, init)
        # Every scheme moves a window (contiguous tokens of one run) by one amount on all axes.
        moved = int(new[0, 0] - live[0, 0])
        self.run_start += moved
        if self.max_units is not None:
            self.units = [(length, cursor + moved) for length, cursor in self.units]
        piece = self._piece_tokens()
        for a in range(0, kept, piece):
            b = min(a + piece, kept)
            # Pieces are copied out before being written back: sources lie ``excess`` tokens
            # later, so for ``b - a > excess`` they overlap the destination.
            at = self._computed_at[:, a + excess : b + excess].clone()
            self._computed_at[:, a:b] = at
            self._live_at[:, a:b] = new[:, a:b]
            for computed, layer in zip(self._computed_keys, self.cache.layers, strict=True):
                moved = computed[:, :, a + excess : b + excess].clone()
                computed[:, :, a:b] = moved
                layer.key_buffer[:, :, init + a : init + b] = scheme.shift(moved, at, new[:, a:b])
                values = layer.value_buffer
                values[:, :, init + a : init + b] = values[:, :, init + a + excess : init + b + excess].clone()
        for layer in self.cache.layers:
            layer.resize(init + kept)

    @property
    def init_nbytes(self) -> int:
        """Bytes of the window's own copy of the system prompt's keys and values."""
        return sum(layer.keys[:, :, : self.init_len].nbytes * 2 for layer in self.cache.layers)

    @property
    def nbytes(self) -> int:
        """Bytes held beyond the system prompt (:attr:`init_nbytes`): the buffers of window keys
        and values, of the keys as computed and of their positions, spare room included."""
        buffers = [b for layer in self.cache.layers for b in (layer.key_buffer, layer.value_buffer)]
        buffers += [*self._computed_keys, self._computed_at, self._live_at]
        return sum(b.untyped_storage().nbytes() for b in buffers) - self.init_nbytes

    def prefix(self, tokens: int) -> DynamicCache:
        """A new cache of ``[init | first tokens of the window]`` (copied; the window is not changed)."""
        end = self.init_len + tokens
        # Copies: the window's buffers are written in place by later frames, possibly while an
        # answer is still decoding from this cache.
        return DynamicCache(
            ddp_cache_data=[
                (layer.keys[:, :, :end].clone(), layer.values[:, :, :end].clone()) for layer in self.cache.layers
            ]
        )
