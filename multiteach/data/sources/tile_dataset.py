"""``TileDataset``: a map-style dataset of tile image files that never crashes a run on a bad file.

Unreadable or truncated images are skipped, logged once on the ``multiteach.data`` logger and replaced by the
next readable image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from multiteach.data.lists.images import (
    IMAGE_ERRORS,
    IMAGE_EXTENSIONS,
    find_images,
    labelled_folder,
    load_rgb,
    logger,
    read_path_list,
    verify_image,
)
from multiteach.errors import MultiteachError


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
