"""DINO-style multi-crop views for distillation, with recordable and replayable parameters.

Views are float RGB in [0, 1] and are NOT mean/std-normalised: every teacher and the student
normalise their own inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from multiteach.data.views.augment import (
    ColorJitter,
    ColorParams,
    HEDJitter,
    HEDParams,
    RandomGaussianBlur,
    color_jitter,
    dihedral,
    gaussian_blur,
    hed_jitter,
    resized_crop,
    sample_crop_box,
    to_tensor01,
)
from multiteach.data.views.masking import sample_ibot_masks
from multiteach.errors import MultiteachError


@dataclass(frozen=True)
class ViewParams:
    """Everything needed to rebuild one view from its source image with ``apply_view``.

    Attributes:
        box: Crop ``(top, left, h, w)`` in source pixels.
        size: Output side in pixels.
        k: Dihedral element 0..7 (0 = identity).
        hed: HED jitter parameters, or None.
        color: Colour jitter parameters, or None.
        blur_sigma: Gaussian blur sigma in pixels, or None.
    """

    box: tuple[int, int, int, int]
    size: int
    k: int = 0
    hed: HEDParams | None = None
    color: ColorParams | None = None
    blur_sigma: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form (for a feature cache)."""
        return {
            "box": list(self.box),
            "size": self.size,
            "k": self.k,
            "hed": None if self.hed is None else {"scale": list(self.hed.scale), "shift": list(self.hed.shift)},
            "color": None if self.color is None else {**self.color._asdict(), "order": list(self.color.order)},
            "blur_sigma": self.blur_sigma,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewParams:
        """Inverse of ``to_dict``."""
        hed, color = d.get("hed"), d.get("color")
        return cls(
            box=(int(d["box"][0]), int(d["box"][1]), int(d["box"][2]), int(d["box"][3])),
            size=int(d["size"]),
            k=int(d.get("k", 0)),
            hed=None if hed is None else HEDParams(tuple(hed["scale"]), tuple(hed["shift"])),
            color=None if color is None else ColorParams(**{**color, "order": tuple(color["order"])}),
            blur_sigma=d.get("blur_sigma"),
        )


def apply_view(image: Image.Image | Tensor, params: ViewParams) -> Tensor:
    """Build one view: crop+resize, rotate/flip, HED jitter, colour jitter, blur, in that order.

    Args:
        image: Source image (PIL, or (3, H, W) uint8/float tensor).
        params: Recorded parameters (from ``MultiCropTransform.sample_params``).

    Returns:
        Float tensor (3, size, size) in [0, 1].
    """
    x = dihedral(resized_crop(to_tensor01(image), params.box, params.size), params.k)
    if params.hed is not None:
        x = hed_jitter(x, params.hed.scale, params.hed.shift)
    if params.color is not None:
        x = color_jitter(x, params.color)
    if params.blur_sigma is not None:
        x = gaussian_blur(x, params.blur_sigma)
    return x.clamp_(0.0, 1.0)


class MultiCropTransform:
    """Turn one tile into ``n_global`` large and ``n_local`` small augmented views.

    Args:
        global_size: Side of the global views (G).
        local_size: Side of the local views (L).
        n_global: Number of global views (>= 1).
        n_local: Number of local views (may be 0).
        global_scale: Area fraction range of global crops.
        local_scale: Area fraction range of local crops.
        hed: ``(alpha, beta)`` of the HED stain jitter, or None to disable.
        flip_rot: Apply a random element of the dihedral group (rotations by 90 degrees and flips).
        color_jitter: ``(brightness, contrast, saturation, hue)`` strengths, or None to disable.
        color_jitter_prob: Probability of colour jitter per view.
        blur_prob: Probability of Gaussian blur per view.
        blur_sigma: Range of the blur sigma in pixels.
        generator: RNG for all parameters; None uses torch's global RNG (right for DataLoader
            workers, which torch seeds per worker).
        return_params: Add ``"params"`` (list of ``ViewParams``, globals then locals) to the output.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 98,
        n_global: int = 2,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        hed: tuple[float, float] | None = (0.05, 0.01),
        flip_rot: bool = True,
        color_jitter: tuple[float, float, float, float] | None = (0.1, 0.1, 0.1, 0.02),
        color_jitter_prob: float = 0.8,
        blur_prob: float = 0.1,
        blur_sigma: tuple[float, float] = (0.1, 1.5),
        generator: torch.Generator | None = None,
        return_params: bool = False,
    ) -> None:
        if n_global < 1 or n_local < 0:
            raise MultiteachError(f"multicrop needs n_global >= 1 and n_local >= 0, got {n_global} and {n_local}.")
        if global_size < 1 or local_size < 1:
            raise MultiteachError(f"multicrop sizes must be positive, got {global_size} and {local_size}.")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < lo <= hi <= 1.0:
                raise MultiteachError(f"multicrop {name} must satisfy 0 < min <= max <= 1, got ({lo}, {hi}).")
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.n_global, self.n_local = int(n_global), int(n_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.flip_rot = flip_rot
        self.hed = HEDJitter(*hed) if hed is not None else None
        self.color = ColorJitter(*color_jitter) if color_jitter is not None else None
        self.color_jitter_prob = float(color_jitter_prob)
        self.blur = RandomGaussianBlur(blur_prob, blur_sigma)
        self.generator = generator
        self.return_params = return_params

    def _sample_view(self, height: int, width: int, size: int, scale: tuple[float, float], g: Any) -> ViewParams:
        box = sample_crop_box(height, width, scale, generator=g)
        k = int(torch.randint(8, (), generator=g)) if self.flip_rot else 0
        hed = self.hed.sample(g) if self.hed is not None else None
        color = None
        if self.color is not None and float(torch.rand((), generator=g)) < self.color_jitter_prob:
            color = self.color.sample(g)
        return ViewParams(box, size, k, hed, color, self.blur.sample(g))

    def sample_params(self, height: int, width: int, generator: torch.Generator | None = None) -> list[ViewParams]:
        """Draw the parameters of all views of one ``height`` x ``width`` image (globals first)."""
        g = generator if generator is not None else self.generator
        views = [self._sample_view(height, width, self.global_size, self.global_scale, g) for _ in range(self.n_global)]
        views += [self._sample_view(height, width, self.local_size, self.local_scale, g) for _ in range(self.n_local)]
        return views

    def __call__(self, image: Image.Image | Tensor) -> dict[str, Any]:
        """Make the views.

        Returns:
            ``{"global": [n_global x (3, G, G)], "local": [n_local x (3, L, L)]}`` float in [0, 1],
            plus ``"params"`` when ``return_params``.
        """
        x = to_tensor01(image)
        params = self.sample_params(x.shape[-2], x.shape[-1])
        views = [apply_view(x, p) for p in params]
        out: dict[str, Any] = {"global": views[: self.n_global], "local": views[self.n_global :]}
        if self.return_params:
            out["params"] = params
        return out


def _crop_major(per_image: Sequence[Sequence[Tensor]]) -> Tensor | None:
    n_crops = len(per_image[0])
    if n_crops == 0:
        return None
    return torch.stack([views[c] for c in range(n_crops) for views in per_image])


def collate_multicrop(samples: Sequence[Any]) -> dict[str, Any]:
    """Stack multi-crop samples crop-major, like DINOv2 (image b's crop c is row ``c * B + b``).

    Args:
        samples: ``MultiCropTransform`` outputs, or ``(output, label)`` pairs from a labelled
            ``TileDataset``. An output may carry ``"masks"`` (n_global, N) and ``"params"``.

    Returns:
        ``global`` (n_global*B, 3, G, G); ``local`` (n_local*B, 3, L, L) or None; and when present
        ``masks`` (n_global*B, N) bool, ``labels`` (B,) long, ``params`` (B lists of ViewParams),
        ``cache_keys`` (n_global*B, 16) uint8 row keys and ``cache_rows`` (their ``[provenance, view]``) when
        training from a feature cache;
        ``student_global`` (n_global*B, 3, G, G) and ``robust`` (n_global*B, 5) with robust views;
        ``skipped``: every sample's ``(what, reason)`` pairs of unreadable files/slides, joined (training loader).
    """
    if not samples:
        raise MultiteachError("collate_multicrop got an empty batch.")
    labelled = isinstance(samples[0], (tuple, list))
    views = [s[0] for s in samples] if labelled else list(samples)
    out: dict[str, Any] = {"global": _crop_major([v["global"] for v in views])}
    out["local"] = _crop_major([v.get("local", []) for v in views])
    if "masks" in views[0]:
        out["masks"] = _crop_major([v["masks"] for v in views])
    for key in ("cache_keys", "student_global", "robust"):
        if key in views[0]:
            out[key] = _crop_major([v[key] for v in views])
    if "cache_rows" in views[0]:
        out["cache_rows"] = [v["cache_rows"][c] for c in range(len(views[0]["cache_rows"])) for v in views]
    if "params" in views[0]:
        out["params"] = [v["params"] for v in views]
    if "skipped" in views[0]:
        out["skipped"] = [pair for v in views for pair in v["skipped"]]
    if labelled:
        out["labels"] = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.long)
    return out


class MultiCropCollator:
    """``collate_multicrop`` plus iBOT masks for the global crops, drawn per batch as DINOv2.

    Args:
        grid: Patch grid of a global crop, e.g. ``global_size // patch_size`` (int or (h, w)).
        mask_probability: Fraction of global crops that get a mask.
        ratio_min_max: Range of the masked fraction for a masked crop.
        generator: RNG; None uses torch's global RNG.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        mask_probability: float = 0.5,
        ratio_min_max: tuple[float, float] = (0.1, 0.5),
        generator: torch.Generator | None = None,
    ) -> None:
        self.grid, self.mask_probability, self.ratio_min_max = grid, mask_probability, ratio_min_max
        self.generator = generator

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        """Return ``collate_multicrop(samples)`` with ``masks`` (n_global*B, h*w) bool added."""
        out = collate_multicrop(samples)
        out["masks"] = sample_ibot_masks(
            out["global"].shape[0], self.grid, self.mask_probability, self.ratio_min_max, self.generator
        )
        return out
