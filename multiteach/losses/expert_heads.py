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

from multiteach.atomic import atomic_save_safetensors
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
    path = Path(path)
    atomic_save_safetensors(path, head.state_dict())
    return path


def load_head(head: DINOHead, path: str | Path) -> DINOHead:
    """Load safetensors weights into ``head`` (shapes checked)."""
    from safetensors.torch import load_file

    assign_state_dict(head, load_file(str(path)), path)
    return head.requires_grad_(False)


def terms_needing_heads(loss: torch.nn.Module) -> list:
    """Prototype terms (DINO/iBOT) whose frozen expert target head is neither loaded nor fitted yet."""
    return [t for t in loss.terms.values() if getattr(t, "teacher", None) and not getattr(t, "target_ready", True)]


@torch.no_grad()
def expert_features(
    teacher, batches, n_tiles: int, patch: bool, tokens_per_image: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen teacher features of the first two global views of ``n_tiles`` tiles.

    Args:
        teacher: A :class:`~multiteach.teachers.Teacher`.
        batches: Iterable of multi-crop batches (``global`` crop-major, 2+ global crops).
        n_tiles: How many tiles to use.
        patch: Patch tokens (iBOT) instead of summaries (DINO); ``tokens_per_image`` random positions,
            the same positions in both views.
        tokens_per_image: Patch positions sampled per tile.
        seed: Position sampling seed.

    Returns:
        (view A, view B) features, (M, D) each.
    """
    g = torch.Generator().manual_seed(seed)
    a, b, seen = [], [], 0
    for batch in batches:
        crops = batch["global"]
        n = crops.shape[0] // 2 if crops.shape[0] % 2 == 0 else crops.shape[0]
        out = teacher(crops)
        if patch:
            tokens = out.patch_tokens
            idx = torch.randint(0, tokens.shape[1], (n, tokens_per_image), generator=g)
            fa = torch.gather(tokens[:n], 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
            fb = torch.gather(tokens[n : 2 * n], 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
        else:
            fa, fb = out.summary[:n], out.summary[n : 2 * n]
        a.append(fa.reshape(-1, fa.shape[-1]).clone())
        b.append(fb.reshape(-1, fb.shape[-1]).clone())
        seen += n
        if seen >= n_tiles:
            break
    return torch.cat(a), torch.cat(b)


def fit_missing_heads(loss: torch.nn.Module, teachers: dict, batches_fn, seed: int = 0) -> list[str]:
    """Fit every expert target head that was not loaded from ``target_heads``; return the term names.

    Args:
        loss: The :class:`~multiteach.losses.CompositeLoss`.
        teachers: Loaded teachers by name.
        batches_fn: Callable returning a fresh iterable of multi-crop batches (the same on every process).
        seed: Fitting seed (identical on every process, so every rank fits the same head).
    """
    fitted = []
    for term in terms_needing_heads(loss):
        patch = term.__class__.__name__ == "IBOTTerm"
        a, b = expert_features(teachers[term.teacher], batches_fn(), term.fit_tiles, patch, seed=seed)
        fresh = copy.deepcopy(term.target_head).requires_grad_(True).train()
        torch.manual_seed(seed)
        head = fit_expert_head(a, b, fresh, steps=term.fit_steps, seed=seed)
        _broadcast(head)
        term.set_target_head(head)
        fitted.append(term.name)
        log.warning(
            "losses.%s: %s's own %s head is not available; fitted a replacement on %d frozen %s "
            "features of %s (recorded in the model card)",
            term.name,
            term.teacher,
            "iBOT" if patch else "DINO",
            a.shape[0],
            "patch" if patch else "summary",
            term.teacher,
        )
    return fitted


def _broadcast(module: torch.nn.Module) -> None:
    """Make every process hold rank 0's fitted head exactly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for p in module.parameters():
            dist.broadcast(p.data, src=0)
