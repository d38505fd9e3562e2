"""Reading the list of whole-slide images a run patches from: folders, text lists and CSVs.

A source (``data.slides.source``) is one of, or a list of:

- a folder: every slide under it at any depth, by extension (``SLIDE_EXTENSIONS``), hidden files and folders
  ignored, in sorted path order; a DICOM slide (a folder of ``.dcm`` files, one per level) counts once;
- a ``.txt`` list: one slide path per line; blank lines and lines starting with ``#`` are ignored;
- a ``.csv`` list with a ``path`` column and optional ``mpp`` (level-0 µm/px; it wins over the slide's
  metadata) and ``weight`` (sampling weight >= 0; 0 leaves the slide out) columns;
- a single slide file.

Relative paths in a list are resolved against the list's folder. Listed slides that do not exist are counted,
the first ten named in a warning and skipped; the run goes on unless none exists.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from multiteach.data.lists.paths import walk_folder
from multiteach.errors import MultiteachError, did_you_mean, missing_path

logger = logging.getLogger("multiteach.data")

SLIDE_EXTENSIONS: tuple[str, ...] = (
    "bif",
    "dcm",
    "mrxs",
    "ndpi",
    "scn",
    "svs",
    "svslide",
    "tif",
    "tiff",
    "vms",
    "vmu",
)
"""File extensions of the slide formats OpenSlide reads (matched case-insensitively)."""

LIST_EXTENSIONS: tuple[str, ...] = ("csv", "txt")
_TILE_EXTENSIONS = ("jpg", "jpeg", "png")  # pre-extracted tiles: a folder of these belongs in data.train
_SHOW_MISSING = 10
SOURCE_KEY = "data.slides.source"
SOURCE_EXPECTED = f"a slide folder, a .txt or .csv slide list, or a slide file ({', '.join(SLIDE_EXTENSIONS)})"


@dataclass(frozen=True, eq=False)
class SlideTable:
    """The slides of a run, held compactly (no Python object per slide beyond its path string).

    Attributes:
        paths: Absolute, normalised slide paths (symlinks not resolved), one per slide, shape ``(n,)``.
        mpp: float64 array ``(n,)``: level-0 µm/px given by a CSV ``mpp`` column, NaN where none was given.
        weight: float64 array ``(n,)``: sampling weight (CSV ``weight`` column; 1.0 by default), >= 0.
        source: The source(s) as given, for messages.
        missing: ``(path, reason)`` of every listed slide that does not exist (skipped).
    """

    paths: list[str]
    mpp: np.ndarray = field(repr=False)
    weight: np.ndarray = field(repr=False)
    source: str = ""
    missing: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        n = len(self.paths)
        object.__setattr__(self, "mpp", np.asarray(self.mpp, dtype=np.float64).reshape(n))
        object.__setattr__(self, "weight", np.asarray(self.weight, dtype=np.float64).reshape(n))

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"SlideTable({len(self)} slides from {self.source!r}, {len(self.missing)} missing)"

    def fingerprint(self) -> str:
        """A hex digest of the paths, mpp and weights (not of the files' contents)."""
        digest = hashlib.sha256()
        digest.update("\0".join(self.paths).encode("utf-8", "surrogateescape"))
        digest.update(np.ascontiguousarray(self.mpp).tobytes())
        digest.update(np.ascontiguousarray(self.weight).tobytes())
        return digest.hexdigest()


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def find_slides(root: str | os.PathLike[str], what: str = SOURCE_KEY) -> list[str]:
    """Every slide under a folder, at any depth, in sorted order.

    Hidden files and folders are ignored and symlinked folders followed once. A folder holding several
    ``.dcm`` files is one DICOM slide (OpenSlide opens it from any of its files): its first file is listed.

    Args:
        root: The folder.
        what: What the folder is for, in errors (e.g. ``"data.slides.source"``).

    Returns:
        Absolute slide paths, sorted by their path relative to ``root``.

    Raises:
        MultiteachError: If the folder holds no slide (naming it, the extensions looked for and, when it holds
            JPEG/PNG images, that those go in ``data.train``).
    """

    root_path = Path(os.path.abspath(Path(root).expanduser()))
    found: list[str] = []
    dicom_folders: set[str] = set()
    for path in walk_folder(root_path, SLIDE_EXTENSIONS):
        if _extension(path) == "dcm":  # one slide per folder of DICOM files: its first file
            folder = os.path.dirname(path)
            if folder in dicom_folders:
                continue
            dicom_folders.add(folder)
        found.append(path)
    if not found:
        tiles = len(walk_folder(root_path, _TILE_EXTENSIONS))
        hint = (
            f" It holds {tiles} JPEG/PNG image(s): pre-extracted tiles are read with data.train, not data.slides."
            if tiles
            else ""
        )
        raise MultiteachError(
            f"{what}: no slides in folder {root_path} (looked for {', '.join('.' + e for e in SLIDE_EXTENSIONS)} "
            f"at any depth; hidden files ignored).{hint}"
        )
    return found


def _number(raw: str, column: str, where: str, minimum_exclusive: bool) -> float:
    """A CSV cell as a finite float (> 0 or >= 0); an empty cell is NaN."""
    text = raw.strip()
    if not text:
        return math.nan
    rule = "a number > 0 (µm/px)" if minimum_exclusive else "a number >= 0"
    try:
        value = float(text)
    except ValueError:
        raise MultiteachError(f"{where}: {column} {text!r} is not a number; it must be {rule}.") from None
    if not math.isfinite(value) or value < 0 or (minimum_exclusive and value == 0):
        raise MultiteachError(f"{where}: {column} {text!r} is not allowed; it must be {rule}.")
    return value


def _read_csv(path: Path, what: str = SOURCE_KEY) -> tuple[list[str], list[float], list[float]]:
    """Entries, mpp and weights of a CSV slide list (mpp NaN and weight 1.0 where not given); ``what`` names the
    setting or command the list is for, in errors."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        columns = [c.strip() for c in header or []]
        lowered = [c.lower() for c in columns]
        if "path" not in lowered:
            raise MultiteachError(
                f"{what}: CSV {path} needs a 'path' column (optional: 'mpp', 'weight'); it has: "
                f"{', '.join(columns) or 'no header'}." + did_you_mean("path", columns)
            )
        col = {name: lowered.index(name) for name in ("path", "mpp", "weight") if name in lowered}
        entries: list[str] = []
        mpps: list[float] = []
        weights: list[float] = []
        for line, row in enumerate(reader, start=2):
            cell = row[col["path"]].strip() if len(row) > col["path"] else ""
            if not cell or cell.startswith("#"):
                continue
            where = f"{what}: CSV {path} line {line} ({cell})"
            mpp = _number(row[col["mpp"]], "mpp", where, True) if "mpp" in col and len(row) > col["mpp"] else math.nan
            raw_weight = row[col["weight"]] if "weight" in col and len(row) > col["weight"] else ""
            weight = _number(raw_weight, "weight", where, False)
            entries.append(cell)
            mpps.append(mpp)
            weights.append(1.0 if math.isnan(weight) else weight)
    return entries, mpps, weights


def _read_list(path: Path, what: str = SOURCE_KEY) -> tuple[list[str], list[float], list[float]]:
    """Entries (relative ones joined to the list's folder), mpp and weights of a .txt or .csv list."""
    if _extension(path.name) == "csv":
        entries, mpps, weights = _read_csv(path, what)
    else:
        with path.open(encoding="utf-8-sig") as fh:
            entries = [s for s in (line.strip() for line in fh) if s and not s.startswith("#")]
        mpps, weights = [math.nan] * len(entries), [1.0] * len(entries)
    if not entries:
        raise MultiteachError(f"{what}: slide list {path} names no slides.")
    base = path.parent
    absolute = [os.path.normpath(os.path.join(base, os.path.expanduser(e))) for e in entries]
    return absolute, mpps, weights


def read_slide_csv(path: str | os.PathLike[str], what: str = "slide list") -> tuple[list[str], dict[str, float]]:
    """The slides of one CSV slide list and the level-0 µm/px its ``mpp`` column gives (``multiteach tile``).

    The form ``data.slides.source`` reads (``path`` relative to the CSV's folder, optional ``mpp`` and
    ``weight``); slides are returned whether or not they exist, for the caller to report.

    Returns:
        ``(absolute slide paths in file order, {slide path: mpp} for the rows that give one)``.

    Raises:
        MultiteachError: Naming the file (and line) when it cannot be read, has no ``path`` column, names no
            slide, or holds an ``mpp`` that is not a number > 0.
    """
    csv_path = Path(os.path.abspath(Path(path).expanduser()))
    try:
        paths, mpps, _ = _read_list(csv_path, what)
    except OSError as exc:
        raise MultiteachError(f"{what} {csv_path}: cannot be read ({exc.strerror or exc})") from None
    return paths, {p: m for p, m in zip(paths, mpps) if not math.isnan(m)}


def _read_one(source: str) -> tuple[list[str], list[float], list[float], bool]:
    """Paths, mpp, weights of one source, and whether its paths were listed (so may be missing)."""
    path = Path(os.path.abspath(Path(source).expanduser()))
    if not path.exists():
        raise missing_path(SOURCE_KEY, source, expected=SOURCE_EXPECTED)
    if path.is_dir():
        found = find_slides(path)
        return found, [math.nan] * len(found), [1.0] * len(found), False
    ext = _extension(path.name)
    if ext in LIST_EXTENSIONS:
        return (*_read_list(path), True)
    if ext in SLIDE_EXTENSIONS:
        return [str(path)], [math.nan], [1.0], False
    hint = did_you_mean(ext, SLIDE_EXTENSIONS + LIST_EXTENSIONS) if ext else ""
    raise MultiteachError(f"{SOURCE_KEY}: {path} is not {SOURCE_EXPECTED}.{hint}")


def _missing_reason(path: str) -> str | None:
    """Why a listed slide cannot be used (None when it is a file)."""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return "is a folder, not a slide file (list the slide file itself, e.g. the .mrxs or one .dcm)"
    return "does not exist"


def read_slide_list(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> SlideTable:
    """Read the slides of ``data.slides.source``.

    Args:
        source: A folder, a ``.txt``/``.csv`` slide list or a slide file, or a list of these (joined in
            order; a slide named twice is kept once, at its first place).

    Returns:
        The ``SlideTable``: existing slides in source order, missing ones in ``missing``.

    Raises:
        MultiteachError: For a source that does not exist or is of no known kind, a folder without slides, a
            list naming no slide, a CSV without a ``path`` column or with a bad ``mpp``/``weight`` value (naming
            the line), or when no listed slide exists.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise MultiteachError(f"{SOURCE_KEY}: no source given; expected {SOURCE_EXPECTED}.")
    paths: list[str] = []
    mpps: list[float] = []
    weights: list[float] = []
    missing: list[tuple[str, str]] = []
    seen: set[str] = set()
    duplicates = 0
    for src in sources:
        found, mpp, weight, listed = _read_one(os.fspath(src))
        for p, m, w in zip(found, mpp, weight):
            if p in seen:
                duplicates += 1
                continue
            seen.add(p)
            reason = _missing_reason(p) if listed else None
            if reason is not None:
                missing.append((p, reason))
                continue
            paths.append(p)
            mpps.append(m)
            weights.append(w)
    described = ", ".join(os.fspath(s) for s in sources)
    if duplicates:
        logger.warning("%s: %d slide(s) named more than once; each is kept once", described, duplicates)
    if missing:
        _warn_missing(described, missing, len(paths) + len(missing))
    if not paths:
        first, reason = missing[0]
        raise MultiteachError(
            f"{SOURCE_KEY}: none of the {len(missing)} listed slide(s) exists; first: {first} {reason}."
        )
    return SlideTable(paths, np.array(mpps), np.array(weights), source=described, missing=missing)


def _warn_missing(described: str, missing: Iterable[tuple[str, str]], total: int) -> None:
    missing = list(missing)
    shown = "; ".join(f"{p} ({r})" for p, r in missing[:_SHOW_MISSING])
    more = f"; and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
    logger.warning(
        "%s: %d of %d listed slide(s) cannot be used and are skipped: %s%s", described, len(missing), total, shown, more
    )


def slides_hint(folder: str | os.PathLike[str]) -> str:
    """A sentence for a "no images found" error when ``folder`` holds whole-slide images instead of tiles.

    Args:
        folder: The folder that held no tile images (searched at any depth, hidden entries skipped).

    Returns:
        ``" It holds whole-slide images (e.g. NAME): ..."`` naming ``data.slides.source=FOLDER`` and
        ``multiteach tile``, or ``""`` when it holds none.
    """
    slide_only = [e for e in SLIDE_EXTENSIONS if e not in ("tif", "tiff")]  # a .tif may be a tile as well
    found = walk_folder(Path(folder).expanduser(), slide_only)
    if not len(found):
        return ""
    name = Path(found[0]).name
    return (
        f" It holds whole-slide images (e.g. {name}), not tiles: patch them during training with "
        f"data.slides.source={folder} (instead of data.train), or cut tiles once with "
        f"`multiteach tile {folder}/*{Path(name).suffix} --out TILES` and set data.train=TILES."
    )
