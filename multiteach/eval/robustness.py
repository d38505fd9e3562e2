"""Robustness of embeddings to scanner and staining shifts: PLISM-style metrics, RI and perturbations.

PLISM-style metrics over *matched* embeddings ``a[i] <-> b[i]`` (the same tissue tile seen through
two scanners/stainings, or a clean and a perturbed copy of one image), following
``owkin/plism-benchmark``:

- :func:`matched_cosine`: mean of the diagonal of the cosine matrix between ``a`` and ``b``.
- :func:`topk_retrieval`: stack ``a`` and ``b`` into 2n rows, exclude each row's self-match, and
  count a hit when the matched row of the other set is among the k most similar of the remaining
  2n - 1 rows; averaged over both directions. Chance level is ``k / (2n - 1)``. Ties are counted
  against the match (a candidate exactly as similar as the match ranks before it), so collapsed
  embeddings score 0, not 1.

Robustness index (:func:`robustness_index`) over embeddings with a biological label and a site
(centre/scanner) label, computed by the ``croma`` package (PathoROB definition): among each sample's
k nearest neighbours (cosine, same-``group`` neighbours excluded), count SO = same biological class
from another site and OS = other class from the same site; RI = sum(SO) / (sum(SO) + sum(OS)) pooled
over samples, in [0, 1] with 0.5 neutral. ``ri_odds`` = sum(SO) / sum(OS) is de Jong et al.'s ratio
form (> 1 when biology dominates).

A perturbation suite (:func:`perturbation_suite`) produces scanner/stain-like copies of an image
batch for users without matched pairs; :func:`evaluate_perturbations` scores an encoder on it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from multiteach.data.views.perturb import blur, check_images, hed_shift, heldout_suite, jpeg_compress, scanner_colour
from multiteach.errors import MultiteachError, did_you_mean
from multiteach.eval.knn import as_features, as_labels, check_classes, check_same_dim

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10)
#: k candidates for :func:`robustness_index`; croma picks the one with the best bio kNN balanced accuracy.
DEFAULT_RI_KS: tuple[int, ...] = (5, 11, 21)
CROMA_PIN = "croma==1.0.1"


# --------------------------------------------------------------------------- PLISM metrics
def _normalised_pair(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    a_np, b_np = as_features(a, "a"), as_features(b, "b")
    check_same_dim(a_np, b_np, ("a", "b"))
    if len(a_np) != len(b_np):
        raise MultiteachError(f"a has {len(a_np)} rows but b has {len(b_np)}; matched embeddings need equal lengths.")
    a_t = torch.nn.functional.normalize(torch.from_numpy(a_np), dim=1, eps=1e-12)
    b_t = torch.nn.functional.normalize(torch.from_numpy(b_np), dim=1, eps=1e-12)
    return a_t, b_t


def matched_cosine(a: Any, b: Any) -> float:
    """Mean cosine similarity between matched embeddings ``a[i]`` and ``b[i]``.

    Equals the mean of the diagonal of the (n, n) cosine matrix between ``a`` and ``b`` (PLISM's
    cosine metric) without forming the matrix.

    Args:
        a: Embeddings, shape (n, D) (numpy or torch).
        b: Matched embeddings, shape (n, D).

    Returns:
        The mean matched cosine, in [-1, 1].

    Raises:
        MultiteachError: On empty inputs or mismatched shapes.
    """
    a_t, b_t = _normalised_pair(a, b)
    return float((a_t * b_t).sum(dim=1).mean())


def topk_retrieval(a: Any, b: Any, ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 2048) -> dict[str, float]:
    """PLISM top-k retrieval accuracy of matched embeddings over the stacked 2n x 2n cosine matrix.

    For each of the 2n rows of ``[a; b]`` the self-similarity is excluded and the rank of its
    matched row in the other set is the number of other candidates at least as similar. A hit at k
    means rank < k. The accuracy is averaged over the a->b and b->a directions. Rows are processed
    in chunks, so memory is O(chunk_size * 2n).

    Example (by hand): ``a = [(1, 0), (0, 1)]``, ``b = [(.8, .6), (.6, .8)]`` gives a->b top-1 = 1
    (each a row's nearest is its match) and b->a top-1 = 0 (b rows are nearest each other, cos .96),
    so ``top1 = 0.5``; with 3 candidates per row ``top3 = 1``.

    Args:
        a: Embeddings, shape (n, D).
        b: Matched embeddings, shape (n, D).
        ks: The k values, each in 1..2n-1.
        chunk_size: Rows of the similarity matrix computed at once.

    Returns:
        ``{"top{k}": accuracy}`` for each k, in [0, 1].

    Raises:
        MultiteachError: On empty inputs, mismatched shapes or a k outside 1..2n-1.
    """
    a_t, b_t = _normalised_pair(a, b)
    n = a_t.shape[0]
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise MultiteachError("ks is empty; give at least one k, e.g. (1, 3, 5, 10).")
    bad = [k for k in ks if not 1 <= k <= 2 * n - 1]
    if bad:
        raise MultiteachError(f"top-k needs 1 <= k <= 2n - 1 = {2 * n - 1} (n = {n} matched pairs); got k = {bad}.")
    z = torch.cat([a_t, b_t]).to(torch.float32)
    match = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    ranks = torch.empty(2 * n, dtype=torch.long)
    for start in range(0, 2 * n, int(chunk_size)):
        rows = torch.arange(start, min(start + int(chunk_size), 2 * n))
        sims = z[rows] @ z.T  # (chunk, 2n)
        sims[torch.arange(len(rows)), rows] = float("-inf")  # exclude self
        target = sims[torch.arange(len(rows)), match[rows]]
        ranks[rows] = (sims >= target[:, None]).sum(dim=1) - 1  # candidates other than the match
    return {f"top{k}": float(0.5 * ((ranks[:n] < k).double().mean() + (ranks[n:] < k).double().mean())) for k in ks}


def plism_pair_metrics(a: Any, b: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Matched cosine and top-k retrieval of one pair of matched embedding sets.

    Args:
        a: Embeddings, shape (n, D).
        b: Matched embeddings, shape (n, D).
        ks: Top-k values (see :func:`topk_retrieval`).

    Returns:
        ``{"cosine": float, "top1": float, ...}``.
    """
    return {"cosine": matched_cosine(a, b), **topk_retrieval(a, b, ks)}


# --------------------------------------------------------------------------- robustness index
def _import_croma() -> Any:
    try:
        import croma
    except ImportError as exc:
        raise MultiteachError(
            f"robustness_index needs the 'croma' package: pip install '{CROMA_PIN}' "
            "(pure Python; depends on numpy, pandas, scikit-learn, tqdm, not on torch)."
        ) from exc
    return croma


def robustness_index(
    x: Any,
    bio_labels: Any,
    site_labels: Any,
    k: int | Sequence[int] = DEFAULT_RI_KS,
    groups: Any | None = None,
) -> dict[str, float]:
    """Robustness index (PathoROB) of embeddings, computed with ``croma.RI``.

    For each sample, its k nearest neighbours by cosine distance are taken, excluding itself and any
    sample of the same ``group`` (e.g. the same slide or patient, so near-duplicates do not count).
    SO neighbours share the biological class but come from another site; OS neighbours have another
    class from the same site. RI = sum(SO) / (sum(SO) + sum(OS)) pooled over all samples. With a
    sequence of k, croma uses the k with the best biological kNN balanced accuracy.

    Example: 5 points on a circle at 0, 10, 22, 37, 55 degrees with (class, site) = (A, 1), (A, 2),
    (B, 1), (B, 2), (A, 2) and k = 2 have 4 SO and 3 OS neighbours, so RI = 4/7 and ri_odds = 4/3.

    Args:
        x: Embeddings, shape (N, D); croma L2-normalises them.
        bio_labels: Biological class of each row (tissue/cancer type), shape (N,), >= 2 classes.
        site_labels: Confounder of each row (centre, scanner or staining), shape (N,), >= 2 sites.
        k: One k, or candidate ks (each <= N - 1) to select from.
        groups: Independence groups (slide/patient ids), shape (N,); None makes every row its own group.

    Returns:
        ``{"ri": float, "ri_odds": float, "k": int, "support": float}``: ``ri`` in [0, 1];
        ``ri_odds`` = SO / OS = ri / (1 - ri) (inf when no OS neighbour); ``k`` the k used;
        ``support`` the fraction of samples with at least one SO or OS neighbour (croma also
        emits a ``RuntimeWarning`` when it is below 1).

    Raises:
        MultiteachError: On empty inputs, mismatched lengths, a single class or site, fewer than
            k + 1 samples, or croma missing.
    """
    feats = as_features(x, "x")
    n = len(feats)
    bio = as_labels(bio_labels, n, "bio_labels")
    site = as_labels(site_labels, n, "site_labels")
    check_classes(bio, "bio_labels")
    if len(np.unique(site)) < 2:
        raise MultiteachError("site_labels: all samples come from one site; RI needs at least two sites.")
    ks = [int(k)] if np.isscalar(k) else [int(v) for v in k]
    if not ks or min(ks) < 1:
        raise MultiteachError(f"k must be a positive int or a non-empty sequence of them, got {k!r}.")
    if max(ks) > n - 1:
        raise MultiteachError(f"RI with k={max(ks)} needs at least {max(ks) + 1} samples, got {n}; lower k.")
    group_ids = np.arange(n) if groups is None else as_labels(groups, n, "groups")

    croma = _import_croma()
    import pandas as pd  # a dependency of croma, so present once croma imports

    manifest = pd.DataFrame(
        {
            "sample_id": [str(i) for i in range(n)],
            "image_path": [""] * n,
            "label": [str(v) for v in bio],
            "group_id": [str(v) for v in group_ids],
            "site": [str(v) for v in site],
        }
    )
    try:
        result = croma.RI.compute(feats, manifest, confounder_column="site", k_candidates=ks)
    except (ValueError, RuntimeError) as exc:  # croma raises these for unusable neighbourhoods
        raise MultiteachError(f"robustness_index: croma could not score these embeddings: {exc}") from exc
    ri = float(result.value)
    odds = math.inf if ri >= 1.0 else ri / (1.0 - ri)
    return {"ri": ri, "ri_odds": odds, "k": int(result.k), "support": float(result.support)}


# --------------------------------------------------------------------------- perturbations
#: Illustrative scanner colour profiles (not calibrated to real devices): a display gamma applied to
#: every channel, then a 3 x 3 channel-mixing gain matrix (rows: output R, G, B). "warm" lifts
#: mid-tones and shifts towards red/yellow; "cool" darkens mid-tones and shifts towards blue.
SCANNER_PROFILES: dict[str, tuple[float, tuple[tuple[float, float, float], ...]]] = {
    "warm": (0.9, ((1.06, 0.03, 0.00), (0.02, 0.98, 0.00), (0.00, 0.02, 0.92))),
    "cool": (1.1, ((0.94, 0.00, 0.02), (0.00, 1.00, 0.03), (0.02, 0.03, 1.06))),
}


def perturbation_suite(seed: int = 0) -> dict[str, Callable[[Tensor], Tensor]]:
    """Named, fixed perturbations of an image batch (B, 3, H, W) in [0, 1] -> same shape, in [0, 1].

    Parameters are fixed once per suite, so calling a perturbation twice gives the same output and
    a suite built with the same seed is identical. The seed only sets the HED shift direction: for
    haematoxylin and eosin, a magnitude in [0.5, 1] x the level's strength with a random sign
    (DAB is left unchanged). The others are deterministic:

    - ``hed_light``: scale strength 0.05, shift strength 0.01; ``hed_strong``: 0.15 and 0.03.
    - ``jpeg_q80``, ``jpeg_q50``: JPEG re-compression at quality 80 / 50 (4:2:0 chroma).
    - ``blur_s1``, ``blur_s2``: Gaussian blur, sigma 1 / 2 pixels.
    - ``scanner_warm``, ``scanner_cool``: :data:`SCANNER_PROFILES` gamma + gain matrix.

    Args:
        seed: Seed for the HED directions.

    Returns:
        Ordered dict of name -> callable (``functools.partial`` objects, so parameters are inspectable).
    """
    g = torch.Generator().manual_seed(int(seed))
    suite: dict[str, Callable[[Tensor], Tensor]] = {}
    for name, alpha, beta in (("hed_light", 0.05, 0.01), ("hed_strong", 0.15, 0.03)):
        mag = 0.5 + 0.5 * torch.rand(4, generator=g, dtype=torch.float64)
        sign = torch.where(torch.rand(4, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
        u = (mag * sign).tolist()
        scale = (1.0 + alpha * u[0], 1.0 + alpha * u[1], 1.0)
        shift = (beta * u[2], beta * u[3], 0.0)
        suite[name] = functools.partial(hed_shift, scale=scale, shift=shift)
    suite["jpeg_q80"] = functools.partial(jpeg_compress, quality=80)
    suite["jpeg_q50"] = functools.partial(jpeg_compress, quality=50)
    suite["blur_s1"] = functools.partial(blur, sigma=1.0)
    suite["blur_s2"] = functools.partial(blur, sigma=2.0)
    for name, (gamma, matrix) in SCANNER_PROFILES.items():
        suite[f"scanner_{name}"] = functools.partial(scanner_colour, gamma=gamma, matrix=matrix)
    return suite


def evaluate_perturbations(
    embed: Callable[[Tensor], Any],
    images: Tensor,
    suite: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """PLISM-style metrics between embeddings of clean images and of each perturbed copy.

    Args:
        embed: Maps an image batch (b, 3, H, W) in [0, 1] to embeddings (b, D) (tensor or array);
            it does its own normalisation/resizing. Called under ``torch.no_grad()``.
        images: Clean images, shape (N, 3, H, W), float in [0, 1]; N >= 2.
        suite: name -> perturbation; default :func:`perturbation_suite` with seed 0.
        ks: Top-k values (each <= 2N - 1).
        batch_size: Images per ``embed`` call.

    Returns:
        ``{perturbation: {"cosine": float, "top1": float, ...}}``.
    """
    images = check_images(images)
    if images.ndim != 4 or images.shape[0] < 2:
        raise MultiteachError(f"evaluate_perturbations needs a batch of at least 2 images, got {tuple(images.shape)}.")
    suite = perturbation_suite(0) if suite is None else suite
    copies = embed_copies(embed, images, suite, batch_size)
    return {name: plism_pair_metrics(copies["clean"], copies[name], ks) for name in suite}


def embed_copies(
    embed: Callable[[Tensor], Any],
    images: Tensor,
    suite: Mapping[str, Callable[[Tensor], Tensor]],
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Embeddings of the clean images and of each perturbed copy, for PLISM metrics and the RI alike.

    Args:
        embed: Maps (b, 3, H, W) in [0, 1] to (b, D) (tensor or array); called under ``torch.no_grad()``.
        images: Clean images (N, 3, H, W) in [0, 1].
        suite: name -> perturbation.
        batch_size: Images per ``embed`` call.

    Returns:
        ``{"clean": (N, D), name: (N, D), ...}`` in suite order.
    """
    out = {}
    with torch.no_grad():
        for site, fn in {"clean": None, **suite}.items():
            chunks = []
            for start in range(0, images.shape[0], int(batch_size)):
                batch = images[start : start + int(batch_size)]
                chunks.append(as_features(embed(batch if fn is None else fn(batch)), "embed output"))
            out[site] = np.concatenate(chunks)
    return out


#: ``multiteach eval --perturbations`` choices.
SUITES: tuple[str, ...] = ("standard", "heldout")


def robustness_suite(name: str, seed: int = 0) -> dict[str, Callable[[Tensor], Tensor]]:
    """The named perturbation suite: ``standard`` (:func:`perturbation_suite`) or ``heldout``
    (:func:`multiteach.data.views.perturb.heldout_suite`, severities beyond the default robust-view training ranges)."""
    if name == "standard":
        return perturbation_suite(seed)
    if name == "heldout":
        return heldout_suite()
    raise MultiteachError(
        f"perturbations: unknown suite {name!r}.{did_you_mean(name, SUITES)} Allowed: {', '.join(SUITES)}."
    )


def perturbation_ri(
    embed: Callable[[Tensor], Any],
    images: Tensor,
    labels: Any,
    suite: Mapping[str, Callable[[Tensor], Tensor]],
    batch_size: int = 64,
) -> dict[str, float]:
    """Robustness index with synthetic sites: every image clean and through each perturbation of ``suite``.

    Each copy is a sample whose site is its perturbation (``clean`` or the suite name) and whose biology is the
    image's label; copies of one image share a group, so an image's own copies never count as neighbours.
    RI > 0.5 means neighbours share the class across perturbations more than the perturbation across classes.

    Args:
        embed: Maps (b, 3, H, W) in [0, 1] to (b, D).
        images: Labelled images (N, 3, H, W) in [0, 1].
        labels: Their classes, (N,).
        suite: name -> perturbation.
        batch_size: Images per ``embed`` call.

    Returns:
        :func:`robustness_index`'s dict (``ri``, ``ri_odds``, ``k``, ``support``).
    """
    return copies_ri(embed_copies(embed, check_images(images), suite, batch_size), labels)


def copies_ri(copies: Mapping[str, np.ndarray], labels: Any) -> dict[str, float]:
    """:func:`robustness_index` of :func:`embed_copies` output: each copy a site, copies of one image a group.

    Args:
        copies: ``{"clean": (N, D), name: (N, D), ...}``.
        labels: Each image's class, (N,).

    Returns:
        :func:`robustness_index`'s dict.
    """
    n = len(copies["clean"])
    bio = np.tile(np.asarray(labels), len(copies))
    groups = np.tile(np.arange(n), len(copies))
    sites = np.repeat(np.asarray(list(copies)), n)
    ks = tuple(k for k in DEFAULT_RI_KS if k <= len(bio) - len(copies))
    return robustness_index(np.concatenate(list(copies.values())), bio, sites, k=ks or (1,), groups=groups)
