"""Streaming tissue tiles from many whole-slide images without writing them out.

``WSITileDataset`` plans every slide up front and reads tiles on demand; each DataLoader worker
opens its own slide handles (OpenSlide handles cannot be pickled or shared across ``fork``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from multiteach.data.tiling.plan import TileGrid, _plan_one, _prepare, read_tile
from multiteach.data.wsi.pool import SlidePool
from multiteach.data.wsi.slide import PathLike, failure_reason, logger, slide_errors
from multiteach.data.wsi.tissue import DEFAULT_THUMB_SIZE
from multiteach.errors import MultiteachError


class WSITileDataset:
    """Map-style dataset streaming tissue tiles from whole-slide images, without extracting them.

    Tiles are planned (``plan_tiles``) for every slide when the dataset is built, in this process;
    pass ``TileGrid`` objects (e.g. ``TileGrid.from_csv``) instead of paths to reuse saved plans.
    Slides are opened lazily in whichever process reads them: OpenSlide handles cannot be pickled
    or shared across ``fork``, so each DataLoader worker opens its own (at most ``max_open`` at a
    time, least recently used closed first).

    ``dataset[i]`` returns ``transform(tile)`` for an RGB PIL tile of ``tile_size`` pixels at
    ``target_mpp`` µm/px (the tile itself when ``transform`` is None). Tiles run slide by slide, in
    grid order. A slide that cannot be opened, planned or read is logged once on the
    ``multiteach.data`` logger, listed in ``skipped`` and, if it fails while reading, replaced by
    the first tile of the next readable slide.

    Args:
        slides: Slide paths and/or ``TileGrid`` plans.
        transform: Callable applied to each RGB PIL tile.
        target_mpp: µm/px of the tiles.
        tile_size: Side of the tiles in pixels.
        overlap: Fraction of a tile shared by neighbours, in ``[0, 1)``.
        min_tissue: Lowest tissue fraction of a kept tile, in ``[0, 1]``.
        mpp: Level-0 µm/px override applied to every slide path (not to ``TileGrid`` entries).
        mpp_overrides: Per-slide level-0 µm/px, keyed by path, file name or stem; wins over ``mpp``.
        thumb_size: Longer side of the tissue-mask thumbnails in pixels.
        max_open: Most slides kept open per process.

    Raises:
        MultiteachError: For bad arguments, an ``mpp_overrides`` key naming no slide, when every
            slide is unreadable, or when no slide has a tile.
    """

    def __init__(
        self,
        slides: Sequence[PathLike | TileGrid],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        target_mpp: float = 0.5,
        tile_size: int = 224,
        overlap: float = 0.0,
        min_tissue: float = 0.5,
        mpp: float | None = None,
        mpp_overrides: Mapping[str, float] | None = None,
        thumb_size: int = DEFAULT_THUMB_SIZE,
        max_open: int = 64,
    ) -> None:
        self.transform = transform
        self.max_open = max(1, int(max_open))
        slides, args, lookup = _prepare(
            slides,
            "WSITileDataset",
            target_mpp=target_mpp,
            tile_size=tile_size,
            overlap=overlap,
            min_tissue=min_tissue,
            mpp=mpp,
            mpp_overrides=mpp_overrides,
            thumb_size=thumb_size,
        )
        self._skipped: dict[str, str] = {}
        self.grids: list[TileGrid] = []
        for s in slides:
            planned = _plan_one(s, args, lookup)
            if isinstance(planned, str):
                self._skipped[str(s)] = planned
            else:
                self.grids.append(planned)
        if not self.grids:
            first = next(iter(self._skipped.values()), "")
            raise MultiteachError(f"All {len(slides)} slide(s) are unreadable. First error: {first}")
        counts = np.array([len(g) for g in self.grids], dtype=np.int64)
        if counts.sum() == 0:
            raise MultiteachError(
                f"No tiles with tissue fraction >= {min_tissue} on {len(self.grids)} readable slide(s) at "
                f"{target_mpp} µm/px, {tile_size} px; lower min_tissue (--min-tissue) or check the slides."
            )
        self._ends = np.cumsum(counts)
        self._pool = SlidePool(self.max_open)  # each worker process opens its own handles

    @property
    def skipped(self) -> list[Path]:
        """Slides skipped so far in this process (at planning, or when a read failed), in order."""
        return [Path(s) for s in self._skipped]

    @property
    def skip_reasons(self) -> dict[str, str]:
        """``{slide: reason}`` for every skipped slide."""
        return dict(self._skipped)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} tiles")
        index %= n
        g = int(np.searchsorted(self._ends, index, side="right"))
        return g, index - (int(self._ends[g - 1]) if g else 0)

    def locate(self, index: int) -> tuple[TileGrid, int]:
        """``(grid, tile index within it)`` of dataset item ``index``; ``grid.coords[j]`` is its level-0 (x, y)."""
        g, local = self._locate(index)
        return self.grids[g], local

    def _drop(self, slide: str, err: BaseException) -> None:
        self._pool.drop(slide)
        if slide not in self._skipped:
            reason = failure_reason(err)
            self._skipped[slide] = reason
            logger.warning("skipping unreadable slide %s (%s)", slide, reason)

    def __getitem__(self, index: int) -> Any:
        g, local = self._locate(index)
        errors = slide_errors()
        for step in range(len(self.grids)):
            grid = self.grids[(g + step) % len(self.grids)]
            if step:
                local = 0
            if grid.slide in self._skipped or len(grid) == 0:
                continue
            try:
                tile = read_tile(self._pool.get(grid.slide), grid, local)
            except errors as err:
                self._drop(grid.slide, err)
                continue
            return tile if self.transform is None else self.transform(tile)
        raise MultiteachError(
            f"All {len(self.grids)} slide(s) became unreadable; see the multiteach.data log ({self.skip_reasons})."
        )

    def close(self) -> None:
        """Close the slide handles this process opened."""
        self._pool.close()
