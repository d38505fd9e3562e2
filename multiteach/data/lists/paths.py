"""Millions of file paths in one buffer: :class:`PathTable`, and the fast readers that fill it.

A Python ``list[Path]`` costs ~0.6 KB per tile and is copied page by page into every DataLoader worker as
reference counts are touched. A :class:`PathTable` holds every path as UTF-8 bytes in one ``uint8`` array with
``int64`` start/end offsets and a shared prefix: ~16 bytes plus the relative path per tile, and nothing a worker
writes to. It is filled without a Python object per tile:

- :func:`walk_folder` descends a folder in sorted order (the order of the sorted relative paths);
- :func:`read_text_list` finds the lines of a text list with numpy;
- :func:`read_table_list` takes the ``path`` column of a CSV or Parquet list as Arrow buffers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from multiteach.atomic import atomic_path
from multiteach.errors import MultiteachError, did_you_mean

PATH_COLUMNS: tuple[str, ...] = ("path", "file")
TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".parquet", ".pq")


class PathTable(Sequence[str]):
    """An immutable sequence of paths stored as one byte buffer.

    ``table[i]`` is ``prefix + blob[starts[i]:ends[i]]`` decoded as UTF-8.

    Args:
        blob: ``(nbytes,) uint8``: the paths' bytes (possibly with separators between them).
        starts: ``(N,) int64``: where each path starts in ``blob``.
        ends: ``(N,) int64``: where each path ends (exclusive).
        prefix: Prepended to every path (a folder with a trailing separator, or "").
    """

    def __init__(self, blob: np.ndarray, starts: np.ndarray, ends: np.ndarray, prefix: str = "") -> None:
        self.blob = np.ascontiguousarray(blob, dtype=np.uint8)
        self.starts = np.ascontiguousarray(starts, dtype=np.int64)
        self.ends = np.ascontiguousarray(ends, dtype=np.int64)
        self.prefix = prefix
        if self.starts.shape != self.ends.shape:
            raise ValueError(f"PathTable: {self.starts.shape} starts but {self.ends.shape} ends")

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike[str]], prefix: str = "") -> PathTable:
        """Build from an iterable of paths (each relative to ``prefix``)."""
        parts = [os.fsencode(p) for p in paths]
        lengths = np.fromiter((len(b) for b in parts), dtype=np.int64, count=len(parts))
        ends = np.cumsum(lengths)
        blob = np.frombuffer(b"".join(parts), dtype=np.uint8)
        return cls(blob, ends - lengths, ends, prefix)

    @classmethod
    def concat(cls, tables: Sequence[PathTable]) -> PathTable:
        """One table holding every path of ``tables`` in order (prefixes folded into the paths when they differ)."""
        if len(tables) == 1:
            return tables[0]
        prefixes = {t.prefix for t in tables}
        common = prefixes.pop() if len(prefixes) == 1 else ""
        blobs, starts, ends, offset = [], [], [], 0
        for t in tables:
            if t.prefix != common:  # rare (several folders): re-encode with the prefix folded in
                t = cls.from_paths((t[i] for i in range(len(t))), prefix="")
            blobs.append(t.blob)
            starts.append(t.starts + offset)
            ends.append(t.ends + offset)
            offset += len(t.blob)
        return cls(np.concatenate(blobs), np.concatenate(starts), np.concatenate(ends), common)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("PathTable does not slice; index one path at a time")
        i = int(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for {n} paths")
        i %= n
        return self.prefix + bytes(self.blob[self.starts[i] : self.ends[i]]).decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def select(self, keep: np.ndarray) -> PathTable:
        """The paths at ``keep`` (a boolean mask or integer indices), sharing this table's buffer."""
        return PathTable(self.blob, self.starts[keep], self.ends[keep], self.prefix)

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's arrays."""
        return int(self.blob.nbytes + self.starts.nbytes + self.ends.nbytes)


def _has_extension(name: str, exts: frozenset[str]) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot + 1 :].lower() in exts


def walk_folder(root: str | os.PathLike[str], extensions: Iterable[str]) -> PathTable:
    """Every image under ``root`` (any depth), as a :class:`PathTable` with prefix ``root/``.

    The order is that of the sorted relative POSIX paths (a folder ``d`` sorts as ``d/``), found by a
    depth-first walk with one sorted ``scandir`` per folder: no global sort, no Python object kept per file.
    Hidden files and folders (``.name``) are ignored; symlinked folders are followed once (cycles cut).

    Args:
        root: Folder to search.
        extensions: Allowed file extensions (case-insensitive, with or without the dot).

    Returns:
        The table; empty when no image was found (the caller words the error).
    """
    root = Path(root).expanduser()
    exts = frozenset(e.lower().lstrip(".") for e in extensions)
    blob = bytearray()
    ends: list[int] = []  # array('q') would be smaller, but the list is freed when the table is built
    seen: set[str] = set()

    def visit(folder: str, rel: bytes) -> None:
        real = os.path.realpath(folder)
        if real in seen:
            return
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                entries = [(e.name + "/" if e.is_dir() else e.name, e) for e in it if not e.name.startswith(".")]
        except OSError:
            return
        entries.sort(key=lambda pair: pair[0])
        for key, entry in entries:
            if key.endswith("/"):
                visit(entry.path, rel + os.fsencode(entry.name) + b"/")
            elif _has_extension(entry.name, exts):
                blob.extend(rel)
                blob.extend(os.fsencode(entry.name))
                ends.append(len(blob))

    visit(str(root), b"")
    end = np.asarray(ends, dtype=np.int64)
    start = np.concatenate([np.zeros(1, dtype=np.int64), end[:-1]]) if len(end) else end
    return PathTable(np.frombuffer(bytes(blob), dtype=np.uint8), start, end, str(root).rstrip("/") + "/")


def _base_prefix(list_file: Path) -> str:
    return str(list_file.parent.resolve()).rstrip("/") + "/"


def _absolute_or_relative(table: PathTable, list_file: Path) -> PathTable:
    """Resolve the entries of a list read from ``list_file``: relative ones against its folder."""
    if not len(table):
        return table
    first = table.blob[table.starts]
    absolute = (first == ord("/")) | (first == ord("~"))
    if not absolute.any():
        return PathTable(table.blob, table.starts, table.ends, _base_prefix(list_file))
    if absolute.all() and not (first == ord("~")).any():
        return table
    base = _base_prefix(list_file)  # a mixed list (rare): fold the folder into the relative entries
    return PathTable.from_paths(
        p if Path(p).is_absolute() else base + p for p in (os.path.expanduser(q) for q in table)
    )


def read_text_list(list_file: str | os.PathLike[str]) -> PathTable:
    """Paths of a text list, one per line; blank lines and ``#`` comments ignored, relative paths against its folder.

    Lines are found with numpy on the file's bytes, so a list of 10^7 entries is read in about a second.
    """
    list_file = Path(list_file).expanduser()
    data = np.fromfile(list_file, dtype=np.uint8)
    if data[:3].tobytes() == b"\xef\xbb\xbf":  # UTF-8 byte-order mark
        data = data[3:]
    if not len(data):
        return PathTable(data, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    newlines = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([np.zeros(1, dtype=np.int64), newlines + 1])
    ends = np.concatenate([newlines, np.array([len(data)], dtype=np.int64)])
    ends = ends - ((ends > starts) & (data[np.maximum(ends - 1, 0)] == ord("\r")))  # CRLF
    for _ in range(2):  # trim spaces/tabs at either end (vectorised, a couple of characters is plenty)
        lead = (ends > starts) & np.isin(data[np.minimum(starts, len(data) - 1)], (32, 9))
        starts = starts + lead
        trail = (ends > starts) & np.isin(data[np.maximum(ends - 1, 0)], (32, 9))
        ends = ends - trail
    keep = ends > starts
    keep &= data[np.minimum(starts, len(data) - 1)] != ord("#")
    return _absolute_or_relative(PathTable(data, starts[keep], ends[keep]), list_file)


def read_table_list(list_file: str | os.PathLike[str]) -> PathTable:
    """The ``path`` (or ``file``) column of a CSV or Parquet list, taken as Arrow buffers (no object per row).

    Relative paths are resolved against the list's folder.

    Raises:
        MultiteachError: The file has no ``path``/``file`` column (naming the columns it has).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    list_file = Path(list_file).expanduser()
    if list_file.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(list_file)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(list_file)
    columns = [c.strip() for c in table.column_names]
    match = next((i for i, c in enumerate(columns) if c.lower() in PATH_COLUMNS), None)
    if match is None:
        raise MultiteachError(
            f"List {str(list_file)!r} needs a 'path' or 'file' column; it has: {', '.join(columns) or 'none'}."
            + did_you_mean("path", columns)
        )
    column = table.column(match).combine_chunks()
    if not pa.types.is_large_string(column.type):
        column = column.cast(pa.large_string())
    column = pc.utf8_trim_whitespace(column.fill_null(""))
    column = column.filter(pc.and_(pc.greater(pc.utf8_length(column), 0), pc.invert(pc.starts_with(column, "#"))))
    if not isinstance(column, pa.Array):
        column = column.combine_chunks()
    _, offsets, data = column.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[column.offset : column.offset + len(column) + 1]
    blob = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
    return _absolute_or_relative(PathTable(blob, offsets[:-1], offsets[1:]), list_file)


def read_list(list_file: str | os.PathLike[str]) -> PathTable:
    """A list file of tile paths: CSV/Parquet (a ``path`` column) or text (one path per line)."""
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise MultiteachError(f"Path list {str(list_file)!r} does not exist.")
    if list_file.suffix.lower() in TABLE_SUFFIXES:
        return read_table_list(list_file)
    return read_text_list(list_file)


def write_text_list(table: PathTable, out: str | os.PathLike[str]) -> Path:
    """Write every path of ``table`` to a text list (one per line), atomically; returns the path written."""
    out = Path(out).expanduser()
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        prefix = os.fsencode(table.prefix)
        chunk = 65536
        for lo in range(0, len(table), chunk):
            hi = min(len(table), lo + chunk)
            fh.write(
                b"".join(
                    prefix + table.blob[s:e].tobytes() + b"\n" for s, e in zip(table.starts[lo:hi], table.ends[lo:hi])
                )
            )
    return out
