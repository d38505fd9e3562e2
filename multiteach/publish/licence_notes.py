"""``multiteach export --licence-note`` values read against a run's recipe, as teacher name -> licence text."""

from __future__ import annotations

from multiteach.config import load_recipe
from multiteach.errors import MultiteachError


def licence_notes(run_dir: str, notes: list[str]) -> dict[str, str]:
    """``--licence-note`` values as teacher name -> text: ``NAME=TEXT`` for a teacher of the run's recipe, a
    plain ``TEXT`` for every teacher of it (a name that is not one of its teachers is part of the text)."""
    if not notes:
        return {}
    names = list(load_recipe(f"{run_dir}/recipe.yaml").teachers)
    out: dict[str, str] = {}
    for note in notes:
        name, sep, text = note.partition("=")
        if sep and name.strip() in names:
            if not text.strip():
                raise MultiteachError(f"--licence-note {note!r}: the text after {name.strip()}= is empty")
            out[name.strip()] = text.strip()
        else:
            out.update({n: note.strip() for n in names if n not in out})
    return out
