"""kNN / linear-probe balanced accuracy of every checkpoint of a `pretrain_tiny` run vs training minutes.

    python examples/tiny_teacher/curve.py RUN_DIR [--data ../shared/data/labeled] [--out curve.csv]

Each checkpoint's EMA student is scored on the shared labelled sets (multiteach.eval.transfer) next to a
random initialisation of the same architecture (step 0). Minutes come from the run's metrics.jsonl
(images/s of each logged window). This is how the shipped `multiteach-tiny` curve was measured.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from multiteach.build import build_student_from
from multiteach.config import load_recipe
from multiteach.eval.embed import load_images
from multiteach.eval.transfer import (
    classification_scores,
    embed_images,
    load_shared_sets,
    mean_over_sets,
    student_embedder,
)
from multiteach.runs import STUDENT_PREFIX


def minutes_at(run: Path) -> dict[int, float]:
    """Cumulative training minutes at each logged step (from logged images/s)."""
    recipe_batch = load_recipe(run / "recipe.yaml").optim.batch_size
    out, total, last = {0: 0.0}, 0.0, 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        total += (rec["step"] - last) * recipe_batch / max(rec["img_per_s"], 1e-9) / 60
        out[rec["step"]], last = total, rec["step"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--data", default="../shared/data/labeled")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rule", default="cls", choices=["cls", "cls+mean"])
    ap.add_argument("--every", type=int, default=1, help="score every n-th checkpoint")
    ap.add_argument("--live", action="store_true", help="score the live weights instead of the EMA weights")
    args = ap.parse_args()
    run = Path(args.run)
    recipe = load_recipe(run / "recipe.yaml")
    sets = load_shared_sets(args.data)
    images = {n: load_images(d.all_paths, 224) for n, d in sets.items()}
    minutes = minutes_at(run)
    ckpts = sorted((run / "checkpoints").glob("step_*"))[:: args.every]
    rows = []
    for ckpt in [None, *ckpts]:
        torch.manual_seed(recipe.seed)
        student = build_student_from(recipe).eval()
        step = 0
        if ckpt is not None:
            sd = load_file(str(ckpt / ("model.safetensors" if args.live else "ema.safetensors")))
            student.load_state_dict(
                {k[len(STUDENT_PREFIX) :]: v for k, v in sd.items() if k.startswith(STUDENT_PREFIX)}
            )
            step = int(ckpt.name.split("_")[1])
        embed = student_embedder(student, recipe, args.rule)
        scores = {n: classification_scores(sets[n], embed_images(embed, images[n])) for n in sets}
        row = {
            "step": step,
            "minutes": round(minutes.get(step, float("nan")), 1),
            **{f"{n}_{m}": round(s[m], 3) for n, s in scores.items() for m in s},
            "knn_mean": round(mean_over_sets(scores, "knn"), 3),
            "linear_mean": round(mean_over_sets(scores, "linear"), 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
