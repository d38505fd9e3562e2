"""Reading whole-slide images (the lowest data floor; it knows no dataset and no list).

Resolutions are in µm/px ("mpp"); coordinates are level-0 pixels (the slide's full-resolution grid, as in
``OpenSlide.read_region``). Modules:

- ``slide``: opening slides with OpenSlide, level-0 mpp from metadata or overrides, level choice, scanned bounds,
  flattening a read region onto the slide's background.
- ``tissue``: tissue mask from Otsu's threshold on the saturation of a bounded-memory thumbnail.
- ``pool``: ``SlidePool``, each process's least-recently-used open slides.
"""

import importlib
import warnings
from typing import Any

from multiteach.data.wsi.pool import SlidePool
from multiteach.data.wsi.slide import (
    INSTALL_HINT,
    MPP_KEYS,
    MPP_TOLERANCE,
    PLAUSIBLE_MPP,
    PathLike,
    SlideOrPath,
    choose_level,
    logger,
    open_slide,
    slide_mpp,
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

__all__ = [
    "DEFAULT_MIN_SATURATION",
    "DEFAULT_THUMB_SIZE",
    "INSTALL_HINT",
    "MEDIAN_SIZE",
    "MPP_KEYS",
    "MPP_TOLERANCE",
    "OPEN_SIZE",
    "PLAUSIBLE_MPP",
    "PathLike",
    "SlidePool",
    "SlideOrPath",
    "choose_level",
    "logger",
    "open_slide",
    "otsu_threshold",
    "slide_mpp",
    "slide_thumbnail",
    "tissue_fraction",
    "tissue_mask",
]

#: Names an earlier multiteach exported from ``multiteach.data.wsi``, with their new home (offline tiling and slide
#: lists sit on higher floors now). Still importable from here, with a DeprecationWarning.
MOVED = {
    "WSITileDataset": "multiteach.data.tiling",
    "TileGrid": "multiteach.data.tiling",
    "CSV_COLUMNS": "multiteach.data.tiling",
    "TILE_FORMATS": "multiteach.data.tiling",
    "TileWriteResult": "multiteach.data.tiling",
    "plan_tiles": "multiteach.data.tiling",
    "read_tile": "multiteach.data.tiling",
    "write_tiles": "multiteach.data.tiling",
    "expand_slide_lists": "multiteach.data.tiling",
    "read_slide_csv": "multiteach.data.lists.slide_list",
    "slides_hint": "multiteach.data.lists.slide_list",
}


def __getattr__(name: str) -> Any:
    """The moved names of :data:`MOVED`, forwarded to their new home with a DeprecationWarning."""
    home = MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"multiteach.data.wsi.{name} moved to {home}; import it from there", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(home), name)
