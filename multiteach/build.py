"""Turn a validated recipe into objects: student, the teachers some term uses, the loss, the data pipeline.

Nothing here knows about processes or devices beyond ``device=``; :mod:`multiteach.train` does that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from multiteach.config import path_rule
from multiteach.data.loader import GlobalBatchSampler, SeededMultiCrop, worker_init
from multiteach.data.online import open_slide_source
from multiteach.data.sources import TileSource, open_tile_source
from multiteach.data.views.multicrop import MultiCropTransform, collate_multicrop
from multiteach.data.views.perturb import RobustViews
from multiteach.errors import MultiteachError, missing_path
from multiteach.losses import CompositeLoss, active_teachers, build_loss
from multiteach.model import DistillModel
from multiteach.students import Student, build_student, init_from_teacher
from multiteach.teachers import (
    CATALOG,
    Teacher,
    build_teacher,
    resolve_spec,
    spec_overrides,
    teacher_architecture,
    weights_architecture,
)

log = logging.getLogger(__name__)


@dataclass
class Components:
    """What a run trains and what it distils from.

    Attributes:
        model: Student + loss terms (the module Accelerate wraps).
        teachers: Loaded teachers by recipe name (only those an active term reads).
    """

    model: DistillModel
    teachers: dict[str, Teacher]


def build_student_from(recipe: Any, device: str = "cpu") -> Student:
    """The recipe's student (``student.arch`` + kwargs)."""
    s = recipe.student
    return build_student(
        s.arch,
        pretrained=s.pretrained,
        img_size=s.img_size,
        drop_path_rate=s.drop_path_rate,
        device=device,
        **dict(s.kwargs),
    )


def build_teachers(recipe: Any, names: list[str], device: str = "cpu") -> dict[str, Teacher]:
    """Load the named teachers of the recipe (frozen, on ``device``)."""
    teachers = {}
    for name in names:
        cfg = recipe.teachers[name]
        if cfg.weights and not Path(cfg.weights).expanduser().exists():
            key = f"teachers.{name}.weights"
            raise missing_path(key, cfg.weights, path_rule(recipe, key), "a weights file or folder")
        overrides = spec_overrides(cfg)
        try:
            teachers[name] = build_teacher(
                cfg.source,
                weights=cfg.weights,
                input_size=cfg.input_size,
                dtype=cfg.dtype,
                pretrained=cfg.pretrained,
                device=device,
                **overrides,
            )
        except MultiteachError as exc:
            raise MultiteachError(f"teachers.{name}: {exc}") from None
    return teachers


def build_components(recipe: Any, device: str = "cpu", cache: Any | None = None) -> Components:
    """Student, used teachers and loss from a recipe; teachers no active term reads are not loaded.

    With a :class:`multiteach.cache.FeatureCache` no teacher is loaded at all (``teachers`` is empty): the
    loss is built from the specs and grids recorded in the cache.
    """
    losses = {k: v for k, v in recipe.losses.items()}
    names = active_teachers(losses)
    size = recipe.data.global_crops.size
    if cache is None:
        teachers = build_teachers(recipe, names, device)
        specs = {n: t.spec for n, t in teachers.items()}
        grids = {
            n: (t.spec.grid_at(t.input_size or size), f"input {t.input_size} px, patch {t.spec.patch_size}")
            for n, t in teachers.items()
        }
    else:
        teachers, specs = {}, {n: cache.spec(n) for n in names}
        grids = {n: (cache.grids[n], f"cached in {cache.dir}") for n in names}
    student = build_student_from(recipe, device)
    if recipe.student.init_from is not None:
        _init_student_from_teacher(recipe, student, teachers, device)
    loss: CompositeLoss = build_loss(
        losses, student.summary_dim, specs, dict(recipe.heads), patch_dim=student.embed_dim
    )
    _check_grids(recipe, student, grids, loss)
    model = DistillModel(student, loss, recipe.student.mean, recipe.student.std).to(device)
    if recipe.data.masking is None and student.mask_token is not None:
        student.mask_token.requires_grad_(False)  # unused without masks: keep it out of DDP's reducer
    return Components(model, teachers)


def _init_student_from_teacher(recipe: Any, student: Student, teachers: dict[str, Teacher], device: str) -> None:
    """Apply ``student.init_from``: copy the teacher's layers (loading the teacher if no term or cache did)."""
    name = recipe.student.init_from
    teacher = teachers.get(name) or build_teachers(recipe, [name], device)[name]
    vit = getattr(teacher.backbone, "model", teacher.backbone)
    blocks = init_from_teacher(student, vit, recipe.student.init_blocks, name)
    log.info("student initialised from teacher %s: patch embedding, tokens, norm and blocks %s", name, blocks)


def _check_grids(
    recipe: Any, student: Student, grids: dict[str, tuple[tuple[int, int], str]], loss: CompositeLoss
) -> None:
    """Fail before training when a patch term cannot compare grids because resampling is off; log once per
    teacher when the student's and the teacher's grids do not divide each other (tokens are then resampled).

    ``grids``: teacher name -> (its patch grid on a global crop, where that grid comes from, for messages).
    """
    size = recipe.data.global_crops.size
    s_grid = student.grid_for(size, size)
    logged: set[str] = set()
    for name in loss.names:
        term = loss.term(name)
        teacher, resample = getattr(term, "teacher", None), getattr(term, "resample", None)
        if getattr(term, "on", None) != "patch" or teacher not in grids:  # e.g. invariance: no teacher grid
            continue
        t_grid, source = grids[teacher]
        if teacher not in logged and not _grids_divide(s_grid, tuple(t_grid)):
            logged.add(teacher)
            mine = f"{s_grid} (global crops {size} px, {student.family} stride {student.patch_size})"
            theirs = f"{tuple(t_grid)} ({source})"
            how = f"{resample} to the {getattr(term, 'resample_to', 'student')} grid"
            log.info(
                "student grid %s and teacher %r grid %s do not divide: tokens resampled %s", mine, teacher, theirs, how
            )
        if resample == "none" and tuple(t_grid) != tuple(s_grid):
            raise MultiteachError(
                f"losses.{name}: student grid {s_grid} (global crops {size} px, patch {student.patch_size}) and "
                f"teacher {term.teacher!r} grid {t_grid} ({source}) differ "
                "and resample is 'none'; set resample: bicubic, or sizes that give the same grid"
            )


def _grids_divide(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether one (h, w) grid is a whole multiple of the other in both directions (equal grids included)."""
    return all(x % y == 0 for x, y in zip(a, b)) or all(y % x == 0 for x, y in zip(a, b))


def training_source(recipe: Any) -> TileSource:
    """The recipe's training source: online patching from ``data.slides``, else the tiles of ``data.train``.

    ``data.train`` entries are folders of tiles (walked), list files (TXT/CSV/Parquet), folders of TRIDENT/CLAM
    coordinate ``.h5`` files or of WebDataset ``.tar`` shards; one kind per recipe. Nothing is decoded here
    (an unreadable tile is skipped when read; ``multiteach data check`` scans them all on demand).
    """
    if recipe.data.slides is not None:
        return open_slide_source(recipe.data.slides, recipe.seed)
    sources = recipe.data.train if isinstance(recipe.data.train, (list, tuple)) else [recipe.data.train]
    if not sources or sources == [None]:
        raise MultiteachError(
            "data.train: no training tiles configured; set a tile folder or a list file (data.train=...), or "
            "slides for online patching (data.slides.source=...)"
        )
    for i, src in enumerate(sources):
        if not Path(src).expanduser().exists():
            key = "data.train" if isinstance(recipe.data.train, str) else f"data.train[{i}]"
            raise missing_path(key, Path(src), path_rule(recipe, key), "a tile folder or a list file")
    return open_tile_source(sources, tuple(recipe.data.extensions), recipe.data.slide_dir)


def multicrop_transform(recipe: Any) -> MultiCropTransform:
    """The recipe's multi-crop augmentation."""
    d = recipe.data
    aug = d.augment
    return MultiCropTransform(
        global_size=d.global_crops.size,
        local_size=d.local_crops.size,
        n_global=d.global_crops.n,
        n_local=d.local_crops.n,
        global_scale=tuple(d.global_crops.scale),
        local_scale=tuple(d.local_crops.scale),
        hed=tuple(aug.hed) if aug.hed else None,
        flip_rot=aug.flip_rot,
        color_jitter=tuple(aug.color_jitter) if aug.color_jitter else None,
        color_jitter_prob=aug.color_jitter_prob,
        blur_prob=aug.blur_prob,
    )


def robust_views(recipe: Any) -> RobustViews | None:
    """``data.robust_views`` as a :class:`RobustViews` sampler, or None when the switch is off."""
    cfg = recipe.data.robust_views
    if cfg is None:
        return None
    return RobustViews({k: v for k, v in cfg.items() if k != "p"}, p=cfg["p"])


def data_loader(
    recipe: Any,
    tiles: TileSource,
    student: Student,
    rank: int,
    world_size: int,
    start_step: int,
    cache: Any | None = None,
) -> DataLoader:
    """This process's loader of multi-crop micro-batches, starting at optimiser step ``start_step``.

    With a :class:`multiteach.cache.FeatureCache` the global crops are its cached views and each batch
    carries their ``cache_keys`` (see :class:`~multiteach.data.loader.SeededMultiCrop`).
    """
    masking = (
        None
        if recipe.data.masking is None
        else {"probability": recipe.data.masking.probability, "ratio": list(recipe.data.masking.ratio)}
    )
    size = recipe.data.global_crops.size
    dataset = SeededMultiCrop(
        tiles,
        multicrop_transform(recipe),
        recipe.seed,
        mask_grid=student.grid_for(size, size),
        masking=masking,
        cache=cache,
        robust=robust_views(recipe),
    )
    sampler = GlobalBatchSampler(
        len(tiles),
        recipe.optim.batch_size,
        recipe.schedule.steps,
        rank,
        world_size,
        recipe.optim.grad_accum,
        recipe.seed,
        start_step,
        shuffle=tiles.shuffle,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_multicrop,
        num_workers=recipe.data.num_workers,
        persistent_workers=False,
        worker_init_fn=worker_init if recipe.data.num_workers else None,
    )


def check_batch_split(recipe: Any, world_size: int) -> int:
    """Images per process per micro-step; a clear error when the global batch does not split evenly."""
    batch, accum = recipe.optim.batch_size, recipe.optim.grad_accum
    if batch % (world_size * accum):
        raise MultiteachError(
            f"optim.batch_size={batch} does not split across {world_size} process(es) x grad_accum={accum}; "
            f"use a multiple of {world_size * accum}"
        )
    return batch // (world_size * accum)


def describe_graph(recipe: Any) -> dict[str, Any]:
    """Build the recipe's full model graph with the real architectures on the meta device (no weights,
    no memory) and count parameters: student, each loss term's heads, and each teacher a term uses.

    A teacher is counted as its loader would build it: from the ``config.json`` of its weights folder when
    there is one (a stand-in's architecture, say), else from the catalog; the heads are built for that
    teacher's width. ``teacher_architectures`` says per teacher which one was counted, with both when they
    differ (:func:`teacher_provenance`).
    """
    import torch

    losses = dict(recipe.losses)
    specs, teachers, provenance = {}, {}, {}
    for name in active_teachers(losses):
        specs[name], provenance[name] = teacher_provenance(name, recipe.teachers[name])
        teachers[name] = provenance[name]["params"]
    student = build_student_from(recipe, device="meta")
    with torch.device("meta"):
        loss = build_loss(losses, student.summary_dim, specs, dict(recipe.heads), patch_dim=student.embed_dim)
    return {
        "student": {"arch": recipe.student.arch, "params": _count(student.model)},
        "loss": str(loss),
        # per term: its own modules (a head shared by two terms appears under both); total counts it once
        "loss_terms": {n: _count(loss.terms[k]) for n, k in zip(loss.names, loss.terms.keys())},
        "projection_heads": _count(loss.heads) if loss.heads is not None else 0,
        "loss_total": _count(loss),
        "teachers": teachers,
        "teacher_architectures": provenance,
    }


def teacher_provenance(name: str, cfg: Any) -> tuple[Any, dict[str, Any]]:
    """Which architecture a recipe teacher is counted as: its weights folder's ``config.json`` or the catalog's.

    Args:
        name: The teacher's recipe name.
        cfg: Its recipe entry (``source``, ``weights``, ``pretrained``, ...).

    Returns:
        ``(spec, info)``: the spec the heads are built for (with the counted model's width and token layout),
        and ``{"counted": "weights" | "catalog", "arch", "width", "depth", "params", "catalog": {"arch", "width",
        "depth", "params"} or None, "weights_config": {"path", "arch", "width", "depth", "params"} or None,
        "line"}`` where ``line`` says it in words, naming both architectures when they differ.

    Raises:
        MultiteachError: For a source whose architecture is only known from a config that is not local
            (``hf-hub:`` without ``weights:``).
    """
    overrides = spec_overrides(cfg)
    spec = resolve_spec(cfg.source, **overrides, **({"weights": cfg.weights} if cfg.weights else {}))
    own = "the catalog architecture" if cfg.source in CATALOG else f"the architecture {cfg.source!r} names"
    catalog = None
    if spec.arch and not spec.arch.startswith(("hf-hub:", "local-dir:")):
        catalog = _arch_info(spec.arch, teacher_architecture(cfg.source, **overrides))
    # pretrained: false builds the catalog architecture with random weights; no file is read
    folder = weights_architecture(spec) if cfg.pretrained else None
    if cfg.weights:
        where = "`weights:`"
    elif cfg.source.startswith("local-dir:"):
        where = "`source: local-dir:`"
    else:
        where = "the catalog's shipped weights"
    if folder is not None:
        model, spec, path = folder
        counted = _arch_info(spec.arch, model)
        text = f"{name}: counted the architecture of the folder in {where}: {_arch_text(counted)}, from {path}"
        if catalog is None:
            line = text
        elif catalog == counted:
            line = f"{text}; the same as {own}"
        else:
            line = f"{text}; {own} differs: {_arch_text(catalog)}"
        weights_config = {"path": str(path), **counted}
        info = {"counted": "weights", **counted, "catalog": catalog, "weights_config": weights_config, "line": line}
        return spec, info
    if catalog is None:
        raise MultiteachError(
            f"teacher {name!r} ({cfg.source}): its architecture is only known from its config.json; point "
            "`weights:` at a local folder holding it to count it"
        )
    if not cfg.pretrained:
        why = "pretrained: false builds it with random weights"
    elif spec.weights and spec.loader in ("timm", "transformers"):
        why = f"{where} {spec.weights} has no config.json"
    elif spec.weights:
        why = f"the {spec.loader} loader builds it for any weights ({where} {spec.weights})"
    else:
        why = "no `weights:` folder; the Hub weights are this architecture"
    line = f"{name}: counted {own}, {_arch_text(catalog)}: {why}"
    return spec, {"counted": "catalog", **catalog, "catalog": catalog, "weights_config": None, "line": line}


def _arch_info(arch: str, model: Any) -> dict[str, Any]:
    """``{"arch", "width", "depth", "params"}`` of a teacher model (width/depth None when not found)."""
    config = getattr(model, "config", None)
    width = getattr(model, "num_features", None) or getattr(config, "hidden_size", None)
    depth = len(model.blocks) if hasattr(model, "blocks") else getattr(config, "num_hidden_layers", None)
    return {"arch": arch, "width": width, "depth": depth, "params": _count(model)}


def _arch_text(arch: dict[str, Any]) -> str:
    """``vit_large_patch16_224 (1024-d, 24 blocks, 303.35M params)``."""
    parts = [f"{arch['width']}-d" if arch["width"] else "", f"{arch['depth']} blocks" if arch["depth"] else ""]
    parts = [p for p in parts if p] + [f"{arch['params'] / 1e6:.2f}M params"]
    return f"{arch['arch']} ({', '.join(parts)})"


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())
