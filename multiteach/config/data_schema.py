"""The ``data:`` sections: where tiles come from (tile lists or whole slides) and how views are made.

Each section's ``_finish(at)`` checks ranges and relations once the converter (:mod:`.convert`) has
checked the types; ``at`` is the section's key path, for the messages. :mod:`.schema` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from multiteach.config.checks import _positive, _probabilities, _require, robust_views_settings


def _hint(text: str) -> dict[str, str]:
    """Field metadata: what to write for a required key (shown when it is missing)."""
    return {"hint": text}


@dataclass(kw_only=True)
class GlobalCrops:
    """Global (teacher-sized) crops: ``n`` per tile, ``size`` pixels, area ``scale`` range."""

    n: int = 2
    size: int = 224
    scale: tuple[float, float] = (0.32, 1.0)

    def _finish(self, at: str) -> None:
        _check_crops(self, at, min_n=1)


@dataclass(kw_only=True)
class LocalCrops:
    """Local (small) crops for the student only: ``n`` per tile (0 = none), ``size``, area ``scale``."""

    n: int = 0
    size: int = 98
    scale: tuple[float, float] = (0.05, 0.32)

    def _finish(self, at: str) -> None:
        _check_crops(self, at, min_n=0)


@dataclass(kw_only=True)
class AugmentConfig:
    """Photometric and geometric augmentation; ``null`` switches ``hed``/``color_jitter`` off.

    Attributes:
        hed: HED jitter ``[alpha, beta]`` (stain scale, shift).
        flip_rot: Random rot90 + flip.
        color_jitter: ``[brightness, contrast, saturation, hue]``.
        color_jitter_prob: Probability of applying the colour jitter.
        blur_prob: Probability of a Gaussian blur.
    """

    hed: tuple[float, float] | None = (0.05, 0.01)
    flip_rot: bool = True
    color_jitter: tuple[float, float, float, float] | None = (0.1, 0.1, 0.1, 0.02)
    color_jitter_prob: float = 0.8
    blur_prob: float = 0.1

    def _finish(self, at: str) -> None:
        for name in ("hed", "color_jitter"):
            values = getattr(self, name)
            _require(values is None or min(values) >= 0, f"{at}.{name}", values, "values must be >= 0")
        if self.color_jitter is not None:
            _require(self.color_jitter[3] <= 0.5, f"{at}.color_jitter", self.color_jitter, "hue must be <= 0.5")
        _probabilities(self, at, "color_jitter_prob", "blur_prob")


@dataclass(kw_only=True)
class MaskingConfig:
    """iBOT block masking of the student's global crops: per-image ``probability``, masked ``ratio`` range."""

    probability: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)

    def _finish(self, at: str) -> None:
        _probabilities(self, at, "probability")
        lo, hi = self.ratio
        _require(0 <= lo <= hi <= 1, f"{at}.ratio", list(self.ratio), "expected [low, high] with 0 <= low <= high <= 1")


@dataclass(kw_only=True)
class SlidesConfig:
    """Online patching: training tiles drawn at random tissue positions straight from whole-slide images.

    Attributes:
        source: A folder of slides, a text list (one slide per line) or a CSV with a ``path`` column and
            optional ``mpp`` (level-0 µm/px, for slides whose metadata has none) and ``weight`` (sampling weight).
            A list of these is joined.
        target_mpp: Resolutions of the tiles in µm/px (Midnight: ``[0.25, 0.5, 1.0, 2.0]``).
        proportions: Share of tiles at each ``target_mpp`` (default: equal); normalised to sum 1.
        tile_size: Side of the tiles in pixels (before the multi-crop views).
        min_tissue: Lowest tissue fraction of a tile's footprint on the slide's tissue mask, in [0, 1].
        hsv_filter: Also keep only tiles whose pixels pass Virchow's HSV tissue rule (see
            :mod:`multiteach.data.online`).
        open_per_worker: Slides each DataLoader worker keeps open (least recently used closed first).
        tiles_per_visit: Consecutive samples drawn from one slide before the next slide is chosen.
        mpp: Level-0 µm/px for slides whose metadata records none (a CSV ``mpp`` column wins); null: such a
            slide is an error.
        samples_per_epoch: Length of one epoch of the endless stream (it only reseeds the draws).
        index_dir: Folder of the per-slide tissue index shared by runs (default: the user's cache folder,
            ``$MULTITEACH_INDEX_DIR`` or ``~/.cache/multiteach/tissue-index``).
        thumb_size: Longer side of the tissue-mask thumbnail in pixels.
        min_saturation: Floor of the Otsu threshold on the 0-255 saturation of the thumbnail.
        index_workers: Processes that build missing tissue-index entries.
    """

    source: str | list[str] = field(metadata=_hint("a slide folder, list file or CSV, e.g. data.slides.source=slides/"))
    target_mpp: list[float] = field(default_factory=lambda: [0.5])
    proportions: list[float] | None = None
    tile_size: int = 224
    min_tissue: float = 0.4
    hsv_filter: bool = False
    open_per_worker: int = 16
    tiles_per_visit: int = 8
    mpp: float | None = None
    samples_per_epoch: int = 1_048_576
    index_dir: str | None = None
    thumb_size: int = 1024
    min_saturation: int = 15
    index_workers: int = 2

    def _finish(self, at: str) -> None:
        sources = [self.source] if isinstance(self.source, str) else list(self.source)
        _require(bool(sources) and all(sources), f"{at}.source", self.source, "needs at least one non-empty path")
        _require(
            bool(self.target_mpp) and min(self.target_mpp) > 0,
            f"{at}.target_mpp",
            self.target_mpp,
            "must be a non-empty list of positive µm/px values",
        )
        if self.proportions is not None:
            _require(
                len(self.proportions) == len(self.target_mpp),
                f"{at}.proportions",
                self.proportions,
                f"needs one share per target_mpp ({len(self.target_mpp)})",
            )
            _require(
                min(self.proportions) >= 0 and sum(self.proportions) > 0,
                f"{at}.proportions",
                self.proportions,
                "shares must be >= 0 and not all 0",
            )
        _positive(self, at, "tile_size", "open_per_worker", "tiles_per_visit", "mpp", "samples_per_epoch")
        _positive(self, at, "thumb_size", "index_workers")
        _probabilities(self, at, "min_tissue")
        _require(0 <= self.min_saturation <= 255, f"{at}.min_saturation", self.min_saturation, "must be in [0, 255]")

    @property
    def shares(self) -> list[float]:
        """``proportions`` normalised to sum 1 (equal shares when unset)."""
        raw = self.proportions or [1.0] * len(self.target_mpp)
        total = float(sum(raw))
        return [float(x) / total for x in raw]


@dataclass(kw_only=True)
class DataConfig:
    """Where tiles come from and how views are made.

    Attributes:
        train: Tile folder(s), list file(s) (TXT/CSV/Parquet), TRIDENT/CLAM coordinate folders or WebDataset
            shard folders; required for training unless ``slides`` is set, may come from an override.
        extensions: Image file extensions picked up in folders.
        num_workers: DataLoader workers.
        global_crops: Global crop settings.
        local_crops: Local crop settings.
        augment: Augmentation settings.
        masking: iBOT masking, or null for none.
        slides: Online patching from whole-slide images (:class:`SlidesConfig`), or null; replaces ``train``.
        slide_dir: Folder of the slides that TRIDENT/CLAM coordinate files in ``train`` name (matched by name).
        robust_views: Stain/scanner-robust distillation, or null: the student's global views are perturbed
            copies of the clean views its teachers see (same crop, pixel-aligned). ``p`` (probability each
            configured perturbation applies to a view, default 0.5; or a mapping name -> probability, e.g.
            ``{hed: 0.8, blur: 0.2}``, unnamed kinds 0.5) and perturbation name -> ``[low, high]``
            (``hed``, ``gamma``, ``gain``, ``blur``, ``jpeg``; see :mod:`multiteach.data.views.perturb`); ``{}``
            uses the default ranges.
    """

    train: str | list[str] | None = None
    extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "tif", "tiff"])
    num_workers: int = 0
    global_crops: GlobalCrops = field(default_factory=GlobalCrops)
    local_crops: LocalCrops = field(default_factory=LocalCrops)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    masking: MaskingConfig | None = None
    slides: SlidesConfig | None = None
    slide_dir: str | None = None
    robust_views: dict[str, Any] | None = None

    def _finish(self, at: str) -> None:
        paths = [self.train] if isinstance(self.train, str) else self.train or []
        _require(all(paths), f"{at}.train", self.train, "paths must be non-empty")
        _require(all(self.extensions), f"{at}.extensions", self.extensions, "extensions must be non-empty")
        _require(self.num_workers >= 0, f"{at}.num_workers", self.num_workers, "must be >= 0")
        if self.slides is not None:
            _require(
                not paths, f"{at}.train", self.train, "give either data.train (tiles) or data.slides (slides), not both"
            )
        if self.robust_views is not None:
            self.robust_views = robust_views_settings(self.robust_views, f"{at}.robust_views")


def _check_crops(crops: GlobalCrops | LocalCrops, at: str, min_n: int) -> None:
    """Crop count, size and an ordered area-scale range within (0, 1]."""
    _require(crops.n >= min_n, f"{at}.n", crops.n, f"must be >= {min_n}")
    _positive(crops, at, "size")
    lo, hi = crops.scale
    _require(0 < lo <= hi <= 1, f"{at}.scale", list(crops.scale), "expected [low, high] with 0 < low <= high <= 1")
