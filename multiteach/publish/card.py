"""The model card (``README.md``) of an export: front matter, licence, loading line, recipe, teachers, data, tables."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from multiteach.layers import LAYER_NAMES
from multiteach.publish.load_line import timm_load_line
from multiteach.publish.provenance import (
    card_license,
    checkpoint_step,
    loaded_teachers,
    teacher_card_files,
    teacher_rows,
    toolkit_version,
)
from multiteach.publish.redact import (
    LOCAL_PLACEHOLDER,
    redact_local_path,
    redact_local_paths,
    redact_path_slot,
    redact_text,
)
from multiteach.runs import RunStudent
from multiteach.students import spread_blocks
from multiteach.teachers.loaded import teacher_depth

PLACEHOLDER_REPO = "ORG/NAME"
CARD_TAGS = ["pathology", "multiteach", "distillation"]


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
    what = [f"architecture `{redact_text(info['architecture'])}` (its own config)"] if info.get("architecture") else []
    if info.get("file"):
        what.append(f"weights file `{info['file']}`, sha256 `{info.get('sha256')}`")
    why = redact_text(info.get("why") or "not a catalog teacher")
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
