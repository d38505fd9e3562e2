"""The built-in loss term types: expert feature distillation and DINO/iBOT/KoLeo self-distillation.

Feature terms (types ``cosine``, ``smooth_l1``, ``mse``, ``kl``, ``mixed``) project the student's summary or
patch tokens through the teacher's projection head and compare them with the teacher's (optionally
standardised) features. ``dino``/``ibot`` compare prototype scores with an EMA copy of the student
(``target: ema``) or with a frozen expert teacher through frozen heads (``target: <teacher>``, H0-mini).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multiteach.errors import MultiteachError, did_you_mean
from multiteach.heads import DINOHead
from multiteach.losses.base import LOSSES, BuildInfo, LossContext, LossTerm
from multiteach.losses.dino import DINOLoss
from multiteach.losses.expert_heads import load_head
from multiteach.losses.feature import DISTANCES, resample_grid
from multiteach.losses.ibot import IBOTPatchLoss
from multiteach.losses.koleo import koleo
from multiteach.losses.standardize import PhiSStandardizer, RunningStandardizer
from multiteach.teachers.base import TeacherOutput, TeacherSpec

TARGETS = ("summary", "patch")
RESAMPLE_MODES = ("bicubic", "bilinear", "none")
STANDARDIZERS = ("none", "running", "phi-s")
#: Which student view of ``data.robust_views`` a feature term distils the clean teacher into.
STUDENT_VIEWS = ("perturbed", "clean", "both")


def _choice(term: str, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise MultiteachError(
            f"losses.{term}.{key}: {value!r} is not allowed.{did_you_mean(str(value), allowed)} "
            f"Allowed: {', '.join(allowed)}."
        )
    return value


def teacher_spec(term: str, teacher: Any, info: BuildInfo, key: str = "teacher") -> TeacherSpec:
    if teacher not in info.teachers:
        known = ", ".join(info.teachers) or "none"
        raise MultiteachError(
            f"losses.{term}.{key}: teacher {teacher!r} is not configured under `teachers:`."
            f"{did_you_mean(str(teacher), info.teachers)} Configured: {known}."
        )
    return info.teachers[teacher]


def required_teacher_spec(term: str, cfg: Mapping[str, Any], info: BuildInfo) -> TeacherSpec:
    """The spec of the teacher a term's (required) ``teacher:`` key names."""
    if "teacher" not in cfg:
        raise MultiteachError(
            f"losses.{term}: a {cfg['type']} term needs `teacher:` (one of {', '.join(info.teachers)})"
        )
    return teacher_spec(term, cfg["teacher"], info)


def _grid_aligned(
    tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], mode: str, term: str
) -> torch.Tensor:
    """Resample (B, h*w, D) tokens to ``target`` grid, or fail when resampling is off."""
    if tuple(grid) == tuple(target):
        return tokens
    if mode == "none":
        raise MultiteachError(
            f"losses.{term}: student grid {target} and teacher grid {grid} differ and resample is 'none'; "
            "set resample: bicubic (or bilinear), or give the student and teacher matching grids"
        )
    return resample_grid(tokens, grid, target, mode=mode)


class FeatureTerm(LossTerm):
    """Distance between projected student features and a teacher's features.

    Recipe keys: ``teacher``, ``on`` (summary|patch), ``resample`` (bicubic|bilinear|none),
    ``resample_to`` (student|teacher grid), ``standardize`` (none|running|phi-s), and the distance's
    own options (``beta`` for smooth_l1, ``temperature`` for kl, ``mix`` for mixed), and ``student_view``
    (perturbed|clean|both): which student view of ``data.robust_views`` imitates the clean teacher. ``perturbed``
    (the default) is the student's perturbed copy (the only view without robust views); ``clean`` its pass on the
    clean crop (what a switch-off student learns from); ``both`` the mean of the two distances, so the clean view
    keeps the plain distillation while the perturbed one learns robustness.

    Shapes:
        summary: student (B, D_s) -> head -> (B, D_t) vs teacher (B, D_t).
        patch: student (B, N_s, D_s) -> head -> (B, N, D_t) vs teacher (B, N, D_t) after grid resampling.
    """

    distance_name = ""
    distance_keys: tuple[str, ...] = ()
    allowed_keys = ("teacher", "on", "resample", "resample_to", "standardize", "student_view")

    def __init__(
        self,
        name: str,
        weight: float,
        teacher: str,
        on: str = "summary",
        resample: str = "bicubic",
        resample_to: str = "student",
        standardize: str = "none",
        dim: int = 0,
        student_view: str = "perturbed",
        **options: Any,
    ) -> None:
        super().__init__(name, weight)
        self.teacher = teacher
        self.student_view = _choice(name, "student_view", student_view, STUDENT_VIEWS)
        # the clean pass is computed with gradients when a distillation term reads it
        self.needs_clean_student = self.clean_student_grad = self.student_view != "perturbed"
        self.on = _choice(name, "on", on, TARGETS)
        self.resample = _choice(name, "resample", resample, RESAMPLE_MODES)
        self.resample_to = _choice(name, "resample_to", resample_to, ("student", "teacher"))
        self.standardize_kind = _choice(name, "standardize", standardize, STANDARDIZERS)
        self.dim = dim
        self.options = options
        self.distance = DISTANCES[self.distance_name]
        self.standardizer: nn.Module | None = {
            "none": None,
            "running": RunningStandardizer(dim),
            "phi-s": PhiSStandardizer(dim),
        }[standardize]

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any], info: BuildInfo) -> FeatureTerm:
        spec = required_teacher_spec(name, cfg, info)
        on = _choice(name, "on", cfg.get("on", "summary"), TARGETS)
        if on == "patch" and not spec.patch_tokens:
            raise MultiteachError(
                f"losses.{name}: on: patch, but teacher {cfg['teacher']!r} gives no patch tokens; use on: summary"
            )
        dim = spec.summary_dim if on == "summary" else spec.embed_dim
        kwargs = {k: v for k, v in cfg.items() if k not in ("type", "weight")}
        return cls(name, cfg["weight"], dim=dim, **kwargs)

    def head_targets(self) -> dict[str, dict[str, int]]:
        return {self.teacher: {self.on: self.dim}}

    def _target(self, t: torch.Tensor) -> torch.Tensor:
        if self.standardizer is None:
            return t
        if self.training:
            self.standardizer.update(t)
            if isinstance(self.standardizer, PhiSStandardizer):
                self.standardizer.finalize()
        return self.standardizer(t)

    def forward(self, ctx: LossContext) -> torch.Tensor:
        """Unweighted distance for this step (the mean over the student views ``student_view`` names)."""
        if self.student_view == "perturbed":
            views = [ctx.student_global]
        elif ctx.student_clean is None:
            raise MultiteachError(
                f"losses.{self.name}.student_view: {self.student_view!r} needs data.robust_views (clean + perturbed "
                "student views); without it use student_view: perturbed"
            )
        else:
            views = [ctx.student_clean] if self.student_view == "clean" else [ctx.student_global, ctx.student_clean]
        teacher = ctx.teachers[self.teacher]
        t = teacher.summary if self.on == "summary" else teacher.patch_tokens
        if self.on == "patch" and self.resample_to == "student":
            t = _grid_aligned(t, teacher.grid, views[0].grid, self.resample, self.name)
        t = self._target(t.float())  # once per step: a running standardiser sees each target once
        distances = [self.distance(self._student(ctx, v, teacher.grid).float(), t, **self.options) for v in views]
        return distances[0] if len(distances) == 1 else sum(distances) / len(distances)

    def _student(self, ctx: LossContext, student: TeacherOutput, teacher_grid: tuple[int, int]) -> torch.Tensor:
        """One student view's features, projected (and grid-aligned) to the teacher's: (B, D_t) or (B, N, D_t)."""
        if self.on == "summary":
            return ctx.heads(self.teacher, "summary", student.summary)
        s = student.patch_tokens
        if self.resample_to == "teacher":
            s = _grid_aligned(s, student.grid, teacher_grid, self.resample, self.name)
        return ctx.heads(self.teacher, "patch", s)


def _feature_type(distance: str, keys: tuple[str, ...]) -> type[FeatureTerm]:
    cls = type(
        f"{distance.title().replace('_', '')}Term",
        (FeatureTerm,),
        {
            "distance_name": distance,
            "allowed_keys": (*FeatureTerm.allowed_keys, *keys),
            "__doc__": f"Feature distillation with the ``{distance}`` distance (see :class:`FeatureTerm`).",
        },
    )
    LOSSES.register(distance, cls)
    return cls


CosineTerm = _feature_type("cosine", ())
SmoothL1Term = _feature_type("smooth_l1", ("beta",))
MSETerm = _feature_type("mse", ())
KLTerm = _feature_type("kl", ("temperature",))
MixedTerm = _feature_type("mixed", ("weights",))


class _PrototypeTerm(LossTerm):
    """Shared machinery of DINO and iBOT: a student prototype head, its target branch, and the criterion
    (``criterion``: :class:`DINOLoss` or :class:`IBOTPatchLoss`, built with the term's temperatures/centering)."""

    criterion: type[nn.Module]

    allowed_keys = (
        "out_dim",
        "hidden_dim",
        "bottleneck_dim",
        "nlayers",
        "student_temp",
        "center_momentum",
        "centering",
        "target",
        "target_heads",
        "fit_tiles",
        "fit_steps",
    )

    def __init__(
        self,
        name: str,
        weight: float,
        student_dim: int,
        target_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        target: str = "ema",
        target_heads: str | None = None,
        fit_tiles: int = 1024,
        fit_steps: int = 300,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "softmax",
    ) -> None:
        super().__init__(name, weight)
        self.fit_tiles, self.fit_steps = fit_tiles, fit_steps
        self.target = target
        self.teacher = None if target == "ema" else target
        head_kw = {"out_dim": out_dim, "hidden_dim": hidden_dim, "bottleneck_dim": bottleneck_dim, "nlayers": nlayers}
        self.head = DINOHead(student_dim, **head_kw)
        self.target_head: DINOHead | None = None
        self.target_ready = target == "ema"
        if self.teacher is not None:
            self.target_head = DINOHead(target_dim, **head_kw).requires_grad_(False)
            if target_heads:
                self.load_target_head(target_heads)
        self.loss = self.criterion(out_dim, student_temp, center_momentum, centering)

    def load_target_head(self, path: str | Path) -> None:
        """Load the frozen expert head from a safetensors file (keys of a :class:`DINOHead`)."""
        path = Path(path)
        if not path.is_file():
            raise MultiteachError(f"losses.{self.name}.target_heads: {path} does not exist")
        self.set_target_head(load_head(self.target_head, path))

    def set_target_head(self, head: DINOHead) -> None:
        """Use ``head`` (loaded or fitted with :func:`~multiteach.losses.expert_heads.fit_expert_head`), frozen."""
        self.target_head = head.requires_grad_(False).eval()
        self.target_ready = True

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any], info: BuildInfo) -> LossTerm:
        kwargs = {k: v for k, v in cfg.items() if k not in ("type", "weight")}
        target = kwargs.get("target", "ema")
        target_dim = info.student_dim
        if target != "ema":
            spec = teacher_spec(name, target, info, key="target")
            target_dim = cls._target_dim(spec)
        return cls(name, cfg["weight"], student_dim=info.student_dim, target_dim=target_dim, **kwargs)

    @staticmethod
    def _target_dim(spec: TeacherSpec) -> int:
        return spec.summary_dim

    def _target_head(self, ctx: LossContext) -> nn.Module:
        """The target branch's head: the EMA twin's (``target: ema``) or the frozen expert head."""
        if self.teacher is None:
            if ctx.ema_global is None or ctx.ema_terms is None:
                raise MultiteachError(f"losses.{self.name}: target 'ema' needs the EMA student's outputs")
            return ctx.ema_terms[self.name].head
        if not self.target_ready:
            raise MultiteachError(
                f"losses.{self.name}: the expert heads of {self.teacher!r} are not loaded; set target_heads: "
                "PATH.safetensors, or fit them first on cached teacher features"
            )
        return self.target_head


@LOSSES.register("dino")
class DINOTerm(_PrototypeTerm):
    """DINO on the summary (CLS): student global+local crops vs the target branch on global crops.

    Recipe keys: ``out_dim`` (prototypes), ``hidden_dim``, ``bottleneck_dim``, ``nlayers``, ``student_temp``,
    ``center_momentum``, ``centering`` (softmax|sinkhorn_knopp), ``local_crops`` (true|false),
    ``same_view_pairs`` (also pair each view with itself), ``target`` (ema|teacher), ``target_heads``.
    """

    allowed_keys = (*_PrototypeTerm.allowed_keys, "local_crops", "same_view_pairs")
    criterion = DINOLoss

    def __init__(
        self,
        name: str,
        weight: float,
        student_dim: int,
        target_dim: int,
        local_crops: bool = True,
        same_view_pairs: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, weight, student_dim, target_dim, **kwargs)
        self.local_crops = local_crops
        self.same_view_pairs = same_view_pairs

    def forward(self, ctx: LossContext) -> torch.Tensor:
        """DINO cross-entropy averaged over (student crop, target crop) pairs."""
        n = ctx.n_global
        students = list(self.head(ctx.student_global.summary).chunk(n))
        if self.local_crops and ctx.student_local is not None:
            n_local = ctx.student_local.summary.shape[0] // (ctx.student_global.summary.shape[0] // n)
            students += list(self.head(ctx.student_local.summary).chunk(n_local))
        source = ctx.ema_global if self.teacher is None else ctx.teachers[self.teacher]
        head = self._target_head(ctx)
        with torch.no_grad():
            t_logits = head(source.summary)
            probs = self.loss.teacher_probs(t_logits, ctx.teacher_temp).chunk(n)
        value = self.loss(students, list(probs), ignore_diagonal=not self.same_view_pairs)
        if self.training:
            self.loss.update_center(t_logits)
        return value


@LOSSES.register("ibot")
class IBOTTerm(_PrototypeTerm):
    """iBOT on patch tokens of the global crops: masked tokens only, or all tokens (H0-mini).

    Recipe keys: as DINO, plus ``masked_only`` (default true) and ``share_head_with`` (name of a dino term
    whose head to use). With an expert target the teacher grid is resampled to the student's (``resample``).
    """

    allowed_keys = (*_PrototypeTerm.allowed_keys, "masked_only", "share_head_with", "resample")
    criterion = IBOTPatchLoss

    def __init__(
        self,
        name: str,
        weight: float,
        student_dim: int,
        target_dim: int,
        masked_only: bool = True,
        share_head_with: str | None = None,
        resample: str = "bicubic",
        **kwargs: Any,
    ) -> None:
        super().__init__(name, weight, student_dim, target_dim, **kwargs)
        self.masked_only = masked_only
        self.share_head_with = share_head_with
        self.resample = _choice(name, "resample", resample, RESAMPLE_MODES)

    @staticmethod
    def _target_dim(spec: TeacherSpec) -> int:
        return spec.embed_dim

    def link(self, terms: Mapping[str, LossTerm]) -> None:
        """With ``share_head_with``, use that DINO term's head (one module, two users)."""
        other = self.share_head_with
        if other is None:
            return
        if not isinstance(terms.get(other), DINOTerm):
            dinos = [n for n, t in terms.items() if isinstance(t, DINOTerm)]
            raise MultiteachError(
                f"losses.{self.name}.share_head_with: {other!r} is not an active dino term.{did_you_mean(other, dinos)}"
            )
        if terms[other].head.last_layer.out_features != self.head.last_layer.out_features:
            raise MultiteachError(f"losses.{self.name}: a shared head needs the same out_dim as {other!r}")
        self.head = terms[other].head

    def forward(self, ctx: LossContext) -> torch.Tensor:
        """iBOT cross-entropy over the selected patch tokens."""
        student = ctx.student_global
        mask = ctx.masks if self.masked_only else None
        if self.masked_only and mask is None:
            raise MultiteachError(f"losses.{self.name}: masked_only needs iBOT masks (data.masking) or set it false")
        source = ctx.ema_global if self.teacher is None else ctx.teachers[self.teacher]
        head = self._target_head(ctx)
        t_tokens = _grid_aligned(source.patch_tokens, source.grid, student.grid, self.resample, self.name)
        s_tokens = student.patch_tokens
        if mask is not None:  # project only the masked tokens: (M, D) rows
            s_tokens, t_tokens = s_tokens[mask], t_tokens[mask]
        s_logits = self.head(s_tokens)
        with torch.no_grad():
            t_logits = head(t_tokens)
            probs = self.loss.teacher_probs(t_logits, ctx.teacher_temp, mask)
        value = self.loss(s_logits, probs, mask)
        if self.training:
            self.loss.update_center(t_logits, mask)
        return value


@LOSSES.register("koleo")
class KoLeoTerm(LossTerm):
    """KoLeo spreading regulariser on the student's global summaries, summed over global crops (DINOv2).

    Shapes:
        student_global.summary (n_global * B, D) -> scalar.
    """

    allowed_keys = ("eps",)

    def __init__(self, name: str, weight: float, eps: float = 1e-8) -> None:
        super().__init__(name, weight)
        self.eps = eps

    def forward(self, ctx: LossContext) -> torch.Tensor:
        """Sum over global crops of KoLeo within the crop's batch."""
        chunks = ctx.student_global.summary.float().chunk(ctx.n_global)
        return sum(koleo(c, self.eps) for c in chunks)


@LOSSES.register("invariance")
class InvarianceTerm(LossTerm):
    """Stain/scanner invariance: the student's embedding of its perturbed view agrees with its own embedding of
    the clean view (``data.robust_views``), ``1 - cos`` with the clean branch detached.

    This is the clean-vs-augmented consistency of UDA (Xie et al. 2020) and AugMix (Hendrycks et al. 2020),
    with stop-gradient on the clean side as in UDA, applied to the perturbations H&E augmentation studies
    single out (Tellez et al. 2019: HED stain and scanner colour shifts). The distillation terms already pull
    perturbed-student features towards the clean teacher; this term adds invariance in the student's own space.
    It needs ``data.robust_views`` (without it both branches see the same pixels).

    Shapes:
        student_global.summary (n_global * B, D) and student_clean.summary (same) -> scalar; with
        ``on: patch``, patch tokens (n_global * B, N, D), averaged over tokens.
    """

    allowed_keys = ("on",)
    needs_clean_student = True

    def __init__(self, name: str, weight: float, on: str = "summary") -> None:
        super().__init__(name, weight)
        self.on = _choice(name, "on", on, TARGETS)

    def forward(self, ctx: LossContext) -> torch.Tensor:
        """Mean of ``1 - cos(perturbed, clean.detach())``."""
        if ctx.student_clean is None:
            raise MultiteachError(
                f"losses.{self.name}: type 'invariance' needs data.robust_views (clean + perturbed views)"
            )
        if self.on == "summary":
            a, b = ctx.student_global.summary, ctx.student_clean.summary
        else:
            a, b = ctx.student_global.patch_tokens, ctx.student_clean.patch_tokens
        return (1.0 - torch.nn.functional.cosine_similarity(a.float(), b.detach().float(), dim=-1)).mean()
