"""Reading a cache in training: the memory-mapped :class:`FeatureCache` and :func:`open_cache`, which refuses a
cache built for another recipe."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from multiteach.build import training_source
from multiteach.cache.key import cache_key, stale_reasons
from multiteach.cache.layout import FORMAT, INDEX, META_KEY, SHARD_RE
from multiteach.data.views.multicrop import ViewParams
from multiteach.errors import MultiteachError
from multiteach.losses import active_teachers
from multiteach.teachers.base import Teacher, TeacherOutput, TeacherSpec

__all__ = ["FeatureCache", "open_cache"]

_REBUILD = "multiteach cache RECIPE [key=value ...] --overwrite"


class FeatureCache:
    """A complete cache folder, read lazily: shards are memory-mapped (``safetensors.safe_open``) on first
    use and kept open per process. Safe to pickle into DataLoader workers (open handles are not carried).

    Args:
        cache_dir: A folder written by :func:`~multiteach.cache.write_cache` (with ``index.json``).

    Attributes:
        n_views: Cached views per tile.
        names: Teachers :meth:`targets` returns (all cached ones; :func:`open_cache` narrows them to the
            recipe's active teachers).
        grids: Teacher -> cached patch grid (h', w').
        key: The key the cache was built for.
        tile_paths: Tile paths, by tile index.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir).expanduser()
        path = self.dir / INDEX
        if not path.is_file():
            partial = self.dir.is_dir() and any(SHARD_RE.match(p.name) for p in self.dir.iterdir())
            what = "is not a cache"
            if partial:
                what = "is incomplete (shards but no index.json: a writer has not finished)"
            raise MultiteachError(f"feature cache {self.dir} {what}; build it with `multiteach cache RECIPE`")
        index = json.loads(path.read_text())
        if index.get("format") != FORMAT:
            raise MultiteachError(
                f"feature cache {self.dir} has format {index.get('format')}, this version reads {FORMAT}; "
                f"rebuild it: {_REBUILD}"
            )
        self.key: dict[str, Any] = index["key"]
        self.digest: str = index["digest"]
        self.n_views: int = int(index["n_views"])
        self.n_tiles: int = int(index["n_tiles"])
        self.dtype: str = index["dtype"]
        self.grids: dict[str, tuple[int, int]] = {n: (int(g[0]), int(g[1])) for n, g in index["grids"].items()}
        self.names: list[str] = list(self.grids)
        self.tile_paths: list[str] = index["tiles"]
        self._specs: dict[str, dict[str, Any]] = index["specs"]
        self._shards: list[str] = index["shards"]
        self._locations: list[list[int]] = index["locations"]
        self._handles: dict[int, Any] = {}
        self._views: dict[int, list[list[dict[str, Any]]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_views"] = {}, {}
        return state

    def spec(self, name: str) -> TeacherSpec:
        """The loaded teacher's spec as the writer saw it (token layout, dims, preprocessing)."""
        d = dict(self._specs[name])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return TeacherSpec(**d)

    def nbytes(self) -> int:
        """Size of all shards on disk, in bytes."""
        return sum((self.dir / s).stat().st_size for s in self._shards)

    def _handle(self, shard: int) -> Any:
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(str(self.dir / self._shards[shard]), framework="pt")
        return h

    def _locate(self, tile: int, view: int) -> tuple[int, int]:
        """(shard, row) of a (tile, view) key."""
        if not 0 <= tile < self.n_tiles or not 0 <= view < self.n_views:
            raise MultiteachError(
                f"feature cache {self.dir}: no entry for tile {tile}, view {view} ({self.n_tiles} tiles x "
                f"{self.n_views} views cached)"
            )
        shard, first = self._locations[tile]
        return shard, first + view

    def view_params(self, tile: int, view: int) -> ViewParams:
        """The recorded parameters of a cached view (``apply_view`` rebuilds the crop exactly)."""
        shard, row = self._locate(tile, view)
        if shard not in self._views:
            self._views[shard] = json.loads(self._handle(shard).metadata()[META_KEY])["views"]
        return ViewParams.from_dict(self._views[shard][row // self.n_views][view])

    def _rows(self, tensor: str, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Stack the rows of ``tensor`` for ``keys``, reading each run of consecutive rows in one slice."""
        wanted: dict[int, list[tuple[int, int]]] = {}
        for j, (tile, view) in enumerate(keys):
            shard, row = self._locate(int(tile), int(view))
            wanted.setdefault(shard, []).append((row, j))
        out: list[torch.Tensor | None] = [None] * len(keys)
        for shard, items in wanted.items():
            items.sort()
            sl = self._handle(shard).get_slice(tensor)
            start = 0
            while start < len(items):
                end = start + 1
                while end < len(items) and items[end][0] - items[end - 1][0] <= 1:
                    end += 1
                lo = items[start][0]
                block = sl[lo : items[end - 1][0] + 1]
                for row, j in items[start:end]:
                    out[j] = block[row - lo]
                start = end
        return torch.stack(out)  # type: ignore[arg-type]

    def get_batch(self, teacher: str, keys: Sequence[tuple[int, int]] | torch.Tensor) -> TeacherOutput:
        """Cached outputs of ``teacher`` for (tile, view) ``keys``, as float32.

        Args:
            teacher: Teacher name.
            keys: (M, 2) tile and view indices.

        Returns:
            TeacherOutput(summary (M, D_summary), patch_tokens (M, h'*w', D_patch), grid (h', w')).
        """
        if teacher not in self.grids:
            have = ", ".join(self.grids)
            raise MultiteachError(f"feature cache {self.dir} has no teacher {teacher!r} (it holds {have})")
        keys = keys.tolist() if torch.is_tensor(keys) else list(keys)
        summary = self._rows(f"{teacher}.summary", keys).float()
        patch = self._rows(f"{teacher}.patch", keys).float()
        return TeacherOutput(summary, patch, self.grids[teacher])

    def get(self, teacher: str, tile: int, view: int) -> TeacherOutput:
        """Cached output of ``teacher`` for one view: summary (D_summary,), patch tokens (h'*w', D_patch), grid."""
        out = self.get_batch(teacher, [(tile, view)])
        return TeacherOutput(out.summary[0], out.patch_tokens[0], out.grid)

    def targets(
        self, keys: torch.Tensor | Sequence[tuple[int, int]], device: str | torch.device | None = None
    ) -> dict[str, TeacherOutput]:
        """The training targets of a batch: every teacher in :attr:`names` for its ``cache_keys``.

        Args:
            keys: (M, 2) (tile, view), the batch's ``cache_keys`` (crop-major like its global crops).
            device: Where to put the float32 targets.

        Returns:
            Teacher name -> TeacherOutput(summary (M, D_summary), patch_tokens (M, N', D_patch), grid).
        """
        keys = keys.tolist() if torch.is_tensor(keys) else list(keys)
        out = {}
        for name in self.names:
            o = self.get_batch(name, keys)
            out[name] = TeacherOutput(o.summary.to(device), o.patch_tokens.to(device), o.grid)
        return out


def open_cache(
    cache_dir: str | Path,
    recipe: Any,
    teachers: Mapping[str, Teacher] | None = None,
    tile_paths: Sequence[str | Path] | None = None,
) -> FeatureCache:
    """Open a cache for training with ``recipe``, after checking it was built for exactly this recipe's
    teachers, preprocessing, views, storage and tiles.

    Args:
        cache_dir: The cache folder.
        recipe: The recipe to train.
        teachers: Loaded teachers, if at hand (random-init teachers are otherwise rebuilt to hash them;
            file-backed teachers are fingerprinted from their files and never loaded).
        tile_paths: The recipe's tiles (default: scanned from ``data.train``).

    Returns:
        The cache, its :attr:`FeatureCache.names` set to the recipe's active teachers.

    Raises:
        MultiteachError: the cache is incomplete, or stale (saying what changed and how to rebuild it).
    """
    cache = FeatureCache(cache_dir)
    if tile_paths is None:
        tile_paths = training_source(recipe).paths
    names = active_teachers(recipe.losses)
    reasons = stale_reasons(cache.key, cache_key(recipe, tile_paths, teachers), names)
    if reasons:
        raise MultiteachError(
            f"feature cache {cache.dir} does not match this recipe, so it is not used: {'; '.join(reasons)}. "
            f"Rebuild it: {_REBUILD} (or set cache.dir to a new folder)"
        )
    cache.names = names
    return cache
