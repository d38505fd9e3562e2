"""One slide's tissue-index entry: settings, folder and key; building, reading and loading an entry."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multiteach.atomic import atomic_path
from multiteach.data.wsi.slide import open_slide, scanned_bounds, slide_mpp
from multiteach.data.wsi.tissue import (
    DEFAULT_MIN_SATURATION,
    DEFAULT_THUMB_SIZE,
    MEDIAN_SIZE,
    OPEN_SIZE,
    tissue_mask,
)
from multiteach.errors import MultiteachError

logger = logging.getLogger("multiteach.data")

INDEX_FORMAT = 1
"""Version of the entry and summary layout; bumping it makes every entry new."""

ENV_INDEX_DIR = "MULTITEACH_INDEX_DIR"
ENTRIES_DIR = "entries"
LISTS_DIR = "lists"
SEP = "\0"  # separator of joined path strings (no path contains NUL)


# --------------------------------------------------------------------------------------------------
# Settings, folder and keys
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexSettings:
    """What the tissue index depends on.

    Attributes:
        thumb_size: Longer side of the tissue-mask thumbnail in pixels.
        min_saturation: Floor of the Otsu threshold on the 0-255 saturation.
        mpp: Level-0 µm/px for slides whose metadata records none and that have no CSV ``mpp`` (None: such a
            slide is skipped with a reason).
    """

    thumb_size: int = DEFAULT_THUMB_SIZE
    min_saturation: int = DEFAULT_MIN_SATURATION
    mpp: float | None = None

    @classmethod
    def of(cls, settings: Any) -> IndexSettings:
        """Settings from an ``IndexSettings`` or anything with the same attributes (``SlidesConfig``)."""
        if isinstance(settings, IndexSettings):
            return settings
        if settings is None:
            return cls()
        mpp = getattr(settings, "mpp", None)
        return cls(
            thumb_size=int(getattr(settings, "thumb_size", DEFAULT_THUMB_SIZE)),
            min_saturation=int(getattr(settings, "min_saturation", DEFAULT_MIN_SATURATION)),
            mpp=None if mpp is None else float(mpp),
        )

    def mask_settings(self) -> dict[str, int]:
        """The settings a mask depends on (part of every entry key)."""
        return {
            "thumb_size": self.thumb_size,
            "min_saturation": self.min_saturation,
            "median": MEDIAN_SIZE,
            "open": OPEN_SIZE,
        }


def default_index_dir() -> Path:
    """The tissue-index folder when a recipe names none.

    Returns:
        ``$MULTITEACH_INDEX_DIR`` if set, else ``$XDG_CACHE_HOME/multiteach/tissue-index`` (``XDG_CACHE_HOME``
        defaults to ``~/.cache``).
    """
    explicit = os.environ.get(ENV_INDEX_DIR)
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "multiteach" / "tissue-index"


def entry_key(real_path: str, size: int, mtime_ns: int, settings: IndexSettings) -> str:
    """The key of a slide's entry: a hash of its identity, the mask settings and the index format.

    Args:
        real_path: The slide's absolute path with symlinks resolved.
        size: File size in bytes.
        mtime_ns: Modification time in nanoseconds.
        settings: The index settings (only the mask settings enter the key).

    Returns:
        32 hex characters.
    """
    ident = {"format": INDEX_FORMAT, "path": real_path, "size": int(size), "mtime_ns": int(mtime_ns)}
    text = json.dumps({**ident, **settings.mask_settings()}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def entry_path(index_dir: str | os.PathLike[str], key: str) -> str:
    """Where the entry with ``key`` lives: ``index_dir/entries/<key[:2]>/<key>.npz``."""
    return os.path.join(index_dir, ENTRIES_DIR, key[:2], f"{key}.npz")


# --------------------------------------------------------------------------------------------------
# One entry: build (in a worker process), read its header, load its mask
# --------------------------------------------------------------------------------------------------

_HEADER_FIELDS = (
    "ok",
    "reason",
    "dims",
    "bounds",
    "downsamples",
    "level_dims",
    "mpp_meta",
    "mpp_note",
    "tissue_px",
    "scale",
    "background",
    "mask_shape",
)


def _failed_entry(reason: str) -> dict[str, Any]:
    return {
        "ok": np.bool_(False),
        "reason": np.str_(reason),
        "dims": np.zeros(2, np.int64),
        "bounds": np.zeros(4, np.int64),
        "downsamples": np.ones(1, np.float64),
        "level_dims": np.zeros((1, 2), np.int64),
        "mpp_meta": np.float64(math.nan),
        "mpp_note": np.str_(""),
        "tissue_px": np.int64(0),
        "scale": np.ones(2, np.float64),
        "background": np.full(3, 255, np.uint8),
        "mask_shape": np.zeros(2, np.int64),
        "mask": np.zeros(0, np.uint8),
    }


def _background_rgb(value: str) -> np.ndarray:
    """``openslide.background-color`` (``RRGGBB``) as uint8 ``(3,)``; white when absent or malformed."""
    text = value.strip().lstrip("#")
    try:
        if len(text) == 6:
            return np.array([int(text[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.uint8)
    except ValueError:
        pass
    return np.full(3, 255, np.uint8)


def _measure_slide(path: str, thumb_size: int, min_saturation: int) -> dict[str, Any]:
    """Open a slide and compute every entry field (raises on an unreadable slide)."""
    with open_slide(path) as slide:
        try:
            mpp_meta, mpp_note = slide_mpp(slide), ""
        except MultiteachError as err:
            mpp_meta, mpp_note = math.nan, str(err)
        downsamples = np.asarray(slide.level_downsamples, dtype=np.float64)
        if downsamples.size == 0 or np.any(np.diff(downsamples) < 0):
            raise MultiteachError(f"Slide {path!r} has levels out of order: downsamples {downsamples.tolist()}")
        mask, scale = tissue_mask(slide, thumb_size, min_saturation)
        return {
            "ok": np.bool_(True),
            "reason": np.str_(""),
            "dims": np.asarray(slide.dimensions, dtype=np.int64),
            "bounds": np.asarray(scanned_bounds(slide), dtype=np.int64),
            "downsamples": downsamples,
            "level_dims": np.asarray(slide.level_dimensions, dtype=np.int64).reshape(-1, 2),
            "mpp_meta": np.float64(mpp_meta),
            "mpp_note": np.str_(mpp_note),
            "tissue_px": np.int64(np.count_nonzero(mask)),
            "scale": np.asarray(scale, dtype=np.float64),
            "background": _background_rgb(slide.properties.get("openslide.background-color", "ffffff")),
            "mask_shape": np.asarray(mask.shape, dtype=np.int64),
            "mask": np.packbits(mask, axis=None),
        }


def build_entry(task: tuple[str, str, str, int, int]) -> tuple[str, dict[str, Any], float]:
    """Build and write one entry (runs in a pool worker or in-process).

    Args:
        task: ``(slide path, entry file, identity json, thumb_size, min_saturation)``.

    Returns:
        ``(entry file, header fields, seconds spent)``.
    """
    path, target, identity, thumb_size, min_saturation = task
    start = time.perf_counter()
    try:
        fields = _measure_slide(path, thumb_size, min_saturation)
    except Exception as err:  # noqa: BLE001 - any failure of one slide is its reason to be skipped, not a crash
        reason = str(err) if isinstance(err, MultiteachError) else f"{type(err).__name__}: {err}"
        fields = _failed_entry(reason or type(err).__name__)
    fields["format"] = np.int64(INDEX_FORMAT)
    fields["identity"] = np.str_(identity)
    with atomic_path(target, fsync=False) as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, **fields)
    header = {k: fields[k] for k in _HEADER_FIELDS}
    return target, header, time.perf_counter() - start


def read_entry_header(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The header fields of an entry (everything but the mask), or None when it is absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if int(npz["format"]) != INDEX_FORMAT:
                return None
            return {k: npz[k] for k in _HEADER_FIELDS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def load_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """The tissue mask of an entry.

    Args:
        path: The entry file (``SlideIndex.entries[i]``).

    Returns:
        Bool array of shape ``(h, w)``; True = tissue. One mask pixel covers ``SlideIndex.scale[i]`` level-0
        pixels along x and y.

    Raises:
        MultiteachError: If the entry is missing or damaged (rebuild it with ``multiteach data index``).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            h, w = (int(v) for v in npz["mask_shape"])
            bits = npz["mask"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise MultiteachError(
            f"Tissue-index entry {str(path)!r} is missing or damaged ({type(err).__name__}: {err}); "
            "rebuild it with `multiteach data index SLIDES`."
        ) from err
    return np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)
