"""Tile image files: finding them (nested folders, CSV/TXT path lists, class sub-folders) and decoding them.

Images are found in nested folders (``find_images``), in CSV/TXT path lists (``read_path_list``) or in class
sub-folders (``labelled_folder``); ``load_rgb`` decodes one fully as RGB and ``IMAGE_ERRORS`` lists what PIL
raises for a bad file.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from multiteach.data.lists.paths import walk_folder
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
