"""What a cache's targets depend on: the cache key (a JSON fingerprint of the teachers' weights and preprocessing,
the view spec and the storage), and :func:`key_diff`, which names what differs between two keys.

Per teacher: source + weights fingerprint (safetensors header, size and sampled chunks of the weights file(s),
or a hash of the state dict for random-init teachers) + preprocessing (input size, mean/std, interpolation,
dtype, embedding rule); the view spec (global crop size/scale, augmentation, seed, views per tile); the storage
(dtype, patch pooling, PCA dims). Tiles are not in the key: every stored row is keyed by its tile's identity.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch

from multiteach.build import build_teachers, multicrop_transform, spec_overrides
from multiteach.cache.compress import canonical_dtype
from multiteach.cache.settings import FORMAT, cache_settings
from multiteach.errors import MultiteachError
from multiteach.nested import flatten
from multiteach.teachers import resolve_spec
from multiteach.teachers.base import Teacher, TeacherSpec
from multiteach.teachers.weights import hub_weights

__all__ = [
    "WEIGHT_SUFFIXES",
    "cache_key",
    "file_fingerprint",
    "key_diff",
    "remember_state_dict_hashes",
    "state_dict_hash",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".json")
_MIB = 1 << 20


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
    cfg = recipe.teachers[name]
    overrides = spec_overrides(cfg)
    if cfg.weights:
        overrides["weights"] = cfg.weights
    return resolve_spec(cfg.source, **overrides)


def _weight_files(recipe: Any, name: str) -> list[Path] | None:
    """The files a pretrained teacher's weights come from, or None when only its state dict can tell
    (random init, timm's own pretrained weights, open_clip architecture names)."""
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


def _views_part(recipe: Any, views_per_tile: int) -> dict[str, Any]:
    crops, aug = recipe.data.global_crops, recipe.to_dict()["data"]["augment"]
    return {
        "rule": "sample_params[0] seeded by sha256('{seed}/cache/{tile identity}/{view}')",
        "seed": recipe.seed,
        "views_per_tile": views_per_tile,
        "global_size": crops.size,
        "global_scale": list(crops.scale),
        **aug,
        "blur_sigma": list(multicrop_transform(recipe).blur.sigma),
    }


# State-dict hashes of teachers built without weight files (random init), by what determines their
# initial values; a sweep's runs (in one process) then rebuild such a teacher at most once.
_STATE_DICT_HASHES: dict[str, str] = {}


def _init_key(recipe: Any, order: list[str], name: str) -> str:
    cfgs = {n: recipe.to_dict()["teachers"][n] for n in order}
    versions = [torch.__version__, timm.__version__]
    return _sha(json.dumps([recipe.seed, order, cfgs, name, versions], sort_keys=True, default=str))


def _state_dict_hashes(recipe: Any, order: list[str], given: Mapping[str, Teacher]) -> dict[str, str]:
    """Hashes of the teachers ``order`` that only a state-dict hash identifies (random init, timm's own
    weights): from ``given`` teachers, from this process's memo, or rebuilt exactly as
    :func:`multiteach.cache.write_cache` and a live run build them (recipe seed, recipe order; file-backed
    teachers draw no random numbers)."""
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


def remember_state_dict_hashes(recipe: Any, key: Mapping[str, Any]) -> None:
    """Memoise the state-dict hashes of ``key`` (a key of teachers built as :func:`cache_key` rebuilds them:
    recipe seed, recipe order), so a later :func:`cache_key` in this process needs no rebuild.

    Args:
        recipe: The recipe ``key`` was computed for.
        key: Its :func:`cache_key`, computed from teachers built right after seeding with ``recipe.seed``.
    """
    order = [n for n, t in key["teachers"].items() if "state_dict" in t["weights"]]
    for n in order:
        _STATE_DICT_HASHES[_init_key(recipe, order, n)] = key["teachers"][n]["weights"]["state_dict"]


def cache_key(recipe: Any, names: Sequence[str], teachers: Mapping[str, Teacher] | None = None) -> dict:
    """What a cache's targets depend on, as plain JSON data (the folder's ``cache.json``).

    Args:
        recipe: The recipe (teachers, ``data.global_crops``/``augment``, ``seed``, ``cache`` settings).
        names: The teachers the cache stores (the recipe's active ones when it is created).
        teachers: The loaded teachers, if at hand. Teachers identified by a state-dict hash (random init)
            that are not given are rebuilt for the hash (once per process).

    Returns:
        ``{"format", "views", "storage", "teachers": {name: {"weights", "preprocessing"}}}``.
    """
    settings = cache_settings(recipe)
    names = list(names)
    files = {n: _weight_files(recipe, n) for n in names}
    hashes = _state_dict_hashes(recipe, [n for n in names if files[n] is None], teachers or {})
    key = {
        "format": FORMAT,
        "views": _views_part(recipe, settings.views_per_tile),
        "storage": {
            "dtype": canonical_dtype(settings.dtype),
            "patch_pool": settings.patch_pool,
            "patch_dims": settings.patch_dims,
        },
        "teachers": {
            n: {
                "weights": _weights_part(recipe, n, files[n], hashes.get(n)),
                "preprocessing": _preprocessing_part(recipe, n),
            }
            for n in names
        },
    }
    return json.loads(json.dumps(key))  # tuples -> lists: compares equal to a key read back from JSON


def _short(v: Any) -> str:
    if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v):
        return v[:12] + "…"
    return repr(v)


def key_diff(old: Any, new: Any) -> str:
    """``"a.b 1 -> 2, ..."``: the leaves that differ between two nested mappings (64-hex hashes shortened)."""
    a, b = flatten(old), flatten(new)
    parts = [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(parts)
