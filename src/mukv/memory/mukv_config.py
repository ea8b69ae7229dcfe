"""MuKV configuration and presets (method.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mukv.compress.scorers import keep_count
from mukv.kv.options import StorageOptions
from mukv.memory.granularity import mukv_specs

GRANULARITIES = ("patch", "frame", "segment")
PATCH_LAYOUTS = ("raster", "quadrant")
ENCODE_MODES = ("independent", "shared")
ATTENTION_LAYERS = ("last", "second_last", "middle", "weighted_last5")
FREQUENCIES = ("fft", "diff")
QUERIES = ("last_key", "mean_query")
RETRIEVALS = ("semi_hierarchical", "parallel", "hierarchical")
ORDERS = ("reference", "temporal")
PRESET_NAMES = ("paper", "release")


def _one_of(value: str, options: tuple[str, ...], name: str) -> None:
    if value not in options:
        raise ValueError(f"{name}: must be one of {', '.join(options)}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class PerGranularityFloat:
    patch: float
    frame: float
    segment: float

    def get(self, granularity: str) -> float:
        return getattr(self, granularity)


@dataclass(frozen=True, kw_only=True)
class PerGranularityInt:
    patch: int
    frame: int
    segment: int

    def get(self, granularity: str) -> int:
        return getattr(self, granularity)


@dataclass(frozen=True, kw_only=True)
class PerGranularityBool:
    patch: bool = True
    frame: bool = True
    segment: bool = True

    def get(self, granularity: str) -> bool:
        return getattr(self, granularity)


@dataclass(frozen=True, kw_only=True)
class MukvConfig(StorageOptions):
    """Every MuKV option; the defaults are the ``paper`` preset.

    ``granularities`` switches block kinds on or off (all on in both presets); ``order`` is the
    assembly order (``reference``: patch, frame, segment groups by descending score with baked-in
    positions; ``temporal``: by time, re-positioned contiguously); ``encode_batch_blocks`` bounds
    how many blocks are prefilled in one batch (speed and memory only).
    """

    # The preset the other values started from (recorded with every run); choose it with
    # ``--preset`` / ``method_config(preset=...)``, not as an override.
    preset: str = "paper"
    segment_frames: int = 4
    granularities: PerGranularityBool = field(default_factory=PerGranularityBool)
    patch_layout: str = "raster"
    encode: str = "independent"
    attention_layer: str = "last"
    frequency: str = "fft"
    alpha: PerGranularityFloat = field(default_factory=lambda: PerGranularityFloat(patch=0.5, frame=0.7, segment=0.8))
    keep_ratio: PerGranularityFloat = field(
        default_factory=lambda: PerGranularityFloat(patch=0.1, frame=0.1, segment=0.8)
    )
    causal_correction: bool = False
    dedup: bool = False
    dedup_threshold: float = 0.9
    dedup_candidates: float = 1.2
    query: str = "last_key"
    retrieval: str = "semi_hierarchical"
    top_k: PerGranularityInt = field(default_factory=lambda: PerGranularityInt(patch=20, frame=32, segment=12))
    over_retrieve: float = 2.0
    rerank_weight: PerGranularityFloat = field(
        default_factory=lambda: PerGranularityFloat(patch=0.3, frame=0.3, segment=0.0)
    )
    rerank_top_n: int = 5
    order: str = "reference"
    encode_batch_blocks: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of(self.preset, PRESET_NAMES, "preset")
        if self.segment_frames < 1:
            raise ValueError(f"segment_frames: must be >= 1, got {self.segment_frames}")
        if not any(self.granularities.get(g) for g in GRANULARITIES):
            raise ValueError("granularities: at least one of patch, frame, segment must be on")
        _one_of(self.patch_layout, PATCH_LAYOUTS, "patch_layout")
        _one_of(self.encode, ENCODE_MODES, "encode")
        _one_of(self.attention_layer, ATTENTION_LAYERS, "attention_layer")
        _one_of(self.frequency, FREQUENCIES, "frequency")
        _one_of(self.query, QUERIES, "query")
        _one_of(self.retrieval, RETRIEVALS, "retrieval")
        _one_of(self.order, ORDERS, "order")
        for g in GRANULARITIES:
            if not 0.0 <= self.alpha.get(g) <= 1.0:
                raise ValueError(f"alpha.{g}: must be in [0, 1], got {self.alpha.get(g)}")
            if not 0.0 < self.keep_ratio.get(g) <= 1.0:
                raise ValueError(f"keep_ratio.{g}: must be in (0, 1], got {self.keep_ratio.get(g)}")
            if self.top_k.get(g) < 0:
                raise ValueError(f"top_k.{g}: must be >= 0, got {self.top_k.get(g)}")
            if not 0.0 <= self.rerank_weight.get(g) <= 1.0:
                raise ValueError(f"rerank_weight.{g}: must be in [0, 1], got {self.rerank_weight.get(g)}")
        if not -1.0 <= self.dedup_threshold <= 1.0:
            raise ValueError(f"dedup_threshold: must be a cosine in [-1, 1], got {self.dedup_threshold}")
        if self.dedup_candidates < 1.0:
            raise ValueError(f"dedup_candidates: must be >= 1, got {self.dedup_candidates}")
        if self.over_retrieve < 1.0:
            raise ValueError(f"over_retrieve: must be >= 1, got {self.over_retrieve}")
        if self.rerank_top_n < 1:
            raise ValueError(f"rerank_top_n: must be >= 1, got {self.rerank_top_n}")
        if self.encode_batch_blocks < 1:
            raise ValueError(f"encode_batch_blocks: must be >= 1, got {self.encode_batch_blocks}")

    def answer_tokens(self, tokens_per_frame: int) -> int:
        """Most visual tokens placed in the answering cache: ``top_k`` blocks per enabled
        granularity times the tokens each block keeps (8,212 for the paper preset at P = 196,
        664 at P = 16). Streams shorter than the ``top_k`` blocks give fewer."""
        total = 0
        for spec in mukv_specs(self.segment_frames):
            if self.granularities.get(spec.name):
                block_tokens = spec.frames * tokens_per_frame // spec.parts
                total += self.top_k.get(spec.name) * keep_count(block_tokens, self.keep_ratio.get(spec.name))
        return total


def paper_preset() -> MukvConfig:
    """The settings under which the paper's numbers were produced (the default)."""
    return MukvConfig()


def release_preset() -> MukvConfig:
    """The public release's Python defaults, for comparison."""
    return MukvConfig(
        preset="release",
        keep_ratio=PerGranularityFloat(patch=0.7, frame=0.5, segment=0.3),
        top_k=PerGranularityInt(patch=49, frame=12, segment=3),
        frequency="diff",
        rerank_weight=PerGranularityFloat(patch=0.6, frame=0.5, segment=0.0),
        dedup=True,
    )


PRESETS = {"paper": paper_preset, "release": release_preset}
