"""Writing a cache: run the recipe's teachers over the fixed views of every tile, store shards, merge the index.

Writing is resumable and splittable: each shard is written atomically (temp file + rename), existing complete
shards of the same key are skipped, and rank ``r`` of ``W`` writers caches the tiles ``i`` with ``i % W == r``.
Tensors are reproducible bit for bit, so a resumed cache equals an uninterrupted one. The last writer to
finish builds ``index.json`` (:func:`merge_index`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import DataLoader

from multiteach.atomic import atomic_save_safetensors, atomic_write_text
from multiteach.build import build_teachers, multicrop_transform, training_source
from multiteach.cache.key import build_digest, cache_key, key_diff, remember_state_dict_hashes, stale_reasons
from multiteach.cache.layout import FORMAT, INDEX, META_KEY, SHARD_RE, cache_settings, shard_name, store_dtype
from multiteach.cache.views import TileViews
from multiteach.errors import MultiteachError
from multiteach.losses import active_teachers
from multiteach.seeding import seed_everything

__all__ = ["merge_index", "pool_patch_tokens", "write_cache"]

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


def _shard_meta(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise MultiteachError(f"{path} is not a multiteach cache shard (no {META_KEY!r} metadata)")
    return json.loads(meta[META_KEY])


def _refuse_or_clear(
    out: Path, rank: int, digest: str, key: dict, layout: dict, n_shards: int, overwrite: bool
) -> None:
    """Existing shards of this rank from another build (key or layout), or beyond its shard count, and an
    index of another build: removed with ``overwrite``, otherwise refused with the reasons."""
    stale: list[tuple[Path, str]] = []
    for p in sorted(out.iterdir()):
        m = SHARD_RE.match(p.name)
        if m and int(m.group(1)) == rank:
            meta = _shard_meta(p)
            if meta["digest"] != digest:
                why = stale_reasons(meta["key"], key, list(key["teachers"])) or [
                    f"the layout changed: {key_diff(meta['layout'], layout)}"
                ]
                stale.append((p, "; ".join(why)))
            elif int(m.group(2)) >= n_shards:
                stale.append((p, "it is beyond this rank's shard count"))
    index = out / INDEX
    if index.is_file() and json.loads(index.read_text()).get("digest") != digest:
        stale.append((index, "it indexes another build"))
    if not stale:
        return
    if not overwrite:
        p, why = stale[0]
        raise MultiteachError(
            f"{out} holds a feature cache built for something else ({p.name}: {why}); pass --overwrite "
            f"(overwrite=True) to replace it, or write to another folder"
        )
    for p, _ in stale:
        p.unlink()
    log.warning("removed %d file(s) of an older cache build from %s", len(stale), out)


def write_cache(
    recipe: Any,
    out_dir: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    on_shard: Callable[[Path], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Cache the outputs of the recipe's active teachers on ``cache.n_views`` fixed views of every tile.

    Writer ``rank`` of ``world_size`` caches the tiles ``i`` with ``i % world_size == rank``, in shards of
    ``cache.shard_tiles`` tiles; shards already complete (same key and layout) are skipped, so re-running
    after an interruption resumes. The last writer to finish builds ``index.json`` (:func:`merge_index`).

    Args:
        recipe: The recipe (teachers, tiles, views and ``cache:`` settings).
        out_dir: Cache folder (default ``cache.dir``).
        rank: This writer's rank.
        world_size: Number of writers.
        batch_size: Crops per teacher forward pass (default ``cache.batch_size``); rounded down to whole
            tiles (all views of a tile go in one pass).
        overwrite: Replace files of a cache built for another key or layout (otherwise refused).
        device: Where the teachers run (default: CUDA when available, else CPU).
        on_shard: Called with each shard's path right after it is written (progress hooks, tests).
        progress: Called with one human-readable line per shard.

    Returns:
        The cache folder.

    Raises:
        MultiteachError: no folder given, no active teacher, bad rank, or a folder holding another cache.

    Seeds the random generators with the recipe seed before building the teachers, as training does, so
    random-init teachers are those a live run would use.
    """
    settings = cache_settings(recipe)
    target = out_dir if out_dir is not None else settings.dir
    if target is None:
        raise MultiteachError("cache: no cache folder; set cache.dir in the recipe or pass --out DIR")
    if not 0 <= rank < world_size:
        raise MultiteachError(f"cache: rank {rank} is not in [0, world_size={world_size})")
    out = Path(target).expanduser()
    names = active_teachers(recipe.losses)
    if not names:
        raise MultiteachError("cache: no active loss term reads a teacher, so there is nothing to cache")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name, dtype = store_dtype(settings.dtype)
    n_views, pool = settings.n_views, settings.patch_pool

    tiles = training_source(recipe)
    seed_everything(recipe.seed)  # as multiteach.train does before building teachers: random-init teachers match
    teachers = build_teachers(recipe, names, device)
    key = cache_key(recipe, tiles.paths, teachers)
    remember_state_dict_hashes(recipe, key)  # built by the rule a rebuild follows: spares open_cache one
    layout = {"shard_tiles": settings.shard_tiles, "world_size": world_size}
    digest = build_digest(key, layout)
    specs = {n: json.loads(json.dumps(dataclasses.asdict(t.spec), default=str)) for n, t in teachers.items()}

    mine = list(range(rank, len(tiles), world_size))
    chunks = [mine[i : i + settings.shard_tiles] for i in range(0, len(mine), settings.shard_tiles)]
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(f".shard_r{rank}_*.tmp"):  # left by a killed writer of this rank
        tmp.unlink()
    _refuse_or_clear(out, rank, digest, key, layout, len(chunks), overwrite)

    transform = multicrop_transform(recipe)
    per_pass = max(1, (batch_size or settings.batch_size) // n_views)
    for n, chunk in enumerate(chunks):
        path = out / shard_name(rank, n)
        if path.is_file():
            continue  # written atomically, and of this build (checked above)
        t0 = time.perf_counter()
        loader = DataLoader(
            TileViews(tiles, chunk, transform, recipe.seed, n_views),
            batch_size=per_pass,
            num_workers=recipe.data.num_workers,
            collate_fn=list,
        )
        views: list[list[dict[str, Any]]] = []
        summary: dict[str, list[torch.Tensor]] = {t: [] for t in teachers}
        patch: dict[str, list[torch.Tensor]] = {t: [] for t in teachers}
        grids: dict[str, list[int]] = {}
        for items in loader:
            views += [p for _, p, _ in items]
            x = torch.cat([crops for _, _, crops in items]).to(device)  # tile-major: row t*V + v
            for name, teacher in teachers.items():
                o = teacher(x)
                tokens, grid = pool_patch_tokens(o.patch_tokens.float(), o.grid, pool)
                summary[name].append(_stored(o.summary.float(), dtype, name))
                patch[name].append(_stored(tokens, dtype, name))
                grids[name] = list(grid)
        tensors = {"tiles": torch.tensor(chunk, dtype=torch.int64)}
        for name in teachers:
            tensors[f"{name}.summary"] = torch.cat(summary[name])
            tensors[f"{name}.patch"] = torch.cat(patch[name])
        meta = {
            "format": FORMAT,
            "digest": digest,
            "key": key,
            "layout": layout,
            "rank": rank,
            "shard": n,
            "n_tiles": len(tiles),
            "n_views": n_views,
            "dtype": dtype_name,
            "grids": grids,
            "specs": specs,
            "tiles": chunk,
            "paths": [str(tiles.paths[i]) for i in chunk],
            "views": views,
        }
        atomic_save_safetensors(path, tensors, {META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})
        line = (
            f"rank {rank}: shard {n + 1}/{len(chunks)} ({len(chunk)} tiles x {n_views} views) -> {path.name} "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        log.info(line)
        if progress is not None:
            progress(line)
        if on_shard is not None:
            on_shard(path)
    merge_index(out, missing_ok=True, digest=digest)
    return out


def _stored(x: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    y = x.to(dtype).cpu()
    if not torch.isfinite(y).all():
        raise MultiteachError(
            f"cache: teacher {name!r} gives values that are not finite in {dtype} (fp16 overflows above "
            "65504); use cache.dtype=bfloat16"
        )
    return y


def merge_index(cache_dir: str | Path, missing_ok: bool = False, digest: str | None = None) -> Path | None:
    """Build ``index.json`` (tile -> shard file + row of view 0; key; n_views; grids; specs; tile paths)
    from the shards present.

    Args:
        cache_dir: The cache folder.
        missing_ok: Return None instead of raising while some tiles are not cached yet (writers still
            running) or shards of another build are still there.
        digest: Only index shards of this build (default: all shards, which must be of one build).

    Returns:
        The path of ``index.json``, or None (``missing_ok``) when the cache is not complete.

    Raises:
        MultiteachError: no shards, shards of different builds, a tile cached twice, or tiles missing.
    """
    root = Path(cache_dir)
    files = sorted(p for p in root.iterdir() if SHARD_RE.match(p.name)) if root.is_dir() else []
    if not files:
        if missing_ok:
            return None
        raise MultiteachError(f"{root} holds no cache shards; write them with `multiteach cache RECIPE --out {root}`")
    metas = [(p, _shard_meta(p)) for p in files]
    builds = {m["digest"] for _, m in metas}
    if digest is None and len(builds) > 1:
        raise MultiteachError(
            f"{root} mixes shards of {len(builds)} different cache builds; re-run the writers with --overwrite"
        )
    want = digest or builds.pop()
    usable = [(p, m) for p, m in metas if m["digest"] == want]
    if len(usable) < len(metas) or not usable:
        if missing_ok:
            return None
        raise MultiteachError(f"{root} holds shards of another cache build; re-run the writers with --overwrite")
    ref = usable[0][1]
    n_tiles = ref["n_tiles"]
    locations: list[list[int] | None] = [None] * n_tiles
    paths: list[str | None] = [None] * n_tiles
    for s, (p, m) in enumerate(usable):
        for t, (i, path) in enumerate(zip(m["tiles"], m["paths"])):
            if locations[i] is not None:
                raise MultiteachError(f"{root}: tile {i} is cached twice (in {p.name} and another shard)")
            locations[i], paths[i] = [s, t * m["n_views"]], path
    missing = [i for i, loc in enumerate(locations) if loc is None]
    if missing:
        if missing_ok:
            return None
        world = ref["layout"]["world_size"]
        ranks = sorted({i % world for i in missing})
        raise MultiteachError(
            f"{root}: {len(missing)} of {n_tiles} tiles are not cached yet (writer rank(s) {ranks} of "
            f"{world} unfinished); run `multiteach cache RECIPE --rank R --world-size {world}` for them"
        )
    index = {
        "format": FORMAT,
        "digest": want,
        "key": ref["key"],
        "layout": ref["layout"],
        "n_tiles": n_tiles,
        "n_views": ref["n_views"],
        "dtype": ref["dtype"],
        "grids": ref["grids"],
        "specs": ref["specs"],
        "shards": [p.name for p, _ in usable],
        "locations": locations,
        "tiles": paths,
    }
    target = root / INDEX
    return atomic_write_text(target, json.dumps(index, sort_keys=True, separators=(",", ":")) + "\n")
