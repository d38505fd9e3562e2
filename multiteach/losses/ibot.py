"""iBOT patch-token loss: DINO-style cross-entropy on patch prototype scores.

Two variants share one module. Masked (iBOT, DINOv2, GPFM): the student sees a masked crop and is
scored only on the masked tokens, each image's masked tokens weighted 1/num_masked and the result
averaged over *all* images of the batch (images without masked tokens count as zero). All tokens
(H0-mini and DINOv2 distillation): no mask, the loss is the mean over every patch token.

Tensors are either full grids (B, N, K) with a (B, N) bool mask, or, to avoid running the head on
unmasked tokens, already gathered (M, K) rows ``x[mask]`` (row-major over (B, N)) plus the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.losses.dino import all_reduce_sum, check_centering, cross_entropy, sinkhorn_knopp


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` the loss uses: all tokens (mask None), ``x[mask]`` for (B, N, K), ``x`` if already gathered."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3:
        if x.shape[:2] != mask.shape:
            raise MultiteachError(f"iBOT: mask {tuple(mask.shape)} does not match tokens {tuple(x.shape)}.")
        return x[mask.bool()]
    return x


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher patch scores and student patch scores.

    Args:
        out_dim: Number of patch prototypes K.
        student_temp: Student softmax temperature.
        center_momentum: EMA weight of the old centre: ``c = m * c + (1 - m) * token_mean``.
        centering: ``"softmax"`` or ``"sinkhorn_knopp"`` (Sinkhorn over all selected tokens).

    Buffers:
        center (1, 1, K): running mean of the teacher patch scores.
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, centering: str = "softmax"
    ) -> None:
        super().__init__()
        self.out_dim, self.student_temp, self.center_momentum = out_dim, student_temp, center_momentum
        self.centering = check_centering(centering)
        self.register_buffer("center", torch.zeros(1, 1, out_dim))

    @torch.no_grad()
    def teacher_probs(
        self,
        teacher_logits: torch.Tensor,
        teacher_temp: float,
        mask: torch.Tensor | None = None,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Teacher targets from raw teacher patch scores (does not touch the centre).

        softmax: ``softmax((t - center) / teacher_temp)`` token by token. sinkhorn_knopp: Sinkhorn
        over the selected tokens only (masked ones, or all when ``mask`` is None), with B = the
        total number of selected tokens over all processes; for a full (B, N, K) input with a mask
        the unselected positions are returned as zeros (the loss ignores them).

        Args:
            teacher_logits: Teacher scores (B, N, K), or gathered (M, K) rows when a mask is given.
            teacher_temp: Teacher temperature.
            mask: Bool (B, N), True where the student token is masked; None selects every token.
            n_iterations: Sinkhorn rounds (ignored for softmax centering).

        Returns:
            Targets with the shape of ``teacher_logits``, dtype at least float32.
        """
        t = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
        if self.centering == "softmax":
            return F.softmax((t - self.center.view(-1).to(t.dtype)) / teacher_temp, dim=-1)
        probs = sinkhorn_knopp(_select(t, mask), teacher_temp, n_iterations)
        if mask is None or t.dim() == 2:
            return probs.reshape(t.shape)
        out = torch.zeros_like(t)
        out[mask.bool()] = probs
        return out

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """iBOT loss.

        With a mask: ``(1/B) * sum_b (1/max(1, n_b)) * sum_{masked n} CE(t_bn, s_bn)``, where n_b is
        image b's number of masked tokens. Without: the mean of CE over all B*N tokens.

        Args:
            student_logits: Student patch scores (B, N, K), or gathered (M, K) rows with a mask.
            teacher_probs: Targets from :meth:`teacher_probs`, same shape as ``student_logits``.
            mask: Bool (B, N) of masked student tokens, or None for the all-tokens variant.

        Returns:
            Scalar loss.
        """
        if mask is None:
            return cross_entropy(student_logits, teacher_probs, self.student_temp).mean()
        mask = mask.bool()
        ce = cross_entropy(_select(student_logits, mask), _select(teacher_probs, mask), self.student_temp)
        weights = (1.0 / mask.sum(dim=-1).clamp_min(1)).unsqueeze(-1).expand_as(mask)[mask]
        if weights.shape[0] != ce.shape[0]:
            raise MultiteachError(
                f"iBOT: {ce.shape[0]} gathered tokens but the mask selects {weights.shape[0]}; "
                "gather them as x[mask] or pass full (B, N, K) tensors."
            )
        return (ce * weights.to(ce.dtype)).sum() / mask.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Momentum update of the centre with the mean score of the selected teacher tokens.

        The mean is taken over all selected tokens of all processes (DINOv2 averages per-process
        means, which is the same when every process has the same number of tokens).

        Args:
            teacher_logits: Raw teacher scores (B, N, K), or gathered (M, K) rows when a mask is given.
            mask: Bool (B, N) selecting the tokens (DINOv2: the masked ones); None uses all tokens.
        """
        t = _select(teacher_logits.detach(), mask)
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        stats = all_reduce_sum(torch.cat([t.sum(dim=0), t.new_tensor([t.shape[0]])]))
        batch_center = (stats[:-1] / stats[-1].clamp_min(1.0)).view_as(self.center)
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)
