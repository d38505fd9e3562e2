"""The ViT student: a timm ``VisionTransformer`` with CLS and patch tokens and a learned iBOT mask token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.models import VisionTransformer, checkpoint_seq
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.students.base import Student
from multiteach.teachers.base import TeacherOutput


class ViTStudent(Student):
    """A timm ViT returning CLS and patch tokens, with a learned mask token for iBOT-style masking.

    Args:
        model: A timm ``VisionTransformer`` (any subclass) built with ``num_classes=0`` and a class token.
        arch: The timm architecture name it was built from.
        model_kwargs: The kwargs it was built with, in JSON form (layer classes as names).

    Shapes:
        forward: x (B, 3, H, W) normalised, masks (B, h*w) bool or None -> TeacherOutput(
        summary (B, D), patch_tokens (B, h*w, D), grid (h, w)), with h, w = H // p, W // p.
    """

    is_vit = True

    def __init__(self, model: VisionTransformer, arch: str, model_kwargs: Mapping[str, Any]) -> None:
        _check_model(model, arch)
        super().__init__(model, arch, model_kwargs)
        device = next(model.parameters()).device
        self.mask_token = nn.Parameter(torch.zeros(1, 1, model.embed_dim, device=device))  # DINOv2: zero init

    @property
    def embed_dim(self) -> int:
        """Token width D."""
        return self.model.embed_dim

    @property
    def summary_dim(self) -> int:
        """Summary (CLS) width: the token width D."""
        return self.model.embed_dim

    @property
    def patch_size(self) -> int:
        """Pixels per token side p (the total stride for hybrid CNN stems)."""
        return _patch_stride(self.model)[0]

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register (+ distillation) tokens before the patch tokens."""
        return self.model.num_prefix_tokens

    @property
    def num_registers(self) -> int:
        """Register tokens."""
        return getattr(self.model, "num_reg_tokens", 0)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) for an input of ``height`` x ``width`` pixels."""
        h, w = self.model.patch_embed.dynamic_feat_size((height, width))
        return int(h), int(w)

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """All final-norm tokens, timm's ``forward_features`` with optional mask-token substitution.

        Args:
            x: Normalised images, (B, 3, H, W).
            masks: (B, h*w) bool, True where the patch embedding is replaced by ``mask_token``
                (before the positional embedding is added, as in DINOv2), or None.

        Returns:
            Tokens (B, num_prefix_tokens + h*w, D).
        """
        m = self.model
        self._check_input(x)
        tokens = m.patch_embed(x)  # (B, h, w, D) with dynamic_img_size, else (B, h*w, D)
        if masks is not None:
            tokens = self._apply_masks(tokens, masks, self.grid_for(*x.shape[-2:]))
        tokens = m.norm_pre(m.patch_drop(m._pos_embed(tokens)))
        if m.grad_checkpointing and not torch.jit.is_scripting():
            tokens = checkpoint_seq(m.blocks, tokens)
        else:
            tokens = m.blocks(tokens)
        return m.norm(tokens)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> TeacherOutput:
        """Embed a normalised batch; see the class docstring for shapes."""
        grid = self.grid_for(*x.shape[-2:])
        tokens = self.forward_tokens(x, masks)
        return TeacherOutput(tokens[:, 0], tokens[:, self.num_prefix_tokens :], grid)

    def _apply_masks(self, tokens: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Replace masked patch embeddings by the mask token; tokens (B, h, w, D) or (B, h*w, D)."""
        b, n = tokens.shape[0], grid[0] * grid[1]
        if masks.dtype != torch.bool or tuple(masks.shape) != (b, n):
            raise MultiteachError(
                f"student masks must be bool of shape (B, h*w) = ({b}, {n}) for grid {grid}, "
                f"got {masks.dtype} {tuple(masks.shape)}"
            )
        masks = masks.to(tokens.device).view(*tokens.shape[:-1], 1)
        return torch.where(masks, self.mask_token.to(tokens.dtype).view(-1), tokens)

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error unless ``x`` is (B, in_chans, H, W) with a size the patch embed accepts."""
        pe = self.model.patch_embed
        if x.ndim != 4 or x.shape[1] != self.model.in_chans:
            raise MultiteachError(f"student expects (B, {self.model.in_chans}, H, W), got {tuple(x.shape)}")
        size = tuple(x.shape[-2:])
        if pe.strict_img_size and size != tuple(pe.img_size):
            raise MultiteachError(
                f"student {self.arch!r} was built for {tuple(pe.img_size)} inputs, got {size}; "
                "build it with dynamic_img_size=True to accept other sizes"
            )
        if not pe.dynamic_img_pad and (size[0] % self.patch_size or size[1] % self.patch_size):
            raise MultiteachError(f"student input {size} is not a multiple of patch size {self.patch_size}")


def _patch_stride(model: VisionTransformer) -> tuple[int, int]:
    """Input pixels per token (h, w): the patch size, times the stem stride for hybrid embeds."""
    pe = model.patch_embed
    stride = pe.feat_ratio(as_scalar=False) if hasattr(pe, "feat_ratio") else pe.patch_size
    return int(stride[0]), int(stride[1])


def _not_vit_error(arch: str, model: nn.Module) -> MultiteachError:
    """The error for an arch that is not in timm's VisionTransformer family."""
    return MultiteachError(
        f"student arch {arch!r} builds a {type(model).__name__}, not a timm VisionTransformer; "
        "pick a ViT such as vit_small_patch16_224 or vit_base_patch14_reg4_dinov2"
    )


def _check_model(model: nn.Module, arch: str) -> None:
    """Raise unless ``model`` is a VisionTransformer with a class token, square patches and all patches kept."""
    if not isinstance(model, VisionTransformer):
        raise _not_vit_error(arch, model)
    if not model.has_class_token:
        raise MultiteachError(f"student arch {arch!r} has no class token (class_token=False); it needs one")
    p = _patch_stride(model)
    if p[0] != p[1]:
        raise MultiteachError(f"student arch {arch!r} has non-square patches {tuple(p)}")
    if not isinstance(model.patch_drop, nn.Identity):
        raise MultiteachError("patch_drop_rate must be 0 for a student: the losses need every patch token")
