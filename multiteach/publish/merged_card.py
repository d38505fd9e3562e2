"""The model card of a weight-space merge (``multiteach merge``): a parent's card with a "Merged parents" section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Sections of a parent's card that described the parent's own weights and do not hold for a merge.
PARENT_ONLY_SECTIONS = ("## Evaluation", "## Speed and size")


def merged_card(
    base: str,
    parents: list[Mapping[str, Any]],
    alpha: float,
    differences: list[str] | None = None,
    nearer: int = 0,
) -> str:
    """The card of a weight-space merge (``multiteach merge``): the nearer parent's card, retitled, with a "Merged
    parents" section naming both parents and alpha, and without the parent's evaluation and speed tables.

    Args:
        base: The nearer parent's ``README.md`` (empty for an export without one).
        parents: Per parent ``{source, recipe, weights, step, teachers}``, first then second.
        alpha: Weight of the second parent: ``(1 - alpha) * first + alpha * second``.
        differences: Recipe keys the parents differ in, ``"key: first vs second"``.
        nearer: Which parent ``base`` (and the export's ``recipe.yaml``) belongs to, 0 or 1.
    """
    first, second = parents
    title = f"# merge of {first['recipe']} and {second['recipe']} (alpha {alpha:g})"
    rows = "".join(
        f"| {label} `{p['source']}` | {weight:g} | {p['recipe']} | {p['weights']} | {p['step']} | "
        f"{', '.join(p['teachers']) or 'none'} |\n"
        for label, p, weight in (("first", first, 1 - alpha), ("second", second, alpha))
    )
    section = [
        "## Merged parents",
        "",
        f"These weights are a weight-space interpolation (WiSE-FT, Wortsman et al. 2022) of two students of one "
        f"architecture: `(1 - alpha) * first + alpha * second` with alpha = {alpha:g}, for the backbone and for the "
        "heads both parents have.",
        "",
        "| parent | share | recipe | weights | step | teachers |",
        "|---|---|---|---|---|---|",
        rows.rstrip("\n"),
        "",
        f"The sections below and `recipe.yaml` are those of the {('first', 'second')[nearer]} (nearer) parent; "
        "the parents' own evaluation and speed tables are left out, as they do not describe the merge.",
        "",
    ]
    if differences:
        section += ["The parents were trained from different recipes; they differ in:", ""]
        section += [f"- `{d}`" for d in differences] + [""]
    if sorted(first["teachers"]) != sorted(second["teachers"]):
        section += [
            "The parents had different teachers: the merged weights derive from both, so the terms of every "
            "teacher listed above apply, not only those in the Licence section.",
            "",
        ]
    lines = base.splitlines() if base else ["# merge"]
    at = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    if at is None:
        lines, at = [title, *lines], 0
    lines[at] = title
    kept, skipping = [], False
    for line in lines:
        if line.startswith("## "):
            skipping = line.strip() in PARENT_ONLY_SECTIONS
        if not skipping:
            kept.append(line)
    end = at + 1
    while end < len(kept) and not kept[end].startswith("## "):
        end += 1
    return "\n".join([*kept[:end], *section, *kept[end:]])
