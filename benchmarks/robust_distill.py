"""Robust distillation: is a student trained with the robust-views switch more robust than its teacher?

    python benchmarks/robust_distill.py [--shared ../shared/data] [--out runs/bench_robust] [--steps N]
                                        [--run-off DIR --run-on DIR]

In one run, on this machine:
1. distils the shipped `multiteach-tiny` teacher twice on the tiles it was pretrained on (see
   benchmarks/knowledge_transfer.py): `distill_tiny` (switch off) and `robust_tiny` (the same student and
   terms, `data.robust_views` on, plus the invariance term), timing both;
2. on the labelled images of shared/data/labeled (LC25000 subset + TCGA LUAD/LUSC), scores the teacher and
   both students at **held-out severities** (:func:`multiteach.data.perturb.heldout_suite`: every
   perturbation kind of the training family at 1.25x, 1.5x and 2x beyond the ranges `robust_tiny` trains on,
   15 perturbations): matched cosine and
   top-1 retrieval of each perturbed image's clean twin among all 2N - 1 other embeddings (PLISM protocol),
   and the robustness index with the perturbations as sites;
3. scores kNN and linear-probe balanced accuracy on the same sets (as the knowledge-transfer benchmark);
4. prints on its last line the two ratios the switch is judged by: the robust student's top-1 retrieval over
   the teacher's and over the switch-off student's (mean over the held-out levels of the perturbation kinds the
   switch trains on; every kind's figures are printed above it), and its kNN change against the switch-off
   student.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import torch
from knowledge_transfer import TEACHER, distil

from multiteach.data.perturb import HELDOUT_FACTORS, ORDER, heldout_suite
from multiteach.eval.embed import load_images, resolve_model
from multiteach.eval.robustness import copies_ri, embed_copies, plism_pair_metrics
from multiteach.eval.transfer import (
    classification_scores,
    embed_images,
    load_shared_sets,
    mean_over_sets,
    student_embedder,
)
from multiteach.runs import load_run_student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.environ.get("MULTITEACH_SHARED", "../shared/data"))
    ap.add_argument("--out", default="runs/bench_robust")
    ap.add_argument("--steps", type=int, default=None, help="override both recipes' schedule.steps")
    ap.add_argument("--run-off", default=None, help="score this distill_tiny run instead of training one")
    ap.add_argument("--run-on", default=None, help="score this robust_tiny run instead of training one")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shared, out = Path(args.shared), Path(args.out)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")

    runs, minutes = {}, {}
    plan = (("switch off", "distill_tiny", args.run_off), ("switch on", "robust_tiny", args.run_on))
    for label, recipe, given in plan:
        if given:
            runs[label], minutes[label] = Path(given), float("nan")
        else:
            runs[label], minutes[label] = distil(shared, out, args.steps, recipe, recipe)
    loaded = {label: load_run_student(run_dir) for label, run_dir in runs.items()}
    ranges = {k: tuple(v) for k, v in loaded["switch on"].recipe.data.robust_views.items() if k != "p"}
    suite = heldout_suite(ranges)
    models = {"teacher": resolve_model(TEACHER)}
    models.update({f"student, {label}": student_embedder(r.student, r.recipe) for label, r in loaded.items()})
    for label, r in loaded.items():
        print(f"student, {label}: {r.recipe.name}, {r.recipe.schedule.steps} steps in {minutes[label]:.1f} min")
    print(f"training ranges (switch on): {ranges}")
    print(f"held-out severities: {', '.join(suite)}")

    sets = load_shared_sets(shared / "labeled")
    images = {name: load_images(data.all_paths, 224) for name, data in sets.items()}
    # perturbed at the students' training crop size, so a held-out sigma or quality means what it meant in training
    crop = int(loaded["switch on"].recipe.data.global_crops.size)
    all_images = torch.cat([load_images(data.all_paths, crop) for data in sets.values()])
    labels = np.concatenate(
        [np.concatenate([d.train_labels, d.test_labels]) + 100 * i for i, d in enumerate(sets.values())]
    )
    rows = {}
    for name, embed in models.items():
        feats = {n: embed_images(embed, images[n]) for n in sets}
        scores = {n: classification_scores(sets[n], feats[n]) for n in sets}
        copies = embed_copies(embed, all_images, suite)  # one embedding pass serves PLISM metrics and RI
        per = {p: plism_pair_metrics(copies["clean"], copies[p], ks=(1, 5)) for p in suite}
        ri = copies_ri(copies, labels)
        rows[name] = {
            "knn": mean_over_sets(scores, "knn"),
            "linear": mean_over_sets(scores, "linear"),
            "cosine": float(np.mean([v["cosine"] for v in per.values()])),
            "top1": float(np.mean([v["top1"] for v in per.values()])),
            "per_top1": {p: v["top1"] for p, v in per.items()},
            "ri": ri["ri"],
        }

    n = all_images.shape[0]
    print(f"\n{n} labelled images, {len(suite)} held-out perturbations; chance top-1 = {1 / (2 * n - 1):.4f}")
    print(f"{'model':<22}{'kNN':>7}{'linear':>8}{'cosine':>8}{'top-1':>7}{'RI':>7}   (cosine and top-1: mean over all)")
    for name, r in rows.items():
        print(f"{name:<22}{r['knn']:>7.3f}{r['linear']:>8.3f}{r['cosine']:>8.3f}{r['top1']:>7.3f}{r['ri']:>7.3f}")
    print("\ntop-1 retrieval per held-out perturbation (severity factor beyond the training range)")
    names = list(suite)
    for start in range(0, len(names), len(ORDER)):
        chunk = names[start : start + len(ORDER)]
        print(f"  x{HELDOUT_FACTORS[start // len(ORDER)]:<5}" + "".join(f"{p:>18}" for p in chunk))
        for name, r in rows.items():
            print(f"  {name:<20}" + "".join(f"{r['per_top1'][p]:>18.3f}" for p in chunk)[2:])

    on, off, teacher = rows["student, switch on"], rows["student, switch off"], rows["teacher"]
    trained = [p for p in suite if p.split("@")[0] in ranges]

    def top1(row: dict, names: list[str]) -> float:
        return float(np.mean([row["per_top1"][p] for p in names]))

    print(
        f"\nmean top-1 over every held-out perturbation: teacher {teacher['top1']:.3f}, switch off {off['top1']:.3f}, "
        f"switch on {on['top1']:.3f}; over the kinds the switch trains on ({', '.join(ranges)}): "
        f"{top1(teacher, trained):.3f}, {top1(off, trained):.3f}, {top1(on, trained):.3f}"
    )
    over_teacher = top1(on, trained) / max(top1(teacher, trained), 1e-9)
    over_off = top1(on, trained) / max(top1(off, trained), 1e-9)
    print(
        f"\nsummary: held-out top-1 retrieval on the trained kinds, robust student / teacher {over_teacher:.2f}x, "
        f"robust student / switch-off student {over_off:.2f}x; "
        f"kNN {100 * (on['knn'] - off['knn']):+.1f} pts vs switch-off ({on['knn']:.3f} vs {off['knn']:.3f})"
    )


if __name__ == "__main__":
    main()
