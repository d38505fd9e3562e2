"""Filling a cache ahead of a sweep (the rows a recipe's run will read), and saying what a cache folder holds."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from multiteach.build import build_student_from, data_loader, training_source
from multiteach.cache.settings import cache_settings
from multiteach.cache.store import ROWS_KEY, SHARDS, TargetStore
from multiteach.cache.targets import open_cache
from multiteach.errors import MultiteachError
from multiteach.seeding import seed_everything

__all__ = ["cache_info", "render_info", "write_cache"]

log = logging.getLogger("multiteach.cache")
_ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I64": 8}


def write_cache(
    recipe: Any,
    out_dir: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    *,
    device: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Store every target a run of ``recipe`` reads: its schedule's batches (this rank's share of each global
    batch), their replayed views, every teacher of the cache. Rows already stored are skipped, so running it again
    after an interruption, or for a longer schedule, computes only what is missing; writers of several ranks (or
    machines) fill one folder side by side.

    Args:
        recipe: The recipe (teachers, data, views, schedule and ``cache:`` settings).
        out_dir: Cache folder (default ``cache.dir``).
        rank: This writer's rank (it takes what training rank ``rank`` of ``world_size`` would read).
        world_size: Number of writers.
        device: Where the teachers run (default: CUDA when available, else CPU).
        progress: Called with a line every 10 batches and at the end.

    Returns:
        The cache folder.
    """
    target = out_dir if out_dir is not None else cache_settings(recipe).dir
    if target is None:
        raise MultiteachError("cache: no cache folder; set cache.dir in the recipe or pass --out DIR")
    if not 0 <= rank < world_size:
        raise MultiteachError(f"cache: rank {rank} is not in [0, world_size={world_size})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiles = training_source(recipe)
    seed_everything(recipe.seed)
    cache = open_cache(recipe, rank=rank, cache_dir=target)
    cache.fit_pca(tiles, device)
    student = build_student_from(recipe)
    t0 = time.perf_counter()
    steps = recipe.schedule.steps
    for step, batch in enumerate(data_loader(recipe, tiles, student, rank, world_size, 0, cache=cache.replay), 1):
        cache(batch, device)
        if progress is not None and (step % 10 == 0 or step == steps):
            progress(f"rank {rank}: step {step}/{steps}: {cache.describe()} ({time.perf_counter() - t0:.1f} s)")
    cache.flush()
    return cache.store.root


def cache_info(cache_dir: str | Path) -> dict[str, Any]:
    """What a cache folder holds, read without changing it.

    Returns:
        ``{"dir", "rows", "tiles", "views_per_tile", "teachers", "shards", "bytes", "bytes_per_row" (per
        teacher), "bytes_per_tile" (per teacher: bytes per row x views per tile), "storage", "damaged", "key"}``.
    """
    store = TargetStore(cache_dir, None, readonly=True)
    tiles: set[str] = set()
    per_teacher: dict[str, int] = {}
    for name in store.shard_names():
        with safe_open(str(store.root / SHARDS / name), framework="np") as f:
            tiles.update(str(r[0]) for r in json.loads(f.metadata()[ROWS_KEY]))
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                sl = f.get_slice(k)
                teacher = k.split(".")[0]
                per_teacher[teacher] = per_teacher.get(teacher, 0) + int(np.prod(sl.get_shape())) * _ITEM_BYTES.get(
                    sl.get_dtype(), 4
                )
    rows = len(store)
    teachers = sorted(store.key.get("teachers", {}))
    k = store.key.get("views", {}).get("views_per_tile") or 1
    per_row = {t: per_teacher.get(t, 0) / max(rows, 1) for t in teachers}
    return {
        "dir": str(store.root),
        "rows": rows,
        "tiles": len(tiles),
        "views_per_tile": k,
        "teachers": teachers,
        "shards": len(store.shard_names()),
        "bytes": store.stored_bytes,
        "bytes_per_row": per_row,
        "bytes_per_tile": {t: v * k for t, v in per_row.items()},
        "storage": store.key.get("storage", {}),
        "damaged": list(store.damaged),
        "key": store.key,
    }


def render_info(info: dict[str, Any]) -> str:
    """``multiteach cache info``'s text."""
    s = info["storage"]
    lines = [
        f"cache {info['dir']}",
        f"  rows: {info['rows']} tile views of {info['tiles']} tiles ({info['views_per_tile']} views per tile), "
        f"{info['shards']} shards, {info['bytes'] / 2**20:.1f} MiB",
        f"  storage: {s.get('dtype')}, patch_pool {s.get('patch_pool')}, patch_dims {s.get('patch_dims') or 'all'}",
    ]
    for t in info["teachers"]:
        lines.append(
            f"  teacher {t}: {info['bytes_per_row'][t] / 1024:.1f} KiB per view, "
            f"{info['bytes_per_tile'][t] / 1024:.1f} KiB per tile"
        )
    lines += [f"  damaged (skipped, refilled on use): {name}: {why}" for name, why in info["damaged"]]
    return "\n".join(lines)
