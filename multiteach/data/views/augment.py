"""Pathology augmentations on float RGB tensors in [0, 1] of shape (3, H, W) or (B, 3, H, W).

Every random transform comes in two halves so a view can be replayed exactly later (a feature
cache needs that): a ``sample(...)`` method that draws the parameters from an explicit
``torch.Generator`` (or torch's global RNG when it is None, which a seeded DataLoader seeds per
worker) and a pure function that applies a given parameter set (``hed_jitter``, ``dihedral``,
``color_jitter``, ``gaussian_blur``, ``resized_crop``).

Note: a transform holding an explicit generator is copied into every DataLoader worker with the
same state, so workers would repeat each other's augmentations; leave ``generator=None`` there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from multiteach.errors import MultiteachError

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical-density RGB space,
# exactly as skimage.color.rgb_from_hed; skimage's hed_from_rgb is its inverse.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = math.log(1e-6)


def _uniform(low: float, high: float, generator: torch.Generator | None, shape: tuple[int, ...] = ()) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _pick(generator: torch.Generator | None, default: torch.Generator | None) -> torch.Generator | None:
    return generator if generator is not None else default


def to_tensor01(image: Image.Image | Tensor) -> Tensor:
    """Convert a PIL image or a uint8/float tensor to a float32 (3, H, W) tensor in [0, 1].

    Float tensors are assumed to be in [0, 1] already and are returned as float32 unchanged.
    """
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
    if not isinstance(image, Tensor):
        raise MultiteachError(f"Expected a PIL image or a tensor, got {type(image).__name__}.")
    if image.ndim < 3 or image.shape[-3] != 3:
        raise MultiteachError(f"Expected an RGB tensor of shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}.")
    if not image.is_floating_point():
        return image.to(torch.float32).div_(255.0)
    return image.to(torch.float32)


# --------------------------------------------------------------------------- HED stain jitter
def rgb_to_hed(x: Tensor) -> Tensor:
    """RGB in [0, 1] (..., 3, H, W) to HED stain concentrations (..., 3, H, W), as skimage.rgb2hed.

    Unlike skimage, negative concentrations are kept (not clipped at 0) so that
    ``hed_to_rgb(rgb_to_hed(x)) == x`` for every x in [1e-6, 1].
    """
    od = torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST
    return torch.einsum("...chw,cs->...shw", od, HED_FROM_RGB.to(x.dtype))


def hed_to_rgb(hed: Tensor) -> Tensor:
    """HED concentrations (..., 3, H, W) back to RGB in [0, 1], as skimage.hed2rgb."""
    log_rgb = torch.einsum("...shw,sc->...chw", hed * _LOG_ADJUST, RGB_FROM_HED.to(hed.dtype))
    return torch.exp(log_rgb).clamp_(0.0, 1.0)


def hed_jitter(x: Tensor, scale: Tensor | Sequence[float], shift: Tensor | Sequence[float]) -> Tensor:
    """Apply a recorded HED perturbation: each stain channel ``s -> s * scale + shift``.

    Args:
        x: RGB floats in [0, 1], (3, H, W) or (B, 3, H, W).
        scale: Per-stain factors ``1 + alpha * u``, shape (3,) or (B, 3).
        shift: Per-stain offsets ``beta * v``, shape (3,) or (B, 3).

    Returns:
        RGB floats clamped to [0, 1], same shape as ``x``.
    """
    scale = torch.as_tensor(scale, dtype=x.dtype)[..., None, None]
    shift = torch.as_tensor(shift, dtype=x.dtype)[..., None, None]
    return hed_to_rgb(rgb_to_hed(x) * scale + shift)


class HEDParams(NamedTuple):
    """Recorded HED jitter: per-stain (H, E, D) ``scale`` and ``shift`` as plain floats."""

    scale: tuple[float, float, float]
    shift: tuple[float, float, float]


class HEDJitter:
    """Random stain jitter in HED space (Tellez et al. 2018): ``s * (1 + alpha*u) + beta*v``.

    ``u`` and ``v`` are drawn uniformly from [-1, 1] per stain channel and per call.

    Args:
        alpha: Strength of the multiplicative perturbation.
        beta: Strength of the additive perturbation.
        generator: RNG for the parameters; None uses torch's global RNG.
    """

    def __init__(self, alpha: float = 0.05, beta: float = 0.01, generator: torch.Generator | None = None) -> None:
        self.alpha, self.beta, self.generator = float(alpha), float(beta), generator

    def sample(self, generator: torch.Generator | None = None) -> HEDParams:
        g = _pick(generator, self.generator)
        scale = 1.0 + self.alpha * _uniform(-1.0, 1.0, g, (3,))
        shift = self.beta * _uniform(-1.0, 1.0, g, (3,))
        return HEDParams(tuple(scale.tolist()), tuple(shift.tolist()))

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        return hed_jitter(to_tensor01(image), *self.sample())


# --------------------------------------------------------------------------- dihedral group
def dihedral(x: Tensor, k: int) -> Tensor:
    """Apply element ``k`` (0..7) of the dihedral group D4 to the last two dims.

    ``k % 4`` quarter turns counter-clockwise, then a horizontal flip when ``k >= 4``. k = 0 is the
    identity. Works for (3, H, W) and (B, 3, H, W); H and W swap for odd turns.
    """
    if not 0 <= int(k) < 8:
        raise MultiteachError(f"dihedral k must be in 0..7, got {k}.")
    x = torch.rot90(x, int(k) % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


class RandomRot90Flip:
    """Apply one of the 8 rotations/flips of the square, chosen uniformly (tiles have no up)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def sample(self, generator: torch.Generator | None = None) -> int:
        return int(torch.randint(8, (), generator=_pick(generator, self.generator)))

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        return dihedral(to_tensor01(image), self.sample())


# --------------------------------------------------------------------------- colour jitter
class ColorParams(NamedTuple):
    """Recorded colour jitter: multiplicative factors, a hue shift and the order of the 4 ops."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, ...]


def color_jitter(x: Tensor, params: ColorParams) -> Tensor:
    """Apply recorded colour jitter with torchvision.transforms.v2 functionals.

    Args:
        x: RGB floats in [0, 1], (3, H, W) or (B, 3, H, W).
        params: Factors (1 = unchanged), hue shift in [-0.5, 0.5] and op order (0=b, 1=c, 2=s, 3=h).
    """
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    values = (params.brightness, params.contrast, params.saturation, params.hue)
    identity = (1.0, 1.0, 1.0, 0.0)
    for i in params.order:
        if values[i] != identity[i]:  # skip no-ops (hue is the slow one)
            x = ops[i](x, values[i])
    return x


class ColorJitter:
    """Mild random brightness/contrast/saturation/hue, in a random order (like torchvision's).

    Args:
        brightness, contrast, saturation: Factor drawn from [1 - v, 1 + v].
        hue: Shift drawn from [-hue, hue] (at most 0.5).
        generator: RNG for the parameters; None uses torch's global RNG.
    """

    def __init__(
        self,
        brightness: float = 0.1,
        contrast: float = 0.1,
        saturation: float = 0.1,
        hue: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
            raise MultiteachError("color_jitter needs brightness/contrast/saturation >= 0 and 0 <= hue <= 0.5.")
        self.strengths = (float(brightness), float(contrast), float(saturation), float(hue))
        self.generator = generator

    def sample(self, generator: torch.Generator | None = None) -> ColorParams:
        g = _pick(generator, self.generator)
        b, c, s, h = self.strengths
        u = _uniform(-1.0, 1.0, g, (4,)).tolist()
        order = tuple(torch.randperm(4, generator=g).tolist())
        return ColorParams(1 + b * u[0], 1 + c * u[1], 1 + s * u[2], h * u[3], order)

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        return color_jitter(to_tensor01(image), self.sample())


# --------------------------------------------------------------------------- blur
def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur with std ``sigma`` pixels and kernel size ``2*ceil(3*sigma) + 1``."""
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


class RandomGaussianBlur:
    """Blur with probability ``p``; sigma drawn uniformly from ``sigma`` (pixels)."""

    def __init__(
        self, p: float = 0.1, sigma: tuple[float, float] = (0.1, 1.5), generator: torch.Generator | None = None
    ) -> None:
        self.p, self.sigma, self.generator = float(p), (float(sigma[0]), float(sigma[1])), generator

    def sample(self, generator: torch.Generator | None = None) -> float | None:
        """The sigma to use, or None for no blur. Always draws 2 numbers so RNG use is fixed."""
        g = _pick(generator, self.generator)
        coin, u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        return self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u if coin < self.p else None

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        x, sigma = to_tensor01(image), self.sample()
        return x if sigma is None else gaussian_blur(x, sigma)


# --------------------------------------------------------------------------- random resized crop
def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Draw a RandomResizedCrop box ``(top, left, h, w)`` with torchvision's algorithm, seeded.

    Args:
        height, width: Image size in pixels.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's aspect ratio (w / h), sampled log-uniformly.
        generator: RNG; None uses torch's global RNG.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(_uniform(scale[0], scale[1], generator))
        aspect = math.exp(float(_uniform(log_ratio[0], log_ratio[1], generator)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    # Fallback: central crop at the clamped aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(x: Tensor, box: tuple[int, int, int, int], size: int) -> Tensor:
    """Crop ``box = (top, left, h, w)`` from (…, 3, H, W) and resize to (…, 3, size, size).

    Uses antialiased bilinear resampling, which keeps values inside [0, 1].
    """
    top, left, h, w = box
    return TF.resized_crop(
        x, top, left, h, w, size=[size, size], interpolation=InterpolationMode.BILINEAR, antialias=True
    )
