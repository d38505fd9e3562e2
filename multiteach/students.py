"""Students: a timm ``VisionTransformer``, or any timm model with a spatial feature map, returning a
:class:`TeacherOutput`.

:func:`build_student` picks the kind from the architecture:

- :class:`ViTStudent` (``vit_*``, DeiT, hybrids): CLS token as summary, patch tokens, and a DINOv2-style learned
  ``mask_token`` kept outside the timm model for iBOT masking;
- :class:`FeatureMapStudent` (ConvNeXt, EfficientNet, ResNet, RegNet, FastViT, MobileNetV3/V4, Swin, MaxViT, ...):
  the model's own pooled feature (``forward_head(pre_logits=True)``) as summary and its final feature map
  flattened to (B, h*w, C) as patch tokens, so every feature term reaches each teacher's grid through the usual
  grid resampling. No mask token: iBOT and ``student.init_from`` need a ViT (:func:`check_student_recipe` says so
  when the recipe is read).

Either way the student is a plain timm model (``Student.model``), so an export reloads with ``timm.create_model``
alone. Architecture kwargs that are classes in timm (``mlp_layer``, ``act_layer``, ``norm_layer``) are written in
recipes as names and resolved through :data:`multiteach.layers.LAYER_NAMES`, the table the teacher loaders use
too, so an exported student's config reloads the same way.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer, checkpoint_seq
from torch import nn

from multiteach.errors import MultiteachError, did_you_mean
from multiteach.layers import layer_kwargs_to_names, resolve_layer_kwargs
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD, TeacherOutput


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


def _check_arch(arch: str) -> None:
    """Raise a MultiteachError with close matches unless timm knows ``arch`` (hub/local prefixes pass)."""
    if ":" in arch or timm.is_model(arch):
        return
    raise MultiteachError(f"unknown student arch {arch!r} (not a timm model).{did_you_mean(arch, timm.list_models())}")


class ArchInfo(NamedTuple):
    """What a timm architecture's default model is, read once on the meta device (:func:`arch_info`).

    Attributes:
        family: The timm class name (``VisionTransformer``, ``ConvNeXt``, ...).
        is_vit: Whether it is a timm ``VisionTransformer`` (any subclass).
        params: The class constructor's parameter names.
        var_kwargs: Whether the constructor also takes ``**kwargs``.
        group_matcher: Whether it has timm's ``group_matcher`` (what layer-wise LR decay groups blocks by).
    """

    family: str
    is_vit: bool
    params: frozenset[str]
    var_kwargs: bool
    group_matcher: bool

    def takes(self, name: str) -> bool:
        """Whether the constructor accepts keyword ``name``."""
        return name in self.params or self.var_kwargs


@functools.lru_cache(maxsize=64)
def arch_info(arch: str) -> ArchInfo:
    """:class:`ArchInfo` of timm architecture ``arch`` (its default model built on the meta device, cached)."""
    model = timm.create_model(arch, pretrained=False, num_classes=0, device="meta")
    sig = inspect.signature(type(model).__init__).parameters
    return ArchInfo(
        family=type(model).__name__,
        is_vit=isinstance(model, VisionTransformer),
        params=frozenset(p for p in sig if p != "self"),
        var_kwargs=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()),
        group_matcher=hasattr(model, "group_matcher"),
    )


#: Student kwargs that only a ViT has, with what they are, for the message when another family gets one.
VIT_ONLY_KWARGS: dict[str, str] = {
    "reg_tokens": "register tokens are extra ViT tokens; a feature map has no token sequence to add them to",
    "class_token": "a feature-map student's summary is its own pooled feature (forward_head), not a class token",
    "dynamic_img_size": "a feature-map student takes any input size its strides allow",
    "no_embed_class": "a feature-map student has no positional embedding",
}


def _unexpected_kwarg_error(arch: str, err: TypeError, info: ArchInfo) -> MultiteachError:
    """Turn timm's 'unexpected keyword argument' TypeError into a message naming the kwarg and the family."""
    bad = str(err).rsplit("argument", 1)[-1].strip(" '\"")
    if not info.is_vit and bad in VIT_ONLY_KWARGS:
        return MultiteachError(
            f"student.kwargs.{bad}: a ViT setting, and {arch!r} is timm's {info.family}: {VIT_ONLY_KWARGS[bad]}. "
            f"Remove student.kwargs.{bad}, or use a ViT student (e.g. vit_tiny_patch16_224)"
        )
    return MultiteachError(
        f"student {arch!r}: unknown model kwarg {bad!r} for timm's {info.family}.{did_you_mean(bad, info.params)}"
    )


def _drop_path_kwargs(arch: str, info: ArchInfo, rate: float) -> dict[str, float]:
    """``{"drop_path_rate": rate}`` for timm, or {} for 0; refused for a family without stochastic depth."""
    if info.is_vit:
        return {"drop_path_rate": rate}
    if not rate:
        return {}
    if not info.takes("drop_path_rate"):
        raise MultiteachError(
            f"student.drop_path_rate={rate}: timm's {info.family} ({arch!r}) has no stochastic depth (its "
            "constructor takes no drop_path_rate); set student.drop_path_rate: 0"
        )
    return {"drop_path_rate": rate}


def build_student(
    arch: str,
    pretrained: bool = False,
    img_size: int | Sequence[int] = 224,
    drop_path_rate: float = 0.0,
    device: str | torch.device | None = None,
    **model_kwargs: Any,
) -> Student:
    """Build a :class:`ViTStudent` or :class:`FeatureMapStudent` from a timm name and kwargs.

    Args:
        arch: timm model name: a ViT (``vit_small_patch16_224``, ``vit_base_patch14_reg4_dinov2``, ...) or any
            family with a spatial feature map (``convnext_atto``, ``efficientnet_b0``, ``resnet18``, ...).
        pretrained: Load timm's pretrained weights (needs the Hub or a local cache).
        img_size: For a ViT, the size the positional embedding is built for (int or (H, W)); other sizes are
            resampled on the fly while ``dynamic_img_size`` is True (the default). Other families get it only
            when their constructor takes it (Swin, MaxViT); their layout is read at this size.
        drop_path_rate: Stochastic-depth rate of the last block (linear decay from 0), for families that have it.
        device: Where to create the parameters (``"meta"`` for a shape-only model).
        **model_kwargs: Further timm kwargs of the family (``depth`` for a ViT, ``dims``/``depths`` for ConvNeXt,
            ...); ``mlp_layer``/``act_layer``/``norm_layer`` may be names from :data:`multiteach.layers.LAYER_NAMES`
            (e.g. ``mlp_layer="swiglu_packed", act_layer="silu"``). ``num_classes`` is always 0.

    Returns:
        The student; ``student.model_kwargs`` holds the JSON form (without ``drop_path_rate``).

    Raises:
        MultiteachError: for an unknown arch (with close matches), layer name or kwarg (a ViT-only one such as
            ``reg_tokens`` on another family is named as such), drop path on a family without it, a ViT without
            a class token, or a family whose output is not a feature map.
    """
    _check_arch(arch)
    if model_kwargs.get("num_classes", 0) != 0:
        raise MultiteachError(f"students are headless: num_classes must be 0, got {model_kwargs['num_classes']}")
    img_size = img_size if isinstance(img_size, int) else [int(s) for s in img_size]
    info = arch_info(arch)
    if info.is_vit:
        kwargs = {"num_classes": 0, "dynamic_img_size": True, **model_kwargs, "img_size": img_size}
    else:
        kwargs = {"num_classes": 0, **model_kwargs}
        if "img_size" in info.params and "img_size" not in kwargs:
            kwargs["img_size"] = img_size
    resolved = {**resolve_layer_kwargs(kwargs), **_drop_path_kwargs(arch, info, drop_path_rate)}
    if device is not None:
        resolved["device"] = device
    try:
        model = timm.create_model(arch, pretrained=pretrained, **resolved)
    except TypeError as err:
        if "multiple values for keyword argument" in str(err):
            bad = str(err).rsplit("argument", 1)[-1].strip(" '\"")
            raise MultiteachError(
                f"student.kwargs.{bad}: timm's {arch!r} entry point sets {bad} itself, so it cannot be changed "
                f"there; leave it out or pick another {info.family} arch"
            ) from err
        if "unexpected keyword argument" not in str(err):
            raise
        raise _unexpected_kwarg_error(arch, err, info) from err
    if info.is_vit:
        return ViTStudent(model, arch, layer_kwargs_to_names(kwargs))
    size = img_size if isinstance(img_size, int) else img_size[0]
    return FeatureMapStudent(model, arch, layer_kwargs_to_names(kwargs), img_size=size)


def check_student_recipe(recipe: Any) -> None:
    """Refuse, when a recipe is read, the student settings its architecture cannot apply.

    A ViT student passes unchanged (its kwargs are checked when it is built, as before). For any other family
    (a :class:`FeatureMapStudent`) this refuses, naming the key and what to use instead: ``student.init_from``
    (it copies ViT layers), iBOT terms and ``data.masking`` (they need a ViT's mask token), ``optim.layer_decay``
    on a family without timm's ``group_matcher``, FSDP's per-block wrapping; and it builds the student on the meta
    device at the crop sizes it will see, so a kwarg, drop path or input size the family does not take fails now.
    ``hf-hub:`` and ``local-dir:`` archs are checked when built.

    Args:
        recipe: A :class:`~multiteach.config.Recipe` being finished (``student``, ``losses``, ``data``, ``optim``).

    Raises:
        MultiteachError: naming the recipe key, the family and what works instead.
    """
    s = recipe.student
    if ":" in s.arch:
        return
    info = arch_info(s.arch)
    if info.is_vit:
        return
    what = f"{s.arch!r} is timm's {info.family}, which has no patch embedding or mask token"
    if s.init_from is not None:
        raise MultiteachError(
            f"student.init_from: {s.init_from!r} would copy a teacher's ViT patch embedding and blocks, and {what}. "
            "Remove student.init_from (a random init; timm's pretrained weights, student.pretrained: true, need the "
            "Hub or its cache), or use a ViT student such as vit_tiny_patch16_224"
        )
    for name, cfg in recipe.losses.items():
        if isinstance(cfg, Mapping) and cfg.get("type") == "ibot" and cfg.get("weight", 1) not in (0, None):
            raise MultiteachError(
                f"losses.{name}: iBOT needs a ViT student (masked patch embeddings are replaced by a learned mask "
                f"token), and {what}. Use a dino term on the pooled summary, which works for every family, and set "
                f"losses.{name}=null"
            )
    if recipe.data.masking is not None:
        raise MultiteachError(f"data.masking: iBOT block masks need a ViT student, and {what}; set data.masking: null")
    if recipe.optim.layer_decay is not None and not info.group_matcher:
        raise MultiteachError(
            f"optim.layer_decay={recipe.optim.layer_decay}: timm's {info.family} has no group_matcher, so its layers "
            "have no depth order to decay the learning rate over; set optim.layer_decay: null"
        )
    dist = recipe.train.distributed
    if dist.strategy == "fsdp" and dist.fsdp.auto_wrap == "blocks":
        raise MultiteachError(
            f"train.distributed.fsdp.auto_wrap=blocks: wraps each ViT block in its own FSDP unit, and timm's "
            f"{info.family} has no blocks list; set train.distributed.fsdp.auto_wrap: none (one unit), or use ddp"
        )
    student = build_student(
        s.arch, img_size=s.img_size, drop_path_rate=s.drop_path_rate, device="meta", **dict(s.kwargs)
    )
    sizes = {"data.global_crops.size": recipe.data.global_crops.size}
    if recipe.data.local_crops.n:
        sizes["data.local_crops.size"] = recipe.data.local_crops.size
    for key, size in sizes.items():
        try:
            student.grid_for(size, size)
        except MultiteachError as err:
            raise MultiteachError(f"{key}={size}: {err}") from None


def spread_blocks(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` teacher block indices spread evenly over ``range(n_teacher)``, first and last included."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def init_from_teacher(
    student: Student, teacher_vit: nn.Module, blocks: Sequence[int] | None = None, name: str = "teacher"
) -> list[int]:
    """Copy a timm ViT teacher's patch embedding, prefix tokens, positional embedding, final norm and a subset
    of its blocks into the student (DistilBERT's initialisation, Sanh et al. 2019), in place.

    A student whose MLPs are narrower than the teacher's (``student.kwargs.mlp_ratio``) receives each copied
    block's most important hidden units (width pruning, see :func:`_prune_mlp_hidden`): depth and MLP width
    can both be cut.

    Args:
        student: The student to initialise; its width, patch size and block layout must match the teacher's
            (its MLP hidden width may be smaller).
        teacher_vit: The teacher's timm ``VisionTransformer``.
        blocks: Teacher block index for each student block (default :func:`spread_blocks`).
        name: The teacher's recipe name, for messages.

    Returns:
        The teacher blocks copied, in student order. A positional embedding built for another input size is
        resampled to the student's patch grid.

    Raises:
        MultiteachError: if the teacher is not a timm ViT, an index is out of range, the count differs from
            the student's depth, or a tensor's shape differs (the message names the parameter).
    """
    if not student.is_vit:
        raise MultiteachError(
            f"student.init_from: copies a teacher's ViT layers into a ViT student; {student.arch!r} is timm's "
            f"{student.family}. Remove student.init_from (random init) or use a ViT student"
        )
    if not isinstance(teacher_vit, VisionTransformer):
        raise MultiteachError(
            f"student.init_from: teacher {name!r} is a {type(teacher_vit).__name__}, not a timm VisionTransformer; "
            "initialising from a teacher needs a timm-family teacher of the student's width"
        )
    n_teacher, n_student = len(teacher_vit.blocks), len(student.model.blocks)
    blocks = spread_blocks(n_teacher, n_student) if blocks is None else [int(b) for b in blocks]
    if len(blocks) != n_student or not all(0 <= b < n_teacher for b in blocks):
        raise MultiteachError(
            f"student.init_blocks: one index in [0, {n_teacher - 1}] per student block ({n_student}), got {blocks}"
        )
    source = teacher_vit.state_dict()
    wanted = {}
    for key in student.model.state_dict():
        if key.startswith("blocks."):
            i, rest = key[len("blocks.") :].split(".", 1)
            wanted[key] = f"blocks.{blocks[int(i)]}.{rest}"
        else:
            wanted[key] = key
    target = student.model.state_dict()
    missing = [k for k, src in wanted.items() if src not in source]
    if missing:
        raise MultiteachError(
            f"student.init_from: teacher {name!r} has no {', '.join(wanted[k] for k in missing[:3])} "
            "(the student and teacher ViT layouts differ: registers, class token or norms)"
        )
    if "pos_embed" in wanted and source["pos_embed"].shape != target["pos_embed"].shape:
        source["pos_embed"] = _resampled_pos_embed(source["pos_embed"], student, teacher_vit)
    tensors = {key: source[src] for key, src in wanted.items()}
    for i in range(n_student):
        _prune_mlp_hidden(tensors, f"blocks.{i}.mlp.", target)
    for key, src in wanted.items():
        if tensors[key].shape != target[key].shape:
            raise MultiteachError(
                f"student.init_from: {key} is {tuple(target[key].shape)} in the student but {src} is "
                f"{tuple(tensors[key].shape)} in teacher {name!r}; the student needs the teacher's width, patch "
                "size and positional-embedding grid (student.img_size = the teacher's input size), and an MLP "
                "hidden width no larger than the teacher's"
            )
    student.model.load_state_dict({k: v.to(target[k].dtype) for k, v in tensors.items()})
    return blocks


def _prune_mlp_hidden(tensors: dict[str, torch.Tensor], prefix: str, target: Mapping[str, torch.Tensor]) -> None:
    """Width pruning of one block's MLP, in place: when the student's hidden width ``h_s`` is smaller than the
    teacher's, keep the teacher's ``h_s`` hidden units with the largest ``||fc1 row|| * ||fc2 column||``
    (magnitude importance; Minitron (Muralidharan et al. 2024) prunes MLP neurons by importance, then distils).

    ``tensors`` maps student keys to the teacher tensors they will receive: fc1 (h_t, D) + bias (h_t,), fc2
    (D, h_t). Anything else (another MLP layout, a wider student) is left for the caller's shape check.
    """
    w1, b1, w2 = (f"{prefix}fc1.weight", f"{prefix}fc1.bias", f"{prefix}fc2.weight")
    if w1 not in tensors or w2 not in tensors or tensors[w1].dim() != 2:
        return
    h_t, h_s = tensors[w1].shape[0], target[w1].shape[0]
    if h_s >= h_t or tensors[w1].shape[1] != target[w1].shape[1] or tensors[w2].shape[1] != h_t:
        return
    keep = (tensors[w1].norm(dim=1) * tensors[w2].norm(dim=0)).topk(h_s).indices.sort().values
    tensors[w1], tensors[w2] = tensors[w1][keep], tensors[w2][:, keep]
    if b1 in tensors:
        tensors[b1] = tensors[b1][keep]


def _resampled_pos_embed(pos: torch.Tensor, student: Student, teacher_vit: VisionTransformer) -> torch.Tensor:
    """The teacher's absolute positional embedding (1, prefix + h*w, D) resampled (bicubic) to the student's
    patch grid, as timm does when pretrained weights meet another ``img_size``; returned unchanged when the
    widths or prefix tokens differ (the shape check then names the mismatch)."""
    prefix = 0 if teacher_vit.no_embed_class else teacher_vit.num_prefix_tokens
    if student.model.num_prefix_tokens != teacher_vit.num_prefix_tokens or pos.shape[-1] != student.embed_dim:
        return pos
    grid = tuple(student.model.patch_embed.grid_size)
    old = tuple(teacher_vit.patch_embed.grid_size)
    return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(old), num_prefix_tokens=prefix)
