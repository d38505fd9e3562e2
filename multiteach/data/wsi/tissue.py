"""Tissue detection: Otsu's threshold on the HSV saturation of a low-resolution slide thumbnail."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from multiteach.data.wsi.slide import background_colour, flatten_rgba

if TYPE_CHECKING:
    from openslide import OpenSlide

DEFAULT_THUMB_SIZE = 1024
DEFAULT_MIN_SATURATION = 15
MEDIAN_SIZE = 5  # median filter on the saturation thumbnail before thresholding (pixels)
OPEN_SIZE = 3  # morphological opening of the mask (pixels): removes isolated specks
_STRIP_PIXELS = 16 * 1024 * 1024  # level pixels read at once while building a thumbnail (64 MiB RGBA)


def otsu_threshold(values: np.ndarray) -> int | None:
    """Otsu's threshold of 8-bit values: the ``t`` maximising between-class variance of ``<= t`` / ``> t``.

    When several thresholds tie (an empty stretch of the histogram between the modes) the middle
    one is returned.

    Args:
        values: uint8 array of any shape.

    Returns:
        The threshold (foreground is ``values > t``), or None when all values are equal.
    """
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    if np.count_nonzero(hist) < 2:
        return None
    p = hist / hist.sum()
    omega = np.cumsum(p)  # weight of the class <= t
    mu = np.cumsum(p * np.arange(256))  # its first moment
    denom = omega * (1.0 - omega)
    between = np.zeros(256)
    ok = denom > 1e-12
    between[ok] = (mu[-1] * omega[ok] - mu[ok]) ** 2 / denom[ok]
    # Across an empty gap between the modes the criterion is flat: take the middle of the plateau
    # (the widest margin) rather than its first value, which would hug the lower mode.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return int(best[0] + best[-1]) // 2


def slide_thumbnail(slide: OpenSlide, thumb_size: int = DEFAULT_THUMB_SIZE) -> Image.Image:
    """An RGB thumbnail whose longer side is ``thumb_size`` pixels, with bounded memory.

    Unlike ``OpenSlide.get_thumbnail`` (which reads the whole source level at once, gigabytes for a
    slide without low-resolution levels) the source level is read in horizontal strips of at most
    ~16 M pixels, each area-averaged down before the next is read.

    Args:
        slide: An open slide.
        thumb_size: Longer side of the thumbnail in pixels.

    Returns:
        RGB image of size ``(round(W0 / d), round(H0 / d))`` with ``d = max(1, max(W0, H0) / thumb_size)``.
    """
    width0, height0 = slide.dimensions
    down = max(1.0, max(width0, height0) / thumb_size)  # never upsample a small image
    tw, th = max(1, round(width0 / down)), max(1, round(height0 / down))
    level = slide.get_best_level_for_downsample(down)
    lw, lh = slide.level_dimensions[level]
    level_down = slide.level_downsamples[level]
    rows_per_level_row = th / lh
    out_rows = max(1, int(_STRIP_PIXELS * rows_per_level_row // max(lw, 1)))
    bg = background_colour(slide)
    thumb = Image.new("RGB", (tw, th), bg)
    for r0 in range(0, th, out_rows):
        r1 = min(th, r0 + out_rows)
        y0 = min(lh - 1, round(r0 / rows_per_level_row))
        y1 = min(lh, max(y0 + 1, round(r1 / rows_per_level_row)))
        region = slide.read_region((0, round(y0 * level_down)), level, (lw, y1 - y0))
        thumb.paste(flatten_rgba(region, bg).resize((tw, r1 - r0), Image.Resampling.BOX), (0, r0))
    return thumb


def tissue_mask(
    slide: OpenSlide,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    min_saturation: int = DEFAULT_MIN_SATURATION,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Tissue mask from Otsu's threshold on the HSV saturation of a thumbnail.

    H&E tissue is coloured, glass and background are grey/white (saturation near 0). The saturation
    channel (0-255) is median-filtered (5x5), thresholded at ``max(otsu, min_saturation)`` (the floor
    keeps a blank slide from being split into "tissue" noise), and opened with a 3x3 window to drop
    isolated specks. Dark pen marks and coloured debris count as tissue.

    Args:
        slide: An open slide.
        thumb_size: Longer side of the thumbnail the mask is computed on, in pixels.
        min_saturation: Lowest threshold allowed on the 0-255 saturation scale.

    Returns:
        ``(mask, (sx, sy))``: a bool array of shape ``(h, w)`` (True = tissue), and the size of one
        mask pixel in level-0 pixels along x and y (``W0 / w``, ``H0 / h``).
    """
    thumb = slide_thumbnail(slide, thumb_size)
    sat = thumb.convert("HSV").getchannel("S").filter(ImageFilter.MedianFilter(MEDIAN_SIZE))
    values = np.asarray(sat)
    otsu = otsu_threshold(values)
    threshold = min_saturation if otsu is None else max(otsu, min_saturation)
    mask = Image.fromarray(((values > threshold) * 255).astype(np.uint8))
    mask = mask.filter(ImageFilter.MinFilter(OPEN_SIZE)).filter(ImageFilter.MaxFilter(OPEN_SIZE))
    width0, height0 = slide.dimensions
    return np.asarray(mask) > 0, (width0 / mask.width, height0 / mask.height)


def _pixel_span(start: np.ndarray, extent: float, scale: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask pixels whose centres lie in ``[start, start + extent)`` (level-0 px); at least one pixel."""
    lo = np.clip(np.ceil(start / scale - 0.5), 0, size).astype(np.int64)
    hi = np.clip(np.ceil((start + extent) / scale - 0.5), 0, size).astype(np.int64)
    hi = np.maximum(hi, np.minimum(lo + 1, size))
    lo = np.minimum(lo, hi - 1)
    return lo, hi


def tissue_fraction(
    mask: np.ndarray, scale: tuple[float, float], xs: np.ndarray, ys: np.ndarray, extent: tuple[float, float]
) -> np.ndarray:
    """Fraction of tissue under each tile of a grid.

    A tile covers the mask pixels whose centres fall inside its level-0 footprint (at least the one
    nearest pixel when the mask is coarser than a tile).

    Args:
        mask: Bool tissue mask, shape ``(h, w)``.
        scale: Level-0 pixels per mask pixel, ``(sx, sy)``.
        xs: Tile left edges in level-0 pixels, shape ``(nx,)``.
        ys: Tile top edges in level-0 pixels, shape ``(ny,)``.
        extent: Tile footprint ``(width, height)`` in level-0 pixels.

    Returns:
        Float array of shape ``(ny, nx)`` in ``[0, 1]``.
    """
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), dtype=np.int64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    j0, j1 = _pixel_span(np.asarray(xs, dtype=np.float64), extent[0], scale[0], w)
    i0, i1 = _pixel_span(np.asarray(ys, dtype=np.float64), extent[1], scale[1], h)
    total = (
        table[i1[:, None], j1[None, :]]
        - table[i0[:, None], j1[None, :]]
        - table[i1[:, None], j0[None, :]]
        + table[i0[:, None], j0[None, :]]
    )
    area = (i1 - i0)[:, None] * (j1 - j0)[None, :]
    return total / area
