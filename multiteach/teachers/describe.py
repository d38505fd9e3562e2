"""Catalog as a table: what ``multiteach teachers`` prints and the README's teacher table is generated from."""

from __future__ import annotations

import json
from typing import Any

from multiteach.errors import MultiteachError
from multiteach.teachers import LOADERS
from multiteach.teachers.base import TeacherSpec
from multiteach.teachers.catalog import CATALOG
from multiteach.teachers.licences import licence_terms

COLUMNS = ("name", "dim", "patch", "tokens@224", "params", "input", "mean/std", "licence", "gated", "students")


def _params(spec: TeacherSpec) -> int | None:
    try:
        model = LOADERS[spec.loader].architecture(spec)
    except MultiteachError:  # optional loader library missing (e.g. the conch extra)
        return None
    return sum(p.numel() for p in model.parameters())


def _fmt_stats(spec: TeacherSpec) -> str:
    return "/".join(",".join(f"{v:.3f}" for v in vals) for vals in (spec.mean, spec.std))


def catalog_rows() -> list[dict[str, Any]]:
    """One row per catalog entry; parameter counts computed on the meta device."""
    rows = []
    for name in CATALOG:
        spec = CATALOG.get(name)
        rows.append(
            {
                "name": name,
                "hub_id": spec.hub_id,
                "loader": spec.loader,
                "dim": spec.summary_dim,
                "patch_dim": spec.embed_dim,
                "patch": spec.patch_size,
                "tokens@224": spec.tokens_at(224),
                "prefix_tokens": spec.num_prefix_tokens,
                "params": _params(spec),
                "input": spec.input_size,
                "mean": list(spec.mean),
                "std": list(spec.std),
                "embedding": spec.embedding,
                "licence": spec.license,
                "licence_known": licence_terms(spec.license) is not None,
                "gated": spec.gated,
                "noncommercial_derivatives": spec.noncommercial_derivatives,
                "revision": spec.revision,
                "remote_code": spec.remote_code,
                "verified_against": list(spec.verified_against),
                "checked": list(spec.checked),
                "unverified": [f"[unverified: {fact}]" for fact in spec.unverified],
            }
        )
    return rows


def _cell(row: dict[str, Any], col: str) -> str:
    if col == "params":
        return "n/a" if row["params"] is None else f"{row['params'] / 1e6:.2f}M"
    if col == "mean/std":
        return _fmt_stats(CATALOG.get(row["name"]))
    if col == "gated":
        return "yes" if row["gated"] else "no"
    if col == "students":
        return "non-commercial" if row["noncommercial_derivatives"] else "—"
    if col == "dim":
        return f"{row['dim']} ({row['embedding']})"
    return str(row[col])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (also used for the README)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def unverified_facts() -> dict[str, list[str]]:
    """Catalog entry -> the facts it could not check (``fact: reason``), for entries that have any."""
    return {name: list(CATALOG.get(name).unverified) for name in CATALOG if CATALOG.get(name).unverified}


def render(as_json: bool = False) -> str:
    """The catalog as Markdown (default) or JSON."""
    rows = catalog_rows()
    return json.dumps(rows, indent=2) if as_json else markdown_table(rows)
