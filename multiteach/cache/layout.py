"""The cache folder's on-disk format (file names, shard metadata key, stored dtypes) and the recipe's ``cache:``
settings, shared by the writer (:mod:`multiteach.cache.write`) and the reader (:mod:`multiteach.cache.read`).

The folder holds::

    shard_r{rank}_{n:05d}.safetensors   one per ``cache.shard_tiles`` tiles of a writer (rank):
        {teacher}.summary  (T*V, D_summary)       stored dtype (bf16/fp16/fp32)
        {teacher}.patch    (T*V, N', D_patch)     N' = h'*w', the grid after ``cache.patch_pool``
        tiles              (T,) int64             tile indices; row t*V + v is view v of tile tiles[t]
        metadata "multiteach_cache": JSON with the cache key, the layout, the tile paths and every view's
        ``ViewParams.to_dict()`` (crop box, dihedral element, HED/colour/blur parameters)
    index.json                          the merge step: tile -> (shard, row of its view 0) in "locations"
                                        (shard names in "shards"), the cache key, n_views, grids, teacher
                                        specs, tile paths
"""

from __future__ import annotations

import re
from typing import Any

import torch

from multiteach.config import CacheConfig

__all__ = [
    "FORMAT",
    "INDEX",
    "META_KEY",
    "SHARD_RE",
    "STORE_DTYPES",
    "cache_settings",
    "shard_name",
    "store_dtype",
    "uses_cache",
]

FORMAT = 1
INDEX = "index.json"
META_KEY = "multiteach_cache"
SHARD_RE = re.compile(r"^shard_r(\d+)_(\d{5})\.safetensors$")

STORE_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def cache_settings(recipe: Any) -> CacheConfig:
    """The recipe's :class:`~multiteach.config.CacheConfig` (defaults when ``cache:`` is null)."""
    return recipe.cache if recipe.cache is not None else CacheConfig()


def uses_cache(recipe: Any) -> bool:
    """Whether training reads teacher targets from a cache (``cache.dir`` is set)."""
    return recipe.cache is not None and recipe.cache.dir is not None


def store_dtype(name: str) -> tuple[str, torch.dtype]:
    """The canonical name (``"bfloat16"``, ...) and torch dtype of a ``cache.dtype`` setting (aliases allowed)."""
    dtype = STORE_DTYPES[name]
    return str(dtype).removeprefix("torch."), dtype


def shard_name(rank: int, n: int) -> str:
    """File name of shard ``n`` of writer ``rank``."""
    return f"shard_r{rank}_{n:05d}.safetensors"
