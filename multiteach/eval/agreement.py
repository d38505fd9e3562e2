"""How much two embeddings of the same images agree, in ways a constant embedding cannot fake.

Raw cosine between a student's projected features and a teacher's is ~1 whenever both are dominated
by one shared direction (a teacher whose output barely depends on the image scores 1.000). These
measures remove that shared part first:

- :func:`centred_cosine`: mean over images of ``cos(p - mu, t - mu)``, ``mu`` the teacher's mean over
  the evaluation set; 0 for a constant teacher (its centred features are all zero);
- :func:`linear_cka`: linear centred kernel alignment (Kornblith et al., ICML 2019,
  "Similarity of Neural Network Representations Revisited"), invariant to rotation and isotropic
  scaling, defined for embeddings of different widths; 0 when either side is constant;
- :func:`mutual_knn`: the fraction of each image's ``k`` nearest neighbours (cosine, self excluded)
  that the two embeddings share (as in Huh et al., ICML 2024, "The Platonic Representation
  Hypothesis"); chance level is about ``k / (N - 1)``;
- :func:`spread`: how much an embedding varies across images relative to its size (0 = constant).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from multiteach.errors import MultiteachError

__all__ = ["centred_cosine", "linear_cka", "mutual_knn", "spread"]


def _as_2d(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().double().cpu()
    if t.ndim != 2 or t.shape[0] < 2:
        raise MultiteachError(f"{name}: expected an (N, D) array with N >= 2, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise MultiteachError(f"{name}: contains NaN or infinite values")
    return t


def _pair(a: Any, b: Any, same_dim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_2d(a, "a"), _as_2d(b, "b")
    if x.shape[0] != y.shape[0]:
        raise MultiteachError(f"a and b must embed the same images: {x.shape[0]} vs {y.shape[0]} rows")
    if same_dim and x.shape[1] != y.shape[1]:
        raise MultiteachError(f"a and b must have the same width: {x.shape[1]} vs {y.shape[1]}")
    return x, y


def spread(x: Any) -> float:
    """Variation of an embedding across images: mean per-dimension std / RMS size of the vectors.

    Args:
        x: Embeddings (N, D), N >= 2.

    Returns:
        0 for a constant embedding; about 1 for i.i.d. zero-mean features; real models' embeddings,
        which share a large mean direction, typically give 0.05-1.
    """
    t = _as_2d(x, "x")
    rms = t.pow(2).mean().sqrt()
    return 0.0 if rms == 0 else float(t.std(dim=0).mean() / rms)


def centred_cosine(pred: Any, target: Any) -> float:
    """Mean cosine between ``pred - mu`` and ``target - mu`` with ``mu`` the mean of ``target`` rows.

    Args:
        pred: Predicted (e.g. projected student) features (N, D).
        target: Teacher features (N, D) of the same images.

    Returns:
        A value in [-1, 1]; 0 when the target is constant across images.
    """
    p, t = _pair(pred, target, same_dim=True)
    mu = t.mean(dim=0, keepdim=True)
    pc, tc = p - mu, t - mu
    tiny = 1e-12 * max(float(t.abs().max()), 1.0)
    if float(tc.norm(dim=1).max()) <= tiny:
        return 0.0
    return float(F.cosine_similarity(pc, tc, dim=1, eps=1e-12).mean().clamp(-1.0, 1.0))


def linear_cka(a: Any, b: Any) -> float:
    """Linear CKA between two embeddings of the same N images (widths may differ).

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``,
    computed through the N x N Gram matrices.

    Args:
        a: (N, Da) embeddings.
        b: (N, Db) embeddings of the same images.

    Returns:
        A value in [0, 1]; 0 when either embedding is constant.
    """
    x, y = _pair(a, b, same_dim=False)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    kx, ky = x @ x.T, y @ y.T
    denom = kx.norm() * ky.norm()
    if denom <= 1e-24:
        return 0.0
    return float(((kx * ky).sum() / denom).clamp(0.0, 1.0))


def _neighbours(x: torch.Tensor, k: int) -> torch.Tensor:
    z = F.normalize(x, dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def mutual_knn(a: Any, b: Any, k: int = 10) -> float:
    """Fraction of top-``k`` cosine neighbours (self excluded) two embeddings share, averaged over images.

    Args:
        a: (N, Da) embeddings.
        b: (N, Db) embeddings of the same images.
        k: Neighbours per image; must be < N.

    Returns:
        A value in [0, 1] (1: identical neighbourhoods; about ``k / (N - 1)`` for unrelated embeddings).
    """
    x, y = _pair(a, b, same_dim=False)
    n = x.shape[0]
    if not 1 <= k < n:
        raise MultiteachError(f"mutual_knn: k={k} must be in [1, N-1] = [1, {n - 1}]")
    na, nb = _neighbours(x, k), _neighbours(y, k)
    hits = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        hits[i] = len(set(na[i].tolist()) & set(nb[i].tolist()))
    return float(hits.mean() / k)
