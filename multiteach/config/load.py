"""Recipe files: ``defaults:`` layering, built-in recipes, :func:`load_recipe`, saving and copying out.

A recipe is a YAML file (or the name of a built-in one in ``multiteach/recipes/``). Layers, lowest
priority first, are deep-merged (mappings merge key by key; anything else is replaced):

1. the files named in ``defaults: [_base/data.yaml, ...]``, in order (paths relative to the recipe file,
   else names under the built-in recipes folder; a fragment may name its own defaults);
2. the recipe file itself;
3. command-line overrides ``dotted.key=value`` (:mod:`.overrides`).

In the name-keyed mappings whose entries are mappings (``teachers``, ``heads``, ``losses``) a ``null``
entry removes that entry: this is how a recipe (or ``losses.uni.patch=null``) switches off what a base
configured. The merged mapping is then checked against the schema (:mod:`.schema`, :mod:`.recipe`) before
anything heavy is built; local paths are made absolute on the way (:mod:`.paths`).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from multiteach.atomic import atomic_write_text
from multiteach.config.overrides import apply_override
from multiteach.config.paths import _path_slots, _resolve_paths
from multiteach.config.recipe import Recipe
from multiteach.config.yamlio import _read_yaml
from multiteach.errors import MultiteachError, did_you_mean

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
"""Built-in recipes (package data); ``_base/`` holds the fragments they name in ``defaults:``."""


def list_builtin() -> list[str]:
    """Names of the built-in recipes (``multiteach/recipes/*.yaml``, fragments in ``_base/`` excluded)."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.name.startswith("_"))


def _builtin_file(name: str) -> Path | None:
    """The built-in recipe file called ``name`` (with or without ``.yaml``), or None."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = RECIPES_DIR / f"{stem}.yaml"
    return path if stem and path.is_file() else None


def find_recipe(source: str | os.PathLike[str]) -> Path:
    """Resolve a recipe argument: an existing YAML file, else a built-in recipe name.

    Raises:
        MultiteachError: when it is neither (with close built-in names).
    """
    path = Path(source)
    if path.is_file():
        return path
    builtin = _builtin_file(str(source))
    if builtin is not None:
        return builtin
    names = list_builtin()
    raise MultiteachError(
        f"recipe {str(source)!r}: no such file and no built-in recipe of that name.{did_you_mean(str(source), names)} "
        f"Built-in recipes: {', '.join(names) or 'none'}."
    )


def _find_default(entry: Any, owner: Path) -> Path:
    """Resolve a ``defaults:`` entry of ``owner``: relative to it, else a built-in (``_base/x``) name."""
    if not isinstance(entry, str) or not entry:
        raise MultiteachError(f"{owner}: defaults: entries must be recipe paths or names, got {entry!r}")
    for root in (owner.parent, RECIPES_DIR):
        base = root / entry
        for candidate in (base, base.with_name(base.name + ".yaml")):
            if candidate.is_file():
                return candidate
    fragments = [str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.glob("_base/*.yaml")]
    raise MultiteachError(
        f"{owner}: defaults entry {entry!r} not found next to the recipe or among the built-in fragments."
        f"{did_you_mean(entry.removesuffix('.yaml'), fragments)}"
    )


def _defaults_of(path: Path, data: dict[str, Any]) -> list[Path]:
    """Pop and resolve the ``defaults:`` list of a parsed recipe file."""
    entries = data.pop("defaults", None) or []
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        raise MultiteachError(f"{path}: defaults: expected a list of recipe files, got {entries!r}")
    return [_find_default(entry, path) for entry in entries]


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def compose(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping of a recipe file with its ``defaults:`` merged underneath (not yet checked).

    Raises:
        MultiteachError: for unreadable YAML, missing fragments or a cycle of defaults.
    """
    return _compose(Path(path).resolve(), ())


def _compose(path: Path, stack: tuple[Path, ...], origins: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`compose` for a resolved path; ``stack`` holds the files that named it (cycle check).

    Relative local paths are made absolute against the folder of the file that writes them; ``origins``
    (key -> rule, see :func:`path_rule`) collects how, lower layers first so that higher ones win.
    """
    if path in stack:
        raise MultiteachError(f"defaults form a cycle: {' -> '.join(p.name for p in (*stack, path))}")
    data = _read_yaml(path)
    merged: dict[str, Any] = {}
    for fragment in _defaults_of(path, data):
        merged = deep_merge(merged, _compose(fragment.resolve(), (*stack, path), origins))
    for key, node, name in _path_slots(data):
        node[name] = _resolve_paths(key, node[name], path.parent, f"in {path}", "its folder", origins)
    return deep_merge(merged, data)


def load_recipe(source: str | os.PathLike[str], overrides: Iterable[str] = ()) -> Recipe:
    """Load, layer, override and check a recipe.

    Args:
        source: A YAML file or the name of a built-in recipe (see :func:`list_builtin`).
        overrides: ``dotted.key=value`` strings applied after the files, in order.

    Returns:
        The checked :class:`Recipe`.

    Raises:
        MultiteachError: for a missing recipe, bad YAML, a bad override or a schema violation.
    """
    path = find_recipe(source)
    origins: dict[str, str] = {}
    tree = _compose(path.resolve(), (), origins)
    for override in [overrides] if isinstance(overrides, str) else overrides:
        before = {key: copy.deepcopy(node[name]) for key, node, name in _path_slots(tree)}
        apply_override(tree, override)
        for key, node, name in _path_slots(tree):  # paths this override set: relative to the current folder
            if key not in before or node[name] != before[key]:
                where = f"from the command line ({override})"
                node[name] = _resolve_paths(key, node[name], Path.cwd(), where, "the current folder", origins)
    recipe = Recipe.from_dict(tree, name=path.stem)
    recipe.path_origins = origins
    return recipe


def save_resolved(recipe: Recipe, run_dir: str | os.PathLike[str]) -> Path:
    """Write the resolved recipe to ``run_dir/recipe.yaml`` atomically; returns that path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "recipe.yaml"
    atomic_write_text(target, recipe.to_yaml())
    return target


def _builtin_fragments(path: Path) -> list[Path]:
    """Built-in fragment files ``path`` names in ``defaults:``, recursively, first use first."""
    found: list[Path] = []
    for fragment in _defaults_of(path, _read_yaml(path)):
        fragment = fragment.resolve()
        if fragment.is_relative_to(RECIPES_DIR.resolve()) and fragment not in found:
            found += [fragment, *(f for f in _builtin_fragments(fragment) if f not in found)]
    return found


def copy_builtin(name: str, dest: str | os.PathLike[str], overwrite: bool = False) -> list[Path]:
    """Copy a built-in recipe out for editing (like ``tune cp``), with the ``_base`` fragments it uses.

    The recipe file is copied as is (comments kept) to ``dest`` (a file path, or a folder to copy into);
    its fragments go beside it under the same relative paths (``_base/x.yaml``), so the copy stands alone.
    Fragments already there with the same content are left alone.

    Args:
        name: Built-in recipe name (see :func:`list_builtin`).
        dest: Target file or existing folder.
        overwrite: Replace existing files that differ.

    Returns:
        The files written.

    Raises:
        MultiteachError: for an unknown name, or an existing target file (unless ``overwrite``).
    """
    src = _builtin_file(name)
    if src is None:
        builtin = list_builtin()
        raise MultiteachError(
            f"no built-in recipe {name!r}.{did_you_mean(name, builtin)} Built-in: {', '.join(builtin) or 'none'}."
        )
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    root = RECIPES_DIR.resolve()
    plan = {dest: src, **{dest.parent / f.relative_to(root): f for f in _builtin_fragments(src)}}
    if dest.exists() and dest.resolve() == src.resolve():
        raise MultiteachError(f"{dest} is the built-in recipe itself; copy it somewhere else")
    todo = {d: s for d, s in plan.items() if d == dest or not (d.is_file() and d.read_bytes() == s.read_bytes())}
    clashes = [str(d) for d in todo if d.exists()]
    if clashes and not overwrite:
        raise MultiteachError(
            f"{', '.join(clashes)} already exist(s); pass overwrite=True (--overwrite) to replace, or pick another path"
        )
    for target, source in todo.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return list(todo)
