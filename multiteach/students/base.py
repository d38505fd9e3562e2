"""The base :class:`Student` (a timm model returning a summary and patch tokens) and its input normalisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from multiteach.errors import MultiteachError
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD


def student_mean_std(
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel RGB normalisation the student's input is expected in.

    Args:
        mean: Three per-channel means; ImageNet's when ``None``.
        std: Three per-channel standard deviations (> 0); ImageNet's when ``None``.

    Returns:
        ``(mean, std)`` as two 3-tuples of floats.

    Raises:
        MultiteachError: if a value does not have three entries or a std is not positive.
    """
    mean = tuple(float(v) for v in (IMAGENET_MEAN if mean is None else mean))
    std = tuple(float(v) for v in (IMAGENET_STD if std is None else std))
    if len(mean) != 3 or len(std) != 3:
        raise MultiteachError(f"student mean/std need 3 values (RGB), got mean={mean} std={std}")
    if min(std) <= 0:
        raise MultiteachError(f"student std values must be positive, got {std}")
    return mean, std


class Student(nn.Module):
    """A timm model (``self.model``) returning a summary and patch tokens; see :class:`ViTStudent` and
    :class:`FeatureMapStudent`, which :func:`build_student` chooses between.

    Args:
        model: The timm model, built with ``num_classes=0``.
        arch: The timm architecture name it was built from.
        model_kwargs: The kwargs it was built with, in JSON form (layer classes as names).

    Shapes:
        forward: x (B, 3, H, W) normalised, masks (B, h*w) bool or None -> TeacherOutput(
        summary (B, D_s), patch_tokens (B, h*w, D), grid (h, w)), (h, w) = :meth:`grid_for` (H, W).
    """

    #: Whether the student is a timm VisionTransformer (mask token, class token, ``init_from``).
    is_vit = False
    mask_token: nn.Parameter | None

    def __init__(self, model: nn.Module, arch: str, model_kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.model_kwargs = dict(model_kwargs)

    @property
    def family(self) -> str:
        """The timm class the student is built from (``VisionTransformer``, ``ConvNeXt``, ...)."""
        return type(self.model).__name__

    @property
    def embed_dim(self) -> int:
        """Patch-token width D."""
        raise NotImplementedError

    @property
    def summary_dim(self) -> int:
        """Summary width D_s (the exported backbone's embedding)."""
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        """Input pixels per token side (a ViT's patch size, a feature map's total stride)."""
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the timm model's ``forward_features`` output (0 for a feature map)."""
        return 0

    @property
    def num_registers(self) -> int:
        """Register tokens (0 for a feature map)."""
        return 0

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) for an input of ``height`` x ``width`` pixels."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (timm's own switch).

        Raises:
            MultiteachError: if the student's timm family has no gradient checkpointing.
        """
        try:
            self.model.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError, AttributeError) as err:
            raise MultiteachError(
                f"student {self.arch!r}: timm's {self.family} has no gradient checkpointing ({type(err).__name__}: "
                f"{err}); train it without"
            ) from None

    def extra_repr(self) -> str:
        """One-line summary shown by ``print(student)``."""
        return f"arch={self.arch!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}"
