"""Pre-extracted tiles at scale: folders and list files held as one :class:`PathTable`, nothing decoded at start.

A start-up costs one walk of each folder (or one read of each list) and, for lists, a presence check of the
entries: every entry up to :data:`FULL_CHECK` of them, an even spread of :data:`SAMPLE_CHECK` above that. An
unreadable or missing tile is found when it is read, replaced by the next readable one (deterministically, so
every process agrees), and reported with the batch to the main process, which counts and lists it in the run's
summary. ``multiteach data check`` runs the full scan (decode of every tile) on demand, in parallel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from multiteach.data.lists.images import IMAGE_ERRORS, IMAGE_EXTENSIONS, load_rgb
from multiteach.data.lists.paths import PathTable, read_list, walk_folder
from multiteach.data.lists.slide_list import slides_hint
from multiteach.data.sources.base import SourceTile, read_or_next
from multiteach.errors import MultiteachError

logger = logging.getLogger("multiteach.data")

FULL_CHECK = 200_000  # list entries checked for presence one by one at start (≈ 0.3 s on a local disk)
SAMPLE_CHECK = 20_000  # above that, an even spread of this many
LISTED = 10  # missing entries named in the log


class TileListSource:
    """Tiles from image files: ``read(i, epoch)`` decodes file ``i`` (the epoch does not matter).

    Args:
        table: The tile paths.
        source: What to name in messages (the folders and lists joined).
        missing: Entries found missing at start (already removed from ``table``), for the run's report.
    """

    shuffle = True

    def __init__(self, table: PathTable, source: str, missing: Sequence[str] = (), missing_total: int = 0) -> None:
        if not len(table):
            raise MultiteachError(f"No tiles in {source!r}.")
        self.table = table
        self.source = source
        self.missing = list(missing)
        self.missing_total = max(missing_total, len(self.missing))
        self._bad: set[int] = set()  # per process: files known unreadable, so a replacement skips them fast

    @classmethod
    def from_sources(
        cls, sources: Sequence[str | os.PathLike[str]], extensions: Iterable[str] = IMAGE_EXTENSIONS
    ) -> TileListSource:
        """Folders (walked) and list files (TXT/CSV/Parquet), joined in order.

        Raises:
            MultiteachError: A folder holds no images, or no entry of the lists exists.
        """
        tables: list[PathTable] = []
        missing: list[str] = []
        missing_total = 0
        for src in sources:
            p = Path(src).expanduser()
            if p.is_dir():
                table = walk_folder(p, extensions)
                if not len(table):
                    raise no_images_error(p, extensions)
            else:
                table, gone, n_gone = present_entries(read_list(p), p)
                missing += gone[: LISTED - len(missing)] if len(missing) < LISTED else []
                missing_total += n_gone
            tables.append(table)
        return cls(PathTable.concat(tables), ", ".join(map(str, sources)), missing, missing_total)

    @property
    def paths(self) -> PathTable:
        """The tile paths, by tile index (a sequence of str)."""
        return self.table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Image.Image:
        """Tile ``index`` as an RGB image (the next readable one when it is unreadable)."""
        return self.read(index, 0).image

    def read(self, index: int, epoch: int) -> SourceTile:
        """File ``index`` decoded as RGB; an unreadable file is replaced by the next readable one.

        Raises:
            MultiteachError: Every file is unreadable.
        """
        return read_or_next(
            index,
            len(self.table),
            self._attempt,
            IMAGE_ERRORS,
            self._failed,
            f"All {len(self.table)} image(s) from {self.source!r} are unreadable or corrupt; see the log.",
        )

    def _attempt(self, i: int) -> tuple[Image.Image, str] | None:
        if i in self._bad:
            return None
        path = self.table[i]
        return load_rgb(path), path

    def _failed(self, i: int, err: BaseException) -> tuple[str, str]:
        self._bad.add(i)
        path, reason = self.table[i], f"{type(err).__name__}: {err}"
        logger.warning("skipping unreadable image %s (%s)", path, reason)
        return path, reason

    def describe(self) -> dict[str, Any]:
        """Facts for ``data.json``."""
        return {
            "kind": "tiles",
            "source": self.source,
            "samples": len(self),
            "path_table_mb": round(self.table.nbytes / 2**20, 2),
            "skipped": [{"what": p, "reason": "listed but missing"} for p in self.missing],
            "skipped_total": self.missing_total,
        }


def no_images_error(folder: Path, extensions: Iterable[str]) -> MultiteachError:
    """The error for a tile folder without images (pointing to ``data.slides`` when it holds slides)."""
    exts = ", ".join(sorted({e.lower().lstrip(".") for e in extensions}))
    return MultiteachError(
        f"No images found under {str(folder)!r}; allowed extensions: {exts} (at any depth).{slides_hint(folder)}"
    )


def present_entries(table: PathTable, list_file: Path) -> tuple[PathTable, list[str], int]:
    """Drop list entries whose file does not exist.

    Up to :data:`FULL_CHECK` entries are checked one by one and the missing ones removed; a longer list is
    checked on an even spread of :data:`SAMPLE_CHECK` entries (missing ones elsewhere are skipped when read).

    Returns:
        ``(table, first missing entries (at most LISTED), number found missing)``.

    Raises:
        MultiteachError: The list is empty, or none of the checked entries exists.
    """
    n = len(table)
    if not n:
        raise MultiteachError(f"Path list {str(list_file)!r} names no images.")
    checked = np.arange(n) if n <= FULL_CHECK else np.linspace(0, n - 1, SAMPLE_CHECK).astype(np.int64)
    exists = np.fromiter((os.path.exists(table[int(i)]) for i in checked), dtype=bool, count=len(checked))
    gone = [table[int(i)] for i in checked[~exists][:LISTED]]
    if not exists.any():
        raise MultiteachError(
            f"None of the {len(checked)} entries checked in {str(list_file)!r} exists (e.g. {gone[0]!r}). Relative "
            f"entries are read against the list's folder {str(list_file.parent)!r}."
        )
    n_gone = int((~exists).sum())
    if n_gone:
        scope = "" if n <= FULL_CHECK else f" of {len(checked)} checked (the rest are checked when read)"
        logger.warning(
            "%s: %d entr%s missing%s, skipped; first: %s",
            list_file,
            n_gone,
            "y" if n_gone == 1 else "ies",
            scope,
            ", ".join(gone),
        )
    if n <= FULL_CHECK and n_gone:
        table = table.select(exists)
    return table, gone, n_gone
