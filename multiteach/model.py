"""The trainable unit: student + loss terms (projection heads, DINO/iBOT heads, loss state).

This is the one module Accelerate wraps (DDP/FSDP); teachers and the EMA copy stay outside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from multiteach.losses import CompositeLoss, LossContext
from multiteach.students import Student
from multiteach.teachers.base import TeacherOutput


class DistillModel(nn.Module):
    """Student and the loss that trains it.

    Args:
        student: The timm student.
        loss: Active terms and their heads.
        mean: Student input normalisation mean (RGB).
        std: Student input normalisation std (RGB).
    """

    def __init__(self, student: Student, loss: CompositeLoss, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def embed(self, crops: torch.Tensor, masks: torch.Tensor | None = None) -> TeacherOutput:
        """Student outputs for (B, 3, H, W) crops in [0, 1] (normalised here), optional (B, N) masks."""
        return self.student((crops - self.mean) / self.std, masks=masks)

    def forward(
        self,
        batch: Mapping[str, torch.Tensor | None],
        teachers: Mapping[str, TeacherOutput],
        n_global: int,
        teacher_temp: float,
        ema: DistillModel | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's loss.

        Args:
            batch: ``global`` (n_global*B, 3, G, G), ``local`` (n_local*B, 3, L, L) or None, ``masks``
                (n_global*B, N) or None — crop-major; optionally ``student_global`` (n_global*B, 3, G, G), the
                perturbed copies the student reads instead of ``global`` (robust views).
            teachers: Teacher outputs on the global crops.
            n_global: Global crops per image.
            teacher_temp: DINO/iBOT teacher temperature of this step.
            ema: EMA copy (target branch of self-distillation terms), or None.

        Returns:
            (total loss, {term: value}).
        """
        crops, masks, local = batch["global"], batch.get("masks"), batch.get("local")
        # robust views: the student reads perturbed copies; EMA and expert targets keep the clean crops
        student_crops = batch.get("student_global")
        student_crops = crops if student_crops is None else student_crops
        ctx = LossContext(
            student_global=self.embed(student_crops, masks),
            teachers=teachers,
            n_global=n_global,
            student_local=self.embed(local) if local is not None else None,
            masks=masks,
            teacher_temp=teacher_temp,
        )
        readers = [t for t in self.loss.terms.values() if t.needs_clean_student]
        if student_crops is not crops and readers:
            # a second student pass on the clean crop: with gradients when a term distils into it
            with torch.set_grad_enabled(torch.is_grad_enabled() and any(t.clean_student_grad for t in readers)):
                ctx.student_clean = self.embed(crops)
        if ema is not None:
            with torch.no_grad():
                ctx.ema_global = ema.embed(crops)
            ctx.ema_terms = {name: ema.loss.term(name) for name in ema.loss.names}
        return self.loss(ctx)

    def needs_ema(self) -> bool:
        """Whether any term reads the EMA branch (DINO/iBOT with ``target: ema``)."""
        return any(getattr(t, "target", None) == "ema" for t in self.loss.terms.values())
