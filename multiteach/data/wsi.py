"""Whole-slide images: tissue detection, tile planning at a target resolution, streaming and export.

Units used throughout: resolutions in **µm/px** ("mpp"); tile coordinates in **level-0 pixels**
(the slide's full-resolution pixel grid), the convention of ``OpenSlide.read_region``.

The pipeline for one slide:

1. ``open_slide`` opens it with OpenSlide (``pip install 'multiteach[wsi]'``).
2. ``slide_mpp`` reads the level-0 resolution from the metadata, or takes an override.
3. ``tissue_mask`` thresholds the HSV saturation of a low-resolution thumbnail with Otsu's method.
4. ``plan_tiles`` picks the pyramid level to read from, lays a regular grid at the target resolution
   and keeps the tiles whose tissue fraction reaches ``min_tissue``: a ``TileGrid``.

``WSITileDataset`` streams the planned tiles from many slides without writing them out (each
DataLoader worker opens its own slide handles), and ``write_tiles`` (CLI: ``multiteach tile``) exports
them as image files plus a ``coordinates.csv`` per slide.

Only files OpenSlide recognises as slides are accepted (Aperio, Hamamatsu, Leica, MIRAX, Philips,
Sakura, Ventana, Zeiss, DICOM and tiled, optionally pyramidal, generic TIFF). Plain JPEG/PNG images
and untiled TIFFs are rejected: use ``TileDataset`` for pre-extracted tiles.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image, ImageFilter

from multiteach.errors import MultiteachError, did_you_mean

if TYPE_CHECKING:
    from openslide import OpenSlide

logger = logging.getLogger("multiteach.data")

SlideSource = Union[str, "os.PathLike[str]", "OpenSlide"]
PathLike = Union[str, "os.PathLike[str]"]

INSTALL_HINT = "pip install 'multiteach[wsi]'"
# Metadata keys holding the level-0 resolution in µm/px, most specific first. OpenSlide normalises
# most vendors (and TIFF resolution tags) into openslide.mpp-x/y; aperio.MPP is the raw Aperio field.
MPP_KEYS: tuple[tuple[str, str], ...] = (("openslide.mpp-x", "openslide.mpp-y"), ("aperio.MPP", "aperio.MPP"))
# A level counts as "not coarser than the target" up to this relative slack: pyramid downsamples
# are rarely exact (e.g. 2.0005), and a level at 1.0005 µm/px should serve a 1.0 µm/px target.
MPP_TOLERANCE = 0.01
DEFAULT_THUMB_SIZE = 1024
DEFAULT_MIN_SATURATION = 15
MEDIAN_SIZE = 5  # median filter on the saturation thumbnail before thresholding (pixels)
OPEN_SIZE = 3  # morphological opening of the mask (pixels): removes isolated specks
PLAUSIBLE_MPP = (0.05, 10.0)  # outside this, a value is more likely a magnification (20x) than µm/px
_STRIP_PIXELS = 16 * 1024 * 1024  # level pixels read at once while building a thumbnail (64 MiB RGBA)
TILE_FORMATS: dict[str, tuple[str, str]] = {"jpg": ("JPEG", ".jpg"), "jpeg": ("JPEG", ".jpg"), "png": ("PNG", ".png")}
CSV_COLUMNS: tuple[str, ...] = ("slide", "x", "y", "level", "target_mpp", "tile_size", "level_mpp", "read_size")


# --------------------------------------------------------------------------------------------------
# Opening slides and reading their resolution
# --------------------------------------------------------------------------------------------------


def _import_openslide() -> Any:
    try:
        import openslide
    except (ImportError, OSError) as err:  # OSError: openslide-python present, C library missing
        raise MultiteachError(
            f"Reading whole-slide images needs OpenSlide, which could not be imported ({err}). "
            f"Install it with: {INSTALL_HINT} (openslide-python + openslide-bin)."
        ) from err
    return openslide


def _slide_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this slide cannot be opened or read" (not a bug in the caller)."""
    openslide = _import_openslide()
    return (MultiteachError, openslide.OpenSlideError, OSError)


def _slide_name(slide: Any) -> str:
    # openslide.OpenSlide keeps its path in ``_filename`` (its repr shows it); fall back to repr.
    name = getattr(slide, "_filename", None)
    return str(name) if name is not None else repr(slide)


def open_slide(path: PathLike) -> OpenSlide:
    """Open a whole-slide image with OpenSlide.

    Only real slides are accepted (``openslide.OpenSlide``, not openslide-python's ``open_slide``
    fallback that wraps any PIL image): plain JPEG/PNG files and untiled TIFFs carry no pyramid and
    usually no resolution, so they are refused with a pointer to ``TileDataset``.

    Args:
        path: The slide file (``.svs``, ``.ndpi``, ``.mrxs``, tiled ``.tif``, ...).

    Returns:
        An open ``openslide.OpenSlide``; close it (or use it as a context manager) when done.

    Raises:
        MultiteachError: If the path is missing or a folder, openslide is not installed, or the file
            is not a slide OpenSlide can read.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MultiteachError(f"Slide {str(path)!r} does not exist.")
    if path.is_dir():
        raise MultiteachError(f"Slide {str(path)!r} is a folder; pass the slide file itself (e.g. the .mrxs or .dcm).")
    openslide = _import_openslide()
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as err:
        raise MultiteachError(
            f"{str(path)!r} is not a whole-slide image OpenSlide can read (format not recognised). "
            "Plain JPEG/PNG images and untiled TIFFs are not slides: load pre-extracted tiles with TileDataset, "
            "or convert the image to a tiled pyramidal TIFF."
        ) from err
    except (openslide.OpenSlideError, OSError) as err:
        raise MultiteachError(f"Slide {str(path)!r} could not be opened: {type(err).__name__}: {err}") from err


def _check_mpp(value: float, what: str) -> float:
    try:
        mpp = float(value)
    except (TypeError, ValueError) as err:
        raise MultiteachError(f"{what} must be a number of µm/px, got {value!r}.") from err
    if not math.isfinite(mpp) or mpp <= 0:
        raise MultiteachError(f"{what} must be a positive number of µm/px, got {value!r}.")
    lo, hi = PLAUSIBLE_MPP
    if not lo <= mpp <= hi:
        logger.warning(
            "%s = %g µm/px is unusual; resolutions are µm per pixel, not magnifications (20x ≈ 0.5, 40x ≈ 0.25)",
            what,
            mpp,
        )
    return mpp


def slide_mpp(slide: OpenSlide, override: float | None = None) -> float:
    """The level-0 resolution of a slide in µm/px.

    Read from ``openslide.mpp-x``/``openslide.mpp-y`` (their mean when both exist), else from
    ``aperio.MPP``. ``override`` wins over the metadata.

    Args:
        slide: An open slide.
        override: Level-0 µm/px to use instead of the metadata (the CLI's ``--mpp``).

    Returns:
        Level-0 µm/px.

    Raises:
        MultiteachError: If the slide records no usable resolution and no override was given, or
            the override is not a positive number.
    """
    if override is not None:
        return _check_mpp(override, "mpp override")
    props = slide.properties
    bad: list[str] = []
    for key_x, key_y in MPP_KEYS:
        values = []
        for key in dict.fromkeys((key_x, key_y)):
            raw = props.get(key)
            if raw is None:
                continue
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if math.isfinite(value) and value > 0:
                values.append(value)
            else:
                bad.append(f"{key}={raw!r}")
        if values:
            if len(values) == 2 and abs(values[0] - values[1]) > MPP_TOLERANCE * max(values):
                logger.warning(
                    "slide %s has anisotropic pixels (%s=%s, %s=%s); using their mean",
                    _slide_name(slide),
                    key_x,
                    values[0],
                    key_y,
                    values[1],
                )
            return sum(values) / len(values)
    found = f" (unusable values: {', '.join(bad)})" if bad else ""
    raise MultiteachError(
        f"Slide {_slide_name(slide)!r} records no resolution (no openslide.mpp-x or aperio.MPP){found}. "
        "Give its level-0 µm/px with --mpp (mpp= in Python), e.g. --mpp 0.5 for a 20x scan, 0.25 for 40x."
    )


# --------------------------------------------------------------------------------------------------
# Tissue detection
# --------------------------------------------------------------------------------------------------


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


def _composite(region: Image.Image, background: str) -> Image.Image:
    """Flatten OpenSlide's RGBA (transparent = not scanned) onto the slide's background colour."""
    rgb = Image.new("RGB", region.size, background)
    rgb.paste(region, None, region)
    return rgb


def _background(slide: OpenSlide) -> str:
    return "#" + slide.properties.get("openslide.background-color", "ffffff")


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
    bg = _background(slide)
    thumb = Image.new("RGB", (tw, th), bg)
    for r0 in range(0, th, out_rows):
        r1 = min(th, r0 + out_rows)
        y0 = min(lh - 1, round(r0 / rows_per_level_row))
        y1 = min(lh, max(y0 + 1, round(r1 / rows_per_level_row)))
        region = slide.read_region((0, round(y0 * level_down)), level, (lw, y1 - y0))
        thumb.paste(_composite(region, bg).resize((tw, r1 - r0), Image.Resampling.BOX), (0, r0))
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


# --------------------------------------------------------------------------------------------------
# Tile planning
# --------------------------------------------------------------------------------------------------


def choose_level(level_mpps: Sequence[float], target_mpp: float, tolerance: float = MPP_TOLERANCE) -> int:
    """The pyramid level to read for a target resolution.

    Rule: the coarsest level whose resolution is still at least as fine as the target
    (``level_mpp <= target_mpp * (1 + tolerance)``), i.e. the closest level at or below the target,
    so tiles are only ever downsampled. When every level is coarser than the target, level 0 (the
    finest) is returned and tiles are upsampled.

    Args:
        level_mpps: µm/px of each level, finest first.
        target_mpp: Wanted µm/px.
        tolerance: Relative slack for inexact pyramid downsamples (1% by default).

    Returns:
        The level index.
    """
    limit = target_mpp * (1.0 + tolerance)
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= limit]
    if not fine_enough:
        return int(np.argmin(level_mpps))
    return max(fine_enough, key=lambda i: level_mpps[i])


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
        _atomic_write_csv(path, CSV_COLUMNS, self.rows())
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
    target = _check_mpp(target_mpp, "target_mpp")
    if int(tile_size) != tile_size or tile_size < 1:
        raise MultiteachError(f"tile_size must be a positive whole number of pixels, got {tile_size!r}.")
    if not 0.0 <= overlap < 1.0:
        raise MultiteachError(f"overlap must be a fraction of the tile in [0, 1), got {overlap!r}.")
    if not 0.0 <= min_tissue <= 1.0:
        raise MultiteachError(f"min_tissue must be a fraction in [0, 1], got {min_tissue!r}.")
    if int(thumb_size) != thumb_size or thumb_size < 16:
        raise MultiteachError(f"thumb_size must be a whole number of pixels >= 16, got {thumb_size!r}.")
    return target


def _slide_bounds(slide: OpenSlide) -> tuple[int, int, int, int]:
    """``(x, y, width, height)`` of the scanned area in level-0 pixels (the whole image if unrecorded)."""
    width0, height0 = slide.dimensions
    props = slide.properties
    try:
        bx = int(props.get("openslide.bounds-x", 0))
        by = int(props.get("openslide.bounds-y", 0))
        bw = int(props.get("openslide.bounds-width", width0 - bx))
        bh = int(props.get("openslide.bounds-height", height0 - by))
    except ValueError:
        return 0, 0, width0, height0
    bx, by = max(0, bx), max(0, by)
    return bx, by, max(0, min(bw, width0 - bx)), max(0, min(bh, height0 - by))


def plan_tiles(
    slide: SlideSource,
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
    name = _slide_name(slide)
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
    bx, by, bw, bh = _slide_bounds(slide)
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
    region = slide.read_region((x, y), grid.level, (grid.read_size, grid.read_size))
    tile = _composite(region, _background(slide))
    if grid.read_size != grid.tile_size:
        tile = tile.resize((grid.tile_size, grid.tile_size), Image.Resampling.LANCZOS)
    return tile


# --------------------------------------------------------------------------------------------------
# Many slides: overrides, streaming dataset, export
# --------------------------------------------------------------------------------------------------


def _override_lookup(
    slides: Sequence[PathLike], mpp: float | None, mpp_overrides: Mapping[str, float] | None
) -> Callable[[PathLike], float | None]:
    """Resolve each slide's mpp override: ``mpp_overrides`` (keyed by path, file name or stem), else ``mpp``."""
    overrides = dict(mpp_overrides or {})
    index: dict[str, str] = {}
    for s in slides:
        p = Path(s).expanduser()
        for alias in (str(s), str(p), os.path.abspath(p), p.name, p.stem):
            index.setdefault(alias, str(s))
    unknown = [k for k in overrides if str(k) not in index]
    if unknown:
        names = sorted({Path(s).name for s in slides})
        raise MultiteachError(
            f"mpp_overrides names slide(s) not in the list: {', '.join(map(str, unknown))}. "
            "Keys may be a slide's path, file name or stem." + did_you_mean(str(unknown[0]), names)
        )
    by_slide: dict[str, float] = {}
    for key, value in overrides.items():
        by_slide[index[str(key)]] = _check_mpp(value, f"mpp_overrides[{key!r}]")

    def lookup(slide: PathLike) -> float | None:
        return by_slide.get(str(slide), mpp)

    return lookup


@dataclass(frozen=True)
class _PlanArgs:
    target_mpp: float
    tile_size: int
    overlap: float
    min_tissue: float
    thumb_size: int


def _prepare(
    slides: Sequence[PathLike | TileGrid],
    *,
    target_mpp: float,
    tile_size: int,
    overlap: float,
    min_tissue: float,
    mpp: float | None,
    mpp_overrides: Mapping[str, float] | None,
    thumb_size: int,
) -> tuple[_PlanArgs, Callable[[PathLike], float | None]]:
    """Check every argument before any slide is touched; returns the plan settings and the mpp lookup."""
    _check_plan_args(target_mpp, tile_size, overlap, min_tissue, thumb_size)
    if mpp is not None:
        _check_mpp(mpp, "mpp override")
    _import_openslide()
    lookup = _override_lookup([s for s in slides if not isinstance(s, TileGrid)], mpp, mpp_overrides)
    return _PlanArgs(float(target_mpp), int(tile_size), float(overlap), float(min_tissue), int(thumb_size)), lookup


def _reason(err: BaseException) -> str:
    return str(err) if isinstance(err, MultiteachError) else f"{type(err).__name__}: {err}"


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
    except _slide_errors() as err:
        reason = _reason(err)
        logger.warning("skipping slide %s: %s", slide, reason)
        return reason


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
        if isinstance(slides, (str, os.PathLike, TileGrid)):
            slides = [slides]
        if not slides:
            raise MultiteachError("WSITileDataset got no slides.")
        self.transform = transform
        self.max_open = max(1, int(max_open))
        args, lookup = _prepare(
            slides,
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
        self._pid = os.getpid()
        self._handles: OrderedDict[str, Any] = OrderedDict()

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

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # handles are not picklable; workers reopen
        return state

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

    def _handle(self, slide: str) -> Any:
        if self._pid != os.getpid():  # forked worker: the inherited handles belong to the parent
            self._handles = OrderedDict()
            self._pid = os.getpid()
        handle = self._handles.get(slide)
        if handle is None:
            handle = open_slide(slide)
            self._handles[slide] = handle
            while len(self._handles) > self.max_open:
                _, old = self._handles.popitem(last=False)
                old.close()
        else:
            self._handles.move_to_end(slide)
        return handle

    def _drop(self, slide: str, err: BaseException) -> None:
        handle = self._handles.pop(slide, None)
        if handle is not None:
            handle.close()
        if slide not in self._skipped:
            reason = _reason(err)
            self._skipped[slide] = reason
            logger.warning("skipping unreadable slide %s (%s)", slide, reason)

    def __getitem__(self, index: int) -> Any:
        g, local = self._locate(index)
        errors = _slide_errors()
        for step in range(len(self.grids)):
            grid = self.grids[(g + step) % len(self.grids)]
            if step:
                local = 0
            if grid.slide in self._skipped or len(grid) == 0:
                continue
            try:
                tile = read_tile(self._handle(grid.slide), grid, local)
            except errors as err:
                self._drop(grid.slide, err)
                continue
            return tile if self.transform is None else self.transform(tile)
        raise MultiteachError(
            f"All {len(self.grids)} slide(s) became unreadable; see the multiteach.data log ({self.skip_reasons})."
        )

    def close(self) -> None:
        """Close the slide handles this process opened."""
        while self._handles:
            _, handle = self._handles.popitem()
            handle.close()


@dataclass
class TileWriteResult:
    """What ``write_tiles`` did.

    Attributes:
        counts: ``{slide: tiles written}`` for each slide written completely.
        csv_paths: ``{slide: its coordinates.csv}`` for the same slides.
        skipped: ``{slide: reason}`` for slides that failed (their folder may hold some tiles but no CSV).
    """

    counts: dict[str, int] = field(default_factory=dict)
    csv_paths: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Tiles written over all slides."""
        return sum(self.counts.values())


def _atomic_write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save(image: Image.Image, path: Path, pil_format: str, **options: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format=pil_format, **options)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unique_folder(stem: str, used: set[str]) -> str:
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def write_tiles(
    slides: Sequence[PathLike | TileGrid],
    out_dir: PathLike,
    *,
    target_mpp: float = 0.5,
    tile_size: int = 224,
    overlap: float = 0.0,
    min_tissue: float = 0.5,
    mpp: float | None = None,
    mpp_overrides: Mapping[str, float] | None = None,
    image_format: str = "jpg",
    quality: int = 90,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    progress: Callable[[str], None] | None = None,
) -> TileWriteResult:
    """Export the tissue tiles of many slides as image files plus one ``coordinates.csv`` per slide.

    Layout: ``out_dir/<slide stem>/<stem>_x<X>_y<Y>.<ext>`` (``X``, ``Y`` in level-0 pixels; a
    repeated stem gets ``-2``, ``-3``, ... on its folder) and ``out_dir/<stem>/coordinates.csv`` with
    columns ``file`` + ``CSV_COLUMNS`` (readable by ``TileGrid.from_csv``). Every file is written to
    a temporary name and renamed into place, so no half-written tile or CSV ever carries a final
    name; the CSV is written last, so its presence marks a completely written slide. A slide that
    fails (open, plan or read) is logged, reported in ``skipped`` and the rest go on.

    Args:
        slides: Slide paths and/or ``TileGrid`` plans.
        out_dir: Output folder (created).
        target_mpp: µm/px of the tiles.
        tile_size: Side of the tiles in pixels.
        overlap: Fraction of a tile shared by neighbours, in ``[0, 1)``.
        min_tissue: Lowest tissue fraction of a kept tile, in ``[0, 1]``.
        mpp: Level-0 µm/px override for every slide path.
        mpp_overrides: Per-slide level-0 µm/px keyed by path, file name or stem; wins over ``mpp``.
        image_format: ``"jpg"`` (``"jpeg"``) or ``"png"``.
        quality: JPEG quality, 1-100 (above 95 mostly grows the files).
        thumb_size: Longer side of the tissue-mask thumbnails in pixels.
        progress: Called with one human-readable line per slide written, as it finishes (e.g.
            ``print``); failures go to the ``multiteach.data`` logger instead.

    Returns:
        A ``TileWriteResult`` with per-slide counts, CSV paths and skipped slides.

    Raises:
        MultiteachError: For bad arguments, or when every slide failed.
    """
    fmt = str(image_format).lower().lstrip(".")
    if fmt not in TILE_FORMATS:
        raise MultiteachError(
            f"Unknown tile format {image_format!r}; allowed: jpg, png." + did_you_mean(fmt, TILE_FORMATS)
        )
    if not 1 <= int(quality) <= 100:
        raise MultiteachError(f"quality must be in 1..100, got {quality!r}.")
    if isinstance(slides, (str, os.PathLike, TileGrid)):
        slides = [slides]
    if not slides:
        raise MultiteachError("write_tiles got no slides.")
    args, lookup = _prepare(
        slides,
        target_mpp=target_mpp,
        tile_size=tile_size,
        overlap=overlap,
        min_tissue=min_tissue,
        mpp=mpp,
        mpp_overrides=mpp_overrides,
        thumb_size=thumb_size,
    )
    pil_format, ext = TILE_FORMATS[fmt]
    options: dict[str, Any] = {"quality": int(quality)} if pil_format == "JPEG" else {}
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda line: None)
    result = TileWriteResult()
    used: set[str] = set()
    errors = _slide_errors()
    for s in slides:
        key = s.slide if isinstance(s, TileGrid) else str(s)
        grid = _plan_one(s, args, lookup)
        if isinstance(grid, str):
            result.skipped[key] = grid
            continue
        stem = Path(grid.slide).stem
        folder = out / _unique_folder(stem, used)
        folder.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        try:
            with open_slide(grid.slide) as handle:
                for i, row in enumerate(grid.rows()):
                    name = f"{stem}_x{row['x']}_y{row['y']}{ext}"
                    _atomic_save(read_tile(handle, grid, i), folder / name, pil_format, **options)
                    rows.append({"file": name, **row})
            csv_path = folder / "coordinates.csv"
            _atomic_write_csv(csv_path, ("file", *CSV_COLUMNS), rows)
        except errors as err:
            reason = f"{_reason(err)} (after {len(rows)} of {len(grid)} tiles)"
            result.skipped[key] = reason
            logger.warning("skipping slide %s: %s", key, reason)
            continue
        result.counts[key] = len(rows)
        result.csv_paths[key] = csv_path
        report(
            f"{Path(key).name}: {len(rows)} tiles (level {grid.level}, {grid.level_mpp:.4g} -> "
            f"{grid.target_mpp:g} µm/px, {grid.tile_size} px) -> {csv_path}"
        )
    if not result.counts:
        first = next(iter(result.skipped.values()), "")
        raise MultiteachError(f"All {len(slides)} slide(s) failed, nothing written. First error: {first}")
    return result
