"""Teacher-feature cache: run every teacher once on a fixed set of global-crop views per tile, store its
summary and patch tokens, and train any number of students (an ablation sweep) from them.

Build one with ``multiteach cache RECIPE [key=value ...] [--out DIR]`` (or :func:`write_cache`); train from
it by setting ``cache.dir`` in the recipe. The folder holds::

    shard_r{rank}_{n:05d}.safetensors   one per ``cache.shard_tiles`` tiles of a writer (rank):
        {teacher}.summary  (T*V, D_summary)       stored dtype (bf16/fp16/fp32)
        {teacher}.patch    (T*V, N', D_patch)     N' = h'*w', the grid after ``cache.patch_pool``
        tiles              (T,) int64             tile indices; row t*V + v is view v of tile tiles[t]
        metadata "multiteach_cache": JSON with the cache key, the layout, the tile paths and every view's
        ``ViewParams.to_dict()`` (crop box, dihedral element, HED/colour/blur parameters)
    index.json                          the merge step: tile -> (shard, row of its view 0) in "locations"
                                        (shard names in "shards"), the cache key, n_views, grids, teacher
                                        specs, tile paths

**Views.** View ``v`` of tile ``i`` is the first global view that ``MultiCropTransform.sample_params`` draws
from a generator seeded by :func:`view_seed` (recipe seed, ``"cache"``, i, v): it depends on nothing else, so
any writer (rank, resume, batch size) draws the same views. **Training** with a cache uses view
``(e * n_global + c) % n_views`` for global crop ``c`` of a tile in epoch ``e``
(:func:`multiteach.data.loader.cached_view`); the student's crops are rebuilt from the recorded parameters
with ``apply_view``, exactly what the teacher saw. Local crops and iBOT masks are drawn as without a cache.

**Key.** Per teacher: source + weights fingerprint (safetensors header, size and sampled chunks of the
weights file(s), or a hash of the state dict for random-init teachers) + preprocessing (input size,
mean/std, interpolation, dtype, embedding rule); the view spec (global crop size/scale, augmentation, seed,
n_views); the storage (dtype, patch pooling); and a hash of the tile list (paths and sizes).
:func:`open_cache` recomputes it and refuses a cache built for anything else, naming what changed.

**Writing** is resumable and splittable: each shard is written atomically (temp file + rename), existing
complete shards of the same key are skipped, and rank ``r`` of ``W`` writers caches the tiles ``i`` with
``i % W == r``. Tensors are reproducible bit for bit, so a resumed cache equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from multiteach.data.multicrop import MultiCropTransform, ViewParams, apply_view
from multiteach.errors import MultiteachError
from multiteach.losses import active_teachers
from multiteach.standins import _atomic, atomic_save_safetensors
from multiteach.teachers import resolve_spec
from multiteach.teachers.base import Teacher, TeacherOutput, TeacherSpec

if TYPE_CHECKING:
    from multiteach.config import CacheConfig

log = logging.getLogger("multiteach.cache")

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
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".json")
_MIB = 1 << 20
_REBUILD = "multiteach cache RECIPE [key=value ...] --overwrite"

__all__ = [
    "FeatureCache",
    "cache_key",
    "cache_settings",
    "cache_view_params",
    "merge_index",
    "open_cache",
    "pool_patch_tokens",
    "uses_cache",
    "view_seed",
    "write_cache",
]


# ----------------------------------------------------------------------------------------- settings


def cache_settings(recipe: Any) -> CacheConfig:
    """The recipe's :class:`~multiteach.config.CacheConfig` (defaults when ``cache:`` is null)."""
    from multiteach.config import CacheConfig

    return recipe.cache if recipe.cache is not None else CacheConfig()


def uses_cache(recipe: Any) -> bool:
    """Whether training reads teacher targets from a cache (``cache.dir`` is set)."""
    return recipe.cache is not None and recipe.cache.dir is not None


def _store_dtype(name: str) -> tuple[str, torch.dtype]:
    dtype = STORE_DTYPES[name]
    return str(dtype).removeprefix("torch."), dtype


def shard_name(rank: int, n: int) -> str:
    """File name of shard ``n`` of writer ``rank``."""
    return f"shard_r{rank}_{n:05d}.safetensors"


# -------------------------------------------------------------------------------------------- views


def view_seed(seed: int, tile: int, view: int) -> int:
    """A 63-bit generator seed unique to (recipe seed, ``"cache"``, tile index, view index)."""
    digest = hashlib.sha256(f"{seed}/cache/{tile}/{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def cache_view_params(
    transform: MultiCropTransform, seed: int, tile: int, view: int, height: int, width: int
) -> ViewParams:
    """Parameters of cached view ``view`` of tile ``tile`` (a ``height`` x ``width`` image).

    The first global view ``transform.sample_params`` draws from a generator seeded by :func:`view_seed`;
    only the global-crop settings (size, scale, augmentation) matter.
    """
    g = torch.Generator().manual_seed(view_seed(seed, tile, view))
    return transform.sample_params(height, width, generator=g)[0]


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


# ---------------------------------------------------------------------------------------------- key


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """A fast fingerprint of a weights file, reading a few MiB whatever its size.

    Files up to 4 MiB are hashed whole. Larger ones: size + the safetensors header (tensor names, dtypes,
    shapes, offsets; ``.safetensors`` only) + the first and last MiB + 16 chunks of 64 KiB spread evenly
    in between (the header alone would not see new values of the same shapes).
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}\n".encode())
    with path.open("rb") as f:
        if size <= 4 * _MIB:
            h.update(f.read())
            return h.hexdigest()
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 256 * _MIB)))
        for offset, length in [(0, _MIB), *((size * j // 17, 64 * 1024) for j in range(1, 17)), (size - _MIB, _MIB)]:
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()


def state_dict_hash(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor of ``module.state_dict()`` (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(value.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _recipe_spec(recipe: Any, name: str) -> TeacherSpec:
    """The teacher's spec as the recipe states it, before loading (no files read)."""
    from multiteach.build import spec_overrides

    cfg = recipe.teachers[name]
    overrides = spec_overrides(cfg)
    if cfg.weights:
        overrides["weights"] = cfg.weights
    return resolve_spec(cfg.source, **overrides)


def _weight_files(recipe: Any, name: str) -> list[Path] | None:
    """The files a pretrained teacher's weights come from, or None when only its state dict can tell
    (random init, timm's own pretrained weights, open_clip architecture names)."""
    from multiteach.teachers.weights import hub_weights

    if not recipe.teachers[name].pretrained:
        return None
    spec = _recipe_spec(recipe, name)
    if spec.weights:
        p = Path(spec.weights).expanduser()
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise MultiteachError(f"teachers.{name}.weights: {p} does not exist")
        folder = p
    elif spec.hub_id and spec.loader != "open_clip":
        folder = hub_weights(spec.hub_id, spec.gated, spec.weight_files).parent
    else:
        return None
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def _weights_part(recipe: Any, name: str, files: list[Path] | None, state_dict: str | None) -> dict[str, Any]:
    cfg = recipe.teachers[name]
    part: dict[str, Any] = {
        "source": cfg.source,
        "pretrained": cfg.pretrained,
        "model_kwargs": dict(cfg.model_kwargs),
    }
    if files is not None:
        part["files"] = {f.name: file_fingerprint(f) for f in files}
    else:
        part["state_dict"] = state_dict
    return part


def _preprocessing_part(recipe: Any, name: str) -> dict[str, Any]:
    cfg, spec = recipe.teachers[name], _recipe_spec(recipe, name)
    return {
        "input_size": cfg.input_size or spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": spec.interpolation,
        "dtype": cfg.dtype,
        "embedding": cfg.embedding or spec.embedding,
    }


def _views_part(recipe: Any, n_views: int) -> dict[str, Any]:
    from multiteach.build import multicrop_transform

    crops, aug = recipe.data.global_crops, recipe.to_dict()["data"]["augment"]
    return {
        "rule": "sample_params[0] with sha256('{seed}/cache/{tile}/{view}') seeding",
        "seed": recipe.seed,
        "n_views": n_views,
        "global_size": crops.size,
        "global_scale": list(crops.scale),
        **aug,
        "blur_sigma": list(multicrop_transform(recipe).blur.sigma),
    }


def _tiles_part(paths: Sequence[str | Path]) -> dict[str, Any]:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p}\t{Path(p).stat().st_size}\n".encode())
    return {"n": len(paths), "sha256": h.hexdigest()}


# State-dict hashes of teachers built without weight files (random init), by what determines their
# initial values; a sweep's runs (in one process) then rebuild such a teacher at most once.
_STATE_DICT_HASHES: dict[str, str] = {}


def _init_key(recipe: Any, order: list[str], name: str) -> str:
    import timm

    cfgs = {n: recipe.to_dict()["teachers"][n] for n in order}
    versions = [torch.__version__, timm.__version__]
    return _sha(json.dumps([recipe.seed, order, cfgs, name, versions], sort_keys=True, default=str))


def _state_dict_hashes(recipe: Any, order: list[str], given: Mapping[str, Teacher]) -> dict[str, str]:
    """Hashes of the teachers ``order`` that only a state-dict hash identifies (random init, timm's own
    weights): from ``given`` teachers, from this process's memo, or rebuilt exactly as :func:`write_cache`
    and a live run build them (recipe seed, recipe order; file-backed teachers draw no random numbers)."""
    from multiteach.build import build_teachers

    if all(n in given for n in order):
        return {n: state_dict_hash(given[n]) for n in order}
    keys = {n: _init_key(recipe, order, n) for n in order}
    if any(keys[n] not in _STATE_DICT_HASHES for n in order):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            built = build_teachers(recipe, order)
        _STATE_DICT_HASHES.update({keys[n]: state_dict_hash(t) for n, t in built.items()})
        del built
    return {n: _STATE_DICT_HASHES[keys[n]] for n in order}


def cache_key(recipe: Any, tile_paths: Sequence[str | Path], teachers: Mapping[str, Teacher] | None = None) -> dict:
    """What a cache's features depend on, as plain JSON data.

    Args:
        recipe: The recipe (teachers, ``data.global_crops``/``augment``, ``seed``, ``cache`` settings).
        tile_paths: The training tiles, in dataset order.
        teachers: The loaded teachers, if at hand. Teachers identified by a state-dict hash (random init)
            that are not given are rebuilt for the hash (once per process).

    Returns:
        ``{"format", "tiles", "views", "storage", "teachers": {name: {"weights", "preprocessing"}}}``.
    """
    settings = cache_settings(recipe)
    names = active_teachers(recipe.losses)
    files = {n: _weight_files(recipe, n) for n in names}
    hashes = _state_dict_hashes(recipe, [n for n in names if files[n] is None], teachers or {})
    key = {
        "format": FORMAT,
        "tiles": _tiles_part(tile_paths),
        "views": _views_part(recipe, settings.n_views),
        "storage": {"dtype": _store_dtype(settings.dtype)[0], "patch_pool": settings.patch_pool},
        "teachers": {
            n: {
                "weights": _weights_part(recipe, n, files[n], hashes.get(n)),
                "preprocessing": _preprocessing_part(recipe, n),
            }
            for n in names
        },
    }
    return json.loads(json.dumps(key))  # tuples -> lists: compares equal to a key read back from JSON


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _short(v: Any) -> str:
    if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v):
        return v[:12] + "…"
    return repr(v)


def _diff(old: Any, new: Any) -> str:
    a, b = _flat(old), _flat(new)
    parts = [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(parts)


def stale_reasons(cached: Mapping[str, Any], current: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """What differs between a cache's key and the key of the current recipe, for the teachers ``names``.

    Returns:
        Human-readable reasons; empty when the cache fits.
    """
    if cached.get("format") != current["format"]:
        return [f"cache format {cached.get('format')} (this version reads format {current['format']})"]
    reasons = []
    if cached["tiles"] != current["tiles"]:
        c, n = cached["tiles"], current["tiles"]
        reasons.append(f"the tile list changed ({c['n']} tiles cached, {n['n']} now; list hash {_diff(c, n)})")
    if cached["views"] != current["views"]:
        reasons.append(f"the view spec changed: {_diff(cached['views'], current['views'])}")
    if cached["storage"] != current["storage"]:
        reasons.append(f"the storage changed: {_diff(cached['storage'], current['storage'])}")
    for name in names:
        old, new = cached["teachers"].get(name), current["teachers"][name]
        if old is None:
            have = ", ".join(cached["teachers"]) or "none"
            reasons.append(f"teacher {name!r} is not in the cache (it holds {have})")
            continue
        for part in ("weights", "preprocessing"):
            if old[part] != new[part]:
                reasons.append(f"teacher {name!r} {part} changed: {_diff(old[part], new[part])}")
    return reasons


# ------------------------------------------------------------------------------------------- writer


class _TileViews(Dataset):
    """All cached views of some tiles: item ``j`` is (tile index, [n_views ViewParams dicts], (V, 3, G, G))."""

    def __init__(self, tiles: Any, indices: list[int], transform: MultiCropTransform, seed: int, n_views: int) -> None:
        self.tiles, self.indices, self.transform, self.seed, self.n_views = tiles, indices, transform, seed, n_views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, list[dict[str, Any]], torch.Tensor]:
        i = self.indices[j]
        image = self.tiles[i]
        params = [
            cache_view_params(self.transform, self.seed, i, v, image.height, image.width) for v in range(self.n_views)
        ]
        threads = torch.get_num_threads()
        if torch.utils.data.get_worker_info() is None:  # per-image ops: intra-op threads only slow them down
            torch.set_num_threads(1)
        try:
            crops = torch.stack([apply_view(image, p) for p in params])
        finally:
            torch.set_num_threads(threads)
        return i, [p.to_dict() for p in params], crops


def _shard_meta(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise MultiteachError(f"{path} is not a multiteach cache shard (no {META_KEY!r} metadata)")
    return json.loads(meta[META_KEY])


def _digest(key: Mapping[str, Any], layout: Mapping[str, Any]) -> str:
    return _sha(json.dumps({"key": key, "layout": layout}, sort_keys=True))


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
                    f"the layout changed: {_diff(meta['layout'], layout)}"
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
    from accelerate.utils import set_seed

    from multiteach.build import build_teachers, multicrop_transform, tile_dataset

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
    dtype_name, dtype = _store_dtype(settings.dtype)
    n_views, pool = settings.n_views, settings.patch_pool

    tiles = tile_dataset(recipe)
    set_seed(recipe.seed)  # as multiteach.train does before building teachers: random-init teachers match
    teachers = build_teachers(recipe, names, device)
    key = cache_key(recipe, tiles.paths, teachers)
    order = [n for n in names if "state_dict" in key["teachers"][n]["weights"]]
    for n in order:  # built by the rule a rebuild follows: spares open_cache in this process a rebuild
        _STATE_DICT_HASHES[_init_key(recipe, order, n)] = key["teachers"][n]["weights"]["state_dict"]
    layout = {"shard_tiles": settings.shard_tiles, "world_size": world_size}
    digest = _digest(key, layout)
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
            _TileViews(tiles, chunk, transform, recipe.seed, n_views),
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
    _atomic(target, lambda tmp: tmp.write_text(json.dumps(index, sort_keys=True, separators=(",", ":")) + "\n"))
    return target


# ------------------------------------------------------------------------------------------- reader


class FeatureCache:
    """A complete cache folder, read lazily: shards are memory-mapped (``safetensors.safe_open``) on first
    use and kept open per process. Safe to pickle into DataLoader workers (open handles are not carried).

    Args:
        cache_dir: A folder written by :func:`write_cache` (with ``index.json``).

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
        from multiteach.build import tile_dataset

        tile_paths = tile_dataset(recipe).paths
    names = active_teachers(recipe.losses)
    reasons = stale_reasons(cache.key, cache_key(recipe, tile_paths, teachers), names)
    if reasons:
        raise MultiteachError(
            f"feature cache {cache.dir} does not match this recipe, so it is not used: {'; '.join(reasons)}. "
            f"Rebuild it: {_REBUILD} (or set cache.dir to a new folder)"
        )
    cache.names = names
    return cache
