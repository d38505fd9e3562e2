"""Exporting tissue tiles: image files plus a ``coordinates.csv`` manifest per slide (``multiteach tile``).

Every file is written under a temporary name and renamed into place, so a final name never holds a
half-written tile or CSV.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from multiteach.atomic import atomic_path
from multiteach.data.lists.slide_list import read_slide_csv
from multiteach.data.tiling.plan import CSV_COLUMNS, TileGrid, _plan_one, _prepare, _write_csv, read_tile
from multiteach.data.wsi.slide import PathLike, failure_reason, logger, open_slide, slide_errors
from multiteach.data.wsi.tissue import DEFAULT_THUMB_SIZE
from multiteach.errors import MultiteachError, did_you_mean

TILE_FORMATS: dict[str, tuple[str, str]] = {"jpg": ("JPEG", ".jpg"), "jpeg": ("JPEG", ".jpg"), "png": ("PNG", ".png")}


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


def expand_slide_lists(items: Sequence[PathLike]) -> tuple[list[str], dict[str, float]]:
    """``multiteach tile``'s SLIDE arguments: slide files as given, CSV slide lists replaced by their slides.

    Returns:
        ``(slides, {slide: level-0 µm/px})`` with the µm/px of the CSVs' ``mpp`` columns
        (:func:`read_slide_csv`).
    """
    slides: list[str] = []
    mpps: dict[str, float] = {}
    for item in items:
        if str(item).lower().endswith(".csv"):
            listed, listed_mpp = read_slide_csv(item, "multiteach tile")
            slides += listed
            mpps.update(listed_mpp)
        else:
            slides.append(str(item))
    return slides, mpps


def _save_image(image: Image.Image, path: Path, pil_format: str, **options: Any) -> None:
    """Save ``image`` to ``path`` atomically (temporary file, then rename; no fsync: tiles are re-creatable)."""
    with atomic_path(path, fsync=False) as tmp:
        image.save(tmp, format=pil_format, **options)


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
    slides, args, lookup = _prepare(
        slides,
        "write_tiles",
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
    errors = slide_errors()
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
                    _save_image(read_tile(handle, grid, i), folder / name, pil_format, **options)
                    rows.append({"file": name, **row})
            csv_path = folder / "coordinates.csv"
            _write_csv(csv_path, ("file", *CSV_COLUMNS), rows)
        except errors as err:
            reason = f"{failure_reason(err)} (after {len(rows)} of {len(grid)} tiles)"
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
