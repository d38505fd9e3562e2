"""Tile planning: the level to read, a regular grid at the target resolution, the tissue tiles kept.

A plan is a ``TileGrid``: the tiles of one slide as level-0 ``(x, y)`` corners plus the level and
sizes to read them with. It round-trips through a CSV (``CSV_COLUMNS``), and ``read_tile`` turns
one of its entries into pixels.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from multiteach.atomic import atomic_path
from multiteach.data.wsi.slide import (
    MPP_TOLERANCE,
    PathLike,
    SlideOrPath,
    check_mpp,
    choose_level,
    failure_reason,
    import_openslide,
    logger,
    mpp_override_lookup,
    open_slide,
    read_square,
    scanned_bounds,
    slide_errors,
    slide_mpp,
    slide_name,
)
from multiteach.data.wsi.tissue import DEFAULT_THUMB_SIZE, tissue_fraction, tissue_mask
from multiteach.errors import MultiteachError, did_you_mean

if TYPE_CHECKING:
    from openslide import OpenSlide

CSV_COLUMNS: tuple[str, ...] = ("slide", "x", "y", "level", "target_mpp", "tile_size", "level_mpp", "read_size")


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write a header plus ``rows`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


@dataclass(frozen=True, eq=False)
class TileGrid:
    """The tiles planned on one slide.

    Each tile is read as a ``read_size`` x ``read_size`` region of pyramid ``level`` starting at
    level-0 pixel ``(x, y)`` and resized to ``tile_size`` x ``tile_size``, which makes it
    ``target_mpp`` µm/px.

    Attributes:
        slide: Path of the slide file.
        level: Pyramid level read from.
        level_mpp: µm/px of that level.
        target_mpp: µm/px of the returned tiles.
        read_size: Side of the region read at ``level``, in level pixels
            (``round(tile_size * target_mpp / level_mpp)``).
        tile_size: Side of the returned tiles in pixels.
        coords: int64 array of shape ``(N, 2)``: top-left ``(x, y)`` of each tile in level-0 pixels.
    """

    slide: str
    level: int
    level_mpp: float
    target_mpp: float
    read_size: int
    tile_size: int
    coords: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "coords", np.asarray(self.coords, dtype=np.int64).reshape(-1, 2))

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __repr__(self) -> str:
        return (
            f"TileGrid({self.slide!r}, {len(self)} tiles, level={self.level} ({self.level_mpp:.4g} µm/px), "
            f"target_mpp={self.target_mpp:g}, read_size={self.read_size}, tile_size={self.tile_size})"
        )

    def rows(self) -> Iterable[dict[str, Any]]:
        """One dict per tile with the ``CSV_COLUMNS`` keys."""
        for x, y in self.coords.tolist():
            yield {
                "slide": self.slide,
                "x": x,
                "y": y,
                "level": self.level,
                "target_mpp": repr(float(self.target_mpp)),
                "tile_size": self.tile_size,
                "level_mpp": repr(float(self.level_mpp)),
                "read_size": self.read_size,
            }

    def to_csv(self, path: PathLike) -> Path:
        """Write one row per tile (columns ``CSV_COLUMNS``), atomically.

        A grid without tiles writes only the header, which ``from_csv`` refuses.

        Returns:
            The path written.
        """
        path = Path(path)
        _write_csv(path, CSV_COLUMNS, self.rows())
        return path

    @classmethod
    def from_csv(cls, path: PathLike) -> TileGrid:
        """Read a grid written by ``to_csv`` (or a ``coordinates.csv`` from ``write_tiles``).

        Extra columns are ignored; a relative ``slide`` path is resolved against the CSV's folder.

        Raises:
            MultiteachError: If the file is missing, lacks a column, has no rows, mixes slides or
                tile settings, or holds a non-numeric value.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise MultiteachError(f"Tile grid CSV {str(path)!r} does not exist.")
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in CSV_COLUMNS if c not in columns]
            if missing:
                raise MultiteachError(
                    f"Tile grid CSV {str(path)!r} lacks column(s) {', '.join(missing)}; it has: "
                    f"{', '.join(columns) or 'none'}." + did_you_mean(missing[0], columns)
                )
            reader.fieldnames = columns
            rows = list(reader)
        if not rows:
            raise MultiteachError(f"Tile grid CSV {str(path)!r} has no tiles (header only).")
        shared = ("slide", "level", "target_mpp", "tile_size", "level_mpp", "read_size")
        for key in shared:
            values = {r[key].strip() for r in rows}
            if len(values) > 1:
                raise MultiteachError(
                    f"Tile grid CSV {str(path)!r} mixes {len(values)} values of {key!r} "
                    f"({', '.join(sorted(values)[:3])}); one CSV holds one slide's grid."
                )
        first = rows[0]
        slide = Path(first["slide"].strip()).expanduser()
        if not slide.is_absolute():
            slide = path.parent / slide
        try:
            coords = np.array([[int(r["x"]), int(r["y"])] for r in rows], dtype=np.int64)
            return cls(
                slide=str(slide),
                level=int(first["level"]),
                level_mpp=float(first["level_mpp"]),
                target_mpp=float(first["target_mpp"]),
                read_size=int(first["read_size"]),
                tile_size=int(first["tile_size"]),
                coords=coords,
            )
        except (TypeError, ValueError) as err:
            raise MultiteachError(f"Tile grid CSV {str(path)!r} holds a malformed value: {err}.") from err


def _check_plan_args(target_mpp: float, tile_size: int, overlap: float, min_tissue: float, thumb_size: int) -> float:
    target = check_mpp(target_mpp, "target_mpp")
    if int(tile_size) != tile_size or tile_size < 1:
        raise MultiteachError(f"tile_size must be a positive whole number of pixels, got {tile_size!r}.")
    if not 0.0 <= overlap < 1.0:
        raise MultiteachError(f"overlap must be a fraction of the tile in [0, 1), got {overlap!r}.")
    if not 0.0 <= min_tissue <= 1.0:
        raise MultiteachError(f"min_tissue must be a fraction in [0, 1], got {min_tissue!r}.")
    if int(thumb_size) != thumb_size or thumb_size < 16:
        raise MultiteachError(f"thumb_size must be a whole number of pixels >= 16, got {thumb_size!r}.")
    return target


def plan_tiles(
    slide: SlideOrPath,
    target_mpp: float = 0.5,
    tile_size: int = 224,
    overlap: float = 0.0,
    min_tissue: float = 0.5,
    mpp: float | None = None,
    *,
    thumb_size: int = DEFAULT_THUMB_SIZE,
) -> TileGrid:
    """Plan the tissue tiles of one slide at a target resolution.

    The level is chosen by ``choose_level`` (coarsest level not coarser than ``target_mpp``). Tiles
    lie on a regular grid starting at the scanned area's top-left corner with a stride of
    ``tile_size * (1 - overlap)`` target pixels; only tiles that fit entirely inside the scanned area
    are planned, and of those only the ones whose tissue fraction (``tissue_fraction`` on
    ``tissue_mask``) is ``>= min_tissue`` are kept (``min_tissue=0`` keeps every tile).

    Args:
        slide: Slide path, or an open slide (left open).
        target_mpp: µm/px of the tiles (0.5 ≈ 20x, 0.25 ≈ 40x).
        tile_size: Side of the tiles in pixels at ``target_mpp``.
        overlap: Fraction of a tile shared by neighbours, in ``[0, 1)``.
        min_tissue: Lowest tissue fraction of a kept tile, in ``[0, 1]``.
        mpp: Level-0 µm/px overriding the slide's metadata (needed when it has none).
        thumb_size: Longer side of the tissue-mask thumbnail in pixels.

    Returns:
        The slide's ``TileGrid`` (possibly with no tiles).

    Raises:
        MultiteachError: For a bad argument, an unreadable slide, or a slide without resolution
            metadata and no ``mpp``.
    """
    target = _check_plan_args(target_mpp, tile_size, overlap, min_tissue, thumb_size)
    if isinstance(slide, (str, os.PathLike)):
        with open_slide(slide) as handle:
            return plan_tiles(handle, target, tile_size, overlap, min_tissue, mpp, thumb_size=thumb_size)
    name = slide_name(slide)
    mpp0 = slide_mpp(slide, mpp)
    downsamples = list(slide.level_downsamples)
    level_mpps = [mpp0 * d for d in downsamples]
    level = choose_level(level_mpps, target)
    level_mpp = level_mpps[level]
    if level_mpp > target * (1 + MPP_TOLERANCE):
        logger.warning(
            "slide %s: finest level is %.4g µm/px, coarser than the target %g µm/px; tiles will be upsampled",
            name,
            level_mpp,
            target,
        )
    read_size = max(1, round(tile_size * target / level_mpp))
    extent = read_size * downsamples[level]  # tile footprint in level-0 pixels
    stride = tile_size * (1.0 - overlap) * target / mpp0  # level-0 pixels
    if stride < 1.0:
        raise MultiteachError(f"overlap={overlap} leaves a stride under one level-0 pixel; lower it.")
    bx, by, bw, bh = scanned_bounds(slide)
    eps = 1e-6

    def starts(origin: int, size: int) -> np.ndarray:
        if extent > size + eps:
            return np.zeros(0, dtype=np.int64)
        n = int(math.floor((size - extent) / stride + eps)) + 1
        return origin + np.round(np.arange(n) * stride).astype(np.int64)

    xs, ys = starts(bx, bw), starts(by, bh)
    if xs.size and ys.size:
        mask, scale = tissue_mask(slide, thumb_size)
        keep = tissue_fraction(mask, scale, xs, ys, (extent, extent)) >= min_tissue - 1e-9
        rows, cols = np.nonzero(keep)
        coords = np.stack([xs[cols], ys[rows]], axis=1)
    else:
        logger.warning("slide %s is smaller than one %s-pixel tile at %g µm/px", name, tile_size, target)
        coords = np.zeros((0, 2), dtype=np.int64)
    return TileGrid(
        slide=os.path.abspath(name),
        level=level,
        level_mpp=level_mpp,
        target_mpp=target,
        read_size=read_size,
        tile_size=int(tile_size),
        coords=coords,
    )


def read_tile(slide: OpenSlide, grid: TileGrid, index: int) -> Image.Image:
    """Read tile ``index`` of ``grid`` from an open slide.

    Transparent (unscanned) pixels are filled with the slide's background colour.

    Returns:
        RGB PIL image of ``grid.tile_size`` x ``grid.tile_size`` pixels at ``grid.target_mpp`` µm/px.
    """
    x, y = (int(v) for v in grid.coords[index])
    return read_square(slide, x, y, grid.level, grid.read_size, grid.tile_size)


# --------------------------------------------------------------------------------------------------
# Many slides: one argument check up front, then slide-by-slide planning that skips failures
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PlanArgs:
    target_mpp: float
    tile_size: int
    overlap: float
    min_tissue: float
    thumb_size: int


def _prepare(
    slides: PathLike | TileGrid | Sequence[PathLike | TileGrid],
    caller: str,
    *,
    target_mpp: float,
    tile_size: int,
    overlap: float,
    min_tissue: float,
    mpp: float | None,
    mpp_overrides: Mapping[str, float] | None,
    thumb_size: int,
) -> tuple[Sequence[PathLike | TileGrid], _PlanArgs, Callable[[PathLike], float | None]]:
    """Check every argument before any slide is touched; returns the slides (one given alone made a list),
    the plan settings and the mpp lookup. ``caller`` names the function in the error for no slides."""
    if isinstance(slides, (str, os.PathLike, TileGrid)):
        slides = [slides]
    if not slides:
        raise MultiteachError(f"{caller} got no slides.")
    _check_plan_args(target_mpp, tile_size, overlap, min_tissue, thumb_size)
    if mpp is not None:
        check_mpp(mpp, "mpp override")
    import_openslide()
    lookup = mpp_override_lookup([s for s in slides if not isinstance(s, TileGrid)], mpp, mpp_overrides)
    args = _PlanArgs(float(target_mpp), int(tile_size), float(overlap), float(min_tissue), int(thumb_size))
    return slides, args, lookup


def _plan_one(
    slide: PathLike | TileGrid, args: _PlanArgs, lookup: Callable[[PathLike], float | None]
) -> TileGrid | str:
    """The slide's grid, or the reason it could not be planned (also logged)."""
    if isinstance(slide, TileGrid):
        return slide
    try:
        return plan_tiles(
            slide,
            args.target_mpp,
            args.tile_size,
            args.overlap,
            args.min_tissue,
            lookup(slide),
            thumb_size=args.thumb_size,
        )
    except slide_errors() as err:
        reason = failure_reason(err)
        logger.warning("skipping slide %s: %s", slide, reason)
        return reason
