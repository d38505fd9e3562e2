"""Which pyramid level each (slide, target µm/px) reads, how large the read is, and whether the slide can serve it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from multiteach.data.index import SlideIndex
from multiteach.data.wsi.slide import MPP_TOLERANCE

UPSAMPLE_TOLERANCE = 0.15
"""A target finer than a slide's level 0 is still served when the tile is upsampled by at most this fraction
(1.15x): 40x scanners record 0.2456-0.2631 µm/px, and a 0.25 µm/px target should use them all."""
MAX_READ_FACTOR = 4.0
"""A (slide, target) is unusable when the read at its level is over this many tile sides (plus 1% slack)."""


class TargetPlan(NamedTuple):
    """How every slide serves every target (arrays of shape ``(n_slides, n_targets)``).

    Attributes:
        level: Pyramid level read.
        level_mpp: µm/px of that level.
        read_size: Side of the region read at that level, in level pixels.
        extent: Side of the footprint in level-0 pixels (``read_size x downsample``).
        too_fine: The target is finer than level 0 by more than ``UPSAMPLE_TOLERANCE``.
        too_coarse: The read exceeds ``MAX_READ_FACTOR`` tile sides.
        too_small: The footprint does not fit in the scanned area.
    """

    level: np.ndarray
    level_mpp: np.ndarray
    read_size: np.ndarray
    extent: np.ndarray
    too_fine: np.ndarray
    too_coarse: np.ndarray
    too_small: np.ndarray

    @property
    def usable(self) -> np.ndarray:
        """Bool ``(n_slides, n_targets)``."""
        return ~(self.too_fine | self.too_coarse | self.too_small)


def plan_targets(index: SlideIndex, targets: Sequence[float], tile_size: int) -> TargetPlan:
    """Level, read size and usability of every (slide, target), vectorised over slides.

    The level is :func:`~multiteach.data.wsi.slide.choose_level`'s (levels are ascending in downsample).

    Args:
        index: The slide index.
        targets: Target µm/px values.
        tile_size: Side of the tiles in pixels.

    Returns:
        The :class:`TargetPlan`.
    """
    n = len(index)
    counts = np.diff(index.level_start)
    first = index.level_start[:-1]
    level_mpp_flat = np.repeat(index.mpp, counts) * index.downsamples
    cols: dict[str, list[np.ndarray]] = {name: [] for name in TargetPlan._fields}
    for target in targets:
        fine_enough = level_mpp_flat <= target * (1.0 + MPP_TOLERANCE)
        n_ok = np.add.reduceat(fine_enough.astype(np.int64), first) if n else np.zeros(0, np.int64)
        level = np.maximum(n_ok - 1, 0)
        lm = level_mpp_flat[first + level]
        read = np.maximum(1, np.round(tile_size * target / lm)).astype(np.int64)
        extent = read * index.downsamples[first + level]
        cols["level"].append(level)
        cols["level_mpp"].append(lm)
        cols["read_size"].append(read)
        cols["extent"].append(extent)
        cols["too_fine"].append((n_ok == 0) & (index.mpp > target * (1.0 + UPSAMPLE_TOLERANCE)))
        cols["too_coarse"].append(read > tile_size * MAX_READ_FACTOR * (1.0 + MPP_TOLERANCE))
        cols["too_small"].append((extent > index.bounds[:, 2] + 1e-6) | (extent > index.bounds[:, 3] + 1e-6))
    return TargetPlan(**{name: np.stack(v, axis=1) if v else np.zeros((n, 0)) for name, v in cols.items()})


def unusable_reason(index: SlideIndex, plan: TargetPlan, s: int, t: int, target: float, tile_size: int) -> str:
    if plan.too_fine[s, t]:
        return (
            f"{target:g} µm/px is finer than its level 0 ({index.mpp[s]:.4g} µm/px): tiles would be upsampled "
            f"{index.mpp[s] / target:.2f}x (at most {1 + UPSAMPLE_TOLERANCE:g}x allowed)"
        )
    if plan.too_coarse[s, t]:
        return (
            f"{target:g} µm/px needs a {plan.read_size[s, t]}-px read at its coarsest level "
            f"({plan.level_mpp[s, t]:.4g} µm/px), over {MAX_READ_FACTOR:g}x the {tile_size}-px tile"
        )
    w, h = index.bounds[s, 2:]
    return f"its scanned area ({w}x{h} px) is smaller than one {tile_size}-px tile at {target:g} µm/px"
