"""The tissue index: per-slide tissue masks and geometry, built once in parallel and shared by every run.

Online patching needs, for every slide, a tissue mask (where to draw tiles) and its pyramid geometry (which level
to read). Computing a mask reads a thumbnail of the slide (about half a second for a small slide, seconds for a
large one), so it is done once per slide and kept in an index folder, never in the slide folders:

- ``$MULTITEACH_INDEX_DIR``, else ``$XDG_CACHE_HOME/multiteach/tissue-index`` (``~/.cache/...``), or the
  folder a recipe names in ``data.slides.index_dir`` (:func:`default_index_dir`);
- ``entries/ab/<key>.npz``: one small file per slide, written atomically (temporary file, then rename). The key
  hashes the slide's identity (real path, size, mtime_ns), the mask settings (``thumb_size``,
  ``min_saturation``, the tissue detector's constants) and :data:`INDEX_FORMAT`: touching or replacing a slide,
  or changing a mask setting, makes a new entry; the old one is simply no longer used. The entry holds the
  bit-packed mask from :func:`~multiteach.data.wsi.tissue.tissue_mask`, its scale, the level-0 size and
  scanned bounds, every level's size and downsample, the µm/px the metadata records (NaN if none), the tissue
  pixel count and the background colour: all a worker needs to read tiles without re-reading metadata.
- ``lists/<hash>.npz``: one summary per slide list and settings, written after a build, so a warm start reads one
  file (after checking every slide's identity with ``stat``) instead of one per slide.

The µm/px used for a slide is resolved when the index is loaded, not stored in the key: a CSV ``mpp`` value
wins over the metadata, and ``data.slides.mpp`` fills in for slides whose metadata records none. Changing
those never rebuilds a mask.

An unreadable slide gets a small *failed* entry with the reason; it is not retried on later runs until the
file changes (new size or mtime) or ``retry_failed=True`` (``multiteach data index --retry-failed``): opening a
truncated multi-gigabyte slide can take seconds before it fails, at every start of every run otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multiteach.atomic import atomic_path
from multiteach.data.sources.slide_list import SlideTable
from multiteach.data.wsi.tissue import DEFAULT_MIN_SATURATION, DEFAULT_THUMB_SIZE, MEDIAN_SIZE, OPEN_SIZE
from multiteach.errors import MultiteachError

logger = logging.getLogger("multiteach.data")

INDEX_FORMAT = 1
"""Version of the entry and summary layout; bumping it makes every entry new."""

ENV_INDEX_DIR = "MULTITEACH_INDEX_DIR"
_ENTRIES = "entries"
_LISTS = "lists"
_SEP = "\0"  # separator of joined path strings (no path contains NUL)


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
    return os.path.join(index_dir, _ENTRIES, key[:2], f"{key}.npz")


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
    from multiteach.data.wsi.slide import _slide_bounds, open_slide, slide_mpp
    from multiteach.data.wsi.tissue import tissue_mask

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
            "bounds": np.asarray(_slide_bounds(slide), dtype=np.int64),
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


def _build_entry(task: tuple[str, str, str, int, int]) -> tuple[str, dict[str, Any], float]:
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


# --------------------------------------------------------------------------------------------------
# The index of a slide list
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SlideIndex:
    """The usable slides of a list with what the sampler needs, as compact arrays (n = usable slides).

    Masks are not held here: each worker loads the masks of the slides it reads from ``entries`` (see
    :func:`load_mask`), so the main process stays small at any number of slides.

    Attributes:
        slides: Slide paths as listed (absolute), shape ``(n,)``.
        entries: Entry file of each slide, shape ``(n,)``.
        mpp: float64 ``(n,)``: level-0 µm/px used (CSV ``mpp``, else metadata, else ``data.slides.mpp``).
        weight: float64 ``(n,)``: sampling weight from the list (>= 0).
        tissue_px: int64 ``(n,)``: tissue pixels of the mask.
        scale: float64 ``(n, 2)``: level-0 pixels per mask pixel along x and y.
        dims: int64 ``(n, 2)``: level-0 width and height in pixels.
        bounds: int64 ``(n, 4)``: scanned area ``(x, y, width, height)`` in level-0 pixels.
        background: uint8 ``(n, 3)``: colour of unscanned pixels.
        level_start: int64 ``(n + 1,)``: slide ``i``'s levels are rows ``level_start[i]:level_start[i + 1]`` of
            ``downsamples`` and ``level_dims``.
        downsamples: float64 ``(levels,)``: each level's downsample from level 0, ascending per slide.
        level_dims: int64 ``(levels, 2)``: each level's width and height.
        skipped: ``(slide, reason)`` for every listed slide that is not usable (missing, unreadable, without
            µm/px, without tissue).
        index_dir: The index folder.
        source: The slide list(s) it was built for.
        built: Entries built by the call that returned it.
        reused: Entries found already built.
        seconds: Wall time of the call that returned it.
    """

    slides: list[str]
    entries: list[str]
    mpp: np.ndarray
    weight: np.ndarray
    tissue_px: np.ndarray
    scale: np.ndarray
    dims: np.ndarray
    bounds: np.ndarray
    background: np.ndarray
    level_start: np.ndarray
    downsamples: np.ndarray
    level_dims: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    index_dir: str = ""
    source: str = ""
    built: int = 0
    reused: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.slides)

    def __repr__(self) -> str:
        return (
            f"SlideIndex({len(self)} slides, {len(self.skipped)} skipped, built {self.built}, reused {self.reused}, "
            f"in {self.index_dir!r})"
        )

    @property
    def tissue_um2(self) -> np.ndarray:
        """float64 ``(n,)``: tissue area of each slide in µm² (mask pixels x pixel area at level 0)."""
        return self.tissue_px * self.scale[:, 0] * self.scale[:, 1] * self.mpp**2

    def levels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(downsamples (L,), level_dims (L, 2))`` of slide ``i``."""
        a, b = int(self.level_start[i]), int(self.level_start[i + 1])
        return self.downsamples[a:b], self.level_dims[a:b]

    # ---- summary file -------------------------------------------------------------------------------

    _ARRAYS = ("mpp", "weight", "tissue_px", "scale", "dims", "bounds", "background", "level_start")

    def _save(self, path: Path) -> None:
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        arrays["downsamples"], arrays["level_dims"] = self.downsamples, self.level_dims
        arrays["format"] = np.int64(INDEX_FORMAT)
        for name, values in (
            ("slides", self.slides),
            ("entries", self.entries),
            ("skipped_what", [w for w, _ in self.skipped]),
            ("skipped_reason", [r for _, r in self.skipped]),
        ):
            arrays[name] = np.frombuffer(_SEP.join(values).encode("utf-8", "surrogateescape"), dtype=np.uint8)
        with atomic_path(path, fsync=False) as tmp, tmp.open("wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def _load(cls, path: Path) -> SlideIndex | None:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if int(npz["format"]) != INDEX_FORMAT:
                    return None
                data = {name: npz[name] for name in npz.files}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
            return None

        def strings(name: str) -> list[str]:
            text = data[name].tobytes().decode("utf-8", "surrogateescape")
            return text.split(_SEP) if text else []

        slides, entries = strings("slides"), strings("entries")
        skipped = list(zip(strings("skipped_what"), strings("skipped_reason")))
        arrays = {name: data[name] for name in (*cls._ARRAYS, "downsamples", "level_dims")}
        return cls(slides=slides, entries=entries, skipped=skipped, **arrays)


@dataclass
class _Listed:
    """A listed slide's identity, entry and (once known) header."""

    path: str
    mpp: float
    weight: float
    key: str
    entry: str
    identity: str
    header: dict[str, Any] | None = None


def _identify(
    table: SlideTable, settings: IndexSettings, index_dir: Path
) -> tuple[list[_Listed], list[tuple[str, str]]]:
    """Stat every slide: its entry key and path; slides gone since listing go to the skipped list."""
    listed: list[_Listed] = []
    gone: list[tuple[str, str]] = []
    for path, mpp, weight in zip(table.paths, table.mpp.tolist(), table.weight.tolist()):
        try:
            st = os.stat(path)
        except OSError as err:
            gone.append((path, f"cannot be read: {type(err).__name__}: {err}"))
            continue
        real = os.path.realpath(path)
        key = entry_key(real, st.st_size, st.st_mtime_ns, settings)
        identity = json.dumps({"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        listed.append(_Listed(path, mpp, weight, key, entry_path(index_dir, key), identity))
    return listed, gone


def _summary_path(index_dir: Path, listed: Sequence[_Listed], settings: IndexSettings) -> Path:
    digest = hashlib.sha256(json.dumps([INDEX_FORMAT, settings.mask_settings(), settings.mpp]).encode())
    for item in listed:
        digest.update(
            f"{item.path}{_SEP}{item.key}{_SEP}{item.mpp!r}{_SEP}{item.weight!r}\n".encode("utf-8", "surrogateescape")
        )
    return index_dir / _LISTS / f"{digest.hexdigest()[:32]}.npz"


_NO_MPP = (
    "records no µm/px in its metadata (no openslide.mpp-x or aperio.MPP); give its level-0 µm/px with "
    "data.slides.mpp (every slide without one; `multiteach data index --mpp`) or the mpp column of a CSV slide "
    "list (this slide)"
)


def _assemble(listed: Sequence[_Listed], settings: IndexSettings) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The SlideIndex arrays of the usable slides, and the skipped ones with reasons."""
    rows: list[tuple[_Listed, float, dict[str, Any]]] = []
    skipped: list[tuple[str, str]] = []
    for item in listed:
        header = item.header
        assert header is not None
        if not bool(header["ok"]):
            skipped.append((item.path, f"unreadable: {header['reason']}"))
            continue
        mpp = item.mpp
        if not math.isfinite(mpp):
            mpp = float(header["mpp_meta"])
        if not math.isfinite(mpp):
            mpp = settings.mpp if settings.mpp is not None else math.nan
        if not math.isfinite(mpp):
            skipped.append((item.path, _NO_MPP))
            continue
        if int(header["tissue_px"]) == 0:
            skipped.append(
                (
                    item.path,
                    f"no tissue found on its {int(header['mask_shape'][1])}x{int(header['mask_shape'][0])} mask "
                    f"(min_saturation={settings.min_saturation}); lower data.slides.min_saturation for pale tissue",
                )
            )
            continue
        rows.append((item, mpp, header))
    counts = np.array([len(h["downsamples"]) for _, _, h in rows], dtype=np.int64)
    level_start = np.zeros(len(rows) + 1, dtype=np.int64)
    level_start[1:] = np.cumsum(counts)

    def stack(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        if not rows:
            return np.zeros((0, *shape), dtype=dtype)
        return np.stack([np.asarray(h[name], dtype=dtype).reshape(shape) for _, _, h in rows])

    arrays = {
        "slides": [item.path for item, _, _ in rows],
        "entries": [item.entry for item, _, _ in rows],
        "mpp": np.array([m for _, m, _ in rows], dtype=np.float64),
        "weight": np.array([item.weight for item, _, _ in rows], dtype=np.float64),
        "tissue_px": np.array([int(h["tissue_px"]) for _, _, h in rows], dtype=np.int64),
        "scale": stack("scale", np.float64, (2,)),
        "dims": stack("dims", np.int64, (2,)),
        "bounds": stack("bounds", np.int64, (4,)),
        "background": stack("background", np.uint8, (3,)),
        "level_start": level_start,
        "downsamples": np.concatenate([np.asarray(h["downsamples"], np.float64) for _, _, h in rows])
        if rows
        else np.zeros(0, np.float64),
        "level_dims": np.concatenate([np.asarray(h["level_dims"], np.int64).reshape(-1, 2) for _, _, h in rows])
        if rows
        else np.zeros((0, 2), np.int64),
    }
    return arrays, skipped


def _pool_context() -> multiprocessing.context.BaseContext:
    """The start method of index workers: ``fork`` on Linux, ``spawn`` elsewhere.

    Measured on the 2-core development machine (6 small slides, 2 workers; shared, noisy): fork 1.8-5.3 s,
    forkserver 10.0 s, spawn 16.8 s, one process 3.7 s. ``forkserver`` and ``spawn`` start by importing
    multiteach (and so torch, about 4 s) and re-run the main script in every worker, so a script without an
    ``if __name__ == "__main__":`` guard runs its whole body again per worker. ``fork`` is safe here because a
    worker only opens slides of its own (never a handle inherited from the parent; OpenSlide handles must not
    cross a fork) and runs no torch or OpenMP code; it is also what torch's DataLoader uses on Linux.
    """
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _run_builds(tasks: list[tuple[str, str, str, int, int]], processes: int, progress: bool) -> dict[str, dict]:
    """Build every task's entry, in ``processes`` workers when there is more than one task; returns entry file ->
    header. A pool whose workers die at start (a script without an ``if __name__ == "__main__":`` guard re-runs
    itself in them) is abandoned for an in-process build, with a warning."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    headers: dict[str, dict] = {}
    workers = max(1, min(int(processes), len(tasks)))
    with tqdm(total=len(tasks), desc="tissue index", unit="slide", disable=not progress, leave=False) as bar:
        if workers > 1:
            try:
                with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
                    for future in as_completed([pool.submit(_build_entry, task) for task in tasks]):
                        target, header, _ = future.result()
                        headers[target] = header
                        bar.update()
            except (BrokenProcessPool, RuntimeError) as err:
                logger.warning(
                    "tissue index: worker processes failed (%s: %s); building the remaining entries in this process. "
                    'A script that builds the index must start with `if __name__ == "__main__":`.',
                    type(err).__name__,
                    err,
                )
        for task in tasks:
            if task[1] not in headers:
                target, header, _ = _build_entry(task)
                headers[target] = header
                bar.update()
    return headers


def build_index(
    slides: SlideTable,
    settings: Any = None,
    index_dir: str | os.PathLike[str] | None = None,
    processes: int = 2,
    progress: bool = True,
    retry_failed: bool = False,
) -> SlideIndex:
    """Load the tissue index of a slide list, building the entries it lacks.

    A warm start (every entry built, same list and settings) reads one summary file after a ``stat`` of every
    slide. Otherwise the entries present are reused, the missing ones built in ``processes`` worker processes
    (with a progress bar) and a new summary written.

    Args:
        slides: The slide list (:func:`~multiteach.data.sources.slide_list.read_slide_list`).
        settings: ``IndexSettings``, or ``SlidesConfig`` (its ``thumb_size``, ``min_saturation`` and ``mpp``).
        index_dir: The index folder (default :func:`default_index_dir`).
        processes: Worker processes for missing entries (1: build in this process).
        progress: Show a progress bar while building.
        retry_failed: Rebuild entries recorded as unreadable (e.g. after a storage hiccup).

    Returns:
        The :class:`SlideIndex` of the usable slides, with every other listed slide in ``skipped``.

    Raises:
        MultiteachError: If no listed slide is usable (naming the first reason), or the index folder cannot be
            written when entries must be built.
    """
    start = time.perf_counter()
    settings = IndexSettings.of(settings)
    root = Path(index_dir).expanduser() if index_dir else default_index_dir()
    listed, gone = _identify(slides, settings, root)
    missing = list(slides.missing) + gone
    summary = _summary_path(root, listed, settings)
    index = None if retry_failed else SlideIndex._load(summary) if summary.is_file() else None
    if index is not None and all(os.path.exists(e) for e in set(index.entries)):
        index.built, index.reused = 0, len({item.entry for item in listed})
    else:
        index = _build_missing(listed, settings, root, summary, processes, progress, retry_failed)
    index.skipped = missing + index.skipped
    index.index_dir, index.source = str(root), slides.source
    index.seconds = time.perf_counter() - start
    _report(index, len(slides) + len(slides.missing))
    return index


def _build_missing(
    listed: list[_Listed],
    settings: IndexSettings,
    root: Path,
    summary: Path,
    processes: int,
    progress: bool,
    retry_failed: bool,
) -> SlideIndex:
    """Read the entries present, build the others, assemble the index and write its summary."""
    tasks: list[tuple[str, str, str, int, int]] = []
    headers: dict[str, dict[str, Any] | None] = {}  # entry -> header; a slide linked twice has one entry
    for item in listed:
        if item.entry not in headers:
            header = read_entry_header(item.entry) if os.path.exists(item.entry) else None
            if header is None or (retry_failed and not bool(header["ok"])):
                header = None
                tasks.append((item.path, item.entry, item.identity, settings.thumb_size, settings.min_saturation))
            headers[item.entry] = header
        item.header = headers[item.entry]
    if tasks:
        _check_writable(root)
        built = _run_builds(tasks, processes, progress)
        for item in listed:
            if item.header is None:
                item.header = built[item.entry]
    arrays, skipped = _assemble(listed, settings)
    index = SlideIndex(**arrays, skipped=skipped, built=len(tasks), reused=len(headers) - len(tasks))
    try:
        index._save(summary)
    except OSError as err:  # a read-only shared index still serves this run
        logger.warning(
            "tissue index: could not write the summary %s (%s); the next start re-reads entries", summary, err
        )
    return index


def _check_writable(root: Path) -> None:
    try:
        (root / _ENTRIES).mkdir(parents=True, exist_ok=True)
        probe = root / _ENTRIES / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise MultiteachError(
            f"The tissue index folder {root} cannot be written ({type(err).__name__}: {err}); point "
            f"data.slides.index_dir (or ${ENV_INDEX_DIR}, or `multiteach data index --index-dir`) at a writable folder."
        ) from err


def _report(index: SlideIndex, listed: int) -> None:
    if not len(index):
        first, reason = index.skipped[0] if index.skipped else ("", "no slides")
        raise MultiteachError(
            f"None of the {listed} slide(s) of {index.source} is usable; first: {first}: {reason.rstrip('.')}. "
            f"(tissue index: {index.index_dir})"
        )
    logger.info(
        "tissue index: %d usable slide(s), %d skipped, %d entries built, %d reused, %.2f s (%s)",
        len(index),
        len(index.skipped),
        index.built,
        index.reused,
        index.seconds,
        index.index_dir,
    )
