"""Online patching (the top data floor): training tiles drawn at tissue positions straight from whole-slide images.

- ``targets``: which pyramid level each (slide, target µm/px) reads and whether the slide can serve it.
- ``sampler``: ``SlideSource``, the seeded sampler (``read(index, epoch)`` is a pure function of seed, epoch and
  index), and :func:`open_slide_source` for a recipe's ``data.slides``.
- ``freeze``: :func:`sample_positions` writes a stream's first N positions as a coordinate CSV.
"""

from multiteach.data.online.freeze import sample_positions
from multiteach.data.online.sampler import (
    HSV_MIN_FRACTION,
    SlideSource,
    TileDraw,
    hsv_tissue_fraction,
    open_slide_source,
)
from multiteach.data.online.targets import MAX_READ_FACTOR, UPSAMPLE_TOLERANCE, TargetPlan, plan_targets

__all__ = [
    "HSV_MIN_FRACTION",
    "MAX_READ_FACTOR",
    "UPSAMPLE_TOLERANCE",
    "SlideSource",
    "TargetPlan",
    "TileDraw",
    "hsv_tissue_fraction",
    "open_slide_source",
    "plan_targets",
    "sample_positions",
]
