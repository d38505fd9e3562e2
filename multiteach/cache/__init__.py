"""Teacher-feature cache: run every teacher once on fixed views of every tile, store its summary and patch tokens,
and train any number of students (an ablation sweep) from them.

Build one with ``multiteach cache RECIPE [key=value ...] [--out DIR]`` (or :func:`write_cache`); train from it
by setting ``cache.dir`` in the recipe.

Modules:
    layout: The folder's on-disk format (shard and index names, metadata key, stored dtypes) and settings.
    key: What makes a cache stale: the cache key (weights, preprocessing, views, storage, tiles) and its diff.
    views: Which fixed views of a tile are cached, and the dataset that draws and renders them.
    write: Running the teachers over the views, writing shards (resumable, rank-split) and merging the index.
    read: The memory-mapped :class:`FeatureCache` training reads, and :func:`open_cache` (refuses stale caches).
"""

from multiteach.cache.key import WEIGHT_SUFFIXES, cache_key, file_fingerprint, stale_reasons, state_dict_hash
from multiteach.cache.layout import (
    FORMAT,
    INDEX,
    META_KEY,
    SHARD_RE,
    STORE_DTYPES,
    cache_settings,
    shard_name,
    uses_cache,
)
from multiteach.cache.read import FeatureCache, open_cache
from multiteach.cache.views import cache_view_params, view_seed
from multiteach.cache.write import merge_index, pool_patch_tokens, write_cache

__all__ = [
    "FORMAT",
    "INDEX",
    "META_KEY",
    "SHARD_RE",
    "STORE_DTYPES",
    "WEIGHT_SUFFIXES",
    "FeatureCache",
    "cache_key",
    "cache_settings",
    "cache_view_params",
    "file_fingerprint",
    "merge_index",
    "open_cache",
    "pool_patch_tokens",
    "shard_name",
    "stale_reasons",
    "state_dict_hash",
    "uses_cache",
    "view_seed",
    "write_cache",
]
