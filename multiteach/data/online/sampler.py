"""The online-patching sampler: training tiles drawn at random tissue positions straight from whole-slide images.

``SlideSource.read(index, epoch)`` is a pure function of ``(seed, epoch, index)``:

1. Sample ``index`` belongs to visit ``v = index // tiles_per_visit``. A generator seeded by ``(seed, epoch, v)``
   picks the target µm/px (by ``data.slides.proportions``) and then a slide among those that can serve it, with
   probability proportional to ``weight x tissue area`` (the CSV ``weight``, 1 by default, times the slide's
   tissue area in µm² from its mask): every µm² of tissue in the corpus is equally likely to be visited,
   whatever the slide's scan resolution; a slide of weight 0 is never drawn. The ``tiles_per_visit``
   consecutive samples of a visit share the slide and target, so a worker reads one slide a while.
2. A generator seeded by ``(seed, epoch, index)`` picks a tissue pixel of the slide's mask uniformly, a point
   uniformly inside it, and centres the tile's footprint there (clamped to the scanned area). The tile is
   accepted when the tissue fraction of its footprint on the mask is >= ``min_tissue`` and, with
   ``hsv_filter``, when its pixels pass Virchow's HSV rule (:func:`hsv_tissue_fraction`); otherwise the same
   generator draws again (at most ``MASK_TRIES`` positions and ``HSV_READS`` pixel reads), and the best tile
   seen is kept when none passes.
3. The region is read at the pyramid level :func:`~multiteach.data.wsi.slide.choose_level` picks (the coarsest
   level not coarser than the target), ``round(tile_size * target / level_mpp)`` pixels wide, flattened onto
   the slide's background colour and resized to ``tile_size`` (Lanczos).

A (slide, target) pair is unusable when the target is finer than level 0 by more than ``UPSAMPLE_TOLERANCE``
(tiles would be upsampled), when even the coarsest level needs a read over ``MAX_READ_FACTOR`` times the tile
side, or when the slide is smaller than one tile footprint; a slide usable for no target is skipped with the
reasons. A target no slide can serve is dropped with a warning and the others' shares renormalised.

Each worker process keeps at most ``open_per_worker`` slides open (least recently used closed first), each with
its tissue mask loaded from the index entry; nothing is opened per sample. A slide that fails while reading is
closed, remembered as bad in that process, named in the tile's ``skipped`` and replaced by a deterministic
redraw among the remaining slides, so ``read`` stays a pure function given the same failures.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from multiteach.data.index import SlideIndex, build_index, default_index_dir, load_mask
from multiteach.data.lists.slide_list import read_slide_list
from multiteach.data.online.targets import (
    plan_targets,
    unusable_reason,
)
from multiteach.data.sources.base import SourceTile
from multiteach.data.wsi.pool import SlidePool
from multiteach.data.wsi.slide import failure_reason, read_square, slide_errors
from multiteach.errors import MultiteachError

logger = logging.getLogger("multiteach.data")

MASK_TRIES = 32
"""Tile positions drawn (mask checks only, cheap) before the best one seen is taken."""
HSV_READS = 4
"""With ``hsv_filter``: pixel reads tried before the tile with the largest HSV tissue fraction is kept."""

# Virchow's tile rule (Vorontsov et al., Nature Medicine 2024, "A foundation model for clinical-grade computational
# pathology and rare cancers detection"), adopted by Midnight (Karasikov et al. 2025, arXiv 2504.05186): a tile is
# tissue when more than 60% of its pixels have, in OpenCV's 8-bit HSV (hue 0-180 = 0-360 degrees, S and V 0-255),
# hue in [90, 180], saturation in [8, 255] and value in [103, 255] (OpenMidnight's re-implementation:
# ``cv2.inRange(hsv, [90, 8, 103], [180, 255, 255])``, accepted when the ratio is > 0.6). Pillow's 8-bit HSV
# maps hue 0-360 degrees to 0-255 (180 degrees -> 127), so OpenCV's hue 90 (179-181 degrees) is Pillow's 127.
HSV_MIN_HUE = 127
HSV_MIN_SATURATION = 8
HSV_MIN_VALUE = 103
HSV_MIN_FRACTION = 0.6

_VISIT, _TILE, _REPLACE = 0, 1, 2  # generator streams


def hsv_tissue_fraction(image: Image.Image) -> float:
    """Fraction of pixels inside Virchow's HSV tissue range (see the module constants).

    Args:
        image: RGB tile.

    Returns:
        Fraction in [0, 1]; a tile passes the rule when it is above ``HSV_MIN_FRACTION`` (0.6).
    """
    hsv = np.asarray(image.convert("HSV"))
    inside = (hsv[..., 0] >= HSV_MIN_HUE) & (hsv[..., 1] >= HSV_MIN_SATURATION) & (hsv[..., 2] >= HSV_MIN_VALUE)
    return float(np.count_nonzero(inside)) / inside.size


def _pick(cum: np.ndarray, u: float) -> int:
    """The item a uniform ``u`` in [0, 1) lands on, given the cumulative weights ``cum`` (zero-weight items never)."""
    return min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(cum) - 1)


def _footprint_fraction(mask: np.ndarray, scale: np.ndarray, x: int, y: int, extent: float) -> float:
    """Tissue fraction of one square footprint on the mask, by the rule of ``tissue.tissue_fraction``: the mask
    pixels whose centres lie inside it (at least the nearest one)."""
    h, w = mask.shape

    def span(start: float, step: float, size: int) -> tuple[int, int]:
        lo = min(max(math.ceil(start / step - 0.5), 0), size)
        hi = min(max(math.ceil((start + extent) / step - 0.5), 0), size)
        hi = max(hi, min(lo + 1, size))
        return min(lo, hi - 1), hi

    j0, j1 = span(x, float(scale[0]), w)
    i0, i1 = span(y, float(scale[1]), h)
    return float(np.count_nonzero(mask[i0:i1, j0:j1])) / ((i1 - i0) * (j1 - j0))


# --------------------------------------------------------------------------------------------------
# Per-worker pool of open slides and their masks
# --------------------------------------------------------------------------------------------------


class _Slot:
    """What a worker keeps beside an open slide: its mask and where each mask row's tissue pixels start."""

    __slots__ = ("background", "mask", "row_start")

    def __init__(self, mask: np.ndarray, background: np.ndarray) -> None:
        self.mask = mask
        self.row_start = np.zeros(mask.shape[0] + 1, dtype=np.int64)  # tissue pixels before each mask row
        self.row_start[1:] = np.cumsum(np.count_nonzero(mask, axis=1))
        self.background = "#" + bytes(np.asarray(background, dtype=np.uint8)).hex()


class _SlotLoader:
    """``SlidePool``'s ``on_open``: loads a slide's mask from its index entry when the slide is opened."""

    def __init__(self, index: SlideIndex) -> None:
        self.index = index
        self.rows: dict[str, int] | None = None  # built on first use, in the process that reads

    def __call__(self, path: str, handle: Any) -> _Slot:
        if self.rows is None:
            self.rows = {p: i for i, p in enumerate(self.index.slides)}
        i = self.rows[path]
        return _Slot(load_mask(self.index.entries[i]), self.index.background[i])


# --------------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------------


class TileDraw(NamedTuple):
    """Where a tile is read (the mask-only choice; ``read`` reads exactly it unless ``hsv_filter`` rejects it).

    Attributes:
        slide: The slide's path.
        slide_index: Its row in the ``SlideIndex``.
        target_mpp: µm/px of the tile.
        x: Left edge of the footprint in level-0 pixels.
        y: Top edge in level-0 pixels.
        level: Pyramid level read.
        read_size: Side of the region read at that level.
        tissue: Tissue fraction of the footprint on the mask.
    """

    slide: str
    slide_index: int
    target_mpp: float
    x: int
    y: int
    level: int
    read_size: int
    tissue: float


class SlideSource:
    """Online patching from whole-slide images (see the module docstring); a ``TileSource``.

    Args:
        config: The ``data.slides`` settings (``SlidesConfig``).
        seed: The run seed.
        index: The tissue index of the slide list (:func:`~multiteach.data.index.build_index`).

    Raises:
        MultiteachError: When no slide can serve any target, or every usable slide has weight 0.
    """

    shuffle = False

    def __init__(self, config: Any, seed: int, index: SlideIndex) -> None:
        self.config = config
        self.seed = int(seed) % (1 << 64)
        self.index = index
        self.source = index.source or ", ".join(
            [config.source] if isinstance(config.source, str) else [str(s) for s in config.source]
        )
        self.tile_size = int(config.tile_size)
        self.min_tissue = float(config.min_tissue)
        self.hsv_filter = bool(config.hsv_filter)
        self.tiles_per_visit = int(config.tiles_per_visit)
        self.samples = -(-int(config.samples_per_epoch) // self.tiles_per_visit) * self.tiles_per_visit
        self.targets = np.asarray(config.target_mpp, dtype=np.float64)
        self.plan = plan_targets(index, self.targets.tolist(), self.tile_size)
        self._weights = np.where(self.plan.usable, (index.weight * index.tissue_um2)[:, None], 0.0)
        self._pool = SlidePool(config.open_per_worker, on_open=_SlotLoader(index))
        self._bad: dict[int, str] = {}
        self.skipped = list(index.skipped) + self._unusable_slides()
        self.shares, self.unserved = self._serve(np.asarray(config.shares, dtype=np.float64))
        self._cum_shares = np.cumsum(self.shares)
        self._cum_weights = [np.cumsum(self._weights[:, t]) for t in range(len(self.targets))]

    @classmethod
    def from_config(
        cls, config: Any, seed: int, *, progress: bool = True, index_dir: str | os.PathLike[str] | None = None
    ) -> SlideSource:
        """Read the slide list, load or build its tissue index, and make the source.

        Args:
            config: The ``data.slides`` settings.
            seed: The run seed.
            progress: Show a progress bar while building index entries.
            index_dir: The index folder (default: ``config.index_dir``, else :func:`default_index_dir`).
        """
        table = read_slide_list(config.source)
        folder = index_dir or config.index_dir or default_index_dir()
        index = build_index(table, config, folder, processes=config.index_workers, progress=progress)
        return cls(config, seed, index)

    # ---- set-up ---------------------------------------------------------------------------------------

    def _unusable_slides(self) -> list[tuple[str, str]]:
        """``(slide, reasons)`` of the slides no target can use."""
        out = []
        for s in np.flatnonzero(~self.plan.usable.any(axis=1)).tolist():
            reasons = [
                unusable_reason(self.index, self.plan, s, t, float(target), self.tile_size)
                for t, target in enumerate(self.targets.tolist())
            ]
            out.append((self.index.slides[s], "no target µm/px can be read: " + "; ".join(reasons)))
        return out

    def _serve(self, shares: np.ndarray) -> tuple[np.ndarray, list[tuple[float, str]]]:
        """Shares renormalised over the targets some slide can serve, and the others with reasons."""
        served = self._weights.sum(axis=0) > 0
        unserved = []
        for t in np.flatnonzero(~served).tolist():
            target = float(self.targets[t])
            if self.plan.usable[:, t].any():
                why = "every slide that could serve it has weight 0"
            else:
                example = unusable_reason(self.index, self.plan, 0, t, target, self.tile_size)
                why = f"no slide can be read at it; e.g. {self.index.slides[0]}: {example}"
            unserved.append((target, why))
        if not served.any() or shares[served].sum() <= 0:
            first = self.skipped[0] if self.skipped else ("", "every usable slide has weight 0")
            raise MultiteachError(
                f"data.slides: no slide of {self.source} can serve target_mpp {self.targets.tolist()} "
                f"(proportions {shares.tolist()}, tile_size {self.tile_size}); first: {first[0]}: {first[1]}"
            )
        if unserved:
            logger.warning(
                "data.slides: target_mpp %s dropped (%s); the other targets share its proportion",
                ", ".join(f"{t:g}" for t, _ in unserved),
                "; ".join(f"{t:g}: {why}" for t, why in unserved),
            )
        out = np.where(served, shares, 0.0)
        return out / out.sum(), unserved

    # ---- the draw -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.samples

    def visit(self, v: int, epoch: int) -> tuple[int, int]:
        """The ``(target, slide)`` indices of visit ``v`` of ``epoch`` (before any replacement of bad slides)."""
        rng = np.random.default_rng([self.seed, int(epoch), int(v), _VISIT])
        u_target, u_slide = rng.random(2)
        t = _pick(self._cum_shares, u_target)
        return t, _pick(self._cum_weights[t], u_slide)

    def _replacement(self, v: int, epoch: int, attempt: int) -> tuple[int, int]:
        """A deterministic redraw of visit ``v`` among the slides not known to be bad."""
        weights = self._weights.copy()
        weights[list(self._bad)] = 0.0
        per_target = weights.sum(axis=0)
        shares = np.where(per_target > 0, self.shares, 0.0)
        if shares.sum() <= 0:
            raise MultiteachError(
                f"data.slides: every slide of {self.source} became unreadable while reading; first: "
                + "; ".join(f"{self.index.slides[s]}: {r}" for s, r in list(self._bad.items())[:3])
            )
        rng = np.random.default_rng([self.seed, int(epoch), int(v), _REPLACE, int(attempt)])
        u_target, u_slide = rng.random(2)
        t = _pick(np.cumsum(shares), u_target)
        return t, _pick(np.cumsum(weights[:, t]), u_slide)

    def _choose(self, v: int, epoch: int) -> tuple[int, int, list[tuple[str, str]]]:
        """The visit's ``(target, slide)`` with known-bad slides replaced, and the bad ones it met."""
        t, s = self.visit(v, epoch)
        met: list[tuple[str, str]] = []
        attempt = 0
        while s in self._bad:
            met.append((self.index.slides[s], self._bad[s]))
            t, s = self._replacement(v, epoch, attempt)
            attempt += 1
        return t, s, met

    def _position(self, slot: _Slot, s: int, t: int, rng: np.random.Generator) -> tuple[int, int, float]:
        """One candidate footprint: ``(x, y)`` level-0 corner and its tissue fraction on the mask."""
        k = int(rng.integers(int(slot.row_start[-1])))
        row = int(np.searchsorted(slot.row_start, k, side="right")) - 1
        col = int(np.flatnonzero(slot.mask[row])[k - int(slot.row_start[row])])
        du, dv = rng.random(2)
        scale = self.index.scale[s]
        extent = float(self.plan.extent[s, t])
        bx, by, bw, bh = (int(b) for b in self.index.bounds[s])
        x = min(max(round((col + du) * scale[0] - extent / 2), bx), math.floor(bx + bw - extent))
        y = min(max(round((row + dv) * scale[1] - extent / 2), by), math.floor(by + bh - extent))
        return x, y, _footprint_fraction(slot.mask, scale, x, y, extent)

    def _candidates(self, slot: _Slot, s: int, t: int, index: int, epoch: int):
        """Candidate footprints of sample ``index``: ``(x, y, tissue, accepted by the mask)``."""
        rng = np.random.default_rng([self.seed, int(epoch), int(index), _TILE])
        for _ in range(MASK_TRIES):
            x, y, frac = self._position(slot, s, t, rng)
            yield x, y, frac, frac >= self.min_tissue - 1e-9

    def draw(self, index: int, epoch: int) -> TileDraw:
        """Where sample ``index`` of ``epoch`` is read: the mask-only choice (it opens the slide, reads no pixels).

        Without ``hsv_filter`` this is exactly the tile ``read`` returns (given the same known-bad slides).
        """
        t, s, _ = self._choose(int(index) // self.tiles_per_visit, epoch)
        slot = self._pool.extra(self.index.slides[s])
        best = None
        for x, y, frac, ok in self._candidates(slot, s, t, index, epoch):
            if ok:
                best = (x, y, frac)
                break
            if best is None or frac > best[2]:
                best = (x, y, frac)
        assert best is not None
        return self._as_draw(s, t, *best)

    def _as_draw(self, s: int, t: int, x: int, y: int, frac: float) -> TileDraw:
        return TileDraw(
            self.index.slides[s],
            s,
            float(self.targets[t]),
            int(x),
            int(y),
            int(self.plan.level[s, t]),
            int(self.plan.read_size[s, t]),
            float(frac),
        )

    # ---- reading --------------------------------------------------------------------------------------

    def _pixels(self, slot: _Slot, s: int, t: int, x: int, y: int) -> Image.Image:
        """The RGB tile at footprint corner ``(x, y)``: read, flattened on the background, resized."""
        handle = self._pool.get(self.index.slides[s])
        size = int(self.plan.read_size[s, t])
        return read_square(handle, x, y, int(self.plan.level[s, t]), size, self.tile_size, slot.background)

    def _tile(self, s: int, t: int, index: int, epoch: int) -> tuple[Image.Image, int, int]:
        """Sample ``index``'s tile on slide ``s`` at target ``t``: ``(image, x, y)``."""
        slot = self._pool.extra(self.index.slides[s])
        best_mask: tuple[float, int, int] | None = None
        best_read: tuple[float, Image.Image, int, int] | None = None
        reads = 0
        for x, y, frac, ok in self._candidates(slot, s, t, index, epoch):
            if not ok:
                if best_mask is None or frac > best_mask[0]:
                    best_mask = (frac, x, y)
                continue
            image = self._pixels(slot, s, t, x, y)
            if not self.hsv_filter:
                return image, x, y
            ratio = hsv_tissue_fraction(image)
            if ratio > HSV_MIN_FRACTION:
                return image, x, y
            if best_read is None or ratio > best_read[0]:
                best_read = (ratio, image, x, y)
            reads += 1
            if reads >= HSV_READS:
                break
        if best_read is not None:
            return best_read[1], best_read[2], best_read[3]
        assert best_mask is not None
        _, x, y = best_mask
        return self._pixels(slot, s, t, x, y), x, y

    def _mark_bad(self, s: int, err: BaseException) -> None:
        self._pool.drop(self.index.slides[s])
        reason = failure_reason(err)
        self._bad[s] = reason
        logger.warning("skipping unreadable slide %s (%s)", self.index.slides[s], reason)

    def read(self, index: int, epoch: int) -> SourceTile:
        """The tile at ``index`` of ``epoch`` (see the module docstring).

        Returns:
            ``SourceTile(image, provenance, skipped)``: an RGB ``tile_size`` x ``tile_size`` image, provenance
            ``"{slide}@{x},{y}@{target_mpp:g}"`` (level-0 corner of the footprint) and every unreadable slide
            this sample's visit met and replaced.

        Raises:
            MultiteachError: If every slide became unreadable.
        """
        v = int(index) // self.tiles_per_visit
        errors = slide_errors()
        skipped: dict[str, str] = {}
        while True:
            t, s, met = self._choose(v, epoch)
            skipped.update((what, reason) for what, reason in met if what not in skipped)
            try:
                image, x, y = self._tile(s, t, index, epoch)
            except errors as err:
                self._mark_bad(s, err)
                continue
            provenance = f"{self.index.slides[s]}@{x},{y}@{float(self.targets[t]):g}"
            return SourceTile(image, provenance, tuple(skipped.items()))

    def close(self) -> None:
        """Close the slides this process opened."""
        self._pool.close()

    @property
    def pool(self) -> SlidePool:
        """This process's pool of open slides."""
        return self._pool

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for the run's ``data.json``."""
        usable = (self._weights > 0).any(axis=1)
        return {
            "kind": "slides",
            "source": self.source,
            "samples": len(self),
            "slides": int(usable.sum()),
            "skipped": [{"what": w, "reason": r} for w, r in self.skipped],
            "index_dir": self.index.index_dir,
            "target_mpp": self.targets.tolist(),
            "shares": [round(float(x), 6) for x in self.shares],
            "slides_per_target": (self._weights > 0).sum(axis=0).tolist(),
            "unserved_targets": [{"target_mpp": t, "reason": r} for t, r in self.unserved],
            "tile_size": self.tile_size,
            "tiles_per_visit": self.tiles_per_visit,
            "min_tissue": self.min_tissue,
            "hsv_filter": self.hsv_filter,
            "index": {"built": self.index.built, "reused": self.index.reused, "seconds": round(self.index.seconds, 3)},
        }


def open_slide_source(
    config: Any, seed: int, *, progress: bool = True, index_dir: str | os.PathLike[str] | None = None
) -> SlideSource:
    """The online-patching source of a recipe's ``data.slides``: reads the slide list, loads or builds the tissue
    index (``config.index_workers`` processes) and returns the :class:`SlideSource`.

    Args:
        config: The ``data.slides`` settings (``SlidesConfig``).
        seed: The run seed.
        progress: Show a progress bar while building index entries (pass False on all but one rank).
        index_dir: The index folder (default: ``config.index_dir``, else
            :func:`~multiteach.data.index.default_index_dir`).
    """
    return SlideSource.from_config(config, seed, progress=progress, index_dir=index_dir)
