"""The feature-map student: any timm family with a spatial feature map (ConvNeXt, EfficientNet, Swin, ...)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.students.base import Student
from multiteach.teachers.base import TeacherOutput


class FeatureMapStudent(Student):
    """Any timm model with a spatial feature map as a student (ConvNeXt, EfficientNet, ResNet, FastViT, Swin, ...).

    The summary is the model's own pooled feature, ``forward_head(pre_logits=True)``: exactly what the exported
    timm model returns from ``model(x)``. The patch tokens are the final feature map read row-major, so feature
    terms resample them to each teacher's grid like a ViT's. There is no mask token (``mask_token`` is None).

    Args:
        model: A timm model built with ``num_classes=0`` whose ``forward_features`` returns (B, C, h, w), or
            (B, h, w, C) for NHWC families (Swin, MambaOut).
        arch: The timm architecture name it was built from.
        model_kwargs: The kwargs it was built with, in JSON form (layer classes as names).
        img_size: An input size (px) the layout is read at (the recipe's ``student.img_size``).

    Shapes:
        forward: x (B, 3, H, W) normalised -> TeacherOutput(summary (B, D_s), patch_tokens (B, h*w, C), grid (h, w)),
        (h, w) the feature map's size, about (H, W) / :attr:`patch_size`.

    Raises:
        MultiteachError: if the model's ``forward_features`` output is not a 4-D feature map (token-sequence families
        such as LeViT, EfficientFormer or Eva), or it cannot run on ``img_size`` inputs.
    """

    def __init__(self, model: nn.Module, arch: str, model_kwargs: Mapping[str, Any], img_size: int = 224) -> None:
        super().__init__(model, arch, model_kwargs)
        self.register_parameter("mask_token", None)  # iBOT needs a ViT: nothing to mask here
        # a shape-only copy on the meta device answers grid and width questions without touching the weights or
        # batch-norm statistics; kept out of the module tree (no parameters, no state dict entries)
        self.__dict__["_shapes"] = _meta_copy(model).eval()
        self.__dict__["_grids"] = {}
        self._nhwc, self._channels, self._summary_dim = _feature_layout(self._shapes, arch, int(img_size))

    @property
    def nhwc(self) -> bool:
        """Whether ``forward_features`` returns (B, h, w, C) (Swin, MambaOut) rather than (B, C, h, w)."""
        return self._nhwc

    @property
    def embed_dim(self) -> int:
        """Channels C of the final feature map (the patch-token width)."""
        return self._channels

    @property
    def summary_dim(self) -> int:
        """Width D_s of the pooled feature ``forward_head(pre_logits=True)`` (C, or a head's hidden width)."""
        return self._summary_dim

    @property
    def patch_size(self) -> int:
        """Total stride of the final feature map (timm's ``feature_info`` reduction), in input pixels."""
        info = getattr(self.model, "feature_info", None)
        if info:
            last = info[-1] if isinstance(info, list) else info.info[-1]
            return int(last["reduction"])
        return max(1, 224 // self.grid_for(224, 224)[0])

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Feature-map grid (h, w) for an input of ``height`` x ``width`` pixels (read on the meta copy, cached)."""
        key = (int(height), int(width))
        if key not in self._grids:
            fmap = _meta_features(self._shapes, self.arch, key)
            self._grids[key] = tuple(int(v) for v in (fmap.shape[1:3] if self._nhwc else fmap.shape[-2:]))
        return self._grids[key]

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> TeacherOutput:
        """Embed a normalised batch; see the class docstring for shapes.

        Raises:
            MultiteachError: for masks (they need a ViT's mask token) or an input that is not (B, C_in, H, W).
        """
        if masks is not None:
            raise MultiteachError(
                f"student {self.arch!r} (timm's {self.family}) has no mask token: iBOT masks need a ViT student"
            )
        in_chans = getattr(self.model, "in_chans", 3)
        if x.ndim != 4 or x.shape[1] != in_chans:
            raise MultiteachError(f"student expects (B, {in_chans}, H, W), got {tuple(x.shape)}")
        fmap = self.model.forward_features(x)
        summary = self.model.forward_head(fmap, pre_logits=True)
        if self._nhwc:
            grid, tokens = fmap.shape[1:3], fmap.flatten(1, 2)
        else:
            grid, tokens = fmap.shape[-2:], fmap.flatten(2).transpose(1, 2)
        return TeacherOutput(summary, tokens, (int(grid[0]), int(grid[1])))


#: Families with a spatial feature map, named in errors as examples of students that work.
FEATURE_MAP_EXAMPLES = (
    "convnext_atto",
    "efficientnet_b0",
    "resnet18",
    "regnetx_002",
    "mobilenetv3_small_100",
    "mobilenetv4_conv_small",
    "fastvit_t8",
    "swin_tiny_patch4_window7_224",
)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer on the meta device, the weights never copied."""
    memo: dict[int, Any] = {id(b): torch.empty_like(b, device="meta") for b in model.buffers()}
    memo.update({id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()})
    return copy.deepcopy(model, memo)


def _meta_features(model: nn.Module, arch: str, size: tuple[int, int]) -> torch.Tensor:
    """``forward_features`` of a meta-device model on a (2, 3, H, W) meta input; a MultiteachError if it fails."""
    try:
        return model.forward_features(torch.empty(2, 3, *size, device="meta"))
    except Exception as err:  # noqa: BLE001 - any failure of timm's forward means the size does not fit
        raise MultiteachError(
            f"student {arch!r} (timm's {type(model).__name__}) cannot take {size[0]}x{size[1]} px inputs "
            f"({type(err).__name__}: {str(err)[:200]}); pick sizes it accepts (student.img_size, crop sizes)"
        ) from None


def _feature_layout(model: nn.Module, arch: str, size: int) -> tuple[bool, int, int]:
    """``(nhwc, channels, summary width)`` of a meta-device model's final feature map at ``size`` px.

    Raises:
        MultiteachError: naming the family and the students that work when the output is not a 4-D feature map.
    """
    try:
        fmap = _meta_features(model, arch, (size, size))
    except MultiteachError:  # a token family built for another size: say it is not a feature map, first
        native = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
        if native == size or _meta_features(model, arch, (native, native)).ndim == 4:
            raise
        fmap = _meta_features(model, arch, (native, native))
    if not isinstance(fmap, torch.Tensor) or fmap.ndim != 4:
        got = tuple(fmap.shape) if isinstance(fmap, torch.Tensor) else type(fmap).__name__
        raise MultiteachError(
            f"student arch {arch!r}: timm's {type(model).__name__} returns {got} from forward_features, not a "
            "spatial feature map (B, C, h, w) or (B, h, w, C), so its output cannot be read as patch tokens on a "
            "grid. Use a timm VisionTransformer (vit_tiny_patch16_224, ...) with a class token, or a family with a "
            f"feature map: {', '.join(FEATURE_MAP_EXAMPLES)}"
        )
    fmt = str(getattr(getattr(model, "output_fmt", None), "value", getattr(model, "output_fmt", "")) or "")
    nf = int(getattr(model, "num_features", fmap.shape[1]))
    nhwc = fmt.endswith("NHWC") or (not fmt and fmap.shape[1] != nf and fmap.shape[-1] == nf)
    summary = model.forward_head(fmap, pre_logits=True)
    return nhwc, int(fmap.shape[-1] if nhwc else fmap.shape[1]), int(summary.shape[-1])
