"""Distillation fidelity: how close a run's projected student features are to each teacher's.

For every teacher a feature term of the run distilled (``cosine``, ``smooth_l1``, ``mse``, ``kl``,
``mixed``), the student's summary and/or patch tokens go through the run's own projection head (the
``loss.heads.*`` tensors saved beside the student in the checkpoint) and are compared with the
teacher's features by cosine similarity:

- ``summary_cosine``: mean over images of ``cos(head(student summary), teacher summary)``;
- ``patch_cosine``: mean over images and patch positions of the per-token cosine, after bringing the
  two patch grids together exactly as the term did in training (``resample_to``/``resample``; a term
  with ``resample: none`` whose grids differ here is resampled bicubically);
- ``summary_centred_cosine`` / ``patch_centred_cosine``: the same after removing the teacher's mean
  over the evaluation images from both sides (:func:`~multiteach.eval.agreement.centred_cosine`): 0 for
  a teacher whose output does not depend on the image, where the raw cosine says ~1;
- ``summary_cka``: linear CKA between projected student and teacher summaries;
- ``summary_teacher_spread`` / ``patch_teacher_spread``: how much the teacher's features vary across
  images (:func:`~multiteach.eval.agreement.spread`; ~0 flags a dead teacher).

When a term standardised its targets (``standardize: running`` or ``phi-s``) the head was trained to
predict standardised features, so its output is mapped back with the term's standardiser
``inverse`` before the comparison with the raw teacher features.

Images are resized to the run's global-crop size (``data.global_crops.size``) as in training: the
student sees them at that size and each teacher resizes them to its own ``input_size``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from multiteach.build import build_teachers
from multiteach.errors import MultiteachError
from multiteach.eval.agreement import centred_cosine, linear_cka, spread
from multiteach.eval.embed import load_images, resize_batch
from multiteach.losses import LOSSES, CompositeLoss, active_teachers, build_loss
from multiteach.losses.feature import resample_grid
from multiteach.losses.terms import FeatureTerm
from multiteach.runs import LOSS_PREFIX, RunStudent, load_run_student
from multiteach.teachers import Teacher

TARGET_KEYS = {"summary": "summary_cosine", "patch": "patch_cosine"}


def feature_losses(recipe: Any) -> dict[str, dict[str, Any]]:
    """The active feature-distillation terms of a recipe (those that train a projection head).

    Args:
        recipe: A resolved :class:`~multiteach.config.Recipe`.

    Returns:
        Term name -> its ``losses:`` config, in recipe order (DINO/iBOT/KoLeo left out).
    """
    out = {}
    for name, cfg in recipe.active_losses().items():
        if issubclass(LOSSES.get(str(cfg["type"])), FeatureTerm):
            out[name] = dict(cfg)
    return out


def projection_loss(run: RunStudent, teachers: Mapping[str, Teacher]) -> CompositeLoss:
    """Rebuild a run's feature terms and projection heads and load their saved tensors.

    The loss is rebuilt with :func:`~multiteach.losses.build_loss` from the recipe's feature terms only,
    then the checkpoint's ``loss.*`` tensors are loaded with ``strict=False``: the only keys allowed
    to be left over are those of the terms that are not rebuilt (DINO/iBOT heads and centres), while
    every parameter and buffer of the rebuilt heads and standardisers must be present in the
    checkpoint with the right shape.

    Args:
        run: The run's student, recipe and saved state (:func:`~multiteach.runs.load_run_student`).
        teachers: The loaded teachers by recipe name (their resolved specs size the heads).

    Returns:
        The :class:`~multiteach.losses.CompositeLoss` in eval mode, heads frozen.

    Raises:
        MultiteachError: When the run trained no projection head, or the checkpoint lacks (or has
            mis-shaped) head or standardiser tensors.
    """
    losses = feature_losses(run.recipe)
    if not losses:
        raise MultiteachError(
            "the run has no active feature-distillation term (cosine, smooth_l1, mse, kl, mixed), "
            "so it trained no projection head to measure fidelity with"
        )
    specs = {name: teachers[name].spec for name in active_teachers(losses)}
    student = run.student
    loss = build_loss(losses, student.summary_dim, specs, dict(run.recipe.heads), patch_dim=student.embed_dim)
    state = {k[len(LOSS_PREFIX) :]: v for k, v in run.state.items() if k.startswith(LOSS_PREFIX)}
    try:
        result = loss.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise MultiteachError(f"{run.checkpoint}: the saved projection heads do not fit the recipe: {exc}") from None
    if result.missing_keys:
        raise MultiteachError(
            f"{run.checkpoint}: missing projection-head/standardiser tensors: {', '.join(result.missing_keys[:5])}"
        )
    own = tuple(f"terms.{k}." for k in loss.terms)
    stray = [k for k in result.unexpected_keys if k.startswith("heads.") or k.startswith(own)]
    if stray:
        raise MultiteachError(f"{run.checkpoint}: unexpected projection-head tensors: {', '.join(stray[:5])}")
    return loss.eval().requires_grad_(False)


def _terms_by_target(loss: CompositeLoss) -> dict[str, dict[str, FeatureTerm]]:
    """Teacher -> {target: the first feature term (recipe order) that trained that head}."""
    out: dict[str, dict[str, FeatureTerm]] = {}
    for name in loss.names:
        term = loss.term(name)
        if isinstance(term, FeatureTerm):
            out.setdefault(term.teacher, {}).setdefault(term.on, term)
    return out


def _unstandardise(term: FeatureTerm, x: torch.Tensor) -> torch.Tensor:
    return x if term.standardizer is None else term.standardizer.inverse(x)


def _align(term: FeatureTerm, s_tok: torch.Tensor, s_grid, t_tok: torch.Tensor, t_grid):
    """Bring student (B, Ns, Ds) and teacher (B, Nt, Dt) tokens to one grid as the term did in training."""
    if tuple(s_grid) == tuple(t_grid):
        return s_tok, t_tok
    mode = "bicubic" if term.resample == "none" else term.resample
    if term.resample_to == "student":
        return s_tok, resample_grid(t_tok, t_grid, s_grid, mode=mode)
    return resample_grid(s_tok, s_grid, t_grid, mode=mode), t_tok


def teacher_fidelity(
    run: str | os.PathLike[str] | RunStudent,
    images: torch.Tensor | Sequence[str | os.PathLike[str]],
    *,
    use_ema: bool = True,
    teachers: Mapping[str, Teacher] | None = None,
    batch_size: int = 32,
    size: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """Cosine of a run's projected student features to each distilled teacher's, summary and patch.

    Args:
        run: A run directory, or a :class:`~multiteach.runs.RunStudent` already loaded from one.
        images: RGB (N, 3, H, W) float in [0, 1], or image files.
        use_ema: With a run directory: take the EMA student and heads when the run kept them.
        teachers: Loaded teachers by recipe name; default: loaded from the recipe's ``teachers:``
            entries (``source``, ``weights``, ``input_size``, ``dtype``, ...).
        batch_size: Images per forward pass.
        size: Square size images are resized to for the student; default ``data.global_crops.size``.
        device: Where the student, heads and teachers run.

    Returns:
        ``{teacher: {"summary_cosine", "summary_centred_cosine", "summary_cka", "summary_teacher_spread",
        "patch_cosine", "patch_centred_cosine", "patch_teacher_spread"}}`` with the keys of each target
        the run trained a head for (centred/CKA/spread need at least 2 images).

    Raises:
        MultiteachError: When the run has no feature term, its heads cannot be restored, a teacher
            cannot be loaded, or ``images`` is empty.
    """
    if not isinstance(run, RunStudent):
        run = load_run_student(run, use_ema=use_ema)
    recipe = run.recipe
    size = int(size or recipe.data.global_crops.size)
    names = active_teachers(feature_losses(recipe))
    if teachers is None:
        teachers = build_teachers(recipe, names, device)
    missing = [n for n in names if n not in teachers]
    if missing:
        raise MultiteachError(f"fidelity: no loaded teacher for {', '.join(missing)}")
    loss = projection_loss(run, teachers).to(device)
    student = run.student.to(device).eval()
    mean = torch.tensor(recipe.student.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(recipe.student.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    plan = _terms_by_target(loss)

    if not isinstance(images, torch.Tensor):
        if not images:
            raise MultiteachError("fidelity: no images given")
        images = load_images(list(images), size, batch_size)
    if images.ndim != 4 or images.shape[0] == 0:
        raise MultiteachError(f"fidelity: expected images (N, 3, H, W) with N >= 1, got {tuple(images.shape)}")

    preds: dict[str, dict[str, list[torch.Tensor]]] = {t: {k: [] for k in targets} for t, targets in plan.items()}
    trues: dict[str, dict[str, list[torch.Tensor]]] = {t: {k: [] for k in targets} for t, targets in plan.items()}
    with torch.inference_mode():
        for start in range(0, images.shape[0], int(batch_size)):
            x = resize_batch(images[start : start + int(batch_size)].to(device), size)
            s_out = student((x - mean) / std)
            for name, targets in plan.items():
                t_out = teachers[name](x)
                for target, term in targets.items():
                    if target == "summary":
                        p = _unstandardise(term, loss.heads(name, "summary", s_out.summary).float())
                        t = t_out.summary.float()
                    else:
                        s_tok, t_tok = _align(term, s_out.patch_tokens, s_out.grid, t_out.patch_tokens, t_out.grid)
                        p = _unstandardise(term, loss.heads(name, "patch", s_tok).float())
                        t = t_tok.float()
                    preds[name][target].append(p.flatten(0, -2).cpu())
                    trues[name][target].append(t.flatten(0, -2).cpu())
    out: dict[str, dict[str, float]] = {}
    for name, targets in plan.items():
        out[name] = {}
        for target in targets:
            p, t = torch.cat(preds[name][target]), torch.cat(trues[name][target])
            key = TARGET_KEYS[target]
            cos = F.cosine_similarity(p.double(), t.double(), dim=-1).mean()
            out[name][key] = max(-1.0, min(1.0, float(cos)))
            if t.shape[0] >= 2:
                out[name][f"{target}_centred_cosine"] = centred_cosine(p, t)
                out[name][f"{target}_teacher_spread"] = spread(t)
                if target == "summary":
                    out[name]["summary_cka"] = linear_cka(p, t)
    return out
