"""The index of one slide list: ``SlideIndex`` (compact arrays of the usable slides) and its summary file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multiteach.atomic import atomic_path
from multiteach.data.index.entries import INDEX_FORMAT, LISTS_DIR, SEP, IndexSettings, entry_key, entry_path
from multiteach.data.lists.slide_list import SlideTable


@dataclass(eq=False)
class SlideIndex:
    """The usable slides of a list with what the sampler needs, as compact arrays (n = usable slides).

    Masks are not held here: each worker loads the masks of the slides it reads from ``entries`` (see
    :func:`load_mask`), so the main process stays small at any number of slides.

    Attributes:
        slides: Slide paths as listed (absolute), shape ``(n,)``.
        entries: Entry file of each slide, shape ``(n,)``.
        mpp: float64 ``(n,)``: level-0 µm/px used (CSV ``mpp``, else metadata, else ``data.slides.mpp``).
        weight: float64 ``(n,)``: sampling weight from the list (>= 0).
        tissue_px: int64 ``(n,)``: tissue pixels of the mask.
        scale: float64 ``(n, 2)``: level-0 pixels per mask pixel along x and y.
        dims: int64 ``(n, 2)``: level-0 width and height in pixels.
        bounds: int64 ``(n, 4)``: scanned area ``(x, y, width, height)`` in level-0 pixels.
        background: uint8 ``(n, 3)``: colour of unscanned pixels.
        level_start: int64 ``(n + 1,)``: slide ``i``'s levels are rows ``level_start[i]:level_start[i + 1]`` of
            ``downsamples`` and ``level_dims``.
        downsamples: float64 ``(levels,)``: each level's downsample from level 0, ascending per slide.
        level_dims: int64 ``(levels, 2)``: each level's width and height.
        skipped: ``(slide, reason)`` for every listed slide that is not usable (missing, unreadable, without
            µm/px, without tissue).
        index_dir: The index folder.
        source: The slide list(s) it was built for.
        built: Entries built by the call that returned it.
        reused: Entries found already built.
        seconds: Wall time of the call that returned it.
    """

    slides: list[str]
    entries: list[str]
    mpp: np.ndarray
    weight: np.ndarray
    tissue_px: np.ndarray
    scale: np.ndarray
    dims: np.ndarray
    bounds: np.ndarray
    background: np.ndarray
    level_start: np.ndarray
    downsamples: np.ndarray
    level_dims: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    index_dir: str = ""
    source: str = ""
    built: int = 0
    reused: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.slides)

    def __repr__(self) -> str:
        return (
            f"SlideIndex({len(self)} slides, {len(self.skipped)} skipped, built {self.built}, reused {self.reused}, "
            f"in {self.index_dir!r})"
        )

    @property
    def tissue_um2(self) -> np.ndarray:
        """float64 ``(n,)``: tissue area of each slide in µm² (mask pixels x pixel area at level 0)."""
        return self.tissue_px * self.scale[:, 0] * self.scale[:, 1] * self.mpp**2

    def levels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(downsamples (L,), level_dims (L, 2))`` of slide ``i``."""
        a, b = int(self.level_start[i]), int(self.level_start[i + 1])
        return self.downsamples[a:b], self.level_dims[a:b]

    # ---- summary file -------------------------------------------------------------------------------

    _ARRAYS = ("mpp", "weight", "tissue_px", "scale", "dims", "bounds", "background", "level_start")

    def _save(self, path: Path) -> None:
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        arrays["downsamples"], arrays["level_dims"] = self.downsamples, self.level_dims
        arrays["format"] = np.int64(INDEX_FORMAT)
        for name, values in (
            ("slides", self.slides),
            ("entries", self.entries),
            ("skipped_what", [w for w, _ in self.skipped]),
            ("skipped_reason", [r for _, r in self.skipped]),
        ):
            arrays[name] = np.frombuffer(SEP.join(values).encode("utf-8", "surrogateescape"), dtype=np.uint8)
        with atomic_path(path, fsync=False) as tmp, tmp.open("wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def _load(cls, path: Path) -> SlideIndex | None:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if int(npz["format"]) != INDEX_FORMAT:
                    return None
                data = {name: npz[name] for name in npz.files}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
            return None

        def strings(name: str) -> list[str]:
            text = data[name].tobytes().decode("utf-8", "surrogateescape")
            return text.split(SEP) if text else []

        slides, entries = strings("slides"), strings("entries")
        skipped = list(zip(strings("skipped_what"), strings("skipped_reason")))
        arrays = {name: data[name] for name in (*cls._ARRAYS, "downsamples", "level_dims")}
        return cls(slides=slides, entries=entries, skipped=skipped, **arrays)


@dataclass
class Listed:
    """A listed slide's identity, entry and (once known) header."""

    path: str
    mpp: float
    weight: float
    key: str
    entry: str
    identity: str
    header: dict[str, Any] | None = None


def identify(table: SlideTable, settings: IndexSettings, index_dir: Path) -> tuple[list[Listed], list[tuple[str, str]]]:
    """Stat every slide: its entry key and path; slides gone since listing go to the skipped list."""
    listed: list[Listed] = []
    gone: list[tuple[str, str]] = []
    for path, mpp, weight in zip(table.paths, table.mpp.tolist(), table.weight.tolist()):
        try:
            st = os.stat(path)
        except OSError as err:
            gone.append((path, f"cannot be read: {type(err).__name__}: {err}"))
            continue
        real = os.path.realpath(path)
        key = entry_key(real, st.st_size, st.st_mtime_ns, settings)
        identity = json.dumps({"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        listed.append(Listed(path, mpp, weight, key, entry_path(index_dir, key), identity))
    return listed, gone


def summary_path(index_dir: Path, listed: Sequence[Listed], settings: IndexSettings) -> Path:
    digest = hashlib.sha256(json.dumps([INDEX_FORMAT, settings.mask_settings(), settings.mpp]).encode())
    for item in listed:
        digest.update(
            f"{item.path}{SEP}{item.key}{SEP}{item.mpp!r}{SEP}{item.weight!r}\n".encode("utf-8", "surrogateescape")
        )
    return index_dir / LISTS_DIR / f"{digest.hexdigest()[:32]}.npz"


_NO_MPP = (
    "records no µm/px in its metadata (no openslide.mpp-x or aperio.MPP); give its level-0 µm/px with "
    "data.slides.mpp (every slide without one; `multiteach data index --mpp`) or the mpp column of a CSV slide "
    "list (this slide)"
)


def assemble(listed: Sequence[Listed], settings: IndexSettings) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The SlideIndex arrays of the usable slides, and the skipped ones with reasons."""
    rows: list[tuple[Listed, float, dict[str, Any]]] = []
    skipped: list[tuple[str, str]] = []
    for item in listed:
        header = item.header
        assert header is not None
        if not bool(header["ok"]):
            skipped.append((item.path, f"unreadable: {header['reason']}"))
            continue
        mpp = item.mpp
        if not math.isfinite(mpp):
            mpp = float(header["mpp_meta"])
        if not math.isfinite(mpp):
            mpp = settings.mpp if settings.mpp is not None else math.nan
        if not math.isfinite(mpp):
            skipped.append((item.path, _NO_MPP))
            continue
        if int(header["tissue_px"]) == 0:
            skipped.append(
                (
                    item.path,
                    f"no tissue found on its {int(header['mask_shape'][1])}x{int(header['mask_shape'][0])} mask "
                    f"(min_saturation={settings.min_saturation}); lower data.slides.min_saturation for pale tissue",
                )
            )
            continue
        rows.append((item, mpp, header))
    counts = np.array([len(h["downsamples"]) for _, _, h in rows], dtype=np.int64)
    level_start = np.zeros(len(rows) + 1, dtype=np.int64)
    level_start[1:] = np.cumsum(counts)

    def stack(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        if not rows:
            return np.zeros((0, *shape), dtype=dtype)
        return np.stack([np.asarray(h[name], dtype=dtype).reshape(shape) for _, _, h in rows])

    arrays = {
        "slides": [item.path for item, _, _ in rows],
        "entries": [item.entry for item, _, _ in rows],
        "mpp": np.array([m for _, m, _ in rows], dtype=np.float64),
        "weight": np.array([item.weight for item, _, _ in rows], dtype=np.float64),
        "tissue_px": np.array([int(h["tissue_px"]) for _, _, h in rows], dtype=np.int64),
        "scale": stack("scale", np.float64, (2,)),
        "dims": stack("dims", np.int64, (2,)),
        "bounds": stack("bounds", np.int64, (4,)),
        "background": stack("background", np.uint8, (3,)),
        "level_start": level_start,
        "downsamples": np.concatenate([np.asarray(h["downsamples"], np.float64) for _, _, h in rows])
        if rows
        else np.zeros(0, np.float64),
        "level_dims": np.concatenate([np.asarray(h["level_dims"], np.int64).reshape(-1, 2) for _, _, h in rows])
        if rows
        else np.zeros((0, 2), np.int64),
    }
    return arrays, skipped
