"""iBOT block masking of patch grids, as in BEiT and DINOv2, driven by a ``torch.Generator``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from multiteach.errors import MultiteachError


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if h < 1 or w < 1:
        raise MultiteachError(f"Mask grid must be positive (h, w) patches, got {grid!r}.")
    return h, w


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high], both inclusive (like ``random.randint``)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


class MaskingGenerator:
    """Block-wise masks made of random rectangles (BEiT's generator, as used by DINOv2).

    Rectangles of ``min_num_patches`` to ``max_num_patches`` patches and aspect ratio in
    ``[1/max_aspect, max_aspect]`` are added until the target count is reached; a rectangle is
    only kept if it adds no more patches than still wanted, so the result never exceeds the
    target and may fall slightly short of it.

    Args:
        grid: Patch grid ``(h, w)`` (or one int for a square grid).
        min_num_patches: Smallest rectangle, in patches.
        max_aspect: Largest aspect ratio of a rectangle (its inverse is the smallest).
        max_num_patches: Largest rectangle; default half the grid, as DINOv2.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        min_num_patches: int = 4,
        max_aspect: float = 3.0,
        max_num_patches: int | None = None,
    ) -> None:
        self.height, self.width = _grid(grid)
        self.num_patches = self.height * self.width
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches if max_num_patches is not None else 0.5 * self.num_patches)
        if max_aspect < 1:
            max_aspect = 1 / max_aspect
        self.log_aspect = (-math.log(max_aspect), math.log(max_aspect))

    def _add_block(self, mask: Tensor, max_mask_patches: int, generator: torch.Generator | None) -> int:
        for _ in range(10):
            target_area = _uniform(self.min_num_patches, max_mask_patches, generator)
            aspect = math.exp(_uniform(*self.log_aspect, generator))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = _randint(0, self.height - h, generator)
                left = _randint(0, self.width - w, generator)
                block = mask[top : top + h, left : left + w]
                delta = h * w - int(block.sum())
                if 0 < delta <= max_mask_patches:
                    block.fill_(True)
                    return delta
        return 0

    def __call__(self, num_masking_patches: int, generator: torch.Generator | None = None) -> Tensor:
        """Return a (h, w) bool mask with at most ``num_masking_patches`` True entries."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, max_mask_patches, generator)
            if delta == 0:
                break
            count += delta
        return mask


def sample_ibot_masks(
    batch_size: int,
    grid: int | tuple[int, int],
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | None = None,
    *,
    min_num_patches: int = 4,
    max_aspect: float = 3.0,
) -> Tensor:
    """Masks for one batch, as DINOv2's ``collate_data_and_cast``.

    ``int(batch_size * mask_probability)`` images get a block mask; the i-th of them targets a
    ratio drawn uniformly from the i-th of as many equal slices of ``ratio_min_max`` (so ratios are
    spread evenly). The rest get all-False masks. Rows are then shuffled.

    Args:
        batch_size: Number of images B (for iBOT: n_global * images, crop-major).
        grid: Patch grid ``(h, w)`` or one int.
        mask_probability: Fraction of images that are masked.
        ratio_min_max: Range of the masked fraction of patches for a masked image.
        generator: RNG; None uses torch's global RNG.
        min_num_patches: Smallest masking rectangle.
        max_aspect: Largest rectangle aspect ratio.

    Returns:
        Bool tensor (B, h*w), True = masked patch.
    """
    lo, hi = float(ratio_min_max[0]), float(ratio_min_max[1])
    if not 0.0 <= mask_probability <= 1.0:
        raise MultiteachError(f"mask_probability must be in [0, 1], got {mask_probability}.")
    if not 0.0 <= lo <= hi <= 1.0:
        raise MultiteachError(f"mask ratio_min_max must satisfy 0 <= min <= max <= 1, got {ratio_min_max}.")
    gen = MaskingGenerator(grid, min_num_patches=min_num_patches, max_aspect=max_aspect)
    n_masked = int(batch_size * mask_probability)
    edges = torch.linspace(lo, hi, n_masked + 1, dtype=torch.float64).tolist()
    masks = torch.zeros(batch_size, gen.num_patches, dtype=torch.bool)
    for i in range(n_masked):
        target = int(gen.num_patches * _uniform(edges[i], edges[i + 1], generator))
        masks[i] = gen(target, generator).flatten()
    return masks[torch.randperm(batch_size, generator=generator)]
