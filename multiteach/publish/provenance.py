"""Where a student came from: the teachers it learnt from and really loaded, their licences, its step and version."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import multiteach
from multiteach.errors import MultiteachError
from multiteach.losses import active_teachers
from multiteach.teachers.catalog import CATALOG
from multiteach.teachers.licences import licence_terms
from multiteach.teachers.loaded import describe_teacher, read_teacher_record
from multiteach.teachers.shipped import is_shipped, shipped_dir

NC_LICENSE = "cc-by-nc-nd-4.0"


def used_teachers(recipe: Any) -> list[str]:
    """Teachers that active loss terms read (the ones the student learnt from)."""
    return [n for n in active_teachers(recipe.active_losses()) if n in recipe.teachers]


def checkpoint_step(checkpoint: Path) -> int | None:
    """Optimiser steps completed at ``checkpoint`` (its ``state.json``)."""
    try:
        return int(json.loads((checkpoint / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def teacher_rows(
    recipe: Any,
    loaded: Mapping[str, Mapping[str, Any]] | None = None,
    licence_notes: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per teacher an active term uses: recipe name, source and the catalog's licence facts.

    Licence facts come from :data:`multiteach.teachers.licences.LICENCES` through the catalog entry, the one
    source the README table and ``multiteach teachers`` use too. Sources not in the catalog (``hf-hub:``,
    ``local-dir:``, timm names, ...) get ``license=None``, and so does a catalog name whose weights were not the
    catalog model's (``loaded``): no catalog licence, Hub page or gating is claimed for them.

    Args:
        recipe: The run's recipe.
        loaded: Teacher name -> :func:`~multiteach.teachers.loaded.describe_teacher` result (what was really
            loaded); None takes every catalog name for its catalog model.
        licence_notes: Teacher name -> the licence the exporter states for it (``--licence-note``).
    """
    rows = []
    for name in used_teachers(recipe):
        source = recipe.teachers[name].source
        info = (loaded or {}).get(name)
        catalog_model = source in CATALOG and (info is None or bool(info.get("catalog_model")))
        spec = CATALOG.get(source) if catalog_model else None
        terms = licence_terms(spec.license) if spec else None
        rows.append(
            {
                "name": name,
                "source": source,
                "in_catalog": spec is not None,
                "catalog_name": source in CATALOG,
                "loaded": dict(info) if info else None,
                "user_licence": (licence_notes or {}).get(name, ""),
                "license": spec.license if spec else None,
                "licence_known": terms is not None,
                "hf_license": terms.hf_license if terms else None,
                "restriction": terms.reason if terms else "",
                "licence_note": terms.note if terms else "",
                "gated": bool(spec and spec.gated),
                "noncommercial_derivatives": bool(spec and spec.noncommercial_derivatives),
                "hub_id": spec.hub_id if spec else None,
                "url": spec.url if spec else None,
                "local_weights": recipe.teachers[name].weights,
            }
        )
    return rows


def card_license(rows: list[dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """The card's ``license`` front matter and the licence paragraph, from the teachers' licences.

    Every teacher whose licence restricts students (``noncommercial_derivatives``, derived from the licence:
    any non-commercial or no-derivatives licence, or terms barring commercial use of models trained on its
    outputs) is named with its licence and the reason, and makes the student non-commercial:
    ``cc-by-nc-nd-4.0`` when those teachers are all CC-BY-NC-ND-4.0, else ``other``. Teachers whose licences
    are all Apache-2.0 give ``apache-2.0``; anything else is ``other`` with the reason.

    Returns:
        ``(front matter fields, markdown lines)``.
    """
    nc = [r for r in rows if r["noncommercial_derivatives"]]
    unknown = [r for r in rows if not r["in_catalog"] or not r.get("licence_known", r["in_catalog"])]
    stated = [r for r in unknown if r.get("user_licence")]
    lines: list[str] = []
    if nc:
        names = "; ".join(f"{r['name']} ({r['license']}: {r.get('restriction') or 'non-commercial terms'})" for r in nc)
        lines.append(
            "> **Non-commercial use only.** This student was trained on the outputs of teachers whose terms restrict "
            f"models derived from them: {names}. The student inherits that restriction: it may not be used "
            "commercially."
        )
        if all(r.get("hf_license") == NC_LICENSE for r in nc):
            front = {"license": NC_LICENSE}
        else:
            front = {"license": "other", "license_name": "noncommercial-derivative"}
            lines.append(
                "> Licence `other`: the teachers' non-commercial terms differ from CC-BY-NC-ND-4.0; "
                "the most restrictive of them applies."
            )
    elif rows and not unknown and all(r.get("hf_license") == "apache-2.0" for r in rows):
        front = {"license": "apache-2.0"}
        lines.append("All teachers are Apache-2.0; check their model cards for additional terms.")
    elif unknown and len(stated) == len(unknown):
        front = {"license": "other", "license_name": "stated-in-model-card"}
        lines.append("Licence `other`: the teachers' terms are stated below; read them before using this model.")
    else:
        front = {"license": "other", "license_name": "check-teacher-licences"}
        reason = (
            "no teacher licence is known"
            if not rows
            else "the teachers' licences are not all Apache-2.0 or are not in the catalog"
        )
        lines.append(f"Licence `other`: {reason}; set it yourself after checking the teachers' terms.")
    if unknown:
        lines.append(
            "> Teacher(s) whose licence multiteach does not know: "
            + ", ".join(_unknown_name(r) for r in unknown)
            + ". Check their licences before using or sharing this model"
            + ("." if stated else " (`multiteach export --licence-note NAME=TEXT` states one in this card).")
        )
    for r in stated:
        lines.append(f"Licence of teacher `{r['name']}` as stated by the exporter: {r['user_licence']}")
    noted = [r for r in rows if r.get("licence_note")]
    if noted:
        lines.append("Terms to respect: " + "; ".join(f"{r['name']}: {r['licence_note']}" for r in noted) + ".")
    gated = [r for r in rows if r["gated"]]
    if gated:
        lines.append(
            "Gated teacher(s): "
            + ", ".join(r["name"] for r in gated)
            + " (their weights require accepting terms on the Hugging Face Hub; respect them)."
        )
    return front, lines


def _unknown_name(row: Mapping[str, Any]) -> str:
    """A teacher whose licence is unknown, as the licence paragraph names it (never as the catalog model)."""
    if row.get("catalog_name") and not row["in_catalog"]:
        return f"`{row['name']}` (not the catalog's `{row['source']}` weights: see Teachers)"
    return f"`{row['source']}`"


def toolkit_version() -> str:
    """The installed ``multiteach`` package's version (``multiteach.__version__`` when not installed)."""
    try:
        return metadata.version("multiteach")
    except metadata.PackageNotFoundError:
        return multiteach.__version__


def loaded_teachers(recipe: Any, run_dir: Path) -> dict[str, dict[str, Any]]:
    """What each teacher an active term uses really loaded: the run's ``teachers.json`` (written at training
    time), or for teachers it does not describe (older runs, cached runs, another recipe) a description made now.
    """
    record = read_teacher_record(run_dir)
    out: dict[str, dict[str, Any]] = {}
    for name in used_teachers(recipe):
        cfg = recipe.teachers[name]
        info = record.get(name)
        if info is None or info.get("source") != cfg.source:
            try:
                info = describe_teacher(name, cfg)
            except MultiteachError as exc:
                info = {"name": name, "source": cfg.source, "catalog_model": False, "why": f"not checked: {exc}"}
        out[name] = dict(info)
    return out


def teacher_card_files(rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Export file name -> model card of each teacher whose weights ship inside multiteach (``multiteach-tiny``):
    the export carries a copy, so the card's link to it works on the Hub too."""
    out = {}
    for r in rows:
        spec = CATALOG.get(r["source"]) if r["in_catalog"] else None
        if spec is not None and is_shipped(spec.weights) and (r["loaded"] is None or r["loaded"].get("shipped")):
            card = shipped_dir(r["source"]) / "README.md"
            if card.is_file():
                out[f"teacher-card-{r['source']}.md"] = card
    return out
