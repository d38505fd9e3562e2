"""Local paths of a recipe: made absolute against the file that wrote them, and checked to exist.

``data.train``, ``teachers.*.weights``, ``teachers.*.source: local-dir:...``, ``cache.dir`` and
``losses.*.target_heads`` are made absolute while loading: a relative path written in a recipe file (or a
``defaults:`` fragment) against that file's folder, one given on the command line against the current
folder. ``output_dir`` stays relative to the current folder. :func:`check_paths` checks that they exist and
every "does not exist" error names the absolute path and the rule that produced it (:func:`path_rule`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multiteach.config.recipe import Recipe
from multiteach.errors import missing_path

_LOCAL_DIR = "local-dir:"


def _path_slots(tree: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """The local-path entries of a raw recipe mapping: ``(key, mapping holding it, its name there)``."""
    slots: list[tuple[str, dict[str, Any], str]] = []
    for section, name in (("data", "train"), ("data", "slide_dir"), ("cache", "dir")):
        node = tree.get(section)
        if isinstance(node, dict) and name in node:
            slots.append((f"{section}.{name}", node, name))
    slides = tree.get("data", {}).get("slides") if isinstance(tree.get("data"), dict) else None
    for name in ("source", "index_dir"):
        if isinstance(slides, dict) and name in slides:
            slots.append((f"data.slides.{name}", slides, name))
    for section, name in (("teachers", "weights"), ("teachers", "source"), ("losses", "target_heads")):
        entries = tree.get(section)
        for entry_name, node in (entries or {}).items() if isinstance(entries, dict) else ():
            if isinstance(node, dict) and name in node:
                slots.append((f"{section}.{entry_name}.{name}", node, name))
    return slots


def _resolve_paths(key: str, value: Any, base: Path, where: str, base_name: str, origins: dict[str, str] | None) -> Any:
    """``value`` (a path or a list of them) with relative paths joined to ``base``; records each rule.

    ``where`` says where the value was written ("in FILE", "from the command line (k=v)") and ``base_name``
    what ``base`` is ("its folder", "the current folder"), for :func:`path_rule`.

    Non-path values (null, numbers, a ``source`` that is not ``local-dir:``) are returned unchanged.
    """
    if origins is not None:
        for old in [k for k in origins if k == key or k.startswith(f"{key}[")]:
            del origins[old]

    def one(item: Any, at: str) -> Any:
        prefix = ""
        if key.endswith(".source"):
            if not (isinstance(item, str) and item.startswith(_LOCAL_DIR)):
                return item
            prefix, item = _LOCAL_DIR, item[len(_LOCAL_DIR) :]
        if not isinstance(item, str) or not item.strip():
            return prefix + item if isinstance(item, str) else item
        given = Path(item).expanduser()
        if given.is_absolute():
            resolved, rule = os.path.normpath(given), f"absolute, {where}"
        else:
            resolved = os.path.normpath(base / given)
            rule = f"{item!r} {where}, relative to {base_name} {base}"
        if origins is not None:
            origins[at] = rule
        return prefix + resolved

    if isinstance(value, list):
        return [one(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return one(value, key)


def path_rule(recipe: Any, key: str) -> str:
    """How the local path at ``key`` (``data.train``, ``data.train[1]``, ``teachers.uni.weights``, ...) of a
    recipe from :func:`load_recipe` was made absolute, for error messages."""
    origins = getattr(recipe, "path_origins", None) or {}
    return origins.get(key) or origins.get(key.split("[")[0]) or f"relative to the current folder {Path.cwd()}"


def _local_paths(recipe: Recipe) -> list[tuple[str, Path, str]]:
    """``(key, path, what it must be)`` for every local path a recipe names (null entries left out)."""
    out: list[tuple[str, Path, str]] = []
    train = recipe.data.train
    if isinstance(train, str):
        out.append(("data.train", Path(train), "a tile folder or a list file"))
    else:
        out += [(f"data.train[{i}]", Path(p), "a tile folder or a list file") for i, p in enumerate(train or [])]
    if recipe.data.slide_dir:
        out.append(("data.slide_dir", Path(recipe.data.slide_dir), "the folder of the slides coordinate files name"))
    if recipe.data.slides is not None:
        source = recipe.data.slides.source
        what = "a slide folder, a slide list or a CSV"
        if isinstance(source, str):
            out.append(("data.slides.source", Path(source), what))
        else:
            out += [(f"data.slides.source[{i}]", Path(p), what) for i, p in enumerate(source)]
    for name, teacher in recipe.teachers.items():
        if teacher.weights:
            out.append((f"teachers.{name}.weights", Path(teacher.weights), "a weights file or folder"))
        if teacher.source.startswith(_LOCAL_DIR):
            out.append((f"teachers.{name}.source", Path(teacher.source[len(_LOCAL_DIR) :]), "a model folder"))
    for term, cfg in recipe.active_losses().items():
        if cfg.get("target_heads"):
            out.append((f"losses.{term}.target_heads", Path(cfg["target_heads"]), "a safetensors file"))
    return out


def check_paths(recipe: Recipe) -> list[str]:
    """Check that the data and weights paths of a recipe exist, without building anything.

    Returns:
        One line per path: key, absolute path, what was found there and how the path was resolved;
        ``data.train`` unset and a ``cache.dir`` not written yet are reported, not refused.

    Raises:
        MultiteachError: for the first path that does not exist, naming the absolute path and its rule.
    """
    lines = (
        []
        if recipe.data.train or recipe.data.slides is not None
        else ["data.train: not set (training needs it, e.g. data.train=/data/tiles, or data.slides.source=SLIDES)"]
    )
    for key, path, expected in _local_paths(recipe):
        rule = path_rule(recipe, key)
        path = Path(os.path.abspath(path.expanduser()))
        if not path.exists():
            raise missing_path(key, path, rule, expected)
        lines.append(f"{key}: {path} ({'folder' if path.is_dir() else 'file'}, exists; {rule})")
    if recipe.cache is not None and recipe.cache.dir:
        key, path = "cache.dir", Path(os.path.abspath(Path(recipe.cache.dir).expanduser()))
        state = "exists" if path.is_dir() else "not written yet: `multiteach cache` writes it"
        lines.append(f"{key}: {path} ({state}; {path_rule(recipe, key)})")
    return lines
