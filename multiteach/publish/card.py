"""The model card (``README.md``) of an export, and the licence the student inherits from its teachers.

:func:`model_card` writes the Hugging Face card: front matter (licence from :func:`card_license`), the one-line
``timm.create_model`` call that loads the export (:func:`timm_load_line`, read back by :func:`parse_load_line`),
preprocessing, training recipe, teachers (:func:`teacher_rows`), data, and optional evaluation and speed tables.
Local paths appear only as ``<local>/`` + their last part (:mod:`multiteach.publish.redact`).
"""

from __future__ import annotations

import ast
import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import yaml

from multiteach.errors import MultiteachError
from multiteach.layers import LAYER_NAMES, resolve_layer_kwargs
from multiteach.losses import active_teachers
from multiteach.publish.redact import LOCAL_PLACEHOLDER, redact_local_path, redact_local_paths, redact_path_slot
from multiteach.runs import RunStudent
from multiteach.teachers.catalog import CATALOG
from multiteach.teachers.licences import licence_terms

NC_LICENSE = "cc-by-nc-nd-4.0"
PLACEHOLDER_REPO = "ORG/NAME"
CARD_TAGS = ["pathology", "multiteach", "distillation"]


def used_teachers(recipe: Any) -> list[str]:
    """Teachers that active loss terms read (the ones the student learnt from)."""
    return [n for n in active_teachers(recipe.active_losses()) if n in recipe.teachers]


def checkpoint_step(checkpoint: Path) -> int | None:
    """Optimiser steps completed at ``checkpoint`` (its ``state.json``)."""
    try:
        return int(json.loads((checkpoint / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


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


def teacher_rows(recipe: Any) -> list[dict[str, Any]]:
    """One row per teacher an active term uses: recipe name, source and the catalog's licence facts.

    Licence facts come from :data:`multiteach.teachers.licences.LICENCES` through the catalog entry, the one
    source the README table and ``multiteach teachers`` use too. Sources not in the catalog (``hf-hub:``,
    ``local-dir:``, timm names, ...) get ``license=None``.
    """
    rows = []
    for name in used_teachers(recipe):
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
    train = redact_path_slot(recipe.data.train)
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
        speed: A :func:`~multiteach.publish.speed.speed_card` result (or model -> metric -> value), or None.
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
    step = checkpoint_step(run.checkpoint)
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
        "for further distillation (multiteach: `multiteach.publish.load_heads`)",
        "- `recipe.yaml`: the resolved training recipe",
        "",
    ]
    return "\n".join(out)


def _speed_lines(speed: Mapping[str, Any]) -> list[str]:
    """The speed/size section from a :func:`~multiteach.publish.speed.speed_card` result (or a plain model -> metric
    mapping)."""
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
