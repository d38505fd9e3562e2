"""Photometric perturbations of H&E images: stain (HED), scanner colour (gamma, gain), JPEG and blur.

One family serves two purposes:

- **training** (``data.robust_views``): :class:`RobustViews` draws, per student global view, which
  perturbations apply and how strongly (uniformly inside the configured ranges), so the student sees a
  perturbed copy of the exact crop its teachers see clean. Only photometric perturbations are allowed: a
  geometric one would move pixels and break the patch-token correspondence.
- **evaluation** (``multiteach eval --robustness``): :func:`heldout_suite` builds fixed perturbations of the
  same kinds at severities *outside* the training ranges, so robustness is not measured on the training
  distribution.

Every function takes and returns float RGB in [0, 1] of shape (3, H, W) or (B, 3, H, W).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from multiteach.data.views.augment import gaussian_blur, hed_jitter
from multiteach.errors import MultiteachError, did_you_mean

#: Perturbation name -> (what its range means, lowest allowed, highest allowed).
FAMILY: dict[str, tuple[str, float, float]] = {
    "hed": ("stain strength s: H and E scaled by 1 +/- s, shifted by +/- s/5 in HED space", 0.0, 1.0),
    "gamma": ("per-channel gamma exponent (scanner tone curve)", 0.2, 5.0),
    "gain": ("per-channel gain (white-balance shift)", 0.2, 5.0),
    "blur": ("Gaussian blur sigma in pixels (focus)", 0.0, 10.0),
    "jpeg": ("JPEG quality (integer, 1..100)", 1.0, 100.0),
}
#: Names refused with an explanation: they move pixels, so the student's view would no longer match the teacher's.
GEOMETRIC = frozenset(
    {"rotate", "rotation", "flip", "crop", "scale", "translate", "shift", "affine", "elastic", "resize"}
)
#: The order perturbations are applied in (JPEG last: it is how a scanner stores the image).
ORDER: tuple[str, ...] = ("hed", "gamma", "gain", "blur", "jpeg")
#: Training ranges used where a recipe gives none (``data.robust_views: {}``) and the evaluation's reference.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "hed": (0.05, 0.2),
    "gamma": (0.8, 1.25),
    "gain": (0.92, 1.08),
    "blur": (0.2, 1.2),
    "jpeg": (40.0, 95.0),
}


# --------------------------------------------------------------------------- primitives
def check_images(x: Tensor) -> Tensor:
    """Return ``x`` if it is a float (3, H, W) or (B, 3, H, W) tensor, else raise a clear error."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise MultiteachError("Perturbations take float image tensors in [0, 1] of shape (B, 3, H, W) or (3, H, W).")
    if x.ndim not in (3, 4) or x.shape[-3] != 3 or x.numel() == 0:
        raise MultiteachError(f"Expected images of shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}.")
    return x


def hed_shift(x: Tensor, scale: Sequence[float], shift: Sequence[float]) -> Tensor:
    """Fixed stain shift in HED space: each stain channel ``s -> s * scale + shift`` (Ruifrok-Johnston vectors).

    Args:
        x: RGB in [0, 1], (B, 3, H, W) or (3, H, W).
        scale: Per-stain (H, E, D) factors, 3 floats.
        shift: Per-stain (H, E, D) offsets, 3 floats.

    Returns:
        RGB in [0, 1], same shape and dtype as ``x``.
    """
    return hed_jitter(check_images(x), scale, shift)


def jpeg_compress(x: Tensor, quality: int, subsampling: int = 2) -> Tensor:
    """Re-encode each image as JPEG with PIL at ``quality`` and decode it again (8-bit quantised first).

    Args:
        x: RGB in [0, 1], (B, 3, H, W) or (3, H, W).
        quality: JPEG quality, 1..100.
        subsampling: PIL chroma subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0 (the usual default).

    Returns:
        RGB in [0, 1], same shape and dtype as ``x``.
    """
    x = check_images(x)
    if not 1 <= int(quality) <= 100:
        raise MultiteachError(f"JPEG quality must be in 1..100, got {quality}.")
    batch = x.reshape(-1, *x.shape[-3:])
    u8 = (batch.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in u8:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality), subsampling=int(subsampling))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out.append(np.asarray(decoded.convert("RGB")))
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255.0
    return y.reshape(x.shape)


def blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur (defocus) with std ``sigma`` pixels, kernel ``2*ceil(3*sigma) + 1``.

    Args:
        x: RGB in [0, 1], (B, 3, H, W) or (3, H, W).
        sigma: Blur std in pixels (> 0).

    Returns:
        Blurred RGB in [0, 1], same shape as ``x``.
    """
    if sigma <= 0:
        raise MultiteachError(f"Blur sigma must be > 0, got {sigma}.")
    return gaussian_blur(check_images(x), float(sigma))


def scanner_colour(x: Tensor, gamma: float | Sequence[float], matrix: Sequence[Sequence[float]]) -> Tensor:
    """Scanner-like colour transform: ``clamp(M @ x**gamma, 0, 1)`` per pixel.

    Args:
        x: RGB in [0, 1], (B, 3, H, W) or (3, H, W).
        gamma: Exponent for every channel, or one per channel (each > 0; < 1 brightens mid-tones).
        matrix: 3 x 3 gain matrix mixing the gamma-corrected (R, G, B) into the output channels.

    Returns:
        RGB in [0, 1], same shape and dtype as ``x``.
    """
    x = check_images(x)
    g = torch.as_tensor(gamma, dtype=x.dtype, device=x.device).reshape(-1)
    if g.numel() not in (1, 3) or bool((g <= 0).any()):
        raise MultiteachError(f"gamma must be > 0 (one value or one per channel), got {gamma}.")
    m = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
    if m.shape != (3, 3):
        raise MultiteachError(f"The colour matrix must be 3 x 3, got shape {tuple(m.shape)}.")
    y = torch.einsum("dc,...chw->...dhw", m, x.clamp(0, 1) ** g.view(-1, 1, 1))
    return y.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- the family
@dataclass(frozen=True)
class Perturbation:
    """One drawn perturbation of one view (everything needed to apply it again).

    Attributes:
        hed: ((scale H, E, D), (shift H, E, D)) or None.
        gamma: Per-channel exponents (R, G, B) or None.
        gain: Per-channel gains (R, G, B) or None.
        blur: Sigma in pixels or None.
        jpeg: Quality or None.
    """

    hed: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    gamma: tuple[float, float, float] | None = None
    gain: tuple[float, float, float] | None = None
    blur: float | None = None
    jpeg: int | None = None

    def apply(self, x: Tensor) -> Tensor:
        """Perturb (3, H, W) or (B, 3, H, W) RGB in [0, 1]; identity when nothing was drawn."""
        if self.hed is not None:
            x = hed_shift(x, *self.hed)
        if self.gamma is not None or self.gain is not None:
            gains = self.gain if self.gain is not None else (1.0, 1.0, 1.0)
            x = scanner_colour(x, self.gamma if self.gamma is not None else 1.0, torch.diag(torch.tensor(gains)))
        if self.blur is not None and self.blur > 0:
            x = blur(x, self.blur)
        if self.jpeg is not None:
            x = jpeg_compress(x, self.jpeg)
        return x

    def strengths(self) -> dict[str, float]:
        """One magnitude per perturbation (0 = not applied): hed ``max |scale - 1|``, gamma/gain
        ``max |log value|``, blur sigma, jpeg ``100 - quality``."""
        return {
            "hed": 0.0 if self.hed is None else max(abs(v - 1.0) for v in self.hed[0]),
            "gamma": 0.0 if self.gamma is None else max(abs(math.log(v)) for v in self.gamma),
            "gain": 0.0 if self.gain is None else max(abs(math.log(v)) for v in self.gain),
            "blur": 0.0 if self.blur is None else float(self.blur),
            "jpeg": 0.0 if self.jpeg is None else 100.0 - self.jpeg,
        }


def check_ranges(ranges: Mapping[str, Any], at: str) -> dict[str, tuple[float, float]]:
    """Validate ``name -> [low, high]`` against :data:`FAMILY`; return them as float pairs.

    Raises:
        MultiteachError: naming ``at.name`` for an unknown name (with a close match), a range that is not two
            numbers with low <= high, or values outside what the perturbation allows.
    """
    out = {}
    for name, value in ranges.items():
        if str(name).lower() in GEOMETRIC:
            raise MultiteachError(
                f"{at}.{name}: a geometric perturbation cannot keep the teacher's and the student's views "
                "pixel-aligned (patch targets would no longer match). Geometric augmentation applies to both "
                f"branches: data.augment.flip_rot, data.global_crops.scale. Allowed here: {', '.join(FAMILY)}"
            )
        if name not in FAMILY:
            raise MultiteachError(
                f"{at}.{name}: unknown perturbation.{did_you_mean(str(name), FAMILY)} Allowed: {', '.join(FAMILY)} "
                "(photometric only: a geometric perturbation would break the pixel alignment of teacher and "
                "student views)"
            )
        meaning, lo_ok, hi_ok = FAMILY[name]
        pair = [value, value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if (
            not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
        ):
            raise MultiteachError(f"{at}.{name}: expected [low, high] ({meaning}), got {value!r}")
        lo, hi = float(pair[0]), float(pair[1])
        if not lo_ok <= lo <= hi <= hi_ok or (name in ("gamma", "gain") and lo <= 0):
            raise MultiteachError(
                f"{at}.{name}: [low, high] must satisfy {lo_ok:g} <= low <= high <= {hi_ok:g} ({meaning}), "
                f"got {list(pair)}"
            )
        out[name] = (lo, hi)
    return out


class RobustViews:
    """Draw a :class:`Perturbation` per student view: each configured kind applies with probability ``p``.

    Args:
        ranges: Perturbation name -> (low, high) training range (see :data:`FAMILY`).
        p: Probability that each configured perturbation is applied to a view, or perturbation name -> its own
            probability (configured kinds it leaves out use 0.5).
    """

    def __init__(self, ranges: Mapping[str, tuple[float, float]], p: float | Mapping[str, float] = 0.5) -> None:
        self.ranges = check_ranges(ranges, "data.robust_views")
        probs = dict(p) if isinstance(p, Mapping) else dict.fromkeys(self.ranges, p)
        for name, value in probs.items():
            at = f"data.robust_views.p.{name}" if isinstance(p, Mapping) else "data.robust_views.p"
            if name not in self.ranges:
                raise MultiteachError(f"{at}: {name!r} is not configured (configured: {', '.join(self.ranges)})")
            if not 0.0 <= value <= 1.0:
                raise MultiteachError(f"{at}: must be in [0, 1], got {value!r}")
        self.p = float(p) if not isinstance(p, Mapping) else {k: float(probs.get(k, 0.5)) for k in self.ranges}

    def sample(self, generator: torch.Generator | None = None) -> Perturbation:
        """Draw one view's perturbation. Each kind in :data:`ORDER` costs a fixed 6 draws, configured or not.

        hed: strength s uniform in the range, each of H and E scaled by ``1 +/- s`` and shifted by ``+/- s/5``
        (random signs); gamma and gain: one log-uniform value per channel; blur and jpeg: uniform."""
        drawn: dict[str, Any] = {}
        for name in ORDER:
            coin, u0, *u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
            if name not in self.ranges or coin >= (self.p[name] if isinstance(self.p, dict) else self.p):
                continue
            lo, hi = self.ranges[name]
            if name == "hed":
                s = lo + (hi - lo) * u0
                signs = [1.0 if v < 0.5 else -1.0 for v in u]
                drawn[name] = ((1.0 + s * signs[0], 1.0 + s * signs[1], 1.0), (s / 5 * signs[2], s / 5 * signs[3], 0.0))
            elif name in ("gamma", "gain"):  # log-uniform per channel
                drawn[name] = tuple(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * v) for v in u[:3])
            elif name == "blur":
                drawn[name] = lo + (hi - lo) * u0
            else:
                drawn[name] = int(round(lo + (hi - lo) * u0))
        return Perturbation(**drawn)


#: Severity factors of :func:`heldout_suite`: how far beyond the training range each held-out level lies.
HELDOUT_FACTORS: tuple[float, ...] = (1.25, 1.5, 2.0)


def heldout_levels(
    ranges: Mapping[str, tuple[float, float]] | None = None, factor: float = 1.5
) -> dict[str, Perturbation]:
    """Fixed perturbations of each kind at a severity *beyond* the training range (default :data:`DEFAULT_RANGES`).

    With ``f = factor`` (> 1): hed strength ``f * high`` (H up, E down); gamma and gain ``exp(f * log(end))`` at
    both ends (R past the high end, B past the low end, G unchanged), i.e. ``f`` times as far from 1 in log
    space as the range's ends; blur sigma ``f * high``; JPEG quality ``low / f``.

    Returns:
        Ordered ``name@level -> Perturbation``.

    Raises:
        MultiteachError: for ``factor <= 1`` (that would not lie beyond the training range).
    """
    if factor <= 1:
        raise MultiteachError(f"held-out severity factor must be > 1 (beyond the training range), got {factor}")
    r = {**DEFAULT_RANGES, **(ranges or {})}
    hed = min(1.0, factor * r["hed"][1])
    g_lo, g_hi = (math.exp(factor * math.log(v)) for v in r["gamma"])
    a_lo, a_hi = (math.exp(factor * math.log(v)) for v in r["gain"])
    sigma = factor * max(r["blur"][1], 0.5)
    quality = max(1, int(r["jpeg"][0] / factor))
    return {
        f"hed@{hed:.2f}": Perturbation(hed=((1.0 + hed, 1.0 - hed, 1.0), (hed / 5, -hed / 5, 0.0))),
        f"gamma@{g_hi:.2f}/{g_lo:.2f}": Perturbation(gamma=(g_hi, 1.0, g_lo)),
        f"gain@{a_hi:.2f}/{a_lo:.2f}": Perturbation(gain=(a_hi, 1.0, a_lo)),
        f"blur@{sigma:.1f}": Perturbation(blur=sigma),
        f"jpeg@{quality}": Perturbation(jpeg=quality),
    }


def heldout_suite(
    ranges: Mapping[str, tuple[float, float]] | None = None, factors: Sequence[float] = HELDOUT_FACTORS
) -> dict[str, Callable[[Tensor], Tensor]]:
    """:func:`heldout_levels` at each severity factor, as ``name -> callable`` (B, 3, H, W) -> (B, 3, H, W), the
    form :func:`multiteach.eval.robustness.evaluate_perturbations` takes."""
    return {name: functools.partial(_apply, p) for f in factors for name, p in heldout_levels(ranges, f).items()}


def _apply(perturbation: Perturbation, x: Tensor) -> Tensor:
    return perturbation.apply(check_images(x))


class StrengthLog:
    """Running record of the perturbation strengths drawn between two log steps (robust views).

    ``add`` takes a batch's ``robust`` tensor (V, len(ORDER)) (0 = not applied); ``flush`` returns, per
    perturbation, the fraction of views it touched (``robust_<name>_frac``) and its mean strength where applied
    (``robust_<name>``, see :meth:`Perturbation.strengths`), then starts over.
    """

    def __init__(self) -> None:
        self._rows: list[Tensor] = []

    def add(self, strengths: Tensor | None) -> None:
        """Record one batch's strengths; None (switch off) is ignored."""
        if strengths is not None:
            self._rows.append(strengths.detach().float().cpu())

    def flush(self) -> dict[str, float]:
        """The window's figures (empty when nothing was recorded)."""
        if not self._rows:
            return {}
        x, self._rows = torch.cat(self._rows), []
        out = {}
        for i, name in enumerate(ORDER):
            applied = x[:, i] > 0
            out[f"robust_{name}_frac"] = float(applied.float().mean())
            out[f"robust_{name}"] = float(x[applied, i].mean()) if bool(applied.any()) else 0.0
        return out
