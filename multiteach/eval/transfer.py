"""Did knowledge move? Compare a teacher, a student distilled from it, and random inits of both.

Two kinds of evidence, used by ``benchmarks/knowledge_transfer.py``, the demo and the tests:

- **with labels**: kNN and linear-probe balanced accuracy of frozen embeddings on labelled tile sets
  (:func:`classification_scores`), so "the teacher knows something" and "the student kept it" are
  figures, each next to a random initialisation of the same architecture;
- **without labels**: agreement of a model's embedding with the teacher's on the same images
  (:func:`teacher_agreement`): a ridge map fitted on half of the images and scored by centred cosine on
  the other half (the same protocol for a distilled student and for its random twin, so neither gets a
  head the other lacks), linear CKA, and mutual-kNN agreement (shared top-10 neighbours).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multiteach.errors import MultiteachError
from multiteach.eval.agreement import centred_cosine, linear_cka, mutual_knn
from multiteach.eval.embed import resize_batch
from multiteach.eval.labelled import classification_metrics, load_labelled

__all__ = [
    "LABELLED_SETS",
    "classification_scores",
    "embed_images",
    "fitted_centred_cosine",
    "student_embedder",
    "teacher_agreement",
]

#: The labelled sets of ``shared/data/labeled`` this module scores: name -> protocol.
LABELLED_SETS: dict[str, str] = {
    "lc25000_subset": "5-fold stratified CV (100 tiles, 5 classes), repeated over fold seeds",
    "tcga_luad_lusc_uni": "slide-disjoint train (130) -> test (60), LUAD vs LUSC",
}


def student_embedder(student: torch.nn.Module, recipe: Any, rule: str = "cls"):
    """A callable embedding (B, 3, H, W) RGB in [0, 1] with a student as its recipe trained it.

    Args:
        student: A :class:`~multiteach.students.Student` (trained, or a random twin from
            :func:`~multiteach.build.build_student_from`).
        recipe: Its recipe (``student.img_size``, ``mean``, ``std``).
        rule: ``cls`` (the summary token) or ``cls+mean`` (summary || mean patch token).

    Returns:
        ``f(x) -> (B, D)``.
    """
    mean = torch.tensor(recipe.student.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.student.std).view(1, 3, 1, 1)
    size = int(recipe.student.img_size)
    student = student.eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        out = student((resize_batch(x, size) - mean) / std)
        return out.summary if rule == "cls" else torch.cat([out.summary, out.patch_tokens.mean(1)], dim=1)

    return embed


def embed_images(embedder: Any, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Summary embeddings of preloaded images.

    Args:
        embedder: Maps (B, 3, H, W) RGB in [0, 1] to (B, D) (an :class:`~multiteach.eval.embed.Embedder`).
        images: (N, 3, H, W) float in [0, 1].
        batch_size: Images per forward pass.

    Returns:
        Float32 (N, D).
    """
    out = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            out.append(torch.as_tensor(embedder(images[start : start + batch_size])).float().cpu().numpy())
    x = np.concatenate(out)
    if not np.isfinite(x).all():
        raise MultiteachError(f"model {getattr(embedder, 'name', '?')!r} produced NaN or inf embeddings")
    return x


def classification_scores(
    data: Any, x: np.ndarray, k: int = 10, seed: int = 0, cv_repeats: int = 1, linear: bool = True
) -> dict[str, float]:
    """kNN and linear-probe balanced accuracy of embeddings ``x`` on a labelled set.

    Args:
        data: A :class:`~multiteach.eval.labelled.LabelledSet` (train/test split or CV).
        x: Embeddings (N, D), rows in ``data.all_paths`` order.
        k: kNN neighbours.
        seed: Fold and solver seed (the first of ``cv_repeats`` consecutive seeds).
        cv_repeats: For a set without a split, repeat the 5-fold CV with this many fold seeds and average
            (repeated k-fold CV: on a 100-image set one fold assignment moves balanced accuracy by several
            points). A set with a fixed train/test split is scored once.
        linear: Also fit the linear probe (most of the time on a CV set); ``{"knn": bacc}`` only when False.

    Returns:
        ``{"knn": bacc, "linear": bacc}`` (CV: mean over folds and repeats).
    """
    seeds = [seed] if data.split else range(seed, seed + max(1, int(cv_repeats)))
    found: dict[str, list[float]] = {}
    for s in seeds:
        metrics = classification_metrics(data, x, k=k, n_splits=5, seed=s, probe_c="auto", linear=linear)
        for name, res in metrics.items():
            value = res["balanced_accuracy"]
            found.setdefault(name, []).append(float(value[0] if isinstance(value, tuple) else value))
    return {name: float(np.mean(values)) for name, values in found.items()}


def fitted_centred_cosine(x: Any, teacher: Any, seed: int = 0, ridge: float = 1e-2) -> float:
    """Centred cosine of a ridge map ``x -> teacher`` fitted on a random half, scored on the other half.

    Args:
        x: Embeddings (N, Dx) of the model under test.
        teacher: Teacher embeddings (N, Dt) of the same images.
        seed: Split seed.
        ridge: Ridge strength relative to the mean eigenvalue of the fitting half's Gram matrix.

    Returns:
        Centred cosine (teacher mean of the scoring half removed) in [-1, 1]; ~0 for unrelated features.
    """
    a = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(teacher), dtype=torch.float64)
    if a.shape[0] != b.shape[0] or a.shape[0] < 8:
        raise MultiteachError(f"fitted_centred_cosine: need the same N >= 8 rows, got {a.shape[0]} and {b.shape[0]}")
    perm = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(seed))
    fit, score = perm[: a.shape[0] // 2], perm[a.shape[0] // 2 :]
    mx, mb = a[fit].mean(0), b[fit].mean(0)
    xa, xb = a[fit] - mx, b[fit] - mb
    gram = xa.T @ xa
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xa.T @ xb)
    pred = (a[score] - mx) @ w + mb
    return centred_cosine(pred, b[score])


def teacher_agreement(x: Any, teacher: Any, k: int = 10, seed: int = 0) -> dict[str, float]:
    """Label-free agreement of embeddings ``x`` with the teacher's on the same images.

    Returns:
        ``{"centred_cosine": fitted_centred_cosine, "cka": linear_cka, "mutual_knn": mutual_knn@k}``.
    """
    return {
        "centred_cosine": fitted_centred_cosine(x, teacher, seed=seed),
        "cka": linear_cka(x, teacher),
        "mutual_knn": mutual_knn(x, teacher, k=k),
    }


def load_shared_sets(root: str | os.PathLike[str], names: Sequence[str] = tuple(LABELLED_SETS)) -> dict[str, Any]:
    """Load the labelled sets under ``root`` (``shared/data/labeled``) that exist, by name."""

    root = Path(root)
    sets = {n: load_labelled(root / n) for n in names if (root / n).is_dir()}
    if not sets:
        raise MultiteachError(f"none of {', '.join(names)} found under {root.resolve()}")
    return sets


def mean_over_sets(scores: Mapping[str, Mapping[str, float]], key: str) -> float:
    """Mean of ``scores[set][key]`` over sets."""
    return float(np.mean([s[key] for s in scores.values()]))
