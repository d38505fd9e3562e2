"""The named teachers: one short entry per model, facts taken from its model card and public loading code.

Each entry records what it was checked against (``verified_against``: ``owner/repo@commit:path`` of the
public code read, or a quote of the Hub card), which facts those references confirm (``checked``) and,
in ``unverified``, every fact that could not be checked with the reason. Licences are keys of
:data:`multiteach.teachers.licences.LICENCES`, from which the non-commercial flag, the README table and the
model card's licence text are derived. Parameter counts are not written here: ``multiteach teachers``
computes them from the architecture on the meta device, and the tests compare them with the published
figures.

The entries themselves are the table :data:`multiteach.teachers.catalog_entries.ENTRIES` (add a teacher
there); the references and fact labels they cite are in :mod:`multiteach.teachers.catalog_refs`. This
module registers them, in table order, as :data:`CATALOG`.
"""

from __future__ import annotations

from multiteach.registry import Registry
from multiteach.teachers.base import TeacherSpec
from multiteach.teachers.catalog_entries import ENTRIES

__all__ = ["CATALOG"]

CATALOG: Registry[TeacherSpec] = Registry("teacher")
"""Catalog key (``TeacherSpec.name``) -> entry; registering a name twice raises."""

for _spec in ENTRIES:
    CATALOG.register(_spec.name, _spec)
del _spec
