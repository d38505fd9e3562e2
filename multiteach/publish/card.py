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
import re
from collections.abc import Mapping
from importlib import metadata
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
from multiteach.students import spread_blocks
from multiteach.teachers.catalog import CATALOG
from multiteach.teachers.licences import licence_terms
from multiteach.teachers.loaded import describe_teacher, read_teacher_record, teacher_depth
from multiteach.teachers.shipped import is_shipped, shipped_dir

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


def teacher_rows(
    recipe: Any,
    loaded: Mapping[str, Mapping[str, Any]] | None = None,
    licence_notes: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per teacher an active term uses: recipe name, source and the catalog's licence facts.

    Licence facts come from :data:`multiteach.teachers.licences.LICENCES` through the catalog entry, the one
    source the README table and ``multiteach teachers`` use too. Sources not in the catalog (``hf-hub:``,
    ``local-dir:``, timm names, ...) get ``license=None``, and so does a catalog name whose weights were not the
    catalog model's (``loaded``): no catalog licence, Hub page or gating is claimed for them.

    Args:
        recipe: The run's recipe.
        loaded: Teacher name -> :func:`~multiteach.teachers.loaded.describe_teacher` result (what was really
            loaded); None takes every catalog name for its catalog model.
        licence_notes: Teacher name -> the licence the exporter states for it (``--licence-note``).
    """
    rows = []
    for name in used_teachers(recipe):
        source = recipe.teachers[name].source
        info = (loaded or {}).get(name)
        catalog_model = source in CATALOG and (info is None or bool(info.get("catalog_model")))
        spec = CATALOG.get(source) if catalog_model else None
        terms = licence_terms(spec.license) if spec else None
        rows.append(
            {
                "name": name,
                "source": source,
                "in_catalog": spec is not None,
                "catalog_name": source in CATALOG,
                "loaded": dict(info) if info else None,
                "user_licence": (licence_notes or {}).get(name, ""),
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
    stated = [r for r in unknown if r.get("user_licence")]
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
    elif unknown and len(stated) == len(unknown):
        front = {"license": "other", "license_name": "stated-in-model-card"}
        lines.append("Licence `other`: the teachers' terms are stated below; read them before using this model.")
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
            + ", ".join(_unknown_name(r) for r in unknown)
            + ". Check their licences before using or sharing this model"
            + ("." if stated else " (`multiteach export --licence-note NAME=TEXT` states one in this card).")
        )
    for r in stated:
        lines.append(f"Licence of teacher `{r['name']}` as stated by the exporter: {r['user_licence']}")
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


def _unknown_name(row: Mapping[str, Any]) -> str:
    """A teacher whose licence is unknown, as the licence paragraph names it (never as the catalog model)."""
    if row.get("catalog_name") and not row["in_catalog"]:
        return f"`{row['name']}` (not the catalog's `{row['source']}` weights: see Teachers)"
    return f"`{row['source']}`"


def toolkit_version() -> str:
    """The installed ``multiteach`` package's version (``multiteach.__version__`` when not installed)."""
    try:
        return metadata.version("multiteach")
    except metadata.PackageNotFoundError:
        import multiteach

        return multiteach.__version__


def loaded_teachers(recipe: Any, run_dir: Path) -> dict[str, dict[str, Any]]:
    """What each teacher an active term uses really loaded: the run's ``teachers.json`` (written at training
    time), or for teachers it does not describe (older runs, cached runs, another recipe) a description made now.
    """
    record = read_teacher_record(run_dir)
    out: dict[str, dict[str, Any]] = {}
    for name in used_teachers(recipe):
        cfg = recipe.teachers[name]
        info = record.get(name)
        if info is None or info.get("source") != cfg.source:
            try:
                info = describe_teacher(name, cfg)
            except MultiteachError as exc:
                info = {"name": name, "source": cfg.source, "catalog_model": False, "why": f"not checked: {exc}"}
        out[name] = dict(info)
    return out


def teacher_card_files(rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Export file name -> model card of each teacher whose weights ship inside multiteach (``multiteach-tiny``):
    the export carries a copy, so the card's link to it works on the Hub too."""
    out = {}
    for r in rows:
        spec = CATALOG.get(r["source"]) if r["in_catalog"] else None
        if spec is not None and is_shipped(spec.weights) and (r["loaded"] is None or r["loaded"].get("shipped")):
            card = shipped_dir(r["source"]) / "README.md"
            if card.is_file():
                out[f"teacher-card-{r['source']}.md"] = card
    return out


_PATH_IN_TEXT = re.compile(r"(?<![^\s'\"`(:=])(?:[A-Za-z]:\\|/(?!/)|~)[^\s'\"`,;()]+")


def _redact_text(text: str) -> str:
    """``text`` with every absolute path in it as ``<local>/`` + its last part."""
    return _PATH_IN_TEXT.sub(lambda m: redact_local_path(m.group(0)), text)


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
    licence_notes: Mapping[str, str] | None = None,
    loaded: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The ``README.md`` of an export: HF front matter, licence, loading line, recipe, teachers, data, tables.

    Each teacher is credited for what it really loaded (:func:`loaded_teachers`): a catalog name whose weights
    were another model is described as that model (architecture, file name, SHA-256), with no catalog licence,
    Hub page or gating claimed for it. Links go only where a reader of the pushed model can follow them: the
    teachers' own pages, or the copy of a shipped teacher's card beside the export (:func:`teacher_card_files`).

    Local paths (data folders, ``local-dir:`` teachers, model names that are paths) appear as ``<local>/`` + their
    last part, whatever ``keep_paths`` says; ``keep_paths`` only changes what the card says about ``recipe.yaml``.

    Args:
        run: The restored run (:func:`multiteach.runs.load_run_student`).
        run_dir: Its run directory (for ``data.json`` and ``train.log``).
        repo_id: Hub id used in the loading line.
        evaluation: Model -> metric -> value, or None.
        speed: A :func:`~multiteach.publish.speed.speed_card` result (or model -> metric -> value), or None.
        keep_paths: Whether the export's ``recipe.yaml`` kept the local paths.
        licence_notes: Teacher name -> the licence the exporter states for it (``--licence-note``), shown for
            teachers whose licence multiteach does not know.
        loaded: :func:`loaded_teachers` of the run, when the caller has it already.
    """
    run_dir = Path(run_dir)
    student, recipe = run.student, run.recipe
    loaded = loaded if loaded is not None else loaded_teachers(recipe, run_dir)
    rows = [redact_local_paths(r) for r in teacher_rows(recipe, loaded, licence_notes)]
    if evaluation:
        evaluation = {_card_name(str(name)): metrics for name, metrics in evaluation.items()}
    front, licence_lines = card_license(rows)
    front = {"library_name": "timm", **front, "tags": CARD_TAGS, "pipeline_tag": "image-feature-extraction"}
    params = sum(p.numel() for p in student.model.parameters())
    layer_kwargs = {k: v for k, v in student.model_kwargs.items() if k in LAYER_NAMES}
    size, mean, std = recipe.student.img_size, list(recipe.student.mean), list(recipe.student.std)
    step = checkpoint_step(run.checkpoint)
    teachers = (
        ", ".join(f"`{r['name']}`" + ("" if r["in_catalog"] else " (see Teachers)") for r in rows)
        or "no external teacher (self-distillation)"
    )
    title = f"# {recipe.name}"
    if step is not None and step < recipe.schedule.steps:
        title += f" (incomplete: {step} of {recipe.schedule.steps} steps)"
    out = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", title, ""]
    out += [
        f"A `{student.arch}` {_student_phrases(student, params)['kind']} distilled from {teachers} with "
        f"the `multiteach` Python package, version {toolkit_version()} (Apache-2.0). It is a feature extractor for "
        f"H&E pathology tiles: {_student_phrases(student, params)['roles']}.",
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
        _student_phrases(student, params)["outputs"],
        "",
        "## Preprocessing",
        "",
        f"- RGB tiles resized to {size}x{size} px (bicubic), scaled to [0, 1], normalised with",
        f"  mean {mean} and std {std}; {_student_phrases(student, params)['sizes']}.",
        "- `timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))` builds this transform.",
        "",
        "## Training",
        "",
        f"- student: `{student.arch}` ({params / 1e6:.2f}M params), kwargs `{json.dumps(student.model_kwargs)}`, "
        + student_init_text(recipe, len(getattr(student.model, "blocks", ()))),
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
        out += _teacher_table(rows)
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


def student_init_text(recipe: Any, n_blocks: int) -> str:
    """How the student's weights started: a random init, timm's pretrained weights, or a teacher's blocks
    (``student.init_from``: the blocks the recipe lists, else those :func:`~multiteach.students.spread_blocks`
    picks over the teacher's depth, as training did).

    Args:
        recipe: The run's recipe.
        n_blocks: The student's number of blocks.
    """
    s = recipe.student
    if s.init_from is None:
        return f"initialised from timm's pretrained `{s.arch}` weights" if s.pretrained else "random init"
    depth = None if s.init_blocks else teacher_depth(recipe.teachers[s.init_from])
    if s.init_blocks:
        blocks = f"blocks {list(s.init_blocks)}"
    elif depth:
        blocks = f"blocks {spread_blocks(depth, n_blocks)} of its {depth}"
    else:
        blocks = f"{n_blocks} of its blocks spread evenly over its depth"
    return (
        f"initialised from teacher `{s.init_from}` (`student.init_from`): its patch embedding, class/register "
        f"tokens, positional embedding, final norm and {blocks}, one per student block"
    )


def _teacher_table(rows: list[dict[str, Any]]) -> list[str]:
    """The Teachers section: one table row per teacher, then what was loaded for every teacher whose weights
    were not its catalog model's (never crediting the catalog model, its page or its licence)."""
    cards = {path.parent.name: name for name, path in teacher_card_files(rows).items()}
    out = ["| teacher | source | licence | gated | non-commercial derivatives |", "|---|---|---|---|---|"]
    for r in rows:
        link = cards.get(r["source"]) or (r["url"] if str(r["url"]).startswith("https://") else None)
        if not r["in_catalog"]:
            src = "other weights (below)" if r["catalog_name"] else f"`{r['source']}`"
            lic = "stated below" if r["user_licence"] else "unknown — yours to state (below)"
            out.append(f"| {r['name']} | {src} | {lic} | — | unknown |")
            continue
        src = f"[{r['source']}]({link})" if link else f"`{r['source']}`"
        nc = "yes" if r["noncommercial_derivatives"] else "no"
        out.append(f"| {r['name']} | {src} | {r['license']} | {'yes' if r['gated'] else 'no'} | {nc} |")
    other = [r for r in rows if not r["in_catalog"]]
    if other:
        out += ["", "What was loaded for the teachers whose weights are not a catalog model's:", ""]
        out += [_loaded_line(r) for r in other]
    local = [r["name"] for r in rows if r["in_catalog"] and r.get("local_weights") and not cards.get(r["source"])]
    if local:
        out += [
            "",
            f"Weights of {', '.join(local)} were loaded from a local copy (`weights:` in the recipe) that the weights "
            "doctor found to be the catalog model's architecture.",
        ]
    for source, file in cards.items():
        out += ["", f"`{source}` ships inside multiteach; a copy of its model card is beside this one: `{file}`."]
    return out


def _loaded_line(row: Mapping[str, Any]) -> str:
    """One teacher whose weights are not its catalog model's: why, what was loaded, and whose licence it is."""
    info = row.get("loaded") or {}
    what = [f"architecture `{_redact_text(info['architecture'])}` (its own config)"] if info.get("architecture") else []
    if info.get("file"):
        what.append(f"weights file `{info['file']}`, sha256 `{info.get('sha256')}`")
    why = _redact_text(info.get("why") or "not a catalog teacher")
    head = f"not the catalog's `{row['source']}`: {why}" if row["catalog_name"] else why
    loaded = f" Loaded: {'; '.join(what)}." if what else ""
    if row.get("user_licence"):
        licence = f" Licence, as stated by the exporter: {row['user_licence']}"
    else:
        licence = (
            " Its licence is not known to multiteach and is yours to state "
            f"(`multiteach export --licence-note {row['name']}=TEXT`)."
        )
    return f"- `{row['name']}`: {head}.{loaded}{licence}"


def _student_phrases(student: Any, params: int) -> dict[str, str]:
    """How the card words a student: ``kind`` (architecture in brackets), ``roles`` (which output is the tile
    embedding), ``outputs`` (what timm's calls return), ``sizes`` (other input sizes), for a ViT or a feature map."""
    if student.is_vit:
        return {
            "kind": f"vision transformer ({params / 1e6:.2f}M parameters, {student.embed_dim}-d tokens, patch "
            f"{student.patch_size}, {student.num_registers} register token(s))",
            "roles": "the CLS token is the tile embedding, the patch tokens are spatial features",
            "outputs": "`model(x)` returns the CLS embedding (B, D); `model.forward_features(x)` returns all tokens "
            f"(B, {student.num_prefix_tokens} + h*w, D): CLS, then {student.num_registers} register(s), then the patch "
            "tokens.",
            "sizes": f"other multiples of {student.patch_size} px work too (dynamic image size)",
        }
    d = student.embed_dim
    layout = f"(B, h, w, {d})" if student.nhwc else f"(B, {d}, h, w)"
    return {
        "kind": f"{student.family} ({params / 1e6:.2f}M parameters, a {student.embed_dim}-channel feature map at "
        f"stride {student.patch_size}, {student.summary_dim}-d pooled embedding)",
        "roles": "the pooled feature is the tile embedding, the final feature map gives spatial features",
        "outputs": f"`model(x)` returns the pooled embedding (B, {student.summary_dim}); `model.forward_features(x)` "
        f"returns the final feature map {layout} (read row-major as h*w patch tokens in distillation).",
        "sizes": f"other sizes work too (a convolutional feature map; about one cell per {student.patch_size} px)",
    }


def _speed_lines(speed: Mapping[str, Any]) -> list[str]:
    """The speed/size section from a :func:`~multiteach.publish.speed.speed_card` result (or a plain model -> metric
    mapping)."""
    models = speed.get("models", speed)
    rows = {
        name: {
            "params (M)": m.get("params", 0) / 1e6 if "params" in m else None,
            "GFLOPs/img": m.get("gflops"),
            **({"batch-1 ms/tile": m["latency_ms"]} if m.get("latency_ms") is not None else {}),
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
            f"{speed.get('size')} px (latency: {speed.get('latency') or 'not measured'}); memory: "
            f"{speed.get('memory')}; teachers may be random-init architectures of the real size.",
            "",
        ]
    return lines


# --------------------------------------------------------------------------- merged students (multiteach merge)
#: Sections of a parent's card that described the parent's own weights and do not hold for a merge.
PARENT_ONLY_SECTIONS = ("## Evaluation", "## Speed and size")


def merged_card(
    base: str,
    parents: list[Mapping[str, Any]],
    alpha: float,
    differences: list[str] | None = None,
    nearer: int = 0,
) -> str:
    """The card of a weight-space merge (``multiteach merge``): the nearer parent's card, retitled, with a "Merged
    parents" section naming both parents and alpha, and without the parent's evaluation and speed tables.

    Args:
        base: The nearer parent's ``README.md`` (empty for an export without one).
        parents: Per parent ``{source, recipe, weights, step, teachers}``, first then second.
        alpha: Weight of the second parent: ``(1 - alpha) * first + alpha * second``.
        differences: Recipe keys the parents differ in, ``"key: first vs second"``.
        nearer: Which parent ``base`` (and the export's ``recipe.yaml``) belongs to, 0 or 1.
    """
    first, second = parents
    title = f"# merge of {first['recipe']} and {second['recipe']} (alpha {alpha:g})"
    rows = "".join(
        f"| {label} `{p['source']}` | {weight:g} | {p['recipe']} | {p['weights']} | {p['step']} | "
        f"{', '.join(p['teachers']) or 'none'} |\n"
        for label, p, weight in (("first", first, 1 - alpha), ("second", second, alpha))
    )
    section = [
        "## Merged parents",
        "",
        f"These weights are a weight-space interpolation (WiSE-FT, Wortsman et al. 2022) of two students of one "
        f"architecture: `(1 - alpha) * first + alpha * second` with alpha = {alpha:g}, for the backbone and for the "
        "heads both parents have.",
        "",
        "| parent | share | recipe | weights | step | teachers |",
        "|---|---|---|---|---|---|",
        rows.rstrip("\n"),
        "",
        f"The sections below and `recipe.yaml` are those of the {('first', 'second')[nearer]} (nearer) parent; "
        "the parents' own evaluation and speed tables are left out, as they do not describe the merge.",
        "",
    ]
    if differences:
        section += ["The parents were trained from different recipes; they differ in:", ""]
        section += [f"- `{d}`" for d in differences] + [""]
    if sorted(first["teachers"]) != sorted(second["teachers"]):
        section += [
            "The parents had different teachers: the merged weights derive from both, so the terms of every "
            "teacher listed above apply, not only those in the Licence section.",
            "",
        ]
    lines = base.splitlines() if base else ["# merge"]
    at = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    if at is None:
        lines, at = [title, *lines], 0
    lines[at] = title
    kept, skipping = [], False
    for line in lines:
        if line.startswith("## "):
            skipping = line.strip() in PARENT_ONLY_SECTIONS
        if not skipping:
            kept.append(line)
    end = at + 1
    while end < len(kept) and not kept[end].startswith("## "):
        end += 1
    return "\n".join([*kept[:end], *section, *kept[end:]])
