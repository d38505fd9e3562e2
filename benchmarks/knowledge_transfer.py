"""Knowledge transfer: does a student distilled from the shipped `multiteach-tiny` teacher keep what it knows?

    python benchmarks/knowledge_transfer.py [--shared ../shared/data] [--out runs/bench_transfer] [--steps N]

In one run, on this machine:
1. distils the teacher into the built-in `distill_tiny` student (ViT-Ti width, 5 blocks: < half the
   teacher's parameters) on the real H&E tiles the teacher was pretrained on (shared/data/unlabeled_tiles_224
   + the two shared slides re-tiled), timing it;
2. embeds the labelled sets of shared/data/labeled (LC25000 subset: 5-fold CV repeated over
   ``--cv-repeats`` fold seeds, 10 by default; TCGA LUAD/LUSC: slide-disjoint train -> test) with four
   models: the teacher, a random init of the teacher's architecture, the student, and the student's
   random-init twin;
3. prints kNN and linear-probe balanced accuracy per set (random inits: the mean over ``--random-seeds``
   seeds, 5 by default, because one random init's kNN varies by several points from seed to seed), the
   label-free agreement of each model with the teacher (ridge-fitted centred cosine, linear CKA,
   mutual-kNN@10), the teacher's recorded pretraining
   curve (kNN vs minutes, from the shipped model card folder), and on its last line the ratios:
   teacher gain over random (points), the share of that gain the student keeps, and the student's
   mutual-kNN agreement over its random twin's.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from multiteach.build import build_student_from
from multiteach.config import load_recipe
from multiteach.eval.embed import load_images, resolve_model
from multiteach.eval.transfer import (
    classification_scores,
    embed_images,
    load_shared_sets,
    mean_over_sets,
    student_embedder,
    teacher_agreement,
)
from multiteach.runs import load_run_student
from multiteach.teachers.shipped import shipped_dir

TEACHER = "multiteach-tiny"


def training_tiles(shared: Path, out: Path) -> list[str]:
    """The tiles the teacher was pretrained on (examples/tiny_teacher/prepare_data.sh): the shared unlabelled
    tiles and the two shared slides re-tiled at 0.5 and 1.0 µm/px with 50 % overlap."""
    from multiteach.data.tiling import write_tiles

    folders = [str(shared / "unlabeled_tiles_224" / "tiles")]
    wsi = shared / "wsi"
    for mpp in (0.5, 1.0):
        folder = out / f"wsi_mpp{mpp}"
        if not folder.is_dir():
            slides = sorted(wsi.glob("*.svs"))
            # the TCGA frozen section records no mpp: 0.5 µm/px at level 0 is assumed, as in prepare_data.sh
            overrides = {s.name: 0.5 for s in slides if s.name.startswith("TCGA")}
            write_tiles(slides, folder, target_mpp=mpp, tile_size=224, overlap=0.5, mpp_overrides=overrides)
        folders.append(str(folder))
    return folders


def distil(
    shared: Path,
    out: Path,
    steps: int | None,
    recipe: str = "distill_tiny",
    run: str = "run",
    overrides: Sequence[str] = (),
) -> tuple[Path, float]:
    """Train a built-in recipe (default `distill_tiny`) on the teacher's pretraining tiles into ``out/run``, with
    further ``key=value`` ``overrides``; return (run dir, wall minutes)."""
    from multiteach.train import train

    overrides = [f"data.train=[{','.join(training_tiles(shared, out))}]", f"output_dir={out / run}", *overrides]
    if steps:
        overrides.append(f"schedule.steps={steps}")
    t0 = time.perf_counter()
    run_dir = train(load_recipe(recipe, overrides))
    return run_dir, (time.perf_counter() - t0) / 60


def random_students(recipe, seeds: list[int]) -> list:
    """Random-init twins of a recipe's student, one embedder per seed."""
    students = []
    for seed in seeds:
        torch.manual_seed(seed)
        students.append(student_embedder(build_student_from(recipe), recipe))
    return students


def random_models(recipe, seeds: list[int]) -> dict[str, list]:
    """Random inits of both architectures, one per seed: ``{"random teacher": [...], "random student": [...]}``."""
    teachers = [resolve_model(TEACHER, pretrained=False, seed=seed) for seed in seeds]
    return {"random teacher": teachers, "random student": random_students(recipe, seeds)}


def score_rows(
    rows: dict[str, list], sets: dict, images: dict, cv_repeats: int, linear: bool = True
) -> tuple[dict[str, list], dict[str, list]]:
    """Embed every labelled set with every model of every row and score it.

    Args:
        rows: Row name -> embedders (one model, or one random init per seed).
        sets: Labelled sets by name (:func:`load_shared_sets`); ``images``: their preloaded images.
        cv_repeats: Fold seeds of the repeated 5-fold CV on sets without a split.
        linear: Also fit linear probes (most of the scoring time); kNN only when False.

    Returns:
        ``(feats, scores)``: per row, one ``{set: (N, D) array}`` / ``{set: {"knn", "linear"}}`` per model.
    """
    feats = {m: [{n: embed_images(f, images[n]) for n in sets} for f in fs] for m, fs in rows.items()}
    scores = {
        m: [{n: classification_scores(sets[n], f[n], cv_repeats=cv_repeats, linear=linear) for n in sets} for f in fl]
        for m, fl in feats.items()
    }
    return feats, scores


def mean_over_models(scores: list[dict], metric: str) -> float:
    """A row's figure: ``metric`` averaged over the labelled sets, then over the row's models (seeds)."""
    return float(np.mean([mean_over_sets(s, metric) for s in scores]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.environ.get("MULTITEACH_SHARED", "../shared/data"))
    ap.add_argument("--out", default="runs/bench_transfer")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's schedule.steps")
    ap.add_argument("--run", default=None, help="score this distill_tiny run directory instead of training one")
    ap.add_argument("--random-seeds", type=int, default=5, help="random inits per architecture, averaged (5)")
    ap.add_argument(
        "--cv-repeats", type=int, default=10, help="fold seeds of the repeated 5-fold CV on sets without a split (10)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shared, out = Path(args.shared), Path(args.out)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")

    if args.run:
        run_dir, minutes = Path(args.run), float("nan")
    else:
        run_dir, minutes = distil(shared, out, args.steps)
    run = load_run_student(run_dir)
    recipe = run.recipe
    teacher = resolve_model(TEACHER)
    seeds = list(range(args.random_seeds))
    # one model or several random inits (seeds) per row; a row's figures are the mean over its models
    rows: dict[str, list] = {"teacher": [teacher], "student": [student_embedder(run.student, recipe)]}
    rows.update(random_models(recipe, seeds))
    n_teacher = sum(p.numel() for p in teacher.model.parameters())
    n_student = sum(p.numel() for p in run.student.parameters())
    print(
        f"teacher {TEACHER}: {n_teacher / 1e6:.2f}M params; student {recipe.student.arch} "
        f"{recipe.student.kwargs}: {n_student / 1e6:.2f}M ({n_student / n_teacher:.2f}x); "
        f"distilled {recipe.schedule.steps} steps in {minutes:.1f} min; random rows: mean of seeds {seeds}"
    )

    sets = load_shared_sets(shared / "labeled")
    images = {name: load_images(data.all_paths, 224) for name, data in sets.items()}
    feats, scores = score_rows(rows, sets, images, args.cv_repeats)

    def mean_score(m: str, name: str, metric: str) -> float:
        return float(np.mean([s[name][metric] for s in scores[m]]))

    def mean_over(m: str, metric: str) -> float:
        return mean_over_models(scores[m], metric)

    print(f"\nbalanced accuracy (kNN k=10 / linear probe; sets without a split: 5-fold CV x {args.cv_repeats} seeds)")
    print(f"{'model':<16}" + "".join(f"{n:>28}" for n in sets) + f"{'mean':>16}")
    for m in rows:
        cells = "".join(f"{mean_score(m, n, 'knn'):>19.3f} / {mean_score(m, n, 'linear'):.3f}" for n in sets)
        print(f"{m:<16}{cells}{mean_over(m, 'knn'):>9.3f} / {mean_over(m, 'linear'):.3f}")
    for m in ("random teacher", "random student"):
        per_seed = ", ".join(f"{mean_over_sets(s, 'knn'):.3f}" for s in scores[m])
        print(f"  {m} kNN per seed: {per_seed} (std {np.std([mean_over_sets(s, 'knn') for s in scores[m]]):.3f})")

    all_feats = {m: [np.concatenate([f[n] for n in sets]) for f in fl] for m, fl in feats.items()}
    t_all = all_feats["teacher"][0]
    keys = ("centred_cosine", "cka", "mutual_knn")
    per_model = {m: [teacher_agreement(x, t_all) for x in xs] for m, xs in all_feats.items() if m != "teacher"}
    agree = {m: {k: float(np.mean([a[k] for a in found])) for k in keys} for m, found in per_model.items()}
    print(f"\nagreement with the teacher on {len(t_all)} labelled images (no labels used)")
    print(f"{'model':<16}{'centred cos':>12}{'CKA':>8}{'mutual-kNN@10':>15}")
    for m, a in agree.items():
        print(f"{m:<16}{a['centred_cosine']:>12.3f}{a['cka']:>8.3f}{a['mutual_knn']:>15.3f}")

    curve = shipped_dir(TEACHER) / "curve.csv"
    if curve.is_file():
        print(f"\nteacher pretraining curve (recorded while training, {curve.name}): kNN / linear mean over sets")
        with curve.open() as fh:
            for row in csv.DictReader(fh):
                print(f"  step {row['step']:>5}  {row['minutes']:>6} min  {row['knn_mean']} / {row['linear_mean']}")

    knn = {m: mean_over(m, "knn") for m in rows}
    lin = {m: mean_over(m, "linear") for m in rows}
    gain = knn["teacher"] - knn["random teacher"]
    lin_gain = lin["teacher"] - lin["random teacher"]
    kept = (knn["student"] - knn["random student"]) / gain if gain > 0 else float("nan")
    mk = agree["student"]["mutual_knn"] / max(agree["random student"]["mutual_knn"], 1e-9)
    print(
        f"\nsummary: teacher kNN gain over random {100 * gain:+.1f} pts (linear {100 * lin_gain:+.1f}); "
        f"student keeps {kept:.2f}x of it; student/random-twin mutual-kNN {mk:.2f}x; "
        f"centred cos {agree['student']['centred_cosine']:.3f} vs {agree['random student']['centred_cosine']:.3f}"
    )


if __name__ == "__main__":
    main()
