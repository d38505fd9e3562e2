"""TRIDENT and CLAM patch-coordinate ``.h5`` files as a training source: the tiles they name, read from slides.

Both tools write one ``.h5`` per slide with a dataset ``coords`` of shape ``(N, 2)``: each patch's top-left
``(x, y)`` in level-0 pixels. Their attributes on ``coords`` differ (read from TRIDENT's public code,
``trident/wsi_objects/WSI.py::extract_tissue_coords`` and ``trident/IO.py::read_coords_legacy``):

- TRIDENT: ``patch_size`` (pixels at the target magnification), ``patch_size_level0`` (its footprint in level-0
  pixels), ``level0_magnification``, ``target_magnification``, ``overlap``, ``name`` (the slide's name without
  extension). Files are named ``<name>_patches.h5``.
- CLAM (legacy): ``patch_size`` and ``patch_level`` (the region read at that pyramid level), and optionally
  ``custom_downsample`` (the patch is then resized to ``patch_size / custom_downsample``).

The slide of each file is looked up by name (``name`` attribute, else the file stem without ``_patches``) among
the slides under ``data.slide_dir``. A file whose slide is missing, or that cannot be read, is skipped and listed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from multiteach.data.lists.paths import walk_folder
from multiteach.data.lists.slide_list import SLIDE_EXTENSIONS
from multiteach.data.sources.coords import CoordSource, CoordTable
from multiteach.errors import MultiteachError, did_you_mean

logger = logging.getLogger("multiteach.data")


def _h5_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(p for p in source.iterdir() if p.suffix.lower() == ".h5" and not p.name.startswith("."))


def _slide_name(h5: Path, attrs: dict) -> str:
    name = attrs.get("name")
    if isinstance(name, bytes):
        name = name.decode()
    if name:
        return (
            Path(str(name)).stem if Path(str(name)).suffix.lower() in (".svs", ".ndpi", ".tif", ".tiff") else str(name)
        )
    stem = h5.stem
    return stem[: -len("_patches")] if stem.endswith("_patches") else stem


def read_coord_file(h5: Path, slide: str) -> CoordTable:
    """One TRIDENT/CLAM ``.h5`` file as a table of its tiles on ``slide``.

    Raises:
        MultiteachError: No ``coords`` dataset, or neither TRIDENT's nor CLAM's size attributes.
    """
    import h5py

    with h5py.File(h5, "r") as f:
        if "coords" not in f:
            raise MultiteachError(f"{h5}: no 'coords' dataset (datasets: {', '.join(f.keys()) or 'none'})")
        ds = f["coords"]
        attrs = dict(ds.attrs)
        coords = np.asarray(ds[:], dtype=np.int64).reshape(-1, 2)
    level = -1
    if "patch_size_level0" in attrs:
        size0, out = float(attrs["patch_size_level0"]), int(attrs["patch_size"])
    elif "patch_level" in attrs and "patch_size" in attrs:
        level, size0 = int(attrs["patch_level"]), float(attrs["patch_size"])
        out = max(1, round(size0 / float(attrs.get("custom_downsample", 1) or 1)))
    else:
        raise MultiteachError(
            f"{h5}: 'coords' has neither TRIDENT's patch_size_level0 nor CLAM's patch_level + patch_size "
            f"attributes (it has: {', '.join(attrs) or 'none'})"
        )
    mag = attrs.get("target_magnification")
    mpp = 10.0 / float(mag) if mag not in (None, -1) and float(mag) > 0 else np.nan  # 20x ≈ 0.5 µm/px
    return CoordTable(
        [slide],
        np.zeros(len(coords), dtype=np.int32),
        coords.astype(np.int32),
        np.array([size0]),
        np.array([out], dtype=np.int32),
        np.array([mpp]),
        np.array([level], dtype=np.int32),
    )


def trident_table(
    sources: Sequence[str | os.PathLike[str]], slide_dir: str | os.PathLike[str] | None
) -> tuple[CoordTable, list[tuple[str, str]]]:
    """Every tile named by the ``.h5`` files of ``sources`` (files or folders), and what was skipped.

    Raises:
        MultiteachError: ``slide_dir`` is unset or holds no slides, or no file could be used.
    """
    if slide_dir is None:
        raise MultiteachError(
            "data.slide_dir: TRIDENT/CLAM coordinate files name slides, not images; set data.slide_dir to the "
            "folder holding the slides they were made from"
        )
    found = walk_folder(slide_dir, SLIDE_EXTENSIONS)
    if not len(found):
        raise MultiteachError(
            f"data.slide_dir: no slides under {str(slide_dir)!r} (extensions looked for: {', '.join(SLIDE_EXTENSIONS)})"
        )
    by_name: dict[str, str] = {}
    for p in found:
        by_name.setdefault(Path(p).stem, p)
    tables: list[CoordTable] = []
    skipped: list[tuple[str, str]] = []
    files = [h5 for src in sources for h5 in _h5_files(Path(src).expanduser())]
    for h5 in files:
        try:
            import h5py

            with h5py.File(h5, "r") as f:
                attrs = dict(f["coords"].attrs) if "coords" in f else {}
            name = _slide_name(h5, attrs)
            if name not in by_name:
                raise MultiteachError(f"no slide named {name!r} under {slide_dir}" + did_you_mean(name, list(by_name)))
            tables.append(read_coord_file(h5, by_name[name]))
        except (MultiteachError, OSError, KeyError, ValueError) as err:
            skipped.append((str(h5), str(err)))
            logger.warning("skipping coordinate file %s (%s)", h5, err)
    if not tables:
        first = skipped[0][1] if skipped else "no .h5 files"
        raise MultiteachError(f"No usable coordinate file in {', '.join(map(str, sources))} (first problem: {first})")
    return CoordTable.concat(tables), skipped


class TridentSource(CoordSource):
    """The tiles of TRIDENT/CLAM coordinate files (see the module docstring)."""

    @classmethod
    def from_sources(
        cls, sources: Sequence[str | os.PathLike[str]], slide_dir: str | os.PathLike[str] | None = None
    ) -> TridentSource:
        table, skipped = trident_table(sources, slide_dir)
        return cls(table, ", ".join(map(str, sources)), skipped=skipped)
