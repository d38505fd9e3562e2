"""KoLeo regulariser (Kozachenko-Leonenko entropy estimate, used by DINOv2 on student [CLS] tokens).

Pushes L2-normalised embeddings of a batch apart by penalising small nearest-neighbour distances:
``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)``. DINOv2 applies it to each global crop's batch
separately on each process (no gathering across processes); callers do the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multiteach.errors import MultiteachError


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of a batch of vectors.

    The rows are L2-normalised (``F.normalize`` with ``eps``), each row's nearest other row is found
    by the largest inner product (no gradient through the choice), and the distance is
    ``F.pairwise_distance(x_i, x_nn, eps=eps)`` (i.e. ``||x_i - x_nn + eps||``), as in DINOv2.
    Example: ``koleo([[0, 1], [0, -1]]) = -log 2`` (up to eps). Computed in at least float32.

    Args:
        x: Embeddings (B, D) with B >= 2.
        eps: Normalisation, distance and log guard.

    Returns:
        Scalar ``-mean_i log(d_i + eps)``.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise MultiteachError(f"koleo: expected (B, D) embeddings with B >= 2, got {tuple(x.shape)}.")
    x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.T
        sims.fill_diagonal_(float("-inf"))
        nearest = sims.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


class KoLeoLoss(nn.Module):
    """Module wrapper of :func:`koleo`.

    Args:
        eps: Normalisation, distance and log guard (DINOv2: 1e-8).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """KoLeo loss of a batch.

        Args:
            x: Embeddings (B, D), B >= 2.

        Returns:
            Scalar KoLeo loss.
        """
        return koleo(x, self.eps)
