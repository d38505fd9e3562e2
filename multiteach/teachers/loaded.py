"""What a recipe's teacher really loaded: the catalog model, or another model (and which), for the model card.

A recipe names a catalog teacher (``h-optimus-0``) and may point its ``weights:`` at any folder; the loader then
builds the folder's own architecture (its ``config.json``). The card must not credit the catalog model, its Hub
page or its licence for weights that are not that model's. :func:`describe_teacher` says, per teacher, whether
the weights are the catalog model's and, when they are not (the weights doctor finds another architecture, the
folder is a multiteach stand-in, the source is not in the catalog, or the teacher is random), what was loaded:
the architecture from the weights' own config, the weights file's name and its SHA-256.

``multiteach train`` writes the descriptions of a run's teachers to ``teachers.json`` in the run directory
(:func:`write_teacher_record`); ``multiteach export`` reads them (:func:`read_teacher_record`), or describes the
teachers at export time for runs that have no record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from multiteach.atomic import atomic_write_text
from multiteach.errors import MultiteachError
from multiteach.teachers import CATALOG, resolve_spec, spec_overrides, teacher_architecture, weights_architecture
from multiteach.teachers.base import TeacherSpec
from multiteach.teachers.doctor import Report, check_teacher
from multiteach.teachers.keycheck import vit_dims
from multiteach.teachers.shipped import is_shipped
from multiteach.teachers.weights import file_sha256, local_weights, standin_of

TEACHERS_FILE = "teachers.json"

__all__ = [
    "TEACHERS_FILE",
    "describe_teacher",
    "read_teacher_record",
    "recipe_spec",
    "teacher_depth",
    "write_teacher_record",
]


def recipe_spec(cfg: Any) -> TeacherSpec:
    """The :class:`TeacherSpec` a recipe's teacher entry loads (its overrides and ``weights:`` applied)."""
    spec = resolve_spec(cfg.source, **spec_overrides(cfg))
    return spec.replace(weights=cfg.weights) if cfg.weights else spec


def _not_catalog_reason(cfg: Any, spec: TeacherSpec, report: Report | None) -> str:
    """Why ``cfg``'s weights are not its catalog model's (``""`` when they are)."""
    if not getattr(cfg, "pretrained", True):
        return "random-initialised weights (`pretrained: false`)"
    if cfg.source not in CATALOG:
        return "not a catalog teacher: multiteach knows nothing about its weights or licence"
    standin = standin_of(spec.weights)
    if standin:
        return f"a tiny random stand-in of {standin} written by multiteach (`multiteach.standins`): no one's weights"
    if not cfg.weights:
        return ""  # the catalog's own files: its Hub repo, or the weights shipped inside multiteach
    report = report if report is not None else check_teacher(spec, catalog_architecture=False)
    if report.warnings:
        return f"the weights doctor found another model: {report.warnings[0]}"
    if report.problems:
        return f"its `weights:` could not be checked against the catalog entry: {report.problems[0]}"
    return ""


def _architecture(spec: TeacherSpec) -> str | None:
    """``arch (ViT-? (width W, N blocks, patch P))`` from the weights' own ``config.json``, if they have one."""
    try:
        found = weights_architecture(spec)
    except (MultiteachError, OSError, ValueError, KeyError, RuntimeError):
        return None
    if found is None:
        return None
    model, resolved, _ = found
    dims = vit_dims({k: tuple(v.shape) for k, v in model.state_dict().items()})
    return f"{resolved.arch} ({dims.describe()})"


def teacher_depth(cfg: Any) -> int | None:
    """The number of blocks of the ViT a recipe's teacher entry builds (its weights' own config, else the
    catalog architecture), on the meta device; None when it cannot be known without loading."""
    spec = recipe_spec(cfg)
    try:
        found = weights_architecture(spec)
        model = found[0] if found is not None else teacher_architecture(cfg.source, **spec_overrides(cfg))
    except (MultiteachError, OSError, ValueError, KeyError, RuntimeError):
        return None
    return vit_dims({k: tuple(v.shape) for k, v in model.state_dict().items()}).depth


def describe_teacher(name: str, cfg: Any, report: Report | None = None) -> dict[str, Any]:
    """What the recipe's teacher ``name`` loads, as the model card states it.

    Args:
        name: The teacher's key in the recipe.
        cfg: Its entry (``TeacherConfig``: ``source``, ``weights``, ``pretrained``, overrides).
        report: The weights doctor's report of it (training's preflight), or None to check it now.

    Returns:
        ``name``, ``source``, ``catalog_model`` (the weights are the catalog entry's model), ``why`` (when they
        are not), ``shipped`` (the catalog's weights inside multiteach), ``standin`` (the teacher a multiteach
        stand-in imitates), and for weights that are not the catalog model's: ``architecture`` (from their own
        config), ``file`` (the weights file's name) and ``sha256``.
    """
    spec = recipe_spec(cfg)
    why = _not_catalog_reason(cfg, spec, report)
    info: dict[str, Any] = {
        "name": name,
        "source": cfg.source,
        "catalog_model": not why,
        "why": why,
        "shipped": not why and is_shipped(spec.weights),
        "standin": standin_of(spec.weights),
        "architecture": None,
        "file": None,
        "sha256": None,
    }
    if why and getattr(cfg, "pretrained", True) and spec.weights:
        info["architecture"] = _architecture(spec)
        try:
            path = local_weights(spec.weights, spec.weight_files)
        except MultiteachError:
            path = None
        if path is not None:
            info["file"], info["sha256"] = path.name, file_sha256(path)
    return info


def write_teacher_record(run_dir: str | Path, recipe: Any, reports: Iterable[Report]) -> dict[str, dict[str, Any]]:
    """Describe the teachers the training preflight checked and write them to ``run_dir/teachers.json``.

    Args:
        run_dir: The run directory.
        recipe: The run's recipe.
        reports: The preflight's reports (their ``recipe_name`` says which teacher each is).

    Returns:
        Teacher name -> :func:`describe_teacher` result (what the file holds).
    """
    record = {r.recipe_name: describe_teacher(r.recipe_name, recipe.teachers[r.recipe_name], r) for r in reports}
    atomic_write_text(Path(run_dir) / TEACHERS_FILE, json.dumps(record, indent=2) + "\n")
    return record


def read_teacher_record(run_dir: str | Path) -> dict[str, Mapping[str, Any]]:
    """``run_dir/teachers.json`` (empty when the run has none or it cannot be read)."""
    try:
        data = json.loads((Path(run_dir) / TEACHERS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
