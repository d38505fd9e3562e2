"""End-to-end evaluation of one or more models on a labelled tile folder (``multiteach eval``).

For each model (a run directory, an exported student or a teacher; see
:func:`multiteach.eval.embed.resolve_model`), in turn:

1. embed every labelled image with the model's own preprocessing (its input size, mean and std);
2. classification with frozen embeddings: kNN (cosine, majority vote, ``k`` neighbours) and a
   linear probe (standardised logistic regression, C chosen by inner CV). A folder with ``train/``
   and ``test/`` sub-folders is scored on that split (slide-disjoint in
   ``shared/data/labeled/tcga_luad_lusc_uni``); any other labelled folder by stratified k-fold CV,
   group-aware when groups (slide or patient ids) are known;
3. robustness (optional): PLISM-style matched cosine and top-k retrieval between clean images and
   the fixed :func:`~multiteach.eval.perturbation_suite` copies (stain, JPEG, blur, scanner colour);
4. fidelity (run directories only): centred cosine and linear CKA of the projected student features
   to each teacher's (:func:`multiteach.eval.fidelity.teacher_fidelity`); a teacher whose output barely
   varies across images is reported, never scored as a perfect match.

``results.json`` (everything), ``results.md`` (tables) and, for more than one model,
``comparison.png`` (a panel per metric family, run directories and exports highlighted as students; see
:func:`~multiteach.eval.report.comparison_figure`) are written atomically to the output folder.

Unreadable images (truncated, not an image, empty) are found before any model is loaded, skipped like
``multiteach train`` skips them, and counted and listed in both files (``protocol.skipped``); with
``strict=True`` (``--strict``) they fail the evaluation instead, all listed in one error.

Groups: with ``groups="auto"`` a ``labels.csv`` in the data folder (columns ``file`` or ``path``,
relative to the folder, and one of :data:`GROUP_COLUMNS`, e.g. ``group`` = ``slide_507``) gives
each image its group when every image has one; otherwise the evaluation is not group-aware and
``results.json`` says so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multiteach.data.lists.images import find_images
from multiteach.errors import MultiteachError
from multiteach.eval.embed import embed_folder, load_images, model_kind, resolve_model
from multiteach.eval.fidelity import teacher_fidelity
from multiteach.eval.labelled import (
    classification_metrics,
    drop_images,
    load_labelled,
    unreadable_images,
)
from multiteach.eval.report import atomic_write_bytes, comparison_chart, to_json, to_markdown
from multiteach.eval.robustness import DEFAULT_KS, evaluate_perturbations, perturbation_ri, robustness_suite

log = logging.getLogger("multiteach.eval")

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CHART_PNG = "comparison.png"
#: Row column -> :func:`~multiteach.eval.fidelity.teacher_fidelity` key: centred measures, which a
#: constant teacher cannot pass (the raw cosine stays in ``results.json`` under ``fidelity``).
FIDELITY_COLUMNS = {"summary": "summary_centred_cosine", "patch": "patch_centred_cosine", "cka": "summary_cka"}
#: A teacher whose features spread less than this across the evaluation images is reported as dead.
DEAD_SPREAD = 1e-3
#: Model kinds that are students: highlighted in ``comparison.png``.
STUDENT_KINDS = ("run", "export")


# --------------------------------------------------------------------------- helpers
def _display_names(specs: Sequence[str], kinds: Sequence[str]) -> list[str]:
    """Short unique row names: folder names for folders, the spec for teachers; the full spec on a clash."""
    short = [Path(s).expanduser().resolve().name if k != "teacher" else s for s, k in zip(specs, kinds)]
    out = []
    for s, name in zip(specs, short):
        out.append(name if short.count(name) == 1 else s)
    if len(set(out)) != len(out):
        dupes = sorted({n for n in out if out.count(n) > 1})
        raise MultiteachError(f"model(s) given more than once: {', '.join(dupes)}")
    return out


def _weights_for(specs: Sequence[str], kinds: Sequence[str], weights: str | Mapping[str, str] | None) -> list:
    """Per-model ``weights=`` (teachers only) from one path or a {spec: path} mapping."""
    teachers = [s for s, k in zip(specs, kinds) if k == "teacher"]
    if weights is None:
        return [None] * len(specs)
    if isinstance(weights, (str, os.PathLike)):
        if len(teachers) != 1:
            raise MultiteachError(
                f"one weights path given but {len(teachers)} teacher model(s) ({', '.join(teachers) or 'none'}); "
                "name the model it belongs to: MODEL=PATH"
            )
        weights = {teachers[0]: str(weights)}
    bad = [m for m in weights if m not in teachers]
    if bad:
        raise MultiteachError(
            f"weights given for {', '.join(map(repr, bad))}, which is not one of the teacher models "
            f"({', '.join(teachers) or 'none'}); weights apply to teacher names only"
        )
    return [weights.get(s) if k == "teacher" else None for s, k in zip(specs, kinds)]


def _subset(paths: Sequence[Path], n: int, seed: int) -> list[Path]:
    """At most ``n`` of ``paths``, a seeded random choice kept in the original order."""
    if len(paths) <= n:
        return list(paths)
    idx = np.sort(np.random.default_rng(seed).choice(len(paths), size=n, replace=False))
    return [paths[i] for i in idx]


def _json_ready(obj: Any) -> Any:
    """Tuples -> {"mean", "std"}; numpy scalars -> Python; non-finite floats -> None."""
    if isinstance(obj, Mapping):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(v, (int, float)) for v in obj):
        return {"mean": _json_ready(obj[0]), "std": _json_ready(obj[1])}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------- evaluate
def evaluate(
    models: Sequence[str],
    data: str | os.PathLike[str],
    *,
    robustness_images: str | os.PathLike[str] | None = None,
    groups: str | None = "auto",
    k: int = 20,
    seed: int = 0,
    out_dir: str | os.PathLike[str] = "eval-results",
    weights: str | Mapping[str, str] | None = None,
    pretrained: bool = True,
    use_ema: bool = True,
    batch_size: int = 32,
    max_images: int = 64,
    n_splits: int = 5,
    probe_c: float | str = "auto",
    robustness_size: int = 224,
    perturbations: str = "standard",
    with_fidelity: bool = True,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    strict: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate models on a labelled folder and write ``results.json``, ``results.md`` (and ``comparison.png``).

    Args:
        models: Run directories, exported student folders and/or teacher names (see
            :func:`~multiteach.eval.embed.resolve_model`); each is embedded with its own preprocessing.
        data: Labelled folder: ``<class>/`` sub-folders (stratified, group-aware CV) or ``train/`` and
            ``test/`` each holding ``<class>/`` sub-folders (scored on that split).
        robustness_images: Folder of images for the perturbation robustness metrics (at most
            ``max_images`` of them, a seeded choice); None skips robustness.
        groups: ``"auto"``, a ``labels.csv`` column, or None; see :func:`load_labelled`.
        k: kNN neighbours (cosine, majority vote).
        seed: Seed of folds, probe, image subsets, perturbation directions and random-init weights;
            the same seed gives the same numbers.
        out_dir: Output folder (created).
        weights: Local weights for the teacher model (one path when there is one teacher model), or
            ``{teacher spec: path}``.
        pretrained: False gives teacher models random-initialised weights (a baseline).
        use_ema: Run directories: EMA student (and heads) when the run kept one.
        batch_size: Images per forward pass.
        max_images: Most images used for robustness and for fidelity.
        n_splits: CV folds when there is no train/test split.
        probe_c: Linear-probe inverse L2 strength: ``"auto"`` (chosen from 1e-3..10 by inner 3-fold
            CV on the training data, group-aware with groups) or a fixed float (faster).
        robustness_size: Square size the robustness images are read at (the perturbations act at this
            size, the same for every model; each model then resizes to its own input size).
        perturbations: ``"standard"`` (:func:`~multiteach.eval.robustness.perturbation_suite`) or ``"heldout"``
            (:func:`~multiteach.data.views.perturb.heldout_suite`: the robust-view family at severities beyond its
            default training ranges, so a student trained with ``data.robust_views`` is not scored on its
            training distribution). With robustness on, the robustness index (RI) is also computed on up to
            ``max_images`` labelled images: each clean and perturbed copy is a "site", the class the biology.
        with_fidelity: Measure fidelity for run directories.
        device: Where models run.
        dtype: ``float32`` or ``bfloat16``.
        strict: Fail on unreadable images (all of them named) instead of skipping and listing them.
        progress: Called with one line per step (the CLI prints them).

    Returns:
        The ``results.json`` content (``protocol``, ``models``, ``metrics``, ``probe``, ``robustness``,
        ``fidelity``) plus ``files`` (written paths) and ``markdown`` (the ``results.md`` text).
        ``metrics`` holds one flat row per model: ``knn_bacc``, ``knn_f1``, ``linear_bacc``,
        ``linear_f1`` (``{"mean", "std"}`` in CV mode), ``robust_cosine``/``robust_top{k}`` (means
        over perturbations) and ``fidelity_<teacher>_summary``/``_patch``/``_cka`` (centred measures).

    Raises:
        MultiteachError: Before any model is loaded, for an unknown model, a bad data or robustness
            folder (single class, no images), unreadable images with ``strict``, or bad options.
    """
    say = progress or (lambda line: log.info("%s", line))
    specs = [str(m) for m in models]
    if not specs:
        raise MultiteachError("no model given; name at least one run directory, exported student or teacher")
    if int(k) < 1:
        raise MultiteachError(f"k must be at least 1, got {k}")
    if int(batch_size) < 1:
        raise MultiteachError(f"batch_size must be at least 1, got {batch_size}")
    if probe_c != "auto" and (isinstance(probe_c, str) or not float(probe_c) > 0):
        raise MultiteachError(f"probe_c must be 'auto' or a positive number, got {probe_c!r}")
    kinds = [model_kind(s) for s in specs]  # raises for anything that is none of the three kinds
    names = _display_names(specs, kinds)
    per_weights = _weights_for(specs, kinds, weights)
    labelled = load_labelled(data, groups)
    skipped = {"data": unreadable_images(labelled.all_paths), "robustness": {}}
    rob_paths: list[Path] = []
    if robustness_images is not None:
        if int(max_images) < 2:
            raise MultiteachError(f"robustness needs max_images >= 2, got {max_images}")
        rob_paths = _subset(find_images(robustness_images), int(max_images), seed)
        skipped["robustness"] = unreadable_images(rob_paths)
        rob_paths = [p for p in rob_paths if p not in skipped["robustness"]]
    n_bad = sum(len(v) for v in skipped.values())
    if strict and n_bad:
        listing = "; ".join(f"{p} ({why})" for found in skipped.values() for p, why in found.items())
        raise MultiteachError(
            f"{n_bad} unreadable image(s) (strict: nothing evaluated; without --strict they are skipped): {listing}"
        )
    drop_images(labelled, skipped["data"])
    for p, why in (item for found in skipped.values() for item in found.items()):
        say(f"skipping unreadable image {p} ({why})")
    if robustness_images is not None and len(rob_paths) < 2:
        raise MultiteachError(
            f"robustness needs at least 2 readable images; {robustness_images} has {len(rob_paths)} "
            f"(of {len(rob_paths) + len(skipped['robustness'])} chosen, max_images={max_images})"
        )
    overlap = labelled.groups_overlap()
    if overlap:
        log.warning("%d group(s) occur in both train and test of %s: the split is not group-disjoint", overlap, data)
    n_img = len(labelled.all_paths)
    say(
        f"data: {labelled.root} ({'train/test split' if labelled.split else f'{n_splits}-fold CV'}, "
        f"{n_img} images, {len(labelled.class_names)} classes, groups: {labelled.group_source or 'none'})"
    )

    suite = robustness_suite(perturbations, seed)
    ks = tuple(q for q in DEFAULT_KS if q <= 2 * len(rob_paths) - 1)
    rob_tensor = load_images(rob_paths, int(robustness_size), batch_size) if rob_paths else None
    ri_idx = np.sort(np.random.default_rng(seed).permutation(n_img)[: int(max_images)])
    ri_images = load_images([labelled.all_paths[i] for i in ri_idx], int(robustness_size)) if rob_paths else None
    ri_labels = np.concatenate([labelled.train_labels, labelled.test_labels])[ri_idx]
    fid_paths = _subset(labelled.test_paths if labelled.split else labelled.train_paths, int(max_images), seed)

    table: dict[str, dict[str, Any]] = {}
    model_info: dict[str, Any] = {}
    probe: dict[str, Any] = {}
    robustness: dict[str, Any] = {}
    ri_out: dict[str, Any] = {}
    fidelity_out: dict[str, Any] = {}
    for i, (spec, kind, name, w) in enumerate(zip(specs, kinds, names, per_weights), start=1):
        tag = f"[{i}/{len(specs)}] {name}"
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        emb = resolve_model(
            spec,
            device,
            dtype=dtype,
            weights=w,
            pretrained=pretrained if kind == "teacher" else True,
            use_ema=use_ema,
            seed=seed,
        )
        seconds["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = embed_folder(emb, labelled.all_paths, batch_size)
        seconds["embed"] = time.perf_counter() - t0
        say(f"{tag}: {kind}, {emb.input_size} px, D={emb.dim}; embedded {n_img} images in {seconds['embed']:.1f} s")
        t0 = time.perf_counter()
        cls = classification_metrics(labelled, x, int(k), int(n_splits), seed, probe_c)
        seconds["classification"] = time.perf_counter() - t0
        row: dict[str, Any] = {
            "knn_bacc": cls["knn"]["balanced_accuracy"],
            "knn_f1": cls["knn"]["macro_f1"],
            "linear_bacc": cls["linear"]["balanced_accuracy"],
            "linear_f1": cls["linear"]["macro_f1"],
        }
        if "C" in cls["linear"]:
            probe[name] = {"C": cls["linear"]["C"]}
        if rob_tensor is not None:
            t0 = time.perf_counter()
            per = evaluate_perturbations(emb, rob_tensor, suite, ks=ks, batch_size=batch_size)
            seconds["robustness"] = time.perf_counter() - t0
            for metric in next(iter(per.values())):
                row[f"robust_{metric}"] = float(np.mean([v[metric] for v in per.values()]))
            ri_out[name] = perturbation_ri(emb, ri_images, ri_labels, suite, batch_size=batch_size)
            row["robust_ri"] = ri_out[name]["ri"]
            robustness[name] = per
            say(f"{tag}: robustness on {len(rob_paths)} images x {len(per)} perturbations")
        if kind == "run" and with_fidelity:
            t0 = time.perf_counter()
            try:
                fid = teacher_fidelity(emb.run, fid_paths, batch_size=batch_size, device=device)
            except MultiteachError as exc:  # e.g. the teacher weights are not on this machine
                fidelity_out[name] = {"error": str(exc)}
                say(f"{tag}: fidelity skipped: {exc}")
            else:
                fidelity_out[name] = fid
                for teacher, values in fid.items():
                    for column, key in FIDELITY_COLUMNS.items():
                        if key in values:
                            row[f"fidelity_{teacher}_{column}"] = values[key]
                    dead = [k for k, v in values.items() if k.endswith("teacher_spread") and v < DEAD_SPREAD]
                    if dead:
                        say(
                            f"{tag}: teacher {teacher!r} barely varies across images ({dead[0]} "
                            f"{values[dead[0]]:.2g} < {DEAD_SPREAD}): its fidelity means nothing"
                        )
                say(f"{tag}: fidelity to {', '.join(fid)} on {len(fid_paths)} images")
            seconds["fidelity"] = time.perf_counter() - t0
        table[name] = row
        model_info[name] = {
            "spec": spec,
            "kind": kind,
            "input_size": emb.input_size,
            "dim": emb.dim,
            "mean": list(emb.spec.mean),
            "std": list(emb.spec.std),
            **emb.info,
            "seconds": {k_: round(v, 3) for k_, v in seconds.items()},
        }
        del emb, x

    protocol = {
        "data": str(labelled.root),
        "mode": "train/test" if labelled.split else "cv",
        "classes": labelled.class_names,
        "n_train": len(labelled.train_paths),
        "n_test": len(labelled.test_paths),
        "n_splits": None if labelled.split else int(n_splits),
        "groups": labelled.group_source,
        "groups_note": labelled.group_note,
        "groups_shared_by_train_and_test": overlap,
        "knn": {"k": int(k), "metric": "cosine", "weighting": "uniform"},
        "linear_probe": "StandardScaler + LogisticRegression (lbfgs, L2), "
        + ("C from (1e-3..10) by inner 3-fold CV" if probe_c == "auto" else f"C={float(probe_c):g}"),
        "seed": int(seed),
        "robustness": None
        if not rob_paths
        else {
            "folder": str(robustness_images),
            "n_images": len(rob_paths),
            "size": int(robustness_size),
            "ks": list(ks),
            "perturbations": list(suite),
            "suite": perturbations,
            "ri_images": len(ri_idx),
        },
        "fidelity_images": len(fid_paths) if fidelity_out else 0,
        "skipped": {
            where: [{"path": str(p), "reason": why} for p, why in found.items()] for where, found in skipped.items()
        },
        "n_skipped": n_bad,
    }
    result = {
        "protocol": protocol,
        "models": model_info,
        "metrics": json.loads(to_json(table)),
        "probe": probe,
        "robustness": robustness,
        "robustness_index": ri_out,
        "fidelity": fidelity_out,
    }
    result = _json_ready(result)
    markdown = _markdown(result, table, robustness)
    out = Path(out_dir).expanduser()
    files = {
        "json": str(atomic_write_bytes(out / RESULTS_JSON, (json.dumps(result, indent=2) + "\n").encode())),
        "markdown": str(atomic_write_bytes(out / RESULTS_MD, markdown.encode("utf-8"))),
    }
    chart = out / CHART_PNG
    if len(table) > 1:
        try:
            students = [n for n, k in zip(names, kinds) if k in STUDENT_KINDS]
            title = chart_title(labelled.root.resolve().name, protocol, names, students)
            files["chart"] = str(comparison_chart(table, chart, title=title, highlight=students))
        except ImportError:
            log.warning("matplotlib is not installed; %s not written (pip install matplotlib)", chart)
    elif chart.is_file():
        chart.unlink()  # a stale chart of an earlier, multi-model evaluation
    return {**result, "files": files, "markdown": markdown}


def chart_title(data_name: str, protocol: Mapping[str, Any], names: Sequence[str], students: Sequence[str]) -> str:
    """The ``comparison.png`` title: the data set and how it was scored, then the models, students first.

    Example: ``"tcga: train/test split (130 / 60 images)"`` over ``"run (student) vs uni, phikon"``.
    """
    if protocol["mode"] == "train/test":
        how = f"train/test split ({protocol['n_train']} / {protocol['n_test']} images)"
    else:
        how = f"{protocol['n_splits']}-fold CV ({protocol['n_train']} images)"
    others = [n for n in names if n not in students]
    if students:
        who = f"{', '.join(students)} ({'student' if len(students) == 1 else 'students'})"
        models = f"{who} vs {', '.join(others)}" if others else who
    else:
        models = " vs ".join(names)
    return f"multiteach eval on {data_name}: {how}\n{models}"


def _markdown(result: Mapping[str, Any], table: Mapping[str, Mapping[str, Any]], robustness: Mapping) -> str:
    """results.md: the protocol in words, the main table, and per-perturbation / fidelity details."""
    p = result["protocol"]
    if p["mode"] == "train/test":
        split = f"train/test split ({p['n_train']} / {p['n_test']} images)"
        if p["groups_shared_by_train_and_test"] == 0:
            split += ", group-disjoint"
        elif p["groups_shared_by_train_and_test"]:
            split += f", {p['groups_shared_by_train_and_test']} group(s) in both splits"
    else:
        split = f"{p['n_splits']}-fold stratified{' group' if p['groups'] else ''} CV over {p['n_train']} images"
    lines = [
        "# multiteach eval",
        "",
        f"- data: `{p['data']}`: {split}; classes: {', '.join(p['classes'])}",
        f"- groups: {p['groups'] or 'none'}" + (f" ({p['groups_note']})" if p["groups_note"] else ""),
        f"- kNN: k={p['knn']['k']}, cosine, majority vote; linear probe: {p['linear_probe']}; seed {p['seed']}",
    ]
    if p["robustness"]:
        r = p["robustness"]
        lines.append(
            f"- robustness: {r['n_images']} images from `{r['folder']}` at {r['size']} px, "
            f"{len(r['perturbations'])} perturbations (robust_* = mean over them)"
        )
    if result["fidelity"]:
        lines.append(
            "- fidelity: centred cosine (teacher mean removed) and linear CKA of projected student features "
            f"to the teacher's, {p['fidelity_images']} images"
        )
    if p.get("n_skipped"):
        lines.append(f"- skipped {p['n_skipped']} unreadable image(s), not scored (`--strict` fails instead):")
        lines += [
            f"  - {where}: `{item['path']}` ({item['reason']})"
            for where in p["skipped"]
            for item in p["skipped"][where]
        ]
    lines += ["", to_markdown(table).rstrip("\n")]
    if robustness:
        perts = list(next(iter(robustness.values())))
        rows = {m: {q: v["cosine"] for q, v in per.items()} for m, per in robustness.items()}
        lines += ["", "## Matched cosine per perturbation", "", to_markdown(rows, metrics=perts).rstrip("\n")]
    errors = {m: v["error"] for m, v in result["fidelity"].items() if "error" in v}
    for model, err in errors.items():
        lines += ["", f"Fidelity of {model} not measured: {err}"]
    return "\n".join(lines) + "\n"
