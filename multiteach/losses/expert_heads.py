"""Fit DINO/iBOT heads for a frozen expert teacher whose heads are not public (H-optimus-0).

H0-mini distils through H-optimus-0's own DINO/iBOT heads, which Bioptimus did not release. When a user
does not have them, multiteach fits replacement heads first, on frozen (cached) teacher features of two
views per tile: DINO self-distillation of the head alone (student head vs. an EMA copy of it on the
other view, centred and sharpened targets), the backbone never moving. The fitted head is then frozen
and used as the target branch; the run log and model card say that this was done.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from multiteach.heads import DINOHead
from multiteach.losses.dino import DINOLoss
from multiteach.teachers.weights import assign_state_dict

log = logging.getLogger("multiteach.losses")


def fit_expert_head(
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    head: DINOHead,
    steps: int = 200,
    batch_size: int = 256,
    lr: float = 1e-3,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
    momentum: float = 0.99,
    seed: int = 0,
) -> DINOHead:
    """Fit ``head`` on frozen features of two views per sample; return its EMA copy, frozen.

    Args:
        view_a: Teacher features of view A, (N, D) summaries or (N, P, D) patch tokens (flattened).
        view_b: The same samples' features of view B, same shape.
        head: A fresh :class:`DINOHead` (in_dim = D).
        steps: Optimiser steps.
        batch_size: Rows per step.
        lr: AdamW learning rate.
        teacher_temp: Temperature of the EMA targets.
        student_temp: Temperature of the fitted head.
        momentum: EMA momentum of the target head.
        seed: Sampling seed.

    Returns:
        The EMA head (what targets will be computed with), ``requires_grad=False``, in eval mode.
    """
    a, b = view_a.reshape(-1, view_a.shape[-1]).float(), view_b.reshape(-1, view_b.shape[-1]).float()
    if a.shape != b.shape:
        raise ValueError(f"views must match: {tuple(a.shape)} vs {tuple(b.shape)}")
    target = copy.deepcopy(head).requires_grad_(False)
    loss_fn = DINOLoss(head.last_layer.out_features, student_temp=student_temp, centering="softmax")
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, a.shape[0], (min(batch_size, a.shape[0]),), generator=g)
        xa, xb = a[idx], b[idx]
        with torch.no_grad():
            t_logits = target(torch.cat([xa, xb]))
            probs = loss_fn.teacher_probs(t_logits, teacher_temp).chunk(2)
        loss = loss_fn([head(xa), head(xb)], list(probs), ignore_diagonal=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_fn.update_center(t_logits)
        with torch.no_grad():
            torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in head.parameters()], 1 - momentum)
        if step % 50 == 0:
            log.info("fitting expert head: step %d loss %.4f", step, loss.item())
    return target.eval()


def save_head(head: DINOHead, path: str | Path) -> Path:
    """Save a head as safetensors (what a term's ``target_heads:`` loads)."""
    from multiteach.standins import atomic_save_safetensors

    path = Path(path)
    atomic_save_safetensors(path, head.state_dict())
    return path


def load_head(head: DINOHead, path: str | Path) -> DINOHead:
    """Load safetensors weights into ``head`` (shapes checked)."""
    from safetensors.torch import load_file

    assign_state_dict(head, load_file(str(path)), path)
    return head.requires_grad_(False)
