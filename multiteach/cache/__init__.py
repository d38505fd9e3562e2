"""Teacher-target cache: every teacher runs once per (tile, view); any number of students (an ablation sweep) then
train from the stored targets.

Set ``cache.dir`` in a recipe: training reads the rows it finds and computes, stores and uses the others, from
tile folders, lists, coordinates, shards or slides (online patching) alike. ``multiteach cache RECIPE`` fills a
folder ahead of a sweep; ``multiteach cache info DIR`` says what it holds.

Modules:
    settings: The recipe's ``cache:`` settings and the folder format version.
    compress: Stored precisions (float32/bfloat16/float16/int8 with per-token scales) and the patch-token PCA.
    key: What the targets depend on (teachers' weights and preprocessing, view spec, storage) and its diff.
    store: The folder on disk: append-only shards keyed by (tile identity, view), written by independent writers.
    views: The ``views_per_tile`` replayed views of a tile, drawn from its identity.
    targets: :class:`CachedTargets`, what training calls per batch (read, or compute and store), and
        :func:`open_cache`.
    fill: :func:`write_cache`, filling a folder with the rows a recipe's run reads, and :func:`cache_info`.
"""

from multiteach.cache.compress import PatchPCA, canonical_dtype, cosine_fidelity
from multiteach.cache.fill import cache_info, render_info, write_cache
from multiteach.cache.key import WEIGHT_SUFFIXES, cache_key, file_fingerprint, key_diff, state_dict_hash
from multiteach.cache.settings import FORMAT, cache_settings, uses_cache
from multiteach.cache.store import TargetStore, row_key, tile_identity
from multiteach.cache.targets import CachedTargets, open_cache, pool_patch_tokens
from multiteach.cache.views import ViewReplay, view_seed

__all__ = [
    "FORMAT",
    "WEIGHT_SUFFIXES",
    "CachedTargets",
    "PatchPCA",
    "TargetStore",
    "ViewReplay",
    "cache_info",
    "cache_key",
    "cache_settings",
    "canonical_dtype",
    "cosine_fidelity",
    "file_fingerprint",
    "key_diff",
    "open_cache",
    "pool_patch_tokens",
    "render_info",
    "row_key",
    "state_dict_hash",
    "tile_identity",
    "uses_cache",
    "view_seed",
    "write_cache",
]
