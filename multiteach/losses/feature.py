"""Feature-distillation distances between student and teacher features, plus patch-grid resampling.

Every distance takes a student tensor ``s`` and a teacher tensor ``t`` of the same shape, either
summaries (B, D) or patch tokens (B, N, D), reduces over the feature dimension D (the last one) and
averages over all leading dimensions, returning a scalar. None of them detaches the teacher; the
caller decides what receives gradients. Loss terms pick a distance by name through :data:`DISTANCES`
or :func:`get_distance`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange

from multiteach.errors import MultiteachError, did_you_mean

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: GPFM's patch loss: 0.9 * (1 - mean cosine) + 0.1 * smooth-L1 (``FeatureLoss`` in GPFM's ``kl_loss.py``).
GPFM_PATCH_WEIGHTS: Mapping[str, float] = {"cosine": 0.9, "smooth_l1": 0.1}


def _check_shapes(s: torch.Tensor, t: torch.Tensor, name: str) -> None:
    """Raise a MultiteachError naming ``name`` unless ``s`` and ``t`` have identical shapes."""
    if s.shape != t.shape:
        raise MultiteachError(
            f"{name}: student and teacher features must have the same shape, got {tuple(s.shape)} "
            f"and {tuple(t.shape)}. Project the student to the teacher width and resample patch grids first."
        )


def cosine_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One minus the mean cosine similarity along the feature dimension.

    Args:
        s: Student features, (B, D) or (B, N, D).
        t: Teacher features, same shape as ``s``.

    Returns:
        Scalar ``1 - mean(cos(s, t))``, the mean taken over every leading position (B or B*N).
        0 for identical directions, 1 for orthogonal, 2 for opposite ones.
    """
    _check_shapes(s, t, "cosine_distance")
    return 1.0 - F.cosine_similarity(s, t, dim=-1).mean()


def smooth_l1(s: torch.Tensor, t: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Element-wise smooth-L1 (Huber with threshold ``beta``), averaged over all elements.

    Per element with ``d = |s - t|``: ``0.5 * d**2 / beta`` if ``d < beta`` else ``d - 0.5 * beta``.

    Args:
        s: Student features, (B, D) or (B, N, D).
        t: Teacher features, same shape as ``s``.
        beta: Threshold between the quadratic and linear regimes.

    Returns:
        Scalar mean over all B*D (or B*N*D) elements.
    """
    _check_shapes(s, t, "smooth_l1")
    return F.smooth_l1_loss(s, t, beta=beta)


def mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error averaged over all elements.

    Args:
        s: Student features, (B, D) or (B, N, D).
        t: Teacher features, same shape as ``s``.

    Returns:
        Scalar mean of ``(s - t)**2`` over all elements.
    """
    _check_shapes(s, t, "mse")
    return F.mse_loss(s, t)


def kl_feature(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) over the feature dimension, times T**2.

    For (B, D) inputs this is exactly GPFM's ``kldiv``:
    ``F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T**2``, i.e. the per-row KL
    summed over D and averaged over the B rows. For (B, N, D) inputs every token is one row: the
    result is the per-token KL averaged over all B*N tokens (a literal ``batchmean`` call on the 3-D
    tensor would instead divide by B only, i.e. sum over tokens). The T**2 factor keeps gradient
    magnitudes comparable across temperatures (Hinton et al.); GPFM uses T = 1.

    Args:
        s: Student features (logits), (B, D) or (B, N, D).
        t: Teacher features (logits), same shape as ``s``.
        temperature: Softmax temperature T applied to both sides.

    Returns:
        Scalar mean KL divergence per row (per token for 3-D inputs).
    """
    _check_shapes(s, t, "kl_feature")
    log_q = F.log_softmax(s / temperature, dim=-1).reshape(-1, s.shape[-1])
    p = F.softmax(t / temperature, dim=-1).reshape(-1, t.shape[-1])
    return F.kl_div(log_q, p, reduction="batchmean") * temperature**2


def mixed(s: torch.Tensor, t: torch.Tensor, weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Weighted sum of named distances; the default is GPFM's patch loss.

    Args:
        s: Student features, (B, D) or (B, N, D).
        t: Teacher features, same shape as ``s``.
        weights: Distance name (a key of :data:`DISTANCES` other than ``"mixed"``) to weight.
            ``None`` means :data:`GPFM_PATCH_WEIGHTS` = ``{"cosine": 0.9, "smooth_l1": 0.1}``.

    Returns:
        Scalar ``sum(w * DISTANCES[name](s, t))``.
    """
    weights = GPFM_PATCH_WEIGHTS if weights is None else weights
    if not weights:
        raise MultiteachError("mixed: `weights` is empty; give at least one distance name and weight.")
    total = s.new_zeros(())
    for name, weight in weights.items():
        if name == "mixed":
            raise MultiteachError("mixed: `weights` cannot contain 'mixed' itself.")
        total = total + weight * get_distance(name)(s, t)
    return total


#: Name -> distance function, for loss terms that pick their distance from a recipe.
DISTANCES: dict[str, Distance] = {
    "cosine": cosine_distance,
    "smooth_l1": smooth_l1,
    "mse": mse,
    "kl": kl_feature,
    "mixed": mixed,
}


def get_distance(name: str) -> Distance:
    """Look up a distance in :data:`DISTANCES`.

    Args:
        name: One of ``cosine``, ``smooth_l1``, ``mse``, ``kl``, ``mixed``.

    Returns:
        The distance function ``f(s, t) -> scalar``.

    Raises:
        MultiteachError: if ``name`` is unknown (the message lists close matches).
    """
    try:
        return DISTANCES[name]
    except KeyError:
        raise MultiteachError(
            f"unknown feature distance {name!r}.{did_you_mean(name, DISTANCES)} Known: {', '.join(DISTANCES)}."
        ) from None


def _as_hw(grid: int | tuple[int, int]) -> tuple[int, int]:
    """``h`` -> ``(h, h)``; ``(h, w)`` unchanged."""
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def resample_grid(
    tokens: torch.Tensor,
    grid: int | tuple[int, int],
    target_grid: int | tuple[int, int],
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resample patch tokens laid out row-major on an h x w grid to an h' x w' grid.

    The tokens are viewed as a (B, D, h, w) image and resized with ``F.interpolate``
    (``align_corners=False``, no antialiasing), as GPFM does to bring 14x14 teacher grids to the
    16x16 student grid. Matching grids return ``tokens`` unchanged.

    Args:
        tokens: Patch tokens (B, N, D) with N = h * w, row-major (index = row * w + col).
        grid: Source grid, ``h`` for a square grid or ``(h, w)``.
        target_grid: Target grid, ``h'`` or ``(h', w')``.
        mode: ``"bicubic"`` or ``"bilinear"``.

    Returns:
        Tokens (B, h' * w', D), row-major.
    """
    if mode not in ("bicubic", "bilinear"):
        raise MultiteachError(f"resample_grid: mode must be 'bicubic' or 'bilinear', got {mode!r}.")
    h, w = _as_hw(grid)
    th, tw = _as_hw(target_grid)
    if tokens.dim() != 3 or tokens.shape[1] != h * w:
        raise MultiteachError(
            f"resample_grid: expected tokens (B, {h * w}, D) for a {h}x{w} grid, got {tuple(tokens.shape)}."
        )
    if (h, w) == (th, tw):
        return tokens
    image = rearrange(tokens, "b (h w) d -> b d h w", h=h, w=w)
    image = F.interpolate(image, size=(th, tw), mode=mode, align_corners=False)
    return rearrange(image, "b d h w -> b (h w) d")
