"""Students: any timm ``VisionTransformer`` wrapped to return a :class:`TeacherOutput`.

The student is a plain timm model (``Student.model``) plus a DINOv2-style learned ``mask_token``
kept outside it, so an exported student reloads with ``timm.create_model`` alone. Architecture
kwargs that are classes in timm (``mlp_layer``, ``act_layer``, ``norm_layer``) are written in
recipes as names and resolved through :data:`multiteach.layers.LAYER_NAMES`, the table the teacher
loaders use too, so an exported student's config reloads the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

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
    """A timm ViT returning CLS and patch tokens, with a learned mask token for iBOT-style masking.

    Args:
        model: A timm ``VisionTransformer`` (any subclass) built with ``num_classes=0`` and a class token.
        arch: The timm architecture name it was built from.
        model_kwargs: The kwargs it was built with, in JSON form (layer classes as names).

    Shapes:
        forward: x (B, 3, H, W) normalised, masks (B, h*w) bool or None -> TeacherOutput(
        summary (B, D), patch_tokens (B, h*w, D), grid (h, w)), with h, w = H // p, W // p.
    """

    def __init__(self, model: VisionTransformer, arch: str, model_kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        _check_model(model, arch)
        self.model = model
        self.arch = arch
        self.model_kwargs = dict(model_kwargs)
        device = next(model.parameters()).device
        self.mask_token = nn.Parameter(torch.zeros(1, 1, model.embed_dim, device=device))  # DINOv2: zero init

    @property
    def embed_dim(self) -> int:
        """Token width D."""
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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (timm's own switch)."""
        self.model.set_grad_checkpointing(enable)

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

    def extra_repr(self) -> str:
        """One-line summary shown by ``print(student)``."""
        return f"arch={self.arch!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}"


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


def _unexpected_kwarg_error(arch: str, err: TypeError) -> MultiteachError:
    """Turn timm's 'unexpected keyword argument' TypeError into a clear message.

    A non-ViT arch rejects the ViT kwargs too, so the arch is first probed on the meta device.
    """
    probe = timm.create_model(arch, device="meta")
    if not isinstance(probe, VisionTransformer):
        return _not_vit_error(arch, probe)
    bad = str(err).rsplit("argument", 1)[-1].strip(" '\"")
    allowed = [p for p in inspect.signature(VisionTransformer.__init__).parameters if p != "self"]
    return MultiteachError(f"student {arch!r}: unknown model kwarg {bad!r}.{did_you_mean(bad, allowed)}")


def build_student(
    arch: str,
    pretrained: bool = False,
    img_size: int | Sequence[int] = 224,
    drop_path_rate: float = 0.0,
    device: str | torch.device | None = None,
    **model_kwargs: Any,
) -> Student:
    """Build a :class:`Student` from a timm ViT name and kwargs.

    Args:
        arch: timm model name (``vit_small_patch16_224``, ``vit_base_patch14_reg4_dinov2``, ...).
        pretrained: Load timm's pretrained weights (needs the Hub or a local cache).
        img_size: Size the positional embedding is built for (int or (H, W)); other sizes are
            resampled on the fly while ``dynamic_img_size`` is True (the default).
        drop_path_rate: Stochastic-depth rate of the last block (linear decay from 0).
        device: Where to create the parameters (``"meta"`` for a shape-only model).
        **model_kwargs: Further timm kwargs; ``mlp_layer``/``act_layer``/``norm_layer`` may be names
            from :data:`multiteach.layers.LAYER_NAMES` (e.g. ``mlp_layer="swiglu_packed", act_layer="silu"``).
            ``num_classes`` is always 0.

    Returns:
        The student; ``student.model_kwargs`` holds the JSON form (without ``drop_path_rate``).

    Raises:
        MultiteachError: for an unknown arch, layer name or kwarg, or a non-ViT / CLS-less model.
    """
    _check_arch(arch)
    if model_kwargs.get("num_classes", 0) != 0:
        raise MultiteachError(f"students are headless: num_classes must be 0, got {model_kwargs['num_classes']}")
    img_size = img_size if isinstance(img_size, int) else [int(s) for s in img_size]
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **model_kwargs, "img_size": img_size}
    resolved = resolve_layer_kwargs(kwargs)
    if device is not None:
        resolved["device"] = device
    try:
        model = timm.create_model(arch, pretrained=pretrained, drop_path_rate=drop_path_rate, **resolved)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise _unexpected_kwarg_error(arch, err) from err
    return Student(model, arch, layer_kwargs_to_names(kwargs))


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
