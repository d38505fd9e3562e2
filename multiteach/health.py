"""Run-health checks: dead teachers, dead standardisers and flat loss terms are named, not silently trained on.

A teacher whose output barely depends on the image (wrong or missing weights, wrong preprocessing, a
dtype problem, a random LayerScale model) gives targets a student can match without learning anything;
a running standardiser over such targets divides by ~0; a term whose value never moves gives no
gradient. Training goes on (unless ``train.health_check: error``), but each case is warned about once,
naming the teacher or term, the figure and the likely causes.

- :func:`check_teacher_outputs`: on the first batch, per active teacher, the spread of the summary
  and of the patch tokens across images (:func:`multiteach.eval.agreement.spread`);
- :func:`check_standardizers`: running standardisers whose variance is ~0 after the first batch;
- :class:`FlatTermWatch`: a term whose logged value has not moved over its first ``window`` logs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch

from multiteach.errors import MultiteachError
from multiteach.eval.agreement import spread
from multiteach.teachers.base import TeacherOutput

log = logging.getLogger("multiteach.health")

HealthMode = Literal["warn", "error", "off"]

#: Below this spread across images a teacher's summary or patch tokens count as constant.
MIN_SPREAD = 1e-3
#: A running standardiser with a per-dimension variance below this (relative to the mean square) is dead.
MIN_RELATIVE_VAR = 1e-8
DEAD_TEACHER_CAUSES = (
    "wrong or missing weights (a random model with LayerScale ~1e-5 outputs ~ the same vector for every "
    "image), preprocessing that blanks the input (mean/std, input size), or a dtype overflow"
)


def report(problems: list[str], mode: HealthMode) -> list[str]:
    """Warn about (or, with ``mode="error"``, raise on) each problem; return them."""
    if mode == "off" or not problems:
        return []
    if mode == "error":
        raise MultiteachError("health check failed (train.health_check=error):\n- " + "\n- ".join(problems))
    for p in problems:
        log.warning("health check: %s", p)
    return problems


def teacher_problems(outputs: Mapping[str, TeacherOutput], min_spread: float = MIN_SPREAD) -> list[str]:
    """Teachers whose summary or patch tokens barely vary across the images of one batch.

    Args:
        outputs: Teacher name -> its output on one batch of B >= 2 different crops.
        min_spread: Threshold on :func:`~multiteach.eval.agreement.spread`.

    Returns:
        One message per dead output, naming the teacher, the figure and likely causes.
    """
    problems = []
    for name, out in outputs.items():
        if out.summary.shape[0] < 2:
            continue
        figures = {"summary": spread(out.summary.float())}
        if out.patch_tokens is not None and out.patch_tokens.numel():
            # spread across images of each (position, channel), like the summary's
            figures["patch tokens"] = spread(out.patch_tokens.float().flatten(1))
        for what, value in figures.items():
            if value < min_spread:
                problems.append(
                    f"teacher {name!r}: its {what} barely vary across images (spread {value:.2g} < {min_spread}); "
                    f"targets are ~constant and the student learns nothing from them. Likely causes: "
                    f"{DEAD_TEACHER_CAUSES}"
                )
    return problems


def standardizer_problems(loss: torch.nn.Module) -> list[str]:
    """Running standardisers (``standardize: running``) whose variance is ~0 in every dimension.

    Args:
        loss: The :class:`~multiteach.losses.CompositeLoss` after at least one training step.
    """
    problems = []
    for name in getattr(loss, "names", []):
        std = getattr(loss.term(name), "standardizer", None)
        var, mean = getattr(std, "var", None), getattr(std, "mean", None)
        if var is None or mean is None or int(getattr(std, "count", 1)) == 0:
            continue
        scale = float(var.mean() + mean.pow(2).mean())
        if float(var.max()) <= MIN_RELATIVE_VAR * max(scale, 1e-30):
            problems.append(
                f"term {name!r}: its running standardiser saw variance ~0 (max {float(var.max()):.2g}); the "
                f"standardised target is ~0 for every image, so the term gives no useful gradient. Likely causes: "
                f"{DEAD_TEACHER_CAUSES}"
            )
    return problems


def check_teacher_outputs(outputs: Mapping[str, TeacherOutput], mode: HealthMode = "warn") -> list[str]:
    """Run :func:`teacher_problems` and report per ``mode``."""
    return report(teacher_problems(outputs), mode)


def check_standardizers(loss: torch.nn.Module, mode: HealthMode = "warn") -> list[str]:
    """Run :func:`standardizer_problems` and report per ``mode``."""
    return report(standardizer_problems(loss), mode)


class FlatTermWatch:
    """Watches the logged term values; a term that has not moved over its first ``window`` logs is named.

    Args:
        window: Logged values per term to look at (from the first log).
        rtol: Relative change below which a term counts as flat.
        mode: ``warn``, ``error`` or ``off``.
    """

    def __init__(self, window: int = 5, rtol: float = 1e-6, mode: HealthMode = "warn") -> None:
        self.window, self.rtol, self.mode = window, rtol, mode
        self.seen: dict[str, list[float]] = {}
        self.flat: list[str] = []

    def update(self, values: Mapping[str, float], step: int) -> list[str]:
        """Feed one log line's term values; return the problems newly found."""
        problems = []
        for name, value in values.items():
            history = self.seen.setdefault(name, [])
            if len(history) >= self.window:
                continue
            history.append(float(value))
            if len(history) == self.window:
                lo, hi = min(history), max(history)
                if hi - lo <= self.rtol * max(abs(hi), abs(lo), 1e-12):
                    self.flat.append(name)
                    problems.append(
                        f"term {name!r} has stayed at {hi:.6g} over its first {self.window} logs (to step {step}): "
                        "it gives no gradient. Check its teacher (dead or constant output), its standardiser and "
                        "its weight"
                    )
        return report(problems, self.mode)
