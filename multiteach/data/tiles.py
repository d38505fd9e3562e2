"""Tile discovery and a fault-tolerant image dataset.

Images are found in nested folders (``find_images``), in CSV/TXT path lists (``read_path_list``)
or in class sub-folders (``labelled_folder``). ``TileDataset`` decodes them with PIL as RGB and
never crashes a run on a bad file: unreadable or truncated images are skipped, logged once on the
``multiteach.data`` logger and replaced by the next readable image.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from multiteach.errors import MultiteachError, did_you_mean, missing_path

logger = logging.getLogger("multiteach.data")

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "tif", "tiff")
PATH_COLUMNS: tuple[str, ...] = ("path", "file")
# Everything PIL raises for a missing, unidentified, truncated or malformed file.
IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({e.lower().lstrip(".") for e in extensions}))


def find_images(root: str | os.PathLike[str], extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Find every image under ``root``, at any depth, in a deterministic order.

    Extensions match case-insensitively; hidden files and folders (``.name``, e.g. macOS ``._x.jpg``)
    are ignored. Symlinked folders are followed once.

    Args:
        root: Folder to search.
        extensions: Allowed file extensions, with or without the dot.

    Returns:
        Paths sorted by their path relative to ``root``.

    Raises:
        MultiteachError: If ``root`` is missing, is not a folder or holds no images.
    """
    root = Path(root).expanduser()
    exts = _normalise_extensions(extensions)
    if not root.exists():
        raise missing_path("Image folder", root)
    if not root.is_dir():
        raise MultiteachError(f"Image folder {str(root)!r} is not a folder.")
    from multiteach.data.sources.paths import walk_folder  # here: the sources package imports this module

    found = walk_folder(root, exts)
    if not len(found):
        raise MultiteachError(
            f"No images found under {str(root)!r}; allowed extensions: {', '.join(exts)} (at any depth)."
        )
    return [Path(p) for p in found]


def read_path_list(list_file: str | os.PathLike[str]) -> list[Path]:
    """Read image paths from a CSV (``path`` or ``file`` column) or a text file (one per line).

    A file ending in ``.csv`` is read as CSV with a header row; anything else as text, where blank
    lines and lines starting with ``#`` are ignored. Relative paths are resolved against the
    folder that holds the list.

    Args:
        list_file: The ``.csv`` or ``.txt`` list.

    Returns:
        The paths in file order. They are not checked here (see ``TileDataset.scan``).

    Raises:
        MultiteachError: If the list is missing, empty, or a CSV lacks a path column.
    """
    list_file = Path(list_file).expanduser()
    if not list_file.is_file():
        raise MultiteachError(f"Path list {str(list_file)!r} does not exist.")
    with list_file.open(newline="", encoding="utf-8-sig") as fh:
        if list_file.suffix.lower() == ".csv":
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            column = next((c for c in columns if c.lower() in PATH_COLUMNS), None)
            if column is None:
                raise MultiteachError(
                    f"CSV {str(list_file)!r} needs a 'path' or 'file' column; it has: {', '.join(columns) or 'none'}."
                    + did_you_mean("path", columns)
                )
            reader.fieldnames = columns
            entries = [(row.get(column) or "").strip() for row in reader]
        else:
            entries = [line.strip() for line in fh]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise MultiteachError(f"Path list {str(list_file)!r} names no images.")
    base = list_file.parent
    return [p if p.is_absolute() else base / p for p in (Path(e).expanduser() for e in entries)]


def labelled_folder(
    root: str | os.PathLike[str], extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> tuple[list[Path], list[int], list[str]]:
    """Read an ImageFolder-style tree: each immediate sub-folder of ``root`` is one class.

    Images may be nested below the class folder. Sub-folders without images are ignored, and so are
    images lying directly in ``root`` (with a warning).

    Args:
        root: Folder whose sub-folders are the classes.
        extensions: Allowed file extensions.

    Returns:
        ``(paths, labels, class_names)``: paths sorted per class, integer labels indexing the
        alphabetically sorted ``class_names``.

    Raises:
        MultiteachError: If ``root`` is missing or fewer than 2 sub-folders hold images.
    """
    root = Path(root).expanduser()
    find_images(root, extensions)  # raises for a missing or image-less folder
    exts = _normalise_extensions(extensions)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class: dict[str, list[Path]] = {}
    for d in subdirs:
        try:
            per_class[d.name] = find_images(d, exts)
        except MultiteachError:
            continue
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in exts]
    if loose:
        logger.warning("labelled_folder: ignoring %d image(s) directly in %s (not in a class folder)", len(loose), root)
    if len(per_class) < 2:
        raise MultiteachError(
            f"Labelled folder {str(root)!r} needs at least 2 class sub-folders with images; found "
            f"{len(per_class)} ({', '.join(per_class) or 'none'}). Put each class's images in root/<class>/."
        )
    class_names = sorted(per_class)
    paths = [p for c in class_names for p in per_class[c]]
    labels = [i for i, c in enumerate(class_names) for _ in per_class[c]]
    return paths, labels, class_names


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image fully (truncation raises here, not later) and convert it to RGB."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def verify_image(path: str | os.PathLike[str]) -> None:
    """Check a file with PIL's ``verify`` and a full decode; raises one of ``IMAGE_ERRORS``."""
    with Image.open(path) as im:
        im.verify()
    load_rgb(path)


class TileDataset:
    """Map-style dataset of image tiles that survives unreadable files.

    ``dataset[i]`` returns ``transform(rgb_pil_image)`` (the PIL image itself when ``transform`` is
    None), or ``(that, label)`` when labels were given. If image ``i`` cannot be decoded it is
    recorded in ``skipped``, logged once, and the next readable image (with its label) is returned.
    Each DataLoader worker keeps its own ``skipped``; call ``scan()`` first for an exact count and
    for stable indices (after a scan, index ``i`` always returns ``paths[i]``).

    Args:
        paths: Image files.
        transform: Callable applied to the RGB PIL image (e.g. ``MultiCropTransform``).
        labels: One integer label per path, or None.
        scan: Verify every file now (see ``scan``) and drop the unreadable ones.
        source: Folder or list the paths came from, named in error messages.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        transform: Callable[[Image.Image], Any] | None = None,
        labels: Sequence[int] | None = None,
        *,
        scan: bool = False,
        source: str | os.PathLike[str] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.labels = None if labels is None else [int(x) for x in labels]
        self.source = str(source) if source is not None else None
        self.class_names: list[str] | None = None
        self._skipped: dict[Path, str] = {}
        where = f" from {self.source!r}" if self.source else ""
        if not self.paths:
            raise MultiteachError(f"TileDataset got no image paths{where}.")
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise MultiteachError(f"TileDataset got {len(self.paths)} paths but {len(self.labels)} labels{where}.")
        if scan:
            self.scan()

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        labelled: bool = False,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        scan: bool = False,
    ) -> TileDataset:
        """Build from a folder (any nesting), or from class sub-folders when ``labelled``.

        With ``labelled=True`` the class names are stored on ``dataset.class_names``.
        """
        class_names: list[str] | None = None
        labels: list[int] | None = None
        if labelled:
            paths, labels, class_names = labelled_folder(root, extensions)
        else:
            paths = find_images(root, extensions)
        ds = cls(paths, transform, labels, scan=scan, source=root)
        ds.class_names = class_names
        return ds

    @classmethod
    def from_list(
        cls,
        list_file: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        scan: bool = False,
    ) -> TileDataset:
        """Build from a CSV/TXT path list (see ``read_path_list``)."""
        return cls(read_path_list(list_file), transform, scan=scan, source=list_file)

    @property
    def skipped(self) -> list[Path]:
        """Paths found unreadable so far in this process, in the order they were met."""
        return list(self._skipped)

    def _record_bad(self, path: Path, err: BaseException) -> None:
        if path not in self._skipped:
            self._skipped[path] = f"{type(err).__name__}: {err}"
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)

    def scan(self) -> list[Path]:
        """Verify every file (PIL ``verify`` plus a full decode) and drop the unreadable ones.

        Returns:
            The paths dropped by this scan.

        Raises:
            MultiteachError: If every image is unreadable.
        """
        good: list[int] = []
        bad: list[Path] = []
        for i, path in enumerate(self.paths):
            try:
                verify_image(path)
            except IMAGE_ERRORS as err:
                self._record_bad(path, err)
                bad.append(path)
            else:
                good.append(i)
        if not good:
            where = self.source or (str(self.paths[0].parent) if self.paths else "?")
            first = self._skipped.get(bad[0], "") if bad else ""
            raise MultiteachError(
                f"All {len(self.paths)} image(s) from {where!r} are unreadable or corrupt (first error: {first})."
            )
        self.paths = [self.paths[i] for i in good]
        if self.labels is not None:
            self.labels = [self.labels[i] for i in good]
        if bad:
            logger.warning("scan: %d of %d image(s) unreadable and dropped", len(bad), len(bad) + len(good))
        return bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for offset in range(n):
            i = (index + offset) % n
            path = self.paths[i]
            if path in self._skipped:
                continue
            try:
                image = load_rgb(path)
            except IMAGE_ERRORS as err:
                self._record_bad(path, err)
                continue
            out = image if self.transform is None else self.transform(image)
            return out if self.labels is None else (out, self.labels[i])
        where = f" from {self.source!r}" if self.source else ""
        raise MultiteachError(f"All {n} image(s){where} are unreadable or corrupt; see the multiteach.data log.")
