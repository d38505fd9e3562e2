"""Tiles named by coordinates on slides, read from the slides when training (no image files written).

A :class:`CoordTable` holds, per tile, the slide (an index into a short list of slide paths) and its level-0
top-left corner, and per slide the tile's level-0 footprint and output size. It comes from TRIDENT/CLAM
coordinate ``.h5`` files (:mod:`multiteach.data.sources.trident`) or from a coordinate CSV
(``slide,x,y,size0,tile_size[,target_mpp]``, what ``multiteach data sample`` writes from an online-patching
recipe, so a teacher-feature cache can key tiles by slide, x, y and µm/px). Memory: 12 bytes per tile.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from multiteach.atomic import atomic_path
from multiteach.data.sources.base import SourceTile, read_or_next
from multiteach.data.wsi.pool import SlidePool
from multiteach.data.wsi.slide import choose_level, failure_reason, read_square, slide_errors
from multiteach.errors import MultiteachError, did_you_mean

logger = logging.getLogger("multiteach.data")

COORD_COLUMNS: tuple[str, ...] = ("slide", "x", "y", "size0", "tile_size")


@dataclass
class CoordTable:
    """Tiles as (slide, x, y): per-tile arrays plus per-slide read settings.

    Attributes:
        slides: Slide paths, by slide index.
        slide_of: ``(N,) int32``: each tile's slide index.
        xy: ``(N, 2) int32``: each tile's level-0 top-left corner.
        size0: ``(S,) float64``: per slide, the side of a tile's footprint in level-0 pixels; for a fixed
            ``level``, the side of the region read at that level.
        tile_size: ``(S,) int32``: per slide, the side of the returned tile in pixels.
        mpp: ``(S,) float64``: per slide, the tiles' µm/px when known (NaN otherwise), for provenance.
        level: ``(S,) int32``: per slide, the pyramid level to read (CLAM's ``patch_level``), or -1 to choose
            the coarsest level that keeps the output resolution.
    """

    slides: list[str]
    slide_of: np.ndarray
    xy: np.ndarray
    size0: np.ndarray
    tile_size: np.ndarray
    mpp: np.ndarray
    level: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.level is None:
            self.level = np.full(len(self.slides), -1, dtype=np.int32)

    def __len__(self) -> int:
        return int(self.slide_of.shape[0])

    @classmethod
    def concat(cls, tables: list[CoordTable]) -> CoordTable:
        """One table with every tile of ``tables``, in order."""
        offsets = np.cumsum([0] + [len(t.slides) for t in tables[:-1]])
        return cls(
            slides=[s for t in tables for s in t.slides],
            slide_of=np.concatenate([t.slide_of + np.int32(o) for t, o in zip(tables, offsets)]).astype(np.int32),
            xy=np.concatenate([t.xy for t in tables]).astype(np.int32),
            size0=np.concatenate([t.size0 for t in tables]),
            tile_size=np.concatenate([t.tile_size for t in tables]).astype(np.int32),
            mpp=np.concatenate([t.mpp for t in tables]),
            level=np.concatenate([t.level for t in tables]).astype(np.int32),
        )

    def provenance(self, i: int) -> str:
        """``slide@x,y@mpp`` (or ``slide@x,y@<size0>px`` when the µm/px is unknown) of tile ``i``."""
        s = int(self.slide_of[i])
        x, y = (int(v) for v in self.xy[i])
        mpp = float(self.mpp[s])
        where = f"{mpp:g}" if np.isfinite(mpp) else f"{float(self.size0[s]):g}px"
        return f"{self.slides[s]}@{x},{y}@{where}"


def read_coord_csv(path: str | os.PathLike[str]) -> CoordTable:
    """A coordinate CSV (``slide,x,y,size0,tile_size[,target_mpp]``; relative slide paths against its folder).

    A slide's ``size0``, ``tile_size`` and ``target_mpp`` are taken from its first row.

    Raises:
        MultiteachError: A column is missing (naming it and the columns the file has).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    path = Path(path).expanduser()
    table = pacsv.read_csv(path)
    columns = table.column_names
    missing = [c for c in COORD_COLUMNS if c not in columns]
    if missing:
        raise MultiteachError(
            f"Coordinate list {str(path)!r} lacks column(s) {', '.join(missing)}; it needs "
            f"{', '.join(COORD_COLUMNS)} (and optionally target_mpp); it has {', '.join(columns)}."
            + did_you_mean(missing[0], columns)
        )
    encoded = pc.dictionary_encode(table.column("slide").combine_chunks())
    names = [str(s) for s in encoded.dictionary.to_pylist()]
    base = path.parent.resolve()
    slides = [s if os.path.isabs(s) else str(base / s) for s in names]
    slide_of = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int32)
    first = np.unique(slide_of, return_index=True)[1]

    def per_slide(name: str, default: float = np.nan) -> np.ndarray:
        if name not in columns:
            return np.full(len(slides), default)
        values = table.column(name).combine_chunks().cast(pa.float64()).to_numpy(zero_copy_only=False)
        return values[first]

    xy = np.stack(
        [table.column(c).combine_chunks().cast(pa.int32()).to_numpy(zero_copy_only=False) for c in ("x", "y")], 1
    )
    return CoordTable(
        slides, slide_of, xy, per_slide("size0"), per_slide("tile_size").astype(np.int32), per_slide("target_mpp")
    )


def write_coord_csv(rows: list[tuple[str, int, int, float, int, float]], out: str | os.PathLike[str]) -> Path:
    """Write ``(slide, x, y, size0, tile_size, target_mpp)`` rows as a coordinate CSV, atomically."""
    out = Path(out).expanduser()
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(",".join(COORD_COLUMNS) + ",target_mpp\n")
        for slide, x, y, size0, tile_size, mpp in rows:
            fh.write(f"{slide},{x},{y},{size0!r},{tile_size},{mpp!r}\n")
    return out


class CoordSource:
    """Tiles of a :class:`CoordTable`, read from their slides through a per-worker pool of open handles.

    ``read(i, epoch)`` reads tile ``i`` (the epoch does not matter): the region of ``size0`` level-0 pixels at
    its corner, from the coarsest level that still has at least the output resolution, resized to
    ``tile_size``. A slide that cannot be opened or read is skipped (reported with the tile) and the next
    tile of another slide is returned.

    Args:
        table: The tiles.
        source: What to name in messages.
        open_per_worker: Slides each process keeps open.
        skipped: ``(what, reason)`` found before training (missing slides, unreadable coordinate files).
    """

    shuffle = True

    def __init__(
        self, table: CoordTable, source: str, open_per_worker: int = 16, skipped: list[tuple[str, str]] | None = None
    ) -> None:
        if not len(table):
            raise MultiteachError(f"No tile coordinates in {source!r}.")
        self.table, self.source = table, source
        self.skipped_at_start = list(skipped or [])
        self.pool = SlidePool(open_per_worker)
        self._bad: dict[int, str] = {}  # slide index -> reason, in this process

    def __len__(self) -> int:
        return len(self.table)

    @property
    def paths(self) -> list[str]:
        """Every tile's provenance (``slide@x,y@mpp``), by tile index: what a teacher-feature cache keys."""
        return [self.table.provenance(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> Image.Image:
        return self.read(index, 0).image

    def _read(self, i: int) -> Image.Image:
        t = self.table
        s = int(t.slide_of[i])
        slide = self.pool.get(t.slides[s])
        size0, out, level = float(t.size0[s]), int(t.tile_size[s]), int(t.level[s])
        if level < 0:
            level = choose_level(list(slide.level_downsamples), size0 / out)
            side = max(1, round(size0 / slide.level_downsamples[level]))
        else:
            side = round(size0)
        x, y = (int(v) for v in t.xy[i])
        return read_square(slide, x, y, level, side, out, resample=Image.Resampling.BILINEAR)

    def read(self, index: int, epoch: int) -> SourceTile:
        """Tile ``index`` read from its slide (the next readable slide's tile when its slide fails)."""
        return read_or_next(
            index,
            len(self),
            lambda i: None if int(self.table.slide_of[i]) in self._bad else (self._read(i), self.table.provenance(i)),
            slide_errors(),
            self._failed,
            f"All {len(self.table.slides)} slide(s) of {self.source!r} are unreadable; see the log.",
        )

    def _failed(self, i: int, err: BaseException) -> tuple[str, str]:
        s = int(self.table.slide_of[i])
        reason = failure_reason(err)
        self._bad[s] = reason
        self.pool.drop(self.table.slides[s])
        logger.warning("skipping unreadable slide %s (%s)", self.table.slides[s], reason)
        return self.table.slides[s], reason

    def describe(self) -> dict[str, Any]:
        """Facts for ``data.json``."""
        return {
            "kind": "coords",
            "source": self.source,
            "samples": len(self),
            "slides": len(self.table.slides),
            "skipped": [{"what": w, "reason": r} for w, r in self.skipped_at_start],
        }
