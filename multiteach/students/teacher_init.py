"""Initialising a ViT student from a ViT teacher's blocks: block choice, MLP width pruning, pos-embed resampling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.students.base import Student


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
