"""Building a student from a timm name and kwargs, and checking a recipe's student settings against its family."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import timm
import torch
from timm.models import VisionTransformer

from multiteach.errors import MultiteachError, did_you_mean
from multiteach.layers import layer_kwargs_to_names, resolve_layer_kwargs
from multiteach.students.base import Student
from multiteach.students.feature_map import FeatureMapStudent
from multiteach.students.vit import ViTStudent


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
