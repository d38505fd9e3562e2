"""Opening whole-slide images with OpenSlide, reading their resolution and choosing a pyramid level.

Only files OpenSlide recognises as slides are accepted (Aperio, Hamamatsu, Leica, MIRAX, Philips,
Sakura, Ventana, Zeiss, DICOM and tiled, optionally pyramidal, generic TIFF). Plain JPEG/PNG images
and untiled TIFFs are rejected: use ``TileDataset`` for pre-extracted tiles.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from multiteach.errors import MultiteachError, did_you_mean

if TYPE_CHECKING:
    from openslide import OpenSlide

logger = logging.getLogger("multiteach.data")

SlideOrPath = Union[str, "os.PathLike[str]", "OpenSlide"]
PathLike = Union[str, "os.PathLike[str]"]

INSTALL_HINT = "pip install 'multiteach[wsi]'"
# Metadata keys holding the level-0 resolution in µm/px, most specific first. OpenSlide normalises
# most vendors (and TIFF resolution tags) into openslide.mpp-x/y; aperio.MPP is the raw Aperio field.
MPP_KEYS: tuple[tuple[str, str], ...] = (("openslide.mpp-x", "openslide.mpp-y"), ("aperio.MPP", "aperio.MPP"))
# A level counts as "not coarser than the target" up to this relative slack: pyramid downsamples
# are rarely exact (e.g. 2.0005), and a level at 1.0005 µm/px should serve a 1.0 µm/px target.
MPP_TOLERANCE = 0.01
PLAUSIBLE_MPP = (0.05, 10.0)  # outside this, a value is more likely a magnification (20x) than µm/px


def import_openslide() -> Any:
    try:
        import openslide
    except (ImportError, OSError) as err:  # OSError: openslide-python present, C library missing
        raise MultiteachError(
            f"Reading whole-slide images needs OpenSlide, which could not be imported ({err}). "
            f"Install it with: {INSTALL_HINT} (openslide-python + openslide-bin)."
        ) from err
    return openslide


def slide_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this slide cannot be opened or read" (not a bug in the caller)."""
    openslide = import_openslide()
    return (MultiteachError, openslide.OpenSlideError, OSError)


def failure_reason(err: BaseException) -> str:
    """One-line description of why a slide failed, for logs and skip lists."""
    return str(err) if isinstance(err, MultiteachError) else f"{type(err).__name__}: {err}"


def slide_name(slide: Any) -> str:
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
    openslide = import_openslide()
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


def check_mpp(value: float, what: str) -> float:
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
        return check_mpp(override, "mpp override")
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
                    slide_name(slide),
                    key_x,
                    values[0],
                    key_y,
                    values[1],
                )
            return sum(values) / len(values)
    found = f" (unusable values: {', '.join(bad)})" if bad else ""
    raise MultiteachError(
        f"Slide {slide_name(slide)!r} records no resolution (no openslide.mpp-x or aperio.MPP){found}. "
        "Give its level-0 µm/px with --mpp (mpp= in Python), e.g. --mpp 0.5 for a 20x scan, 0.25 for 40x."
    )


def mpp_override_lookup(
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
        by_slide[index[str(key)]] = check_mpp(value, f"mpp_overrides[{key!r}]")

    def lookup(slide: PathLike) -> float | None:
        return by_slide.get(str(slide), mpp)

    return lookup


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


def scanned_bounds(slide: OpenSlide) -> tuple[int, int, int, int]:
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


def flatten_rgba(region: Image.Image, background: str) -> Image.Image:
    """Flatten OpenSlide's RGBA (transparent = not scanned) onto the slide's background colour."""
    rgb = Image.new("RGB", region.size, background)
    rgb.paste(region, None, region)
    return rgb


def background_colour(slide: OpenSlide) -> str:
    return "#" + slide.properties.get("openslide.background-color", "ffffff")


def read_square(
    slide: OpenSlide,
    x: int,
    y: int,
    level: int,
    read_size: int,
    out_size: int,
    background: str | None = None,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """Read a square region, flatten it on the slide's background and resize it: what every tile reader does.

    Args:
        slide: An open slide.
        x: Left edge in level-0 pixels.
        y: Top edge in level-0 pixels.
        level: Pyramid level read.
        read_size: Side of the region at ``level``, in that level's pixels.
        out_size: Side of the returned tile.
        background: ``#rrggbb`` of unscanned pixels (default: the slide's ``openslide.background-color``).
        resample: Filter when ``read_size != out_size``.

    Returns:
        RGB ``out_size`` x ``out_size`` image.
    """
    region = slide.read_region((int(x), int(y)), int(level), (int(read_size), int(read_size)))
    tile = flatten_rgba(region, background if background is not None else background_colour(slide))
    return tile if read_size == out_size else tile.resize((out_size, out_size), resample)
