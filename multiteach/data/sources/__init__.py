"""Training sources: one small module per way in, each mapping ``(index, epoch)`` to one RGB tile + provenance.

See :mod:`multiteach.data.sources.base` for the contract. :func:`open_tile_source` picks the source for
``data.train`` entries; online patching (``data.slides``) sits a floor above, in :mod:`multiteach.data.online`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from multiteach.data.lists.paths import PathTable, read_list, walk_folder, write_text_list
from multiteach.data.sources.base import SourceTile, TileSource
from multiteach.data.sources.coords import CoordSource, CoordTable, read_coord_csv
from multiteach.data.sources.shards import ShardSource
from multiteach.data.sources.tile_dataset import TileDataset
from multiteach.data.sources.tiles import TileListSource
from multiteach.data.sources.trident import TridentSource
from multiteach.errors import MultiteachError

__all__ = [
    "CoordSource",
    "CoordTable",
    "PathTable",
    "ShardSource",
    "SourceTile",
    "TileDataset",
    "TileListSource",
    "TileSource",
    "TridentSource",
    "open_tile_source",
    "read_list",
    "source_kind",
    "walk_folder",
    "write_text_list",
]


def source_kind(path: str | os.PathLike[str]) -> str:
    """``"trident"`` (a folder of coordinate ``.h5`` files or one such file), ``"coords"`` (a coordinate CSV with a
    ``slide`` column), ``"shards"`` (a folder of ``.tar`` shards) or ``"tiles"`` (a tile folder or a list file)."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".h5":
            return "trident"
        if p.suffix.lower() == ".csv":
            with p.open(encoding="utf-8-sig") as fh:
                header = [c.strip() for c in fh.readline().split(",")]
            return "coords" if "slide" in header and "path" not in header else "tiles"
        return "tiles"
    if p.is_dir():
        with os.scandir(p) as it:
            suffixes = {Path(e.name).suffix.lower() for e in it if e.is_file() and not e.name.startswith(".")}
        if ".h5" in suffixes:
            return "trident"
        if ".tar" in suffixes:
            return "shards"
    return "tiles"


def open_tile_source(
    sources: Sequence[str | os.PathLike[str]],
    extensions: Sequence[str],
    slide_dir: str | os.PathLike[str] | None = None,
) -> TileSource:
    """The source for ``data.train`` entries (all of one kind; see :func:`source_kind`); ``slide_dir`` holds the
    slides that TRIDENT/CLAM coordinate files name."""
    kinds = {str(s): source_kind(s) for s in sources}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{s} ({k})" for s, k in kinds.items())
        raise MultiteachError(f"data.train: entries of one kind per run, got {listed}")
    kind = next(iter(kinds.values()))
    if kind == "trident":
        return TridentSource.from_sources(sources, slide_dir)
    if kind == "coords":
        return CoordSource(CoordTable.concat([read_coord_csv(s) for s in sources]), ", ".join(map(str, sources)))
    if kind == "shards":
        return ShardSource.from_sources(sources)
    return TileListSource.from_sources(sources, extensions)
