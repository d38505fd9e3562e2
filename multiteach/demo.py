"""``multiteach demo``: the whole path on a fresh CPU machine in a few minutes.

1. point the recipe's ``data.slides`` at the real H&E slide shipped with multiteach (CMU-1-Small-Region, CC0; see
   assets/ATTRIBUTION.md): training patches it online, drawing each tile at a random tissue position at
   0.5 µm/px, 224 px, straight from the slide (no training tiles on disk); its tissue index goes in the demo's
   folder (``OUT/tissue-index``), so a fresh machine writes nothing in the user's cache;
2. write a tiny random stand-in of a real family (H-optimus-0-like ViT/14 + registers + SwiGLU) in the real
   on-disk format, so the Hub-format loader runs; the other teacher is ``multiteach-tiny``, the real
   pretrained teacher shipped inside the package;
3. distil a small ViT student (less than half the tiny teacher's parameters) with the built-in ``demo``
   recipe through the real loaders and engine;
4. export it as safetensors + timm config + model card;
5. show knowledge moving without labels: the student vs its random-init twin, each compared with
   ``multiteach-tiny`` on held-out tiles of the slide at another magnification (1.0 µm/px, cut on a grid with
   :func:`~multiteach.data.tiling.write_tiles`; ridge-fitted centred cosine, linear CKA, mutual-kNN
   agreement).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from multiteach.atomic import atomic_write_bytes
from multiteach.build import build_student_from
from multiteach.config import load_recipe
from multiteach.data.lists.images import find_images
from multiteach.data.tiling import write_tiles
from multiteach.eval.embed import load_images, resolve_model
from multiteach.eval.transfer import embed_images, student_embedder, teacher_agreement
from multiteach.publish import export_run
from multiteach.runs import load_run_student
from multiteach.standins import write_standin_teachers
from multiteach.train import train

log = logging.getLogger("multiteach.demo")
SLIDE = "CMU-1-Small-Region.svs"
STANDIN_FAMILIES = ("h-optimus-0",)
KNOWLEDGE_TEACHER = "multiteach-tiny"
STANDIN_LICENCE = "none to inherit: random weights that `multiteach demo` wrote itself (`multiteach.standins`)"
SLIDES = {"target_mpp": [0.5], "tile_size": 224, "min_tissue": 0.5}
"""``data.slides`` of the demo's run besides ``source`` and ``index_dir``: 224 px tiles at 0.5 µm/px (the slide's
level 0 is 0.499 µm/px, so tiles are read 1:1), at least half tissue on the mask. The held-out tiles are at 1.0."""


def slide_path() -> Path:
    """The embedded demo slide."""
    return Path(__file__).resolve().parent / "assets" / SLIDE


def knowledge_check(run_dir: Path, images: Path, seed: int = 0) -> dict[str, dict[str, float]]:
    """Agreement of the distilled student and of its random-init twin with ``multiteach-tiny`` (no labels).

    Args:
        run_dir: The demo's run directory.
        images: A folder of tiles the student did not train on.
        seed: Seed of the twin's initialisation and of the ridge split.

    Returns:
        ``{"student": {...}, "random twin": {...}}``, each ``{"centred_cosine", "cka", "mutual_knn"}``.
    """
    run = load_run_student(run_dir)
    torch.manual_seed(seed)
    twin = build_student_from(run.recipe)
    x = load_images(find_images(images), 224)
    teacher = embed_images(resolve_model(KNOWLEDGE_TEACHER), x)
    models = {"student": student_embedder(run.student, run.recipe), "random twin": student_embedder(twin, run.recipe)}
    return {name: teacher_agreement(embed_images(f, x), teacher, seed=seed) for name, f in models.items()}


def knowledge_table(result: dict[str, dict[str, float]], n_images: int) -> str:
    """The knowledge check as a Markdown table with the student/twin ratios."""
    s, r = result["student"], result["random twin"]
    lines = [
        f"## Knowledge check: agreement with `{KNOWLEDGE_TEACHER}` on {n_images} held-out tiles (no labels)",
        "",
        "| model | centred cosine (ridge) | linear CKA | mutual-kNN@10 |",
        "|---|---|---|---|",
    ]
    for name, v in result.items():
        lines.append(f"| {name} | {v['centred_cosine']:.3f} | {v['cka']:.3f} | {v['mutual_knn']:.3f} |")
    ratio = s["mutual_knn"] / max(r["mutual_knn"], 1e-9)
    lines += [
        "",
        f"student vs random twin: mutual-kNN {ratio:.2f}x, "
        f"centred cosine {s['centred_cosine'] - r['centred_cosine']:+.3f}",
    ]
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path = "runs/demo", overrides: list[str] = ()) -> dict[str, Any]:
    """Run the demo end to end; return the paths of everything it wrote and the knowledge check.

    Args:
        out: Folder for the tissue index, the held-out tiles, stand-ins, the run, the export and the knowledge
            check.
        overrides: Extra recipe overrides (e.g. ``schedule.steps=20`` for a quicker look).
    """
    out = Path(out)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    # held out from training: the same slide at half the magnification, on a grid
    held_out = write_tiles([slide_path()], out / "held_out", target_mpp=1.0, tile_size=224, overlap=0.5, min_tissue=0.3)
    seconds["held-out tiles"] = time.perf_counter() - start
    start = time.perf_counter()
    standins = write_standin_teachers(out / "standins", STANDIN_FAMILIES)
    seconds["stand-ins"] = time.perf_counter() - start
    slides = {"source": str(slide_path()), **SLIDES, "index_dir": str(out / "tissue-index")}
    sets = ["data.train=null", f"data.slides={json.dumps(slides)}", f"output_dir={out / 'run'}"]
    sets += [f"teachers.{name}.weights={path}" for name, path in standins.items()]
    recipe = load_recipe("demo", [*sets, *overrides])
    start = time.perf_counter()
    run_dir = train(recipe)
    seconds["train"] = time.perf_counter() - start
    # the stand-ins are random weights written above: the card describes them as such, with no licence to inherit
    notes = {name: STANDIN_LICENCE for name in standins}
    start = time.perf_counter()
    export_dir = export_run(run_dir, out / "export", overwrite=True, licence_notes=notes)
    seconds["export"] = time.perf_counter() - start
    start = time.perf_counter()
    knowledge = knowledge_check(run_dir, out / "held_out", seed=recipe.seed)
    seconds["knowledge check"] = time.perf_counter() - start
    markdown = knowledge_table(knowledge, len(find_images(out / "held_out")))
    (out / "knowledge").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "knowledge" / "knowledge.md", markdown.encode())
    log.info("trained from %s patched online; held-out tiles: %d", SLIDE, held_out.total)
    log.info("demo phases: %s", ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items()))
    return {
        "slide": slide_path(),
        "index": out / "tissue-index",
        "held_out": out / "held_out",
        "run": run_dir,
        "export": export_dir,
        "knowledge": out / "knowledge",
        "results": {"knowledge": knowledge, "markdown": markdown, "seconds": seconds},
    }
