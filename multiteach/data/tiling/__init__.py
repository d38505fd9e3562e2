"""Offline tiling (``multiteach tile``): plan a tissue grid at a target resolution, stream it, write tiles.

- ``plan``: ``plan_tiles`` lays a grid, keeps the tissue tiles as a ``TileGrid`` (CSV round trip).
- ``dataset``: ``WSITileDataset`` streams planned tiles from many slides, one handle set per worker.
- ``write``: ``write_tiles`` exports tiles plus a ``coordinates.csv``.
"""

from multiteach.data.tiling.dataset import WSITileDataset
from multiteach.data.tiling.plan import CSV_COLUMNS, TileGrid, plan_tiles, read_tile
from multiteach.data.tiling.write import TILE_FORMATS, TileWriteResult, expand_slide_lists, write_tiles

__all__ = [
    "CSV_COLUMNS",
    "TILE_FORMATS",
    "TileGrid",
    "TileWriteResult",
    "WSITileDataset",
    "expand_slide_lists",
    "plan_tiles",
    "read_tile",
    "write_tiles",
]
