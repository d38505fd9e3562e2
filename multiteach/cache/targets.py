"""Teacher targets through a cache, as training reads them: stored rows are read, missing ones computed and stored.

:func:`open_cache` opens (or creates) the folder of ``cache.dir`` for a recipe and returns :class:`CachedTargets`.
For each batch it looks up the row key of every global crop (tile identity + replayed view); the rows found are
read and decoded; the others are computed by the teachers (loaded on the first miss, seeded as a live run seeds
them), encoded, stored, and decoded back, so a run that computes a row and a run that reads it train on the same
values. A second run of a sweep over the same data and views finds every row and loads no teacher.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from multiteach.build import build_teachers, multicrop_transform
from multiteach.cache.key import cache_key
from multiteach.cache.settings import cache_settings
from multiteach.cache.store import KEY_FILE, TargetStore
from multiteach.cache.views import ViewReplay
from multiteach.data.views.multicrop import apply_view
from multiteach.errors import MultiteachError
from multiteach.losses import active_teachers
from multiteach.teachers.base import Teacher, TeacherOutput, TeacherSpec

__all__ = ["CachedTargets", "open_cache", "pool_patch_tokens"]

log = logging.getLogger("multiteach.cache")


def pool_patch_tokens(tokens: torch.Tensor, grid: tuple[int, int], k: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Average-pool patch tokens over ``k`` x ``k`` cells of their grid (a last partial cell averages what it has).

    Args:
        tokens: (B, h*w, D) patch tokens.
        grid: (h, w).
        k: Pooling factor (1 returns the input).

    Returns:
        ((B, ceil(h/k) * ceil(w/k), D) tokens, (ceil(h/k), ceil(w/k))).
    """
    if k == 1:
        return tokens, tuple(grid)
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])
    x = F.avg_pool2d(x.float(), k, stride=k, ceil_mode=True)
    return x.flatten(2).transpose(1, 2), (int(x.shape[-2]), int(x.shape[-1]))


class CachedTargets:
    """The targets of a run's batches from a :class:`~multiteach.cache.store.TargetStore`, filling it on misses.

    Args:
        store: The open cache folder.
        recipe: The recipe (its teachers, for the misses).
        names: Teachers the run's loss reads (a subset of the cache's).
        teachers: Teachers already loaded (a live run's), or empty: they are built on the first miss.

    Attributes:
        replay: The :class:`~multiteach.cache.views.ViewReplay` the training loader draws global views with.
        read_rows: Rows read from the cache so far; computed_rows: rows computed by the teachers.
    """

    def __init__(
        self, store: TargetStore, recipe: Any, names: list[str], teachers: Mapping[str, Teacher] | None = None
    ) -> None:
        self.store, self.recipe, self.names = store, recipe, list(names)
        self.cached_names = list(store.key["teachers"])
        self.teachers: dict[str, Teacher] = dict(teachers or {})
        settings = cache_settings(recipe)
        self.patch_pool = settings.patch_pool
        self.replay = ViewReplay(multicrop_transform(recipe), recipe.seed, settings.views_per_tile)
        self.read_rows = self.computed_rows = 0
        self.dir = store.root

    def knows_specs(self) -> bool:
        """Whether the cache recorded every needed teacher's spec and grid (then no teacher is loaded to start)."""
        return all(n in self.store.specs and n in self.store.grids for n in self.names)

    def spec(self, name: str) -> TeacherSpec:
        """The spec a writer recorded for teacher ``name`` (token layout, dims, preprocessing)."""
        d = dict(self.store.specs[name])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return TeacherSpec(**d)

    @property
    def grids(self) -> dict[str, tuple[int, int]]:
        """Teacher -> the stored patch grid (after ``cache.patch_pool``)."""
        return self.store.grids

    def _load_teachers(self, device: torch.device | str) -> dict[str, Teacher]:
        missing = [n for n in self.cached_names if n not in self.teachers]
        if missing:
            if any(n not in self.recipe.teachers for n in missing):
                raise MultiteachError(
                    f"feature cache {self.dir} stores teacher(s) {', '.join(missing)} that this recipe does not "
                    "define, so it cannot fill missing rows; define them under teachers: or use another cache.dir"
                )
            with torch.random.fork_rng(devices=[]):  # random-init teachers exactly as a live run builds them
                torch.manual_seed(self.recipe.seed)
                built = build_teachers(self.recipe, self.cached_names, device)
            self.teachers.update({n: built[n] for n in missing})
            log.info("cache: loaded teacher(s) %s to fill missing rows", ", ".join(missing))
        return {n: self.teachers[n] for n in self.cached_names}

    def compute(self, x: torch.Tensor, device: torch.device | str) -> dict[str, TeacherOutput]:
        """Every cached teacher's raw (float32, pooled) outputs for crops ``x`` (B, 3, G, G)."""
        out = {}
        with torch.no_grad():
            for name, teacher in self._load_teachers(device).items():
                o = teacher(x.to(device))
                tokens, grid = pool_patch_tokens(o.patch_tokens.float(), o.grid, self.patch_pool)
                out[name] = TeacherOutput(o.summary.float(), tokens, grid)
                self.store.specs.setdefault(name, _spec_dict(teacher.spec))
                self.store.grids.setdefault(name, tuple(grid))
        return out

    def prime(self, tiles: Any, device: torch.device | str) -> None:
        """Before training: fit the PCA of a new folder (:meth:`fit_pca`) and make sure every needed teacher's spec
        and grid are known (a folder without rows computes the first tile for them)."""
        self.fit_pca(tiles, device)
        if not self.knows_specs():
            self.compute(self._first_crops(tiles, 1), device)

    def _first_crops(self, tiles: Any, n: int) -> torch.Tensor:
        """View 0 of tiles ``0 .. n-1`` of epoch 0, (n, 3, G, G): the same crops on every rank."""
        crops = []
        for i in range(min(n, len(tiles))):
            tile = tiles.read(i, 0)
            params, _, _ = self.replay.global_views(tile.image, tile.provenance, 0, 1)
            crops.append(apply_view(tile.image, params[0]))
        return torch.stack(crops)

    def fit_pca(self, tiles: Any, device: torch.device | str) -> None:
        """Fit the patch-token PCA (``cache.patch_dims``) on view 0 of the first ``cache.pca_tiles`` tiles of epoch 0
        of ``tiles``, unless the folder has one (the same tiles on every rank: the fits agree)."""
        if not self.store.needs_pca():
            return
        outputs = self.compute(self._first_crops(tiles, cache_settings(self.recipe).pca_tiles), device)
        self.store.fit_pca({name: o.patch_tokens for name, o in outputs.items()})

    def __call__(self, batch: Mapping[str, Any], device: torch.device | str) -> dict[str, TeacherOutput]:
        """The targets of a batch's global crops.

        Args:
            batch: A training batch with ``global`` (M, 3, G, G), ``cache_keys`` (M, 16) uint8 and ``cache_rows``.
            device: Where to put the targets.

        Returns:
            Teacher name -> TeacherOutput(summary (M, D), patch_tokens (M, N', D), grid), float32.
        """
        keys = batch["cache_keys"]
        locs = self.store.lookup(keys)
        miss = np.flatnonzero(locs[:, 0] < 0)
        hit = np.flatnonzero(locs[:, 0] >= 0)
        parts: dict[str, list[tuple[np.ndarray, TeacherOutput]]] = {n: [] for n in self.names}
        if len(miss):
            raw = self.compute(batch["global"][torch.from_numpy(miss)], device)
            stored, decoded = self.store.encode(raw)
            self.store.add(keys[torch.from_numpy(miss)], [batch["cache_rows"][j] for j in miss.tolist()], stored)
            for n in self.names:
                parts[n].append((miss, decoded[n]))
            self.computed_rows += len(miss)
        if len(hit):
            got = self.store.read(locs[hit], self.names)
            for n in self.names:
                parts[n].append((hit, got[n]))
            self.read_rows += len(hit)
        out = {}
        for n in self.names:
            first = parts[n][0][1]
            summary = torch.empty(len(keys), *first.summary.shape[1:])
            patch = torch.empty(len(keys), *first.patch_tokens.shape[1:])
            for rows, o in parts[n]:
                summary[torch.from_numpy(rows)] = o.summary
                patch[torch.from_numpy(rows)] = o.patch_tokens
            out[n] = TeacherOutput(summary.to(device), patch.to(device), first.grid)
        return out

    def flush(self) -> None:
        """Write the rows computed so far (a checkpoint, the end of a run)."""
        self.store.flush()

    def describe(self) -> str:
        """One line for the run log."""
        total = self.read_rows + self.computed_rows
        return (
            f"feature cache {self.dir}: {self.read_rows} of {total} target rows read, {self.computed_rows} computed "
            f"({len(self.store)} rows stored, {self.store.stored_bytes / 2**20:.1f} MiB)"
        )


def _spec_dict(spec: TeacherSpec) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(spec), default=str))


def open_cache(
    recipe: Any,
    teachers: Mapping[str, Teacher] | None = None,
    rank: int = 0,
    cache_dir: str | Path | None = None,
) -> CachedTargets:
    """Open (or create) the cache folder of ``cache.dir`` for ``recipe``.

    A new folder stores the recipe's active teachers; an existing one may store more (a run whose loss reads
    fewer teachers reads its rows, and fills missing rows for all of them). The folder's key must match the
    recipe's for the stored teachers: weights, preprocessing, view spec, storage.

    Args:
        recipe: The recipe to train.
        teachers: Loaded teachers, if at hand (random-init teachers are otherwise rebuilt to hash them).
        rank: This process's rank (names its shards).
        cache_dir: The folder (default ``cache.dir``).

    Raises:
        MultiteachError: The folder was built for other targets (naming the key that differs), or it does not
            store a teacher the recipe's loss reads.
    """
    settings = cache_settings(recipe)
    root = Path(cache_dir if cache_dir is not None else settings.dir).expanduser()
    names = active_teachers(recipe.losses)
    if not names:
        raise MultiteachError("cache: no active loss term reads a teacher, so there is nothing to cache")
    stored_names = names
    if (root / KEY_FILE).is_file():
        stored_names = list(json.loads((root / KEY_FILE).read_text()).get("teachers", {}))
        absent = [n for n in names if n not in stored_names]
        if absent:
            raise MultiteachError(
                f"feature cache {root} does not store teacher {absent[0]!r} (it holds {', '.join(stored_names)}), "
                "so it is not used: teachers differ. Set cache.dir to a new folder for this set of teachers."
            )
    key = cache_key(recipe, stored_names, teachers)
    store = TargetStore(
        root,
        key,
        shard_rows=settings.shard_tiles,
        max_gb=settings.max_gb,
        rank=rank,
    )
    return CachedTargets(store, recipe, names, teachers)
