"""Whole-slide images: tissue detection, tile planning at a target resolution, streaming and export.

Resolutions are in µm/px ("mpp"); tile coordinates are level-0 pixels (the slide's full-resolution
grid, as in ``OpenSlide.read_region``). Modules:

- ``slide``: opening slides with OpenSlide, level-0 mpp from metadata or overrides, level choice.
- ``tissue``: tissue mask from Otsu's threshold on the saturation of a bounded-memory thumbnail.
- ``plan``: ``plan_tiles`` lays a grid, keeps the tissue tiles as a ``TileGrid`` (CSV round trip).
- ``dataset``: ``WSITileDataset`` streams planned tiles from many slides, one handle set per worker.
- ``write``: ``write_tiles`` (CLI: ``multiteach tile``) exports tiles plus a ``coordinates.csv``.
"""

from multiteach.data.wsi.dataset import WSITileDataset
from multiteach.data.wsi.plan import CSV_COLUMNS, TileGrid, plan_tiles, read_tile
from multiteach.data.wsi.slide import (
    INSTALL_HINT,
    MPP_KEYS,
    MPP_TOLERANCE,
    PLAUSIBLE_MPP,
    PathLike,
    SlideSource,
    choose_level,
    logger,
    open_slide,
    slide_mpp,
    slides_hint,
)
from multiteach.data.wsi.tissue import (
    DEFAULT_MIN_SATURATION,
    DEFAULT_THUMB_SIZE,
    MEDIAN_SIZE,
    OPEN_SIZE,
    otsu_threshold,
    slide_thumbnail,
    tissue_fraction,
    tissue_mask,
)
from multiteach.data.wsi.write import TILE_FORMATS, TileWriteResult, expand_slide_lists, read_slide_csv, write_tiles

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_MIN_SATURATION",
    "DEFAULT_THUMB_SIZE",
    "INSTALL_HINT",
    "MEDIAN_SIZE",
    "MPP_KEYS",
    "MPP_TOLERANCE",
    "OPEN_SIZE",
    "PLAUSIBLE_MPP",
    "TILE_FORMATS",
    "PathLike",
    "SlideSource",
    "TileGrid",
    "TileWriteResult",
    "WSITileDataset",
    "choose_level",
    "expand_slide_lists",
    "logger",
    "open_slide",
    "otsu_threshold",
    "plan_tiles",
    "read_slide_csv",
    "read_tile",
    "slide_mpp",
    "slide_thumbnail",
    "slides_hint",
    "tissue_fraction",
    "tissue_mask",
    "write_tiles",
]
