"""Reading whole-slide images (the lowest data floor; it knows no dataset and no list).

Resolutions are in µm/px ("mpp"); coordinates are level-0 pixels (the slide's full-resolution grid, as in
``OpenSlide.read_region``). Modules:

- ``slide``: opening slides with OpenSlide, level-0 mpp from metadata or overrides, level choice, scanned bounds,
  flattening a read region onto the slide's background.
- ``tissue``: tissue mask from Otsu's threshold on the saturation of a bounded-memory thumbnail.
- ``pool``: ``SlidePool``, each process's least-recently-used open slides.
"""

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
