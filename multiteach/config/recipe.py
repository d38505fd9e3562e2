"""The top-level :class:`Recipe`: its sections, the checks across them, and its plain-data and YAML forms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from multiteach.config.checks import _check_term, _non_negative, _not_configured, _require
from multiteach.config.convert import _build, _plain
from multiteach.config.schema import (
    CacheConfig,
    DataConfig,
    OptimConfig,
    ScheduleConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    _hint,
)
from multiteach.config.yamlio import _Dumper
from multiteach.errors import MultiteachError
from multiteach.losses import check_term
from multiteach.students import check_student_recipe


@dataclass(kw_only=True)
class Recipe:
    """A checked recipe. Build it with :func:`~multiteach.config.load_recipe` or :meth:`Recipe.from_dict`.

    Attributes:
        name: Run name (default: the recipe file's stem).
        seed: Random seed.
        output_dir: Run folder; ``{name}`` in it is replaced by the name (default ``runs/{name}``).
        data: Data and views.
        student: The student.
        teachers: Teacher name -> settings.
        heads: Teacher name -> projection-head config (checked by ``ProjectionHeads`` at build time).
        losses: Term name -> ``{type, weight, ...}`` (term keys checked against the term type here).
        optim: Optimiser.
        schedule: Run length and schedules.
        train: Loop settings.
        cache: Teacher-feature cache (folder, views per tile, stored dtype, pooling), or null.
        export: Export settings, or null.
    """

    name: str = field(metadata=_hint("e.g. name=my-run"))
    seed: int = 0
    output_dir: str = "runs/{name}"
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    losses: dict[str, dict[str, Any]] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig | None = None
    export: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> Recipe:
        """Check a merged recipe mapping and build the typed recipe.

        Args:
            data: The mapping (no ``defaults:`` left; see :func:`~multiteach.config.compose`).
            name: Default for ``name`` when the mapping has none (the recipe file's stem).

        Raises:
            MultiteachError: naming the key path, the bad value and what is allowed.
        """
        if not isinstance(data, Mapping):
            raise MultiteachError(f"recipe: expected a mapping of sections (name, data, ...), got {data!r}")
        raw = dict(data)
        if name is not None and raw.get("name") is None:
            raw["name"] = name
        teachers = raw.get("teachers")
        if isinstance(teachers, Mapping):
            raw["teachers"] = {k: {"source": k, **v} if isinstance(v, Mapping) else v for k, v in teachers.items()}
        return _build(cls, raw, "")

    def _finish(self, at: str) -> None:
        _require(bool(self.name.strip()), "name", self.name, "must be a non-empty string")
        _non_negative(self, at, "seed")
        self.output_dir = self.output_dir.replace("{name}", self.name)
        for teacher in self.teachers:
            if "." in teacher:
                raise MultiteachError(
                    f"teachers.{teacher}: teacher names cannot contain '.' (they key the projection heads); "
                    f"add a teacher with teachers.NAME={{source: ...}}"
                )
        if self.student.init_from is not None and self.student.init_from not in self.teachers:
            raise MultiteachError(f"student.init_from: {_not_configured(self.student.init_from, self.teachers)}")
        for teacher in self.heads:
            if teacher not in self.teachers:
                raise MultiteachError(f"heads.{teacher}: {_not_configured(teacher, self.teachers)}")
        for term, cfg in self.losses.items():
            _check_term(term, cfg, self.teachers, robust_views=self.data.robust_views is not None)
        check_student_recipe(self)  # a non-ViT student: iBOT, masking, init_from, kwargs and sizes it cannot take

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (mappings, lists, scalars), every default filled in."""
        return _plain(self)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML; loading it again gives the same recipe."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=120)

    def active_losses(self) -> dict[str, dict[str, Any]]:
        """Loss terms that will be built (weight absent or > 0)."""
        return {k: v for k, v in self.losses.items() if check_term(k, v)[1] > 0}

    def check_trainable(self) -> None:
        """Raise unless the recipe names training data and has at least one active loss term."""
        if self.data.train is None and self.data.slides is None:
            raise MultiteachError(
                "data.train: required for training: a tile folder, a list file, or a list of them "
                "(e.g. data.train=/data/tiles), or slides for online patching (data.slides.source=SLIDES)"
            )
        if not self.active_losses():
            raise MultiteachError("losses: no active term (every term is null or has weight 0)")
