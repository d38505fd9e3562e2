"""Tiles in WebDataset tar shards, read by offset: one file per few thousand tiles, for cluster file systems and
object stores mounted as files.

The format is WebDataset's (plain POSIX tar; the members of one sample share a key, the name up to the first dot
of the base name; a tile is the sample's ``jpg``/``jpeg``/``png``/``webp``/``tif``/``tiff`` member). WebDataset
itself streams shards sequentially, which cannot give multiteach's loader contract (exact resume, one process x
32 = two x 16). Here each shard's member offsets are listed once (tar headers only, no image read) into the index
folder shared by runs, and a tile is one ``pread`` at its offset. ``multiteach data shard`` writes shards with the
``webdataset`` package (``pip install 'multiteach[shards]'``); any WebDataset writer, or ``tar``, works too.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from multiteach.atomic import atomic_path
from multiteach.data.lists.images import IMAGE_ERRORS
from multiteach.data.sources.base import SourceTile, read_or_next
from multiteach.errors import MultiteachError

logger = logging.getLogger("multiteach.data")

IMAGE_MEMBERS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "tif", "tiff")
INDEX_FORMAT = 1


def default_shard_index_dir() -> Path:
    """Where shard offset lists are kept: ``$MULTITEACH_INDEX_DIR/shards`` or the user cache folder."""
    root = os.environ.get("MULTITEACH_INDEX_DIR")
    if root:
        return Path(root).expanduser() / "shards"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "multiteach" / "shard-index"


def _members(shard: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(offsets, sizes, keys)`` of the image members of one tar shard, read from its headers."""
    offsets, sizes, keys = [], [], []
    with tarfile.open(shard, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = os.path.basename(info.name)
            key, _, ext = base.partition(".")
            if ext.lower() in IMAGE_MEMBERS:
                offsets.append(info.offset_data)
                sizes.append(info.size)
                keys.append(os.path.join(os.path.dirname(info.name), key))
    return np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64), keys


def shard_offsets(shard: Path, index_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The image members of ``shard`` as ``(offsets, sizes)``, from the index folder or listed now and saved.

    The entry is keyed by the shard's absolute path, size and modification time.
    """
    st = shard.stat()
    ident = f"{INDEX_FORMAT}|{os.path.abspath(shard)}|{st.st_size}|{st.st_mtime_ns}"
    entry = index_dir / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.npz"
    if entry.is_file():
        with np.load(entry) as z:
            return z["offsets"], z["sizes"]
    offsets, sizes, _ = _members(shard)
    index_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(entry, fsync=False) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, offsets=offsets, sizes=sizes, shard=np.array(str(shard)))
    return offsets, sizes


class ShardSource:
    """Tiles of WebDataset tar shards; ``read(i, epoch)`` reads member ``i`` by offset (the epoch does not matter).

    Args:
        shards: The ``.tar`` files, in order.
        index_dir: Where their offset lists are kept (default :func:`default_shard_index_dir`).
        source: What to name in messages.
    """

    shuffle = True

    def __init__(self, shards: Sequence[Path], index_dir: Path | None = None, source: str = "") -> None:
        if not shards:
            raise MultiteachError(f"No .tar shards in {source!r}.")
        index_dir = index_dir or default_shard_index_dir()
        self.shards = [str(s) for s in shards]
        self.source = source or ", ".join(self.shards)
        lists = [shard_offsets(Path(s), index_dir) for s in shards]
        self.offsets = np.concatenate([o for o, _ in lists])
        self.sizes = np.concatenate([s for _, s in lists])
        self.shard_of = np.concatenate([np.full(len(o), i, dtype=np.int32) for i, (o, _) in enumerate(lists)])
        if not len(self.offsets):
            raise MultiteachError(f"The shards of {self.source!r} hold no image members ({', '.join(IMAGE_MEMBERS)}).")
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._bad: set[int] = set()

    @classmethod
    def from_sources(cls, sources: Sequence[str | os.PathLike[str]]) -> ShardSource:
        """Every ``.tar`` of the given folders (sorted) and files."""
        shards: list[Path] = []
        for src in sources:
            p = Path(src).expanduser()
            shards += sorted(q for q in p.iterdir() if q.suffix.lower() == ".tar") if p.is_dir() else [p]
        return cls(shards, source=", ".join(map(str, sources)))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def paths(self) -> list[str]:
        """Every tile's provenance (``shard.tar@offset``), by tile index."""
        return [f"{self.shards[s]}@{o}" for s, o in zip(self.shard_of.tolist(), self.offsets.tolist())]

    def __getitem__(self, index: int) -> Image.Image:
        return self.read(index, 0).image

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def read(self, index: int, epoch: int) -> SourceTile:
        """Member ``index`` decoded as RGB (the next readable member when it cannot be read or decoded)."""
        return read_or_next(
            index,
            len(self),
            self._attempt,
            IMAGE_ERRORS,
            self._failed,
            f"All {len(self)} tiles of {self.source!r} are unreadable; see the log.",
        )

    def _where(self, i: int) -> str:
        return f"{self.shards[int(self.shard_of[i])]}@{int(self.offsets[i])}"

    def _attempt(self, i: int) -> tuple[Image.Image, str] | None:
        if i in self._bad:
            return None
        data = os.pread(self._fd(int(self.shard_of[i])), int(self.sizes[i]), int(self.offsets[i]))
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB"), self._where(i)

    def _failed(self, i: int, err: BaseException) -> tuple[str, str]:
        self._bad.add(i)
        where, reason = self._where(i), f"{type(err).__name__}: {err}"
        logger.warning("skipping unreadable shard member %s (%s)", where, reason)
        return where, reason

    def describe(self) -> dict[str, Any]:
        """Facts for ``data.json``."""
        return {
            "kind": "shards",
            "source": self.source,
            "samples": len(self),
            "shards": len(self.shards),
            "skipped": [],
        }


def write_shards(paths: Sequence[str], out: str | os.PathLike[str], tiles_per_shard: int = 10_000) -> list[Path]:
    """Pack image files into WebDataset shards ``out/shard-000000.tar``, ... with the ``webdataset`` package.

    Each sample is ``{"__key__": "%09d", "<ext>": bytes, "json": {"path": original path}}``.

    Raises:
        MultiteachError: ``webdataset`` is not installed (``pip install 'multiteach[shards]'``).
    """
    try:
        import webdataset as wds
    except ImportError as err:
        raise MultiteachError("Writing shards needs webdataset: pip install 'multiteach[shards]'") from err
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=tiles_per_shard, verbose=0) as sink:
        for i, path in enumerate(paths):
            ext = Path(path).suffix.lower().lstrip(".") or "jpg"
            sink.write({"__key__": f"{i:09d}", ext: Path(path).read_bytes(), "json": {"path": str(path)}})
    return sorted(out.glob("shard-*.tar"))
