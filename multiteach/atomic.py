"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every helper writes to a temporary file in the destination's folder (same filesystem, so the final
``os.replace`` is atomic), flushes it to disk with ``fsync``, then renames it over the destination.
If anything fails on the way, the temporary file is removed and the old file (if any) is left as it
was. Parent folders are created as needed. The finished file gets the mode a plain ``open()`` would
give it (``0o666`` minus the umask), not ``mkstemp``'s owner-only ``0o600``.

Example:
    >>> with atomic_path(folder / "table.csv") as tmp:  # doctest: +SKIP
    ...     frame.to_csv(tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "atomic_path",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
]

PathLike = str | os.PathLike[str]


def _umask_mode() -> int:
    """The mode ``open()`` would give a new file: ``0o666`` minus the process umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    """Best-effort ``fsync`` of a folder so the rename itself survives a crash (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, mode: int | None = None, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit, move it into place atomically.

    The temporary file already exists (empty) when the block starts; write it by name (``save_file(...,
    str(tmp))``, ``tmp.write_text(...)``, ...). When the block ends without an exception the file is
    fsynced, given ``mode`` and renamed over ``path``. When the block raises, or the rename fails, the
    temporary file is deleted, ``path`` is untouched and the exception propagates.

    Args:
        path: The destination file.
        mode: Permission bits of the finished file; ``None`` means ``0o666`` minus the umask.
        fsync: Flush the file and its folder to disk. ``False`` for bulk outputs that can be re-created
            (thousands of image tiles): the rename still guarantees that a crashed or killed process never
            leaves a half-written file in place; only an operating-system crash could.

    Yields:
        The temporary file's path (same folder as ``path``, hidden name ending in ``.tmp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, _umask_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if fsync:
        _fsync_dir(path.parent)


def atomic_write(path: PathLike, write: Callable[[Path], object], mode: int | None = None) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then move it into place atomically.

    Args:
        path: The destination file.
        write: Writes the whole file to the path it is given; its return value is ignored.
        mode: Permission bits of the finished file; ``None`` means ``0o666`` minus the umask.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_path(path, mode) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: The destination file.
        data: The whole file's content.
        mode: Permission bits of the finished file; ``None`` means ``0o666`` minus the umask.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), mode)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8", mode: int | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (newlines written as given, no platform translation).

    Args:
        path: The destination file.
        text: The whole file's content.
        encoding: Text encoding.
        mode: Permission bits of the finished file; ``None`` means ``0o666`` minus the umask.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write_bytes(path, text.encode(encoding), mode)


def atomic_write_json(path: PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (no trailing newline).

    Args:
        path: The destination file.
        obj: Anything :func:`json.dumps` accepts.
        **dumps_kwargs: Passed to :func:`json.dumps`; ``indent`` defaults to 2.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    dumps_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs))


def atomic_save_safetensors(
    path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Save ``tensors`` as a safetensors file atomically (detached and made contiguous first).

    Args:
        path: The destination file.
        tensors: Name -> tensor.
        metadata: The file's string metadata header, if any.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from safetensors.torch import save_file  # keeps this module free of torch for light callers

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
