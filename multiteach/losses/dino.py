"""DINO self-distillation loss on prototype scores of the summary ([CLS]) token.

The teacher's prototype scores (logits) are turned into sharpened target distributions, either by
subtracting a running centre and applying a softmax at the teacher temperature ("softmax", DINO,
GPFM and H0-mini) or by Sinkhorn-Knopp equipartition over the batch ("sinkhorn_knopp", DINOv2's
large-scale setting). The student is trained with the cross-entropy between those targets and its
own softmax at the student temperature. Batch statistics (centre, Sinkhorn sums) are summed over
processes when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from multiteach.errors import MultiteachError, did_you_mean

CENTERINGS = ("softmax", "sinkhorn_knopp")


def _distributed() -> bool:
    """Whether torch.distributed is available and initialised (collectives must be used)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` in place over all processes when torch.distributed is initialised (no-op otherwise).

    Args:
        x: Any tensor; not differentiable through the reduction.

    Returns:
        ``x`` itself, now holding the global sum.
    """
    if _distributed():
        dist.all_reduce(x)
    return x


def check_centering(centering: str) -> str:
    """Validate a centering name.

    Args:
        centering: ``"softmax"`` or ``"sinkhorn_knopp"``.

    Returns:
        The name unchanged.

    Raises:
        MultiteachError: for any other name.
    """
    if centering not in CENTERINGS:
        raise MultiteachError(
            f"unknown centering {centering!r}.{did_you_mean(centering, CENTERINGS)} Known: {', '.join(CENTERINGS)}."
        )
    return centering


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype for teacher-side maths: ``x``'s dtype promoted to at least float32 (half/bf16 -> float32)."""
    return torch.promote_types(x.dtype, torch.float32)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp targets: soft assignments with equal prototype usage over the (global) batch.

    With P = exp(scores / temperature) normalised to total mass 1 (a K x M transport plan over K
    prototypes and M rows summed over all processes), each iteration rescales every prototype row to
    mass 1/K and then every sample column to mass 1/M; the result is multiplied by M so that each
    returned row is a distribution over prototypes. The global maximum score is subtracted before
    the exponential for stability; a common factor cancels in the first normalisation, so the
    result is unchanged. Computed in at least float32.

    Args:
        scores: Teacher prototype scores (M, K) of this process.
        temperature: Teacher temperature.
        n_iterations: Number of row/column normalisation rounds (DINOv2 uses 3).

    Returns:
        Targets (M, K), each row summing to 1.
    """
    x = scores.to(_compute_dtype(scores)) / temperature
    top = x.max() if x.numel() else x.new_zeros(())
    if _distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp(x - top).T  # (K, M)
    n_prototypes = q.shape[0]
    n_rows = all_reduce_sum(q.new_tensor(float(q.shape[1])))
    q = q / all_reduce_sum(q.sum())
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(n_iterations):
        q = q / all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(tiny) / n_prototypes
        q = q / q.sum(dim=0, keepdim=True) / n_rows
    return (q * n_rows).T


def cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row cross-entropy ``-sum_k p_k log softmax(s / student_temp)_k``.

    Args:
        student_logits: Student prototype scores (..., K).
        teacher_probs: Teacher target distributions (..., K), same shape.
        student_temp: Student temperature.

    Returns:
        Tensor (...) of per-row losses.
    """
    if student_logits.shape != teacher_probs.shape:
        raise MultiteachError(
            f"student logits {tuple(student_logits.shape)} and teacher probabilities "
            f"{tuple(teacher_probs.shape)} must have the same shape."
        )
    return -(teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1)).sum(dim=-1)


class DINOLoss(nn.Module):
    """DINO cross-entropy between centred, sharpened teacher scores and student scores.

    Typical step: ``p = loss.teacher_probs(t, temp)`` for each teacher crop (no gradient),
    ``loss(students, ps)``, then ``loss.update_center(t_all)`` (softmax centering only).

    Args:
        out_dim: Number of prototypes K.
        student_temp: Student softmax temperature.
        center_momentum: EMA weight of the old centre: ``c = m * c + (1 - m) * batch_mean``.
        centering: ``"softmax"`` (centre then softmax) or ``"sinkhorn_knopp"``.

    Buffers:
        center (1, K): running mean of the teacher logits.
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "softmax"
    ) -> None:
        super().__init__()
        self.out_dim, self.student_temp, self.center_momentum = out_dim, student_temp, center_momentum
        self.centering = check_centering(centering)
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
        """Teacher targets from raw teacher prototype scores (does not touch the centre).

        softmax: ``softmax((t - center) / teacher_temp)``. sinkhorn_knopp: :func:`sinkhorn_knopp`
        over all rows of this call (and of every process), with B = the total number of rows.

        Args:
            teacher_logits: Teacher scores (B, K); all crops of a step may be stacked as (n_crops * B, K).
            teacher_temp: Teacher temperature (DINO warms it up, e.g. 0.04 -> 0.07).
            n_iterations: Sinkhorn rounds (ignored for softmax centering).

        Returns:
            Targets (B, K), rows summing to 1, dtype at least float32.
        """
        t = teacher_logits.to(_compute_dtype(teacher_logits))
        if self.centering == "softmax":
            return F.softmax((t - self.center.view(-1).to(t.dtype)) / teacher_temp, dim=-1)
        return sinkhorn_knopp(t, teacher_temp, n_iterations)

    def forward(
        self,
        student_logits_list: Sequence[torch.Tensor],
        teacher_probs_list: Sequence[torch.Tensor],
        ignore_diagonal: bool = True,
    ) -> torch.Tensor:
        """Mean cross-entropy over (student crop, teacher crop) pairs.

        Student crop i and teacher crop i are the same view when ``i < len(teacher_probs_list)``,
        so list the global crops first, in the teacher's order, then the local crops. With
        ``ignore_diagonal`` (DINO self-distillation) same-view pairs are skipped: for 2 global and
        8 local crops that leaves 2 + 16 = 18 pairs. Set it False to also pair each view with itself
        (distillation from a frozen teacher, H0-mini). Each pair contributes the batch mean of
        :func:`cross_entropy`; the result is the mean over pairs (DINOv2's sum over terms divided
        by the number of terms).

        Args:
            student_logits_list: Student scores, one (B, K) tensor per crop.
            teacher_probs_list: Teacher targets from :meth:`teacher_probs`, one (B, K) tensor per global crop.
            ignore_diagonal: Skip pairs of a view with itself.

        Returns:
            Scalar loss.
        """
        total, pairs = None, 0
        for i, student in enumerate(student_logits_list):
            log_p = F.log_softmax(student / self.student_temp, dim=-1)
            for j, probs in enumerate(teacher_probs_list):
                if ignore_diagonal and i == j:
                    continue
                if probs.shape != log_p.shape:
                    raise MultiteachError(
                        f"DINOLoss: student crop {i} {tuple(log_p.shape)} and teacher crop {j} "
                        f"{tuple(probs.shape)} must have the same shape."
                    )
                term = -(probs * log_p).sum(dim=-1).mean()
                total = term if total is None else total + term
                pairs += 1
        if total is None:
            raise MultiteachError("DINOLoss: no (student, teacher) crop pairs to compare.")
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Momentum update of the centre with the batch mean of the teacher scores (over all processes).

        ``center = m * center + (1 - m) * mean_b(teacher_logits[b])``; only softmax centering reads it.

        Args:
            teacher_logits: Raw teacher scores (B, K), all crops stacked.
        """
        t = teacher_logits.detach().reshape(-1, self.out_dim)
        t = t.to(_compute_dtype(t))
        stats = all_reduce_sum(torch.cat([t.sum(dim=0), t.new_tensor([t.shape[0]])]))
        batch_center = stats[:-1] / stats[-1].clamp_min(1.0)
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)
