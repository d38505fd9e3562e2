"""Loss composition: named, weighted terms built from the recipe's ``losses:`` mapping.

A recipe writes::

    losses:
      uni.cls:   {type: cosine, teacher: uni, on: summary, weight: 1.0}
      uni.patch: {type: mixed, teacher: uni, on: patch, weight: 0.25}
      koleo:     {type: koleo, weight: 0.1}

and :func:`build_loss` turns it into a :class:`CompositeLoss` that prints as
``Loss = 1.0*uni.cls + 0.25*uni.patch + 0.1*koleo`` and returns the total and every term's value.
A term with weight 0 or ``null`` is not built, and a projection head (or teacher) that no remaining
term uses is not built (or loaded). New term types register in :data:`LOSSES` by name, from any file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from multiteach.errors import MultiteachError, did_you_mean
from multiteach.heads import ProjectionHeads
from multiteach.registry import Registry
from multiteach.teachers.base import TeacherOutput, TeacherSpec

LOSSES: Registry[type[LossTerm]] = Registry("loss term type")


@dataclass
class LossContext:
    """Everything a term may read in one step.

    Attributes:
        student_global: Live student on the global crops, crop-major (n_global * B rows).
        teachers: Teacher name -> its output on the same global crops (or cached targets).
        n_global: Number of global crops per image.
        student_local: Live student on the local crops (n_local * B rows), or None.
        ema_global: EMA student on the (unmasked) global crops, for self-distillation.
        ema_terms: The EMA twins of the terms (their heads give the EMA branch's scores).
        masks: Bool (n_global * B, N) iBOT masks applied to the student's global crops, or None.
        teacher_temp: Teacher softmax temperature of this step (DINO/iBOT).
        heads: Per-teacher projection heads (set by :class:`CompositeLoss`).
        student_clean: The student on the clean global crops when it reads perturbed copies
            (``data.robust_views``) and a term asks for it (``needs_clean_student``), else None; without
            gradients unless a term trains through it (``clean_student_grad``).
    """

    student_global: TeacherOutput
    teachers: Mapping[str, TeacherOutput] = field(default_factory=dict)
    n_global: int = 1
    student_local: TeacherOutput | None = None
    ema_global: TeacherOutput | None = None
    ema_terms: Mapping[str, LossTerm] | None = None
    masks: torch.Tensor | None = None
    teacher_temp: float = 0.07
    heads: ProjectionHeads | None = None
    student_clean: TeacherOutput | None = None


@dataclass(frozen=True)
class BuildInfo:
    """What a term needs to know to validate itself and size its modules.

    Attributes:
        student_dim: Student summary width (what DINO heads read).
        teachers: Configured teachers' specs, by name.
        student_patch_dim: Student patch-token width, when it differs from ``student_dim`` (a feature-map
            student whose head widens its pooled feature); None means the same.
    """

    student_dim: int
    teachers: Mapping[str, TeacherSpec]
    student_patch_dim: int | None = None


class LossTerm(nn.Module):
    """A named, weighted loss term. Subclasses register with ``@LOSSES.register("type")``.

    Subclasses set ``allowed_keys`` (recipe keys besides ``type`` and ``weight``), implement
    :meth:`forward` returning an unweighted scalar, and may override :meth:`head_targets`.

    Args:
        name: The recipe key (``"uni.cls"``).
        weight: Non-negative weight.
    """

    allowed_keys: tuple[str, ...] = ()
    teacher: str | None = None
    #: Set by terms that compare the student's perturbed view with its own clean view (robust views).
    needs_clean_student: bool = False
    #: Set by terms that train through the clean view (its pass then keeps gradients; else it runs without).
    clean_student_grad: bool = False

    def __init__(self, name: str, weight: float) -> None:
        super().__init__()
        self.name = name
        self.weight = float(weight)

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any], info: BuildInfo) -> LossTerm:
        """Build from the recipe entry (``type`` and ``weight`` already checked)."""
        kwargs = {k: v for k, v in cfg.items() if k not in ("type", "weight")}
        return cls(name, cfg["weight"], **kwargs)

    def link(self, terms: Mapping[str, LossTerm]) -> None:
        """Hook to connect to other active terms after all are built (e.g. a shared head)."""

    def teachers_used(self) -> list[str]:
        """Teachers whose outputs this term reads."""
        return [self.teacher] if self.teacher else []

    def head_targets(self) -> dict[str, dict[str, int]]:
        """Projection heads this term needs: teacher -> {target: teacher width}."""
        return {}

    def forward(self, ctx: LossContext) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class CompositeLoss(nn.Module):
    """The weighted sum of the active terms, plus the projection heads they use.

    Args:
        terms: Active terms, in recipe order.
        heads: Projection heads for exactly the (teacher, target) pairs the terms use.

    Shapes:
        forward(ctx) -> (total scalar, {term name: unweighted scalar, detached}).
    """

    def __init__(self, terms: list[LossTerm], heads: ProjectionHeads | None) -> None:
        super().__init__()
        self.names = [t.name for t in terms]
        self.terms = nn.ModuleDict({_key(t.name): t for t in terms})
        self.heads = heads

    def term(self, name: str) -> LossTerm:
        """The term called ``name`` (recipe key)."""
        if name not in self.names:
            raise MultiteachError(f"no loss term {name!r}.{did_you_mean(name, self.names)}")
        return self.terms[_key(name)]

    def teachers_used(self) -> list[str]:
        """Teachers some active term reads, in first-use order (only these need loading)."""
        used: list[str] = []
        for t in self.terms.values():
            for name in t.teachers_used():
                if name not in used:
                    used.append(name)
        return used

    def forward(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total weighted loss and each term's unweighted value."""
        ctx.heads = self.heads
        values: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for name in self.names:
            term = self.terms[_key(name)]
            value = term(ctx)
            values[name] = value.detach()
            total = term.weight * value if total is None else total + term.weight * value
        if total is None:
            raise MultiteachError("the loss has no active terms")
        return total, values

    def __str__(self) -> str:
        return "Loss = " + " + ".join(f"{self.terms[_key(n)].weight:g}*{n}" for n in self.names)


def _key(name: str) -> str:
    return name.replace(".", "__")


def check_term(name: str, cfg: Any) -> tuple[type[LossTerm], float]:
    """Check a ``losses:`` entry's ``type``, keys and ``weight``; the one check the recipe and the builder share.

    Args:
        name: The term's recipe key (``"uni.cls"``); errors name ``losses.<name>...``.
        cfg: Its entry, ``{type, weight, ...}``.

    Returns:
        The registered term class and the weight as a float (0.0 when 0 or null: the term is switched off).

    Raises:
        MultiteachError: for an entry that is not a mapping, a missing or unknown ``type``, a key the type
            does not take, or a weight that is not a number >= 0.
    """
    at = f"losses.{name}"
    if not isinstance(cfg, Mapping):
        raise MultiteachError(f"{at}: expected a mapping like {{type: cosine, weight: 1.0}}, got {cfg!r}")
    if "type" not in cfg:
        raise MultiteachError(f"{at}: missing 'type'. Known types: {', '.join(LOSSES.keys())}.")
    cls = term_class(name, cfg["type"])
    allowed = ("type", "weight", *cls.allowed_keys)
    for key in cfg:
        if key not in allowed:
            raise MultiteachError(
                f"{at}.{key}: unknown key for type {cfg['type']!r}.{did_you_mean(str(key), allowed)} "
                f"Allowed: {', '.join(allowed)}."
            )
    weight = cfg.get("weight", 1.0)
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
        raise MultiteachError(f"{at}.weight: expected a number >= 0 (0 or null switches the term off), got {weight!r}")
    return cls, 0.0 if weight is None else float(weight)


def build_loss(
    losses: Mapping[str, Any],
    student_dim: int,
    teachers: Mapping[str, TeacherSpec],
    heads: Mapping[str, Mapping[str, Any]] | None = None,
    patch_dim: int | None = None,
) -> CompositeLoss:
    """Build the active terms of a recipe's ``losses:`` mapping and the heads they need.

    Args:
        losses: Term name -> ``{type, weight, ...}`` (or None / weight 0 to switch it off); every entry's
            type, keys and weight are checked by :func:`check_term`, switched-off ones included.
        student_dim: Student token width (its summary width when ``patch_dim`` differs).
        teachers: Configured teacher specs by name (resolved, e.g. from the catalog).
        heads: Per-teacher head configs ``{kind, shared, bottleneck?, hidden?}``; configs of teachers
            that no active term uses are ignored.
        patch_dim: Student patch-token width when it differs from ``student_dim`` (``student.embed_dim`` vs
            ``student.summary_dim`` of a feature-map student); None means the same.

    Raises:
        MultiteachError: naming the term for an unknown type, unknown key, unknown teacher,
            ``on: patch`` for a teacher without patch tokens, a negative weight, or heads that do not fit.
    """
    info = BuildInfo(student_dim, teachers, patch_dim)
    terms: list[LossTerm] = []
    for name, cfg in losses.items():
        if cfg is None:
            continue
        cls, weight = check_term(name, cfg)
        if weight > 0:
            terms.append(cls.from_config(name, {**cfg, "weight": weight}, info))
    by_name = {t.name: t for t in terms}
    for term in terms:
        term.link(by_name)
    targets: dict[str, dict[str, int]] = {}
    for term in terms:
        for teacher, dims in term.head_targets().items():
            targets.setdefault(teacher, {}).update(dims)
    head_cfgs = {k: v for k, v in (heads or {}).items() if k in targets}
    try:
        in_dims = {"summary": student_dim, "patch": student_dim if patch_dim is None else patch_dim}
        projection = ProjectionHeads(in_dims, targets, head_cfgs) if targets else None
    except MultiteachError as exc:
        raise MultiteachError(f"heads: {exc}") from None
    return CompositeLoss(terms, projection)


def active_teachers(losses: Mapping[str, Any]) -> list[str]:
    """Teachers named by active terms (``teacher:``, or an expert ``target:``), without building anything.

    Lets the engine load only the teachers some term will read.
    """
    names: list[str] = []
    for name, cfg in losses.items():
        if cfg is None or check_term(name, cfg)[1] == 0:
            continue
        for key in ("teacher", "target"):
            value = cfg.get(key)
            if isinstance(value, str) and value != "ema" and value not in names:
                names.append(value)
    return names


def term_class(name: str, type_name: Any) -> type[LossTerm]:
    """The registered class of term ``name``'s ``type`` (errors name ``losses.<name>.type``)."""
    try:
        return LOSSES.get(str(type_name))
    except MultiteachError as exc:
        raise MultiteachError(f"losses.{name}.type: {exc}") from None
