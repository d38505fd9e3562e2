"""Export a trained student as a plain timm model, with its heads, recipe and a model card; measure it; push it.

``export_run`` turns a run directory into a folder that ``timm.create_model("local-dir:DIR", pretrained=True)``
(or ``"hf-hub:ORG/NAME"`` once pushed) loads without multiteach installed:

* ``model.safetensors``: the backbone state dict exactly as ``timm.create_model(arch, num_classes=0, **kwargs)``
  names it (no ``student.`` prefix, no mask token);
* ``config.json``: timm's hub config (``architecture``, ``model_args`` without the layer-class arguments, as the
  public SwiGLU repos write it, and ``pretrained_cfg`` with the student's preprocessing), plus a ``multiteach``
  section recording the layer names so :func:`load_export` needs no call-time arguments;
* ``heads.safetensors``: every ``loss.*`` tensor of the checkpoint (projection, DINO and iBOT heads, loss state)
  and the student's mask token, for fine-tuning or resuming distillation elsewhere;
* ``recipe.yaml``: the resolved recipe, its local paths replaced by ``<local>/`` + the file or folder name
  (``keep_paths`` keeps them);
* ``README.md``: a Hugging Face model card (licence inherited from the teachers, loading line, recipe, data,
  optional evaluation and speed tables).

No file of an export names an absolute local path (data, teacher weights, run folder): ``config.json``, the card
and the safetensors metadata never do, ``recipe.yaml`` only with ``keep_paths``, so a public ``--push`` publishes
no folder, user or mount-point names.

Everything is safetensors, JSON, YAML or Markdown: reading an export back never unpickles anything.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import multiteach
from multiteach.errors import MultiteachError
from multiteach.layers import LAYER_NAMES, resolve_layer_kwargs
from multiteach.runs import LOSS_PREFIX, RunStudent, load_run_student, require_complete
from multiteach.standins import atomic_save_safetensors, atomic_write_json, timm_config

log = logging.getLogger("multiteach.export")

EXPORT_FILES = ("README.md", "config.json", "heads.safetensors", "model.safetensors", "recipe.yaml")
MASK_TOKEN_KEY = "student.mask_token"
NC_LICENSE = "cc-by-nc-nd-4.0"
PLACEHOLDER_REPO = "ORG/NAME"
#: Stands for the folder part of a local path in an export: ``/home/me/data/tiles`` -> ``<local>/tiles``.
LOCAL_PLACEHOLDER = "<local>"
#: Source prefixes that may stand before a local path (``local-dir:/models/uni``, ``open_clip:local-dir:...``).
_PATH_PREFIXES = ("open_clip:", "transformers:", "local-dir:", "file://", "file:")
CARD_TAGS = ["pathology", "multiteach", "distillation"]


# ------------------------------------------------------------------------------------------------ export


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
) -> Path:
    """Export the last checkpoint of a run as a timm model folder (see the module docstring for the files).

    The files are written into a temporary sibling of ``out_dir`` and swapped in at the end, so an
    interrupted export never leaves a half-written ``out_dir``.

    Args:
        run_dir: A run directory written by ``multiteach train``.
        out_dir: Folder to create. It must not exist or be empty, unless ``overwrite`` is set.
        use_ema: Export the EMA weights when the run kept them (the usual DINOv2/H0-mini choice), else the
            live weights.
        overwrite: Replace an existing, non-empty ``out_dir``.
        evaluation: Optional results, model name -> metric -> value, shown as a table in the card.
        speed: Optional :func:`speed_card` result, shown as a speed/size table in the card.
        repo_id: ``ORG/NAME`` the export will be pushed to; the card's loading line uses it (else
            ``ORG/NAME`` as a placeholder).
        allow_incomplete: Export a run whose last checkpoint is before ``schedule.steps`` (its card's title
            then says "incomplete"); otherwise such a run is refused.
        keep_paths: Keep the local paths (data, teacher weights, output folder) in ``recipe.yaml`` as they are;
            by default each becomes ``<local>/`` + its last part (:func:`redact_local_paths`). Other files never
            hold local paths.

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
        _write_export(run, run_dir, tmp, evaluation, speed, repo_id or PLACEHOLDER_REPO, keep_paths)
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
) -> None:
    """Write the five export files of ``run`` into ``folder``."""
    student, recipe = run.student, run.recipe
    backbone = {k: v.detach().cpu() for k, v in student.model.state_dict().items()}
    _check_loads(student.arch, student.model_kwargs, backbone)
    unique, aliases = split_shared(backbone)
    if aliases:
        raise MultiteachError(f"the student shares tensors between {sorted(aliases)}; timm exports cannot tie weights")
    atomic_save_safetensors(folder / "model.safetensors", unique, metadata={"format": "pt"})

    atomic_write_json(folder / "config.json", export_config(run))

    heads = {k: v.detach().cpu() for k, v in run.state.items() if k.startswith(LOSS_PREFIX)}
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
    card = model_card(run, run_dir, repo_id=repo_id, evaluation=evaluation, speed=speed, keep_paths=keep_paths)
    (folder / "README.md").write_text(card, encoding="utf-8")
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


def redact_local_path(value: str, force: bool = False) -> str:
    """``<local>/`` + the last part of a local path, keeping a source prefix; other text unchanged.

    ``/home/me/data/tiles`` -> ``<local>/tiles``; ``local-dir:/models/uni`` -> ``local-dir:<local>/uni``;
    ``hf-hub:org/name``, ``uni`` and relative paths stay as they are unless ``force`` (a value known to be a
    path, such as ``data.train``).

    Args:
        value: A recipe value.
        force: Redact a relative path too.
    """
    prefix, rest = "", value
    while True:
        head = next((p for p in _PATH_PREFIXES if rest.startswith(p)), None)
        if head is None:
            break
        prefix, rest = prefix + head, rest[len(head) :]
    local = rest.startswith(("/", "~", "\\")) or (len(rest) > 2 and rest[1] == ":" and rest[2] in "/\\")
    if not rest or rest.startswith(LOCAL_PLACEHOLDER) or not (local or force or prefix.endswith("local-dir:")):
        return value
    name = rest.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return f"{prefix}{LOCAL_PLACEHOLDER}/{name}" if name not in ("", "~", ".") else f"{prefix}{LOCAL_PLACEHOLDER}"


def redact_local_paths(tree: Any) -> Any:
    """A copy of nested mappings/lists with every local path string redacted (:func:`redact_local_path`)."""
    if isinstance(tree, Mapping):
        return {k: redact_local_paths(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact_local_paths(v) for v in tree]
    return redact_local_path(tree) if isinstance(tree, str) else tree


def _force_paths(value: Any) -> Any:
    """A known path slot (a path or a list of paths) redacted even when relative; null stays null."""
    if isinstance(value, list):
        return [_force_paths(v) for v in value]
    return redact_local_path(value, force=True) if isinstance(value, str) else value


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
    data["data"]["train"] = _force_paths(data["data"]["train"])
    if data.get("cache"):
        data["cache"]["dir"] = _force_paths(data["cache"]["dir"])
    for teacher in data["teachers"].values():
        teacher["weights"] = _force_paths(teacher["weights"])
    for term in data["losses"].values():
        if isinstance(term, dict) and isinstance(term.get("target_heads"), str):
            term["target_heads"] = _force_paths(term["target_heads"])
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
    cfg["multiteach"] = {
        "version": multiteach.__version__,
        "arch": student.arch,
        "model_kwargs": kwargs,
        "layer_kwargs": layer_kwargs,
        "embed_dim": int(student.embed_dim),
        "patch_size": int(student.patch_size),
        "num_prefix_tokens": int(student.num_prefix_tokens),
        "num_registers": int(student.num_registers),
        "weights": run.weights,
        "step": _checkpoint_step(run.checkpoint),
        "recipe": recipe.name,
        "teachers": {name: recipe.teachers[name].source for name in _used_teachers(recipe)},
    }
    return redact_local_paths(cfg)


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


def timm_call_kwargs(layer_kwargs: Mapping[str, str]) -> dict[str, str]:
    """Python source of the layer arguments plain timm needs at call time.

    Args:
        layer_kwargs: Layer names as recipes write them (``{"mlp_layer": "swiglu_packed", "act_layer": "silu"}``).

    Returns:
        Argument -> expression, e.g. ``{"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}``.
    """
    resolved = resolve_layer_kwargs(dict(layer_kwargs))
    out = {}
    for key in LAYER_NAMES:
        if key not in resolved:
            continue
        value = resolved[key]
        out[key] = json.dumps(value) if isinstance(value, str) else _public_name(value)
    return out


def _public_name(obj: Any) -> str:
    """``timm.layers.X`` / ``torch.nn.X`` for a layer class (or timm's ``partial`` aliases such as SwiGLUPacked)."""
    for module, prefix in ((timm.layers, "timm.layers"), (torch.nn, "torch.nn")):
        for name in dir(module):
            if not name.startswith("_") and getattr(module, name) is obj:
                return f"{prefix}.{name}"
    if hasattr(obj, "__qualname__"):
        return f"{obj.__module__}.{obj.__qualname__}"
    raise MultiteachError(f"layer {obj!r} has no public import path; use a class from timm.layers or torch.nn")


def timm_load_line(source: str, layer_kwargs: Mapping[str, str]) -> str:
    """The one-line ``timm.create_model(...)`` call that loads an export with plain timm."""
    args = [json.dumps(source), "pretrained=True", *(f"{k}={v}" for k, v in timm_call_kwargs(layer_kwargs).items())]
    return f"model = timm.create_model({', '.join(args)})"


def parse_load_line(line: str) -> tuple[str, dict[str, Any]]:
    """Read a :func:`timm_load_line` back (source and keyword values) without evaluating code.

    Dotted names (``timm.layers.SwiGLUPacked``) are looked up as attributes of ``timm``/``torch``; literals are
    parsed with :func:`ast.literal_eval`. Used by the tests to load exactly what the model card prints.
    """
    expr = ast.parse(line.strip().split("=", 1)[1].strip(), mode="eval").body
    if not isinstance(expr, ast.Call) or ast.unparse(expr.func) != "timm.create_model":
        raise MultiteachError(f"not a timm.create_model call: {line!r}")
    source = ast.literal_eval(expr.args[0])
    kwargs: dict[str, Any] = {}
    for kw in expr.keywords:
        if isinstance(kw.value, (ast.Attribute, ast.Name)):
            parts = ast.unparse(kw.value).split(".")
            obj: Any = {"timm": timm, "torch": torch}[parts[0]]
            for part in parts[1:]:
                obj = getattr(obj, part)
            kwargs[kw.arg] = obj
        else:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
    return source, kwargs


# ------------------------------------------------------------------------------------------------ model card


def _used_teachers(recipe: Any) -> list[str]:
    """Teachers that active loss terms read (the ones the student learnt from)."""
    from multiteach.losses import active_teachers

    return [n for n in active_teachers(recipe.active_losses()) if n in recipe.teachers]


def _checkpoint_step(checkpoint: Path) -> int | None:
    """Optimiser steps completed at ``checkpoint`` (its ``state.json``)."""
    try:
        return int(json.loads((checkpoint / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def teacher_rows(recipe: Any) -> list[dict[str, Any]]:
    """One row per teacher an active term uses: recipe name, source and the catalog's licence facts.

    Licence facts come from :data:`multiteach.teachers.licences.LICENCES` through the catalog entry, the one
    source the README table and ``multiteach teachers`` use too. Sources not in the catalog (``hf-hub:``,
    ``local-dir:``, timm names, ...) get ``license=None``.
    """
    from multiteach.teachers.catalog import CATALOG
    from multiteach.teachers.licences import licence_terms

    rows = []
    for name in _used_teachers(recipe):
        source = recipe.teachers[name].source
        spec = CATALOG.get(source) if source in CATALOG else None
        terms = licence_terms(spec.license) if spec else None
        rows.append(
            {
                "name": name,
                "source": source,
                "in_catalog": spec is not None,
                "license": spec.license if spec else None,
                "licence_known": terms is not None,
                "hf_license": terms.hf_license if terms else None,
                "restriction": terms.reason if terms else "",
                "licence_note": terms.note if terms else "",
                "gated": bool(spec and spec.gated),
                "noncommercial_derivatives": bool(spec and spec.noncommercial_derivatives),
                "hub_id": spec.hub_id if spec else None,
                "url": spec.url if spec else None,
                "local_weights": recipe.teachers[name].weights,
            }
        )
    return rows


def card_license(rows: list[dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """The card's ``license`` front matter and the licence paragraph, from the teachers' licences.

    Every teacher whose licence restricts students (``noncommercial_derivatives``, derived from the licence:
    any non-commercial or no-derivatives licence, or terms barring commercial use of models trained on its
    outputs) is named with its licence and the reason, and makes the student non-commercial:
    ``cc-by-nc-nd-4.0`` when those teachers are all CC-BY-NC-ND-4.0, else ``other``. Teachers whose licences
    are all Apache-2.0 give ``apache-2.0``; anything else is ``other`` with the reason.

    Returns:
        ``(front matter fields, markdown lines)``.
    """
    nc = [r for r in rows if r["noncommercial_derivatives"]]
    unknown = [r for r in rows if not r["in_catalog"] or not r.get("licence_known", r["in_catalog"])]
    lines: list[str] = []
    if nc:
        names = "; ".join(f"{r['name']} ({r['license']}: {r.get('restriction') or 'non-commercial terms'})" for r in nc)
        lines.append(
            "> **Non-commercial use only.** This student was trained on the outputs of teachers whose terms restrict "
            f"models derived from them: {names}. The student inherits that restriction: it may not be used "
            "commercially."
        )
        if all(r.get("hf_license") == NC_LICENSE for r in nc):
            front = {"license": NC_LICENSE}
        else:
            front = {"license": "other", "license_name": "noncommercial-derivative"}
            lines.append(
                "> Licence `other`: the teachers' non-commercial terms differ from CC-BY-NC-ND-4.0; "
                "the most restrictive of them applies."
            )
    elif rows and not unknown and all(r.get("hf_license") == "apache-2.0" for r in rows):
        front = {"license": "apache-2.0"}
        lines.append("All teachers are Apache-2.0; check their model cards for additional terms.")
    else:
        front = {"license": "other", "license_name": "check-teacher-licences"}
        reason = (
            "no teacher licence is known"
            if not rows
            else "the teachers' licences are not all Apache-2.0 or are not in the catalog"
        )
        lines.append(f"Licence `other`: {reason}; set it yourself after checking the teachers' terms.")
    if unknown:
        lines.append(
            "> Teacher(s) whose licence multiteach does not know: "
            + ", ".join(f"`{r['source']}`" for r in unknown)
            + ". Check their licences before using or sharing this model."
        )
    noted = [r for r in rows if r.get("licence_note")]
    if noted:
        lines.append("Terms to respect: " + "; ".join(f"{r['name']}: {r['licence_note']}" for r in noted) + ".")
    gated = [r for r in rows if r["gated"]]
    if gated:
        lines.append(
            "Gated teacher(s): "
            + ", ".join(r["name"] for r in gated)
            + " (their weights require accepting terms on the Hugging Face Hub; respect them)."
        )
    return front, lines


def _num(value: Any) -> str:
    """A table cell: floats with 4 significant digits, the rest as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: Mapping[str, Mapping[str, Any]], first: str = "model") -> list[str]:
    """A markdown table: one row per key of ``rows``, one column per metric seen in any row."""
    columns: list[str] = []
    for metrics in rows.values():
        for key in metrics:
            if key not in columns:
                columns.append(key)
    out = ["| " + " | ".join([first, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, metrics in rows.items():
        out.append("| " + " | ".join([str(name), *(_num(metrics.get(c)) for c in columns)]) + " |")
    return out


def _loss_line(recipe: Any) -> str:
    """``Loss = 1*uni.cls + 0.5*uni.patch + ...`` from the recipe's active terms (as ``str(CompositeLoss)``)."""
    terms = [f"{float(cfg.get('weight', 1.0)):g}*{name}" for name, cfg in recipe.active_losses().items()]
    return "Loss = " + " + ".join(terms)


def _expert_head_lines(recipe: Any, run_dir: Path) -> list[str]:
    """Lines saying which DINO/iBOT expert heads were fitted on teacher features instead of loaded."""
    fitted = [
        (name, cfg["target"])
        for name, cfg in recipe.active_losses().items()
        if cfg.get("target") not in (None, "ema") and not cfg.get("target_heads")
    ]
    logged = False
    log_file = run_dir / "train.log"
    if log_file.is_file():
        with contextlib.suppress(OSError):
            logged = "fitting expert head" in log_file.read_text(errors="replace")
    if not fitted and not logged:
        return []
    lines = ["## Expert heads", ""]
    for name, target in fitted:
        lines.append(
            f"- `{name}`: the DINO/iBOT heads of the expert teacher `{target}` are not public; they were **fitted** "
            "on frozen teacher features rather than loaded, so targets differ from the original training's."
        )
    if logged and not fitted:
        lines.append("- `train.log` records expert heads fitted on frozen teacher features rather than loaded.")
    return [*lines, ""]


def _data_lines(run_dir: Path, recipe: Any) -> list[str]:
    """Tile count from ``run_dir/data.json`` (written by ``multiteach train``); sources as folder names only."""
    path = run_dir / "data.json"
    lines = ["## Data", ""]
    info: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
    train = _force_paths(recipe.data.train)
    sources = ", ".join(f"`{t}`" for t in ([train] if isinstance(train, str) else train or [])) or "`?`"
    if info:
        skipped = len(info.get("skipped", []))
        lines.append(f"- {info.get('tiles', '?')} tiles from {sources}")
        if skipped:
            lines.append(f"- {skipped} unreadable image(s) skipped")
    else:
        lines.append(f"- training data: {sources} (no data.json in the run directory)")
    d = recipe.data
    lines.append(
        f"- views: {d.global_crops.n} global crops of {d.global_crops.size} px, "
        f"{d.local_crops.n} local crops of {d.local_crops.size} px"
        + (", iBOT masking" if d.masking is not None else "")
    )
    return [*lines, ""]


def _card_name(name: str) -> str:
    """A model name for a card table: a local path as ``<local>/NAME`` in backticks (bare, Markdown would take
    ``<local>`` for an HTML tag and hide it)."""
    redacted = redact_local_path(name)
    return f"`{redacted}`" if redacted != name else name


def model_card(
    run: RunStudent,
    run_dir: str | Path,
    repo_id: str = PLACEHOLDER_REPO,
    evaluation: Mapping[str, Mapping[str, Any]] | None = None,
    speed: Mapping[str, Any] | None = None,
    keep_paths: bool = False,
) -> str:
    """The ``README.md`` of an export: HF front matter, licence, loading line, recipe, teachers, data, tables.

    Local paths (data folders, ``local-dir:`` teachers, model names that are paths) appear as ``<local>/`` + their
    last part, whatever ``keep_paths`` says; ``keep_paths`` only changes what the card says about ``recipe.yaml``.

    Args:
        run: The restored run (:func:`multiteach.runs.load_run_student`).
        run_dir: Its run directory (for ``data.json`` and ``train.log``).
        repo_id: Hub id used in the loading line.
        evaluation: Model -> metric -> value, or None.
        speed: A :func:`speed_card` result (or model -> metric -> value), or None.
        keep_paths: Whether the export's ``recipe.yaml`` kept the local paths.
    """
    run_dir = Path(run_dir)
    student, recipe = run.student, run.recipe
    rows = [redact_local_paths(r) for r in teacher_rows(recipe)]
    if evaluation:
        evaluation = {_card_name(str(name)): metrics for name, metrics in evaluation.items()}
    front, licence_lines = card_license(rows)
    front = {"library_name": "timm", **front, "tags": CARD_TAGS, "pipeline_tag": "image-feature-extraction"}
    params = sum(p.numel() for p in student.model.parameters())
    layer_kwargs = {k: v for k, v in student.model_kwargs.items() if k in LAYER_NAMES}
    size, mean, std = recipe.student.img_size, list(recipe.student.mean), list(recipe.student.std)
    step = _checkpoint_step(run.checkpoint)
    teachers = ", ".join(f"`{r['name']}`" for r in rows) or "no external teacher (self-distillation)"
    title = f"# {recipe.name}"
    if step is not None and step < recipe.schedule.steps:
        title += f" (incomplete: {step} of {recipe.schedule.steps} steps)"
    out = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", title, ""]
    out += [
        f"A `{student.arch}` vision transformer ({params / 1e6:.2f}M parameters, {student.embed_dim}-d tokens, "
        f"patch {student.patch_size}, {student.num_registers} register token(s)) distilled from {teachers} with "
        f"[multiteach](https://github.com/multiteach/multiteach). It is a feature extractor for H&E pathology "
        "tiles: the CLS token is the tile embedding, the patch tokens are spatial features.",
        "",
        "## Licence",
        "",
        *[part for line in licence_lines for part in (line, "")],
        "## Load it with timm",
        "",
        "```python",
        "import timm",
        "import torch",
        "",
        timm_load_line(f"hf-hub:{repo_id}", layer_kwargs),
        "model.eval()",
        "```",
        "",
    ]
    if layer_kwargs:
        out += [
            "The layer arguments (" + ", ".join(f"`{k}`" for k in layer_kwargs) + ") are not stored in `config.json` "
            "(they are classes, not JSON), as in the public SwiGLU models (Virchow, H0-mini): pass them as shown.",
            "",
        ]
    out += [
        "`model(x)` returns the CLS embedding (B, D); `model.forward_features(x)` returns all tokens "
        f"(B, {student.num_prefix_tokens} + h*w, D): CLS, then {student.num_registers} register(s), then the patch "
        "tokens.",
        "",
        "## Preprocessing",
        "",
        f"- RGB tiles resized to {size}x{size} px (bicubic), scaled to [0, 1], normalised with",
        f"  mean {mean} and std {std}; other multiples of {student.patch_size} px work too (dynamic image size).",
        "- `timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))` builds this transform.",
        "",
        "## Training",
        "",
        f"- student: `{student.arch}` ({params / 1e6:.2f}M params), kwargs `{json.dumps(student.model_kwargs)}`"
        + (", initialised from timm's pretrained weights" if recipe.student.pretrained else ", random init"),
        f"- steps: {recipe.schedule.steps} planned"
        + (f", {step} completed at the exported checkpoint" if step is not None else ""),
        f"- batch: {recipe.optim.batch_size} images per step; lr {recipe.optim.lr:g}; "
        f"precision {recipe.train.precision}",
        f"- loss: `{_loss_line(recipe)}`",
        f"- exported weights: {'EMA' if run.weights == 'ema' else 'live (non-EMA)'} student",
        "- the full resolved recipe is `recipe.yaml`; "
        + (
            "it keeps the local paths of the training machine (exported with `--keep-paths`)"
            if keep_paths
            else f"its local paths (data, teacher weights, output folder) read `{LOCAL_PLACEHOLDER}/` + the file or "
            "folder name: point them at your own copies to train it again (`multiteach export --keep-paths` keeps them)"
        ),
        "",
        "## Teachers",
        "",
    ]
    if rows:
        out += ["| teacher | source | licence | gated | non-commercial derivatives |", "|---|---|---|---|---|"]
        for r in rows:
            lic = r["license"] if r["in_catalog"] else "not in the catalog — check its licence"
            src = f"[{r['source']}]({r['url']})" if r["url"] else f"`{r['source']}`"
            nc = "yes" if r["noncommercial_derivatives"] else ("no" if r["in_catalog"] else "unknown")
            out.append(f"| {r['name']} | {src} | {lic} | {'yes' if r['gated'] else 'no'} | {nc} |")
        local = [r["name"] for r in rows if r.get("local_weights")]
        if local:
            out += [
                "",
                f"Weights of {', '.join(local)} were loaded from local files (`weights:` in the recipe), not "
                "from the Hub; check `recipe.yaml` for what they were (the CPU demo uses tiny random stand-ins).",
            ]
    else:
        out.append("No external teacher: the student learnt from its own EMA copy only.")
    out.append("")
    out += _expert_head_lines(recipe, run_dir)
    out += _data_lines(run_dir, recipe)
    if evaluation:
        out += ["## Evaluation", "", *_table(evaluation), ""]
    if speed:
        out += _speed_lines(speed)
    out += [
        "## Files",
        "",
        "- `model.safetensors`, `config.json`: the timm backbone",
        "- `heads.safetensors`: projection / DINO / iBOT heads and loss state (`loss.*`) and the mask token, "
        "for further distillation (multiteach: `multiteach.export.load_heads`)",
        "- `recipe.yaml`: the resolved training recipe",
        "",
    ]
    return "\n".join(out)


def _speed_lines(speed: Mapping[str, Any]) -> list[str]:
    """The speed/size section from a :func:`speed_card` result (or a plain model -> metric mapping)."""
    models = speed.get("models", speed)
    rows = {
        name: {
            "params (M)": m.get("params", 0) / 1e6 if "params" in m else None,
            "GFLOPs/img": m.get("gflops"),
            "img/s": m.get("img_per_s"),
            "peak memory (MB)": m.get("peak_mem_mb"),
        }
        for name, m in models.items()
        if isinstance(m, Mapping)
    }
    lines = ["## Speed and size", "", *_table(rows), ""]
    if "device" in speed:
        lines += [
            f"Measured on {speed['device']}, {speed.get('dtype')}, batch {speed.get('batch')} at "
            f"{speed.get('size')} px; memory: {speed.get('memory')}; teachers may be random-init architectures "
            "of the real size.",
            "",
        ]
    return lines


# ------------------------------------------------------------------------------------------------ speed


def _materialise(spec: Any, device: torch.device) -> nn.Module:
    """A module to time from a module, a catalog/timm name, or ``(timm arch, kwargs)``."""
    from multiteach.students import Student
    from multiteach.teachers import Teacher, build_teacher
    from multiteach.teachers.timm_vit import create_timm

    if isinstance(spec, Teacher):
        return spec.backbone.to(device).eval()
    if isinstance(spec, Student):
        return spec.model.to(device).eval()
    if isinstance(spec, nn.Module):
        return spec.to(device).eval()
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        arch, kwargs = spec
        return create_timm(str(arch), dict(kwargs), device=device).eval()
    if isinstance(spec, str):
        return build_teacher(spec, pretrained=False, dtype="float32", device=device).backbone.eval()
    raise MultiteachError(f"speed_card: cannot build a model from {spec!r}; pass a module, a name or (arch, kwargs)")


class _RssPeak:
    """Peak resident-set growth of this process while the context is open (sampled every millisecond)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> _RssPeak:
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def growth(self) -> int:
        """Bytes of RSS growth above the level at entry."""
        return self.peak - self.base


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    if dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(device.type, dtype=dtype):
            yield
    else:
        yield


def _measure(model: nn.Module, device: torch.device, size: int, batch: int, dtype: torch.dtype, repeats: int) -> dict:
    """Params, GFLOPs per image, img/s and peak memory of one model."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        one = torch.randn(1, 3, size, size, device=device)
        counter = FlopCounterMode(display=False)
        with counter, _autocast(device, dtype):
            model(one)
        flops = counter.get_total_flops()
        x = torch.randn(batch, 3, size, size, device=device)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        rss = _RssPeak() if not cuda else contextlib.nullcontext()
        with _autocast(device, dtype), rss:
            model(x)  # warm-up, inside the memory window: later forwards reuse its allocations
            if cuda:
                torch.cuda.synchronize(device)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                if cuda:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else rss.growth
    return {
        "params": int(params),
        "gflops": flops / 1e9,
        "img_per_s": batch / statistics.median(times),
        "peak_mem_mb": peak / 2**20,
    }


def speed_card(
    model_or_arch: Any,
    teachers: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    size: int = 224,
    batch: int = 8,
    dtype: torch.dtype | str = torch.bfloat16,
    repeats: int = 3,
) -> dict[str, Any]:
    """Size and speed of a student next to its teachers, for the model card.

    Args:
        model_or_arch: The student: a module (a :class:`~multiteach.students.Student` counts its timm model),
            an export folder / ``local-dir:`` / ``hf-hub:`` source, a timm name, or ``(timm arch, kwargs)``.
        teachers: Name -> module, catalog key (random-init architecture of the real size, no weights needed),
            timm name, or ``(timm arch, kwargs)`` with layer names allowed (``mlp_layer: swiglu_packed``).
        device: Where to run.
        size: Square input size in pixels.
        batch: Images per timed forward (keep it small on CPU).
        dtype: ``torch.bfloat16``/``float16`` (autocast) or ``float32``.
        repeats: Timed forwards after one warm-up; img/s uses their median.

    Returns:
        ``{"device", "dtype", "size", "batch", "memory", "flops", "models": {name: {"params", "gflops",
        "img_per_s", "peak_mem_mb"}}}`` with the student under ``"student"``. GFLOPs are per image at ``size``
        counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add). ``memory`` says how
        peak memory was measured: CUDA ``max_memory_allocated`` (weights included) on GPU, peak RSS growth of the
        process during the warm-up and timed forwards on CPU (approximate: activations only, the weights were already
        resident and the allocator may reuse freed memory).
    """
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    if isinstance(model_or_arch, (str, Path)) and (
        Path(str(model_or_arch).removeprefix("local-dir:")).is_dir() or str(model_or_arch).startswith("hf-hub:")
    ):
        student = load_export(model_or_arch).to(device)
    elif isinstance(model_or_arch, str) and timm.is_model(model_or_arch):
        student = _materialise((model_or_arch, {}), device)
    else:
        student = _materialise(model_or_arch, device)
    models = {"student": _measure(student, device, size, batch, dtype, repeats)}
    for name, spec in (teachers or {}).items():
        module = _materialise(spec, device)
        models[name] = _measure(module, device, size, batch, dtype, repeats)
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    memory = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_growth"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "batch": batch,
        "memory": memory,
        "flops": "FlopCounterMode, 2 per multiply-add, per image",
        "models": models,
    }


def recipe_teacher_specs(recipe: Any) -> dict[str, Any]:
    """Teachers of a recipe as :func:`speed_card` specs: catalog keys (with the recipe's kwargs) or timm names.

    Generic sources whose architecture is only known from a downloaded config are left out.
    """
    from multiteach.teachers import CATALOG

    out: dict[str, Any] = {}
    for name in _used_teachers(recipe):
        cfg = recipe.teachers[name]
        if cfg.source in CATALOG:
            spec = CATALOG.get(cfg.source)
            if spec.loader == "timm" and cfg.model_kwargs:
                out[name] = (spec.arch, {**spec.model_kwargs, **cfg.model_kwargs})
            else:
                out[name] = cfg.source
        elif timm.is_model(cfg.source):
            out[name] = (cfg.source, dict(cfg.model_kwargs))
        else:
            log.warning("speed: teacher %r (%s) skipped: its architecture needs its config", name, cfg.source)
    return out


def run_speed(
    run_dir: str | Path,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    size: int = 224,
    batch: int | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """:func:`speed_card` of a run's student next to random-init copies of its teachers' real architectures.

    Args:
        run_dir: A run directory.
        use_ema: Measure the EMA student (same architecture either way).
        device: Where to run; CUDA when available, else CPU.
        size: Input size (224 gives the usual GFLOPs figures).
        batch: Images per forward; 32 on CUDA, 2 on CPU when None.
        progress: Called with a one-line message before measuring (e.g. ``print``), or None.
    """
    run = load_run_student(run_dir, use_ema=use_ema)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch or (32 if device.type == "cuda" else 2)
    if progress is not None:
        progress(f"measuring speed on {device} (batch {batch}, {size} px) ...")
    return speed_card(run.student, recipe_teacher_specs(run.recipe), device=device, size=size, batch=batch)


# ------------------------------------------------------------------------------------------------ hub


def export_files(export_dir: str | Path) -> list[tuple[str, int]]:
    """``(relative path, bytes)`` of every file an upload of ``export_dir`` sends, sorted.

    Raises:
        MultiteachError: when ``export_dir`` is not an export (``config.json`` or ``model.safetensors`` missing).
    """
    root = Path(export_dir)
    missing = [n for n in ("config.json", "model.safetensors") if not (root / n).is_file()]
    if missing:
        raise MultiteachError(f"{root} is not a multiteach export (missing {', '.join(missing)}); run export first")
    files = [
        (p.relative_to(root).as_posix(), p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files)


def check_repo_id(repo_id: str) -> None:
    """Raise unless ``repo_id`` looks like ``ORG/NAME``."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")) or " " in repo_id:
        raise MultiteachError(f"Hub repo id must look like ORG/NAME, got {repo_id!r}")


def push_to_hub(
    export_dir: str | Path,
    repo_id: str,
    private: bool = True,
    dry_run: bool = False,
    token: str | None = None,
    api: Any = None,
) -> dict[str, Any]:
    """Upload an export folder to a Hugging Face model repo (created if missing, private by default).

    Args:
        export_dir: A folder written by :func:`export_run`.
        repo_id: ``ORG/NAME``.
        private: Create the repo private (an existing repo keeps its visibility).
        dry_run: Only list what would be uploaded; nothing is contacted.
        token: A Hub token; when None huggingface_hub looks in its usual places (``HF_TOKEN``, ``hf auth
            login``). It is never printed, logged, returned or written.
        api: An ``HfApi``-like object (tests); built from ``token`` when None.

    Returns:
        ``{"repo_id", "private", "repo_type", "dry_run", "files": [(path, bytes), ...]}`` plus ``"commit_url"``
        after a real upload.
    """
    check_repo_id(repo_id)
    files = export_files(export_dir)
    result: dict[str, Any] = {
        "repo_id": repo_id,
        "private": bool(private),
        "repo_type": "model",
        "dry_run": bool(dry_run),
        "files": files,
    }
    if dry_run:
        return result
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(export_dir),
        repo_type="model",
        allow_patterns=[path for path, _ in files],
        commit_message="Upload multiteach export",
    )
    url = getattr(info, "commit_url", None)
    if url:
        result["commit_url"] = str(url)
    log.info("uploaded %d file(s) to %s", len(files), repo_id)
    return result


def format_files(files: list[tuple[str, int]]) -> str:
    """Aligned ``bytes  path`` lines (the CLI's dry-run listing)."""
    return "\n".join(f"{size:>14,d}  {path}" for path, size in files)
