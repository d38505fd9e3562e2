"""Write an export: a trained student as a plain timm model folder, with its heads, recipe and model card.

``export_run`` turns a run directory into a folder that ``timm.create_model("local-dir:DIR", pretrained=True)``
(or ``"hf-hub:ORG/NAME"`` once pushed) loads without multiteach installed:

* ``model.safetensors``: the backbone state dict exactly as ``timm.create_model(arch, num_classes=0, **kwargs)``
  names it (no ``student.`` prefix, no mask token);
* ``config.json``: timm's hub config (``architecture``, ``model_args`` of the student's family, ViT or not, without
  the layer-class arguments, as the public SwiGLU repos write it, and ``pretrained_cfg`` with the student's
  preprocessing), plus a ``multiteach`` section recording the layer names so :func:`load_export` needs no
  call-time arguments;
* ``heads.safetensors``: every ``loss.*`` tensor of the checkpoint (projection, DINO and iBOT heads, loss state)
  and a ViT student's mask token, for fine-tuning or resuming distillation elsewhere;
* ``recipe.yaml``: the resolved recipe, its local paths replaced by ``<local>/`` + the file or folder name
  (``keep_paths`` keeps them);
* ``README.md``: a Hugging Face model card (:mod:`multiteach.publish.card`: licence inherited from the
  teachers (:mod:`multiteach.publish.provenance`), loading line, recipe, data, optional evaluation and speed tables).

No file of an export names an absolute local path (data, teacher weights, run folder): ``config.json``, the card
and the safetensors metadata never do, ``recipe.yaml`` only with ``keep_paths``, so a public ``--push`` publishes
no folder, user or mount-point names. An interrupted export leaves no half-written folder (the files are
written beside it and swapped in), and a run that stopped before ``schedule.steps`` is refused unless
``allow_incomplete``.

Everything is safetensors, JSON, YAML or Markdown: reading an export back never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import multiteach
from multiteach.atomic import atomic_save_safetensors, atomic_write_json
from multiteach.errors import MultiteachError
from multiteach.layers import LAYER_NAMES, resolve_layer_kwargs
from multiteach.publish.card import PLACEHOLDER_REPO, model_card
from multiteach.publish.provenance import (
    checkpoint_step,
    loaded_teachers,
    teacher_card_files,
    teacher_rows,
    used_teachers,
)
from multiteach.publish.redact import redact_local_paths, redact_path_slot
from multiteach.runs import LOSS_PREFIX, RunStudent, load_run_student, require_complete
from multiteach.standins import timm_config

log = logging.getLogger("multiteach.publish.export")

EXPORT_FILES = ("README.md", "config.json", "heads.safetensors", "model.safetensors", "recipe.yaml")
MASK_TOKEN_KEY = "student.mask_token"


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    use_ema: bool = True,
    overwrite: bool = False,
    evaluation: Mapping[str, Mapping[str, Any]] | None = None,
    speed: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    allow_incomplete: bool = False,
    keep_paths: bool = False,
    licence_notes: Mapping[str, str] | None = None,
) -> Path:
    """Export the last checkpoint of a run as a timm model folder (see the module docstring for the files).

    The files are written into a temporary sibling of ``out_dir`` and swapped in at the end, so an
    interrupted export never leaves a half-written ``out_dir``.

    Args:
        run_dir: A run directory written by ``multiteach train``.
        out_dir: Folder to create. It must not exist or be empty, unless ``overwrite`` is set.
        use_ema: Export the EMA weights when the recipe kept them on purpose (``train.keep_ema``, the usual
            DINOv2/H0-mini choice); the live weights otherwise, and always when False.
        overwrite: Replace an existing, non-empty ``out_dir``.
        evaluation: Optional results, model name -> metric -> value, shown as a table in the card.
        speed: Optional :func:`~multiteach.publish.speed.speed_card` result, shown as a speed/size table in the card.
        repo_id: ``ORG/NAME`` the export will be pushed to; the card's loading line uses it (else
            ``ORG/NAME`` as a placeholder).
        allow_incomplete: Export a run whose last checkpoint is before ``schedule.steps`` (its card's title
            then says "incomplete"); otherwise such a run is refused.
        keep_paths: Keep the local paths (data, teacher weights, output folder) in ``recipe.yaml`` as they are;
            by default each becomes ``<local>/`` + its last part
            (:func:`~multiteach.publish.redact.redact_local_paths`). Other files never hold local paths.
        licence_notes: Teacher name -> the licence the exporter states for a teacher whose licence multiteach
            does not know (``--licence-note NAME=TEXT``); the card prints it for that teacher.

    Returns:
        ``out_dir`` as a resolved path.

    Raises:
        MultiteachError: when ``run_dir`` is not a run directory or has no checkpoint, is incomplete (without
            ``allow_incomplete``), or ``out_dir`` exists and is not empty (without ``overwrite``), is a file,
            or holds the run itself.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    _check_out_dir(out_dir, run_dir, overwrite)
    run = load_run_student(run_dir, use_ema=use_ema)
    require_complete(run_dir, allow_incomplete)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.export-"))
    try:
        _write_export(run, run_dir, tmp, evaluation, speed, repo_id or PLACEHOLDER_REPO, keep_paths, licence_notes)
        _swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s weights of %s) to %s", run.student.arch, run.weights, run.checkpoint.name, out_dir)
    return out_dir


def _check_out_dir(out_dir: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse an output folder that would clobber files (or the run) without ``overwrite``."""
    if out_dir == run_dir or out_dir in run_dir.parents:
        raise MultiteachError(f"{out_dir} is (or contains) the run directory {run_dir}; export elsewhere")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise MultiteachError(f"{out_dir} exists and is not a folder")
    if any(out_dir.iterdir()) and not overwrite:
        raise MultiteachError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``; an old ``out_dir`` is moved aside first, then deleted."""
    if out_dir.exists() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old)  # rename over the empty placeholder folder
        try:
            os.replace(tmp, out_dir)
        except OSError:
            os.replace(old, out_dir)  # put the previous export back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)  # a missing or empty out_dir is replaced in one rename


def _write_export(
    run: RunStudent,
    run_dir: Path,
    folder: Path,
    evaluation: Mapping[str, Mapping[str, Any]] | None,
    speed: Mapping[str, Any] | None,
    repo_id: str,
    keep_paths: bool = False,
    licence_notes: Mapping[str, str] | None = None,
) -> None:
    """Write the five export files of ``run`` into ``folder`` (and a copy of the card of each teacher shipped
    inside multiteach, which the model card links to)."""
    student, recipe = run.student, run.recipe
    backbone = {k: v.detach().cpu() for k, v in student.model.state_dict().items()}
    _check_loads(student.arch, student.model_kwargs, backbone)
    unique, aliases = split_shared(backbone)
    if aliases:
        raise MultiteachError(f"the student shares tensors between {sorted(aliases)}; timm exports cannot tie weights")
    atomic_save_safetensors(folder / "model.safetensors", unique, metadata={"format": "pt"})

    atomic_write_json(folder / "config.json", export_config(run))

    heads = {k: v.detach().cpu() for k, v in run.state.items() if k.startswith(LOSS_PREFIX)}
    if student.mask_token is not None:  # ViT students only
        heads[MASK_TOKEN_KEY] = student.mask_token.detach().cpu()
    unique, aliases = split_shared(heads)
    shared_heads = {
        name: cfg["share_head_with"] for name, cfg in recipe.active_losses().items() if cfg.get("share_head_with")
    }
    meta = {
        "format": "pt",
        "multiteach": multiteach.__version__,
        "weights": run.weights,
        "aliases": json.dumps(aliases, sort_keys=True),
        "share_head_with": json.dumps(shared_heads, sort_keys=True),
    }
    atomic_save_safetensors(folder / "heads.safetensors", unique, metadata=meta)

    (folder / "recipe.yaml").write_text(export_recipe_yaml(recipe, keep_paths), encoding="utf-8")
    loaded = loaded_teachers(recipe, run_dir)
    card = model_card(
        run,
        run_dir,
        repo_id=repo_id,
        evaluation=evaluation,
        speed=speed,
        keep_paths=keep_paths,
        licence_notes=licence_notes,
        loaded=loaded,
    )
    (folder / "README.md").write_text(card, encoding="utf-8")
    for name, source in teacher_card_files(teacher_rows(recipe, loaded)).items():
        shutil.copyfile(source, folder / name)
    _usual_permissions(folder)


def _usual_permissions(folder: Path) -> None:
    """Give the export the umask's usual modes (temporary files and folders are created owner-only)."""
    mask = os.umask(0o022)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~mask)


def _check_loads(arch: str, model_kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Check ``state`` loads strictly into ``timm.create_model(arch, num_classes=0, **kwargs)`` (on meta)."""
    kwargs = resolve_layer_kwargs({**model_kwargs, "num_classes": 0})
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **kwargs)
    try:
        model.load_state_dict(dict(state), strict=True, assign=True)
    except RuntimeError as exc:
        raise MultiteachError(f"the student's weights do not match timm's {arch!r}: {exc}") from None


def export_recipe_yaml(recipe: Any, keep_paths: bool = False) -> str:
    """The ``recipe.yaml`` of an export: the resolved recipe, local paths redacted unless ``keep_paths``.

    Every local-path slot (``data.train``, ``cache.dir``, ``teachers.*.weights``, ``local-dir:`` sources,
    ``losses.*.target_heads``) becomes ``<local>/`` + its last part, as does any other absolute path in the
    recipe (``output_dir``, ...). The result is still a valid recipe: point the placeholders at your own copies
    (``data.train=/my/tiles``) to train it again.
    """
    if keep_paths:
        return recipe.to_yaml()
    data = redact_local_paths(recipe.to_dict())
    data["data"]["train"] = redact_path_slot(data["data"]["train"])
    if data.get("cache"):
        data["cache"]["dir"] = redact_path_slot(data["cache"]["dir"])
    for teacher in data["teachers"].values():
        teacher["weights"] = redact_path_slot(teacher["weights"])
    for term in data["losses"].values():
        if isinstance(term, dict) and isinstance(term.get("target_heads"), str):
            term["target_heads"] = redact_path_slot(term["target_heads"])
    return type(recipe).from_dict(data).to_yaml()


def export_config(run: RunStudent) -> dict[str, Any]:
    """timm hub ``config.json`` of a run's student, with a ``multiteach`` section for layer names.

    ``model_args`` leaves the layer classes out (``mlp_layer``, ``act_layer``, ``norm_layer``) as the public
    SwiGLU repos do; plain timm then needs them at call time (the model card prints the exact line).
    """
    student, recipe = run.student, run.recipe
    kwargs = dict(student.model_kwargs)
    kwargs.pop("num_classes", None)  # top-level num_classes says it
    layer_kwargs = {k: v for k, v in kwargs.items() if k in LAYER_NAMES}
    cfg = timm_config(
        student.arch,
        kwargs,
        int(student.model.num_features),
        tuple(recipe.student.mean),
        tuple(recipe.student.std),
        int(recipe.student.img_size),
    )
    if not student.is_vit:  # timm_config describes a ViT: the family's own pooling and first conv instead
        cfg["global_pool"] = _pool_type(student.model)
        cfg["pretrained_cfg"]["first_conv"] = (getattr(student.model, "pretrained_cfg", None) or {}).get("first_conv")
    cfg["multiteach"] = {
        "version": multiteach.__version__,
        "arch": student.arch,
        "model_kwargs": kwargs,
        "layer_kwargs": layer_kwargs,
        "family": student.family,
        "embed_dim": int(student.embed_dim),
        "summary_dim": int(student.summary_dim),
        "patch_size": int(student.patch_size),
        "num_prefix_tokens": int(student.num_prefix_tokens),
        "num_registers": int(student.num_registers),
        "weights": run.weights,
        "step": checkpoint_step(run.checkpoint),
        "recipe": recipe.name,
        "teachers": {name: recipe.teachers[name].source for name in used_teachers(recipe)},
    }
    return redact_local_paths(cfg)


def _pool_type(model: nn.Module) -> str | None:
    """The pooling a timm model's head applies (``"avg"``, ...), read where timm keeps it; None if not found."""
    head = getattr(model, "head", None)
    places = (getattr(head, "global_pool", None), getattr(head, "pool_type", None), getattr(model, "global_pool", None))
    for pool in places:
        pool = getattr(pool, "pool_type", pool)
        if isinstance(pool, str):
            return pool
    return None


def split_shared(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Make a tensor dict safe for safetensors, which refuses tensors sharing memory.

    Tensors that are the same view of the same memory (tied weights) are written once: the later names
    become aliases of the first. Tensors that only overlap are copied so each is written on its own.

    Args:
        tensors: Name -> tensor.

    Returns:
        ``(unique, aliases)``: the tensors to save (contiguous), and alias name -> saved name.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if t.device.type == "meta" or t.numel() == 0:
            unique[name] = t.contiguous()
            continue
        ptr = t.untyped_storage().data_ptr()
        view = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        unique[name] = t.clone() if ptr in storages else t.contiguous()
        storages.add(ptr)
    return unique, aliases


def load_heads(export_dir: str | Path) -> dict[str, torch.Tensor]:
    """Read ``heads.safetensors`` of an export, with tied tensors restored under every name.

    Args:
        export_dir: An export folder.

    Returns:
        Name -> tensor (``loss.*`` keys as in the run's checkpoint, plus ``student.mask_token``).
    """
    path = Path(export_dir) / "heads.safetensors"
    if not path.is_file():
        raise MultiteachError(f"{path} does not exist; is {export_dir} a multiteach export?")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for alias, name in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[name]
    return tensors


def load_export(source: str | Path, **kwargs: Any) -> nn.Module:
    """Load an export with timm, the layer classes taken from its ``config.json`` (no call-time arguments).

    Args:
        source: An export folder, ``local-dir:PATH`` or ``hf-hub:ORG/NAME``.
        **kwargs: Further ``timm.create_model`` arguments (they win over the recorded ones).

    Returns:
        The timm model with the exported weights, in eval mode.
    """
    text = str(source)
    if text.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        config_path = Path(hf_hub_download(text[len("hf-hub:") :], "config.json"))
        name = text
    else:
        folder = Path(text.removeprefix("local-dir:")).expanduser()
        config_path = folder / "config.json"
        name = f"local-dir:{folder}"
    if not config_path.is_file():
        raise MultiteachError(f"{source}: no config.json; is it a multiteach/timm export?")
    config = json.loads(config_path.read_text())
    layers = dict(config.get("multiteach", {}).get("layer_kwargs", {}))
    call = {**resolve_layer_kwargs(layers), **kwargs}
    return timm.create_model(name, pretrained=True, **call).eval()
