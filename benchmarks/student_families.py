"""Student families: which small student of `multiteach-tiny` keeps its knowledge and runs fastest on a CPU at batch 1?

    python benchmarks/student_families.py [--shared ../shared/data] [--out runs/bench_families] [--runs-dir DIR]
        [--families vit,convnext,mobilenetv3,resnet] [--steps N] [--threads 1,2] [--latency-rounds 20]
        [--random-seeds 5] [--cv-repeats 10] [--linear]

In one run, on this machine:
1. for each family, distils the shipped teacher into a student of that family with its recipe (``vit``: the
   built-in `distill_tiny` ViT student; ``convnext``: the built-in `distill_tiny_cnn`; the other families: that
   recipe with another timm architecture of similar size) on the teacher's pretraining tiles
   (benchmarks/knowledge_transfer.py's protocol and data), or reuses a finished run in ``--runs-dir/FAMILY`` or
   ``--out/FAMILY``;
2. measures each student's timm model (what its export loads) side by side: parameters, batch-1 latency (ms per
   tile at the recipe's input size, the median over ``--latency-rounds`` interleaved rounds of 5 forwards, for
   each thread count in ``--threads``) and batch-32 throughput;
3. scores the knowledge-transfer protocol: kNN (k=10) and linear-probe balanced accuracy on the shared labelled
   sets for the teacher, each student, and random inits (the teacher's architecture and each student's, the mean
   over ``--random-seeds`` seeds); a student's share of the teacher's kNN gain is
   (student - its random twin) / (teacher - random teacher). Linear probes only with ``--linear``: their inner
   search over C takes minutes per model on a 2-core CPU;
4. prints one row per family and, on its last line, the non-ViT student that keeps at least 0.9x of the gain and
   is fastest at batch 1 (else the one that keeps the most), against the ViT student.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knowledge_transfer import (  # noqa: E402 - the shared protocol of benchmarks/knowledge_transfer.py
    TEACHER,
    distil,
    mean_over_models,
    random_students,
    score_rows,
)

from multiteach.eval.embed import load_images, resolve_model  # noqa: E402
from multiteach.eval.transfer import load_shared_sets, student_embedder  # noqa: E402
from multiteach.publish.speed import batch1_latency, speed_card  # noqa: E402
from multiteach.runs import load_run_student, run_progress  # noqa: E402

#: Family -> (built-in recipe, overrides). CNNs whose last width is not the teacher's 192, or whose last activation
#: is a ReLU, distil through linear heads.
FAMILIES: dict[str, tuple[str, list[str]]] = {
    "vit": ("distill_tiny", []),
    "convnext": ("distill_tiny_cnn", []),
    "mobilenetv3": (
        "distill_tiny_cnn",
        ["student.arch=mobilenetv3_small_100", "student.kwargs={}", "heads.multiteach-tiny={kind: linear}"],
    ),
    # ReLU features are >= 0 and cannot equal the teacher's signed embedding: a linear head (an identity head kept
    # the same kNN gain, 0.70x, at a much higher loss)
    "resnet": (
        "distill_tiny_cnn",
        [
            "student.arch=resnet18",
            "student.kwargs={channels: [32, 64, 128, 192]}",
            "heads.multiteach-tiny={kind: linear}",
        ],
    ),
    "regnet": (
        "distill_tiny_cnn",
        ["student.arch=regnetx_002", "student.kwargs={}", "heads.multiteach-tiny={kind: linear}"],
    ),
    "efficientnet": (
        "distill_tiny_cnn",
        ["student.arch=tinynet_d", "student.kwargs={}", "heads.multiteach-tiny={kind: linear}"],
    ),
}
DEFAULT_FAMILIES = "vit,convnext,mobilenetv3,resnet"
GAIN_GOAL, SPEED_GOAL = 0.9, 1.5


def family_run(name: str, shared: Path, out: Path, runs_dir: Path | None, steps: int | None) -> tuple[Path, float]:
    """A family's finished run, reused from ``runs_dir/NAME`` or ``out/NAME``, else trained into ``out/NAME``.

    Returns:
        (run directory, training wall minutes; NaN for a reused run).
    """
    for folder in (runs_dir / name if runs_dir else None, out / name):
        if folder is not None and (folder / "recipe.yaml").is_file():
            done, planned = run_progress(folder)
            if planned and done >= planned:
                return folder, float("nan")
    recipe, overrides = FAMILIES[name]
    print(f"training {name} ({recipe} {' '.join(overrides)}) into {out / name} ...", flush=True)
    return distil(shared, out, steps, recipe=recipe, run=name, overrides=overrides)


def interleaved_latency(models: dict[str, nn.Module], size: int, threads: int, rounds: int) -> dict[str, float]:
    """Batch-1 ms per tile of each model on ``threads`` threads: the median over ``rounds`` rounds, each timing every
    model in turn (5 forwards, their median), so a burst of background load touches all models alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for model in models.values():
            batch1_latency(model, size=size, repeats=5)  # warm-up: allocations, oneDNN kernel choice
        per: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                per[name].append(batch1_latency(model, size=size, repeats=5, warmup=1))
    finally:
        torch.set_num_threads(before)
    return {name: statistics.median(times) for name, times in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.environ.get("MULTITEACH_SHARED", "../shared/data"))
    ap.add_argument("--out", default="runs/bench_families", help="where new runs are trained (one folder per family)")
    ap.add_argument("--runs-dir", default=None, help="reuse finished runs in DIR/FAMILY (e.g. a previous --out)")
    ap.add_argument("--families", default=DEFAULT_FAMILIES, help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--steps", type=int, default=None, help="override every recipe's schedule.steps (new runs)")
    ap.add_argument("--threads", default=None, help="comma list of thread counts for the latency (default 1 and all)")
    ap.add_argument("--latency-rounds", type=int, default=20, help="interleaved rounds of 5 forwards per model (20)")
    ap.add_argument("--batch", type=int, default=32, help="images per forward for the throughput (32)")
    ap.add_argument("--random-seeds", type=int, default=5, help="random inits per architecture, averaged (5)")
    ap.add_argument("--linear", action="store_true", help="also fit linear probes (slow: minutes per model)")
    ap.add_argument(
        "--cv-repeats", type=int, default=10, help="fold seeds of the repeated 5-fold CV on sets without a split (10)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or "vit" not in families or len(families) < 2:
        ap.error(f"--families: 'vit' and at least one of {', '.join(FAMILIES)}; unknown: {unknown}")
    shared, out = Path(args.shared), Path(args.out)
    all_threads = torch.get_num_threads()
    threads = sorted({int(t) for t in args.threads.split(",")} if args.threads else {1, all_threads})
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {all_threads} threads by default")

    runs = {f: family_run(f, shared, out, Path(args.runs_dir) if args.runs_dir else None, args.steps) for f in families}
    students = {f: load_run_student(run_dir) for f, (run_dir, _) in runs.items()}
    teacher = resolve_model(TEACHER)
    n_teacher = sum(p.numel() for p in teacher.model.parameters())

    # speed: each student's plain timm model (the export) at its recipe's input size, side by side
    size = {f: int(s.recipe.student.img_size) for f, s in students.items()}
    if len(set(size.values())) > 1:
        print(f"note: the students' input sizes differ ({size}); each is timed at its own")
    models = {f: s.student.model.eval() for f, s in students.items()}
    latency = {t: {} for t in threads}
    for t in threads:
        for px in sorted(set(size.values())):
            group = {f: m for f, m in models.items() if size[f] == px}
            latency[t].update(interleaved_latency(group, px, t, args.latency_rounds))
    torch.set_num_threads(max(threads))
    card = {
        f: speed_card(m, size=size[f], batch=args.batch, dtype=torch.float32, latency_repeats=0)["models"]["student"]
        for f, m in models.items()
    }
    torch.set_num_threads(all_threads)

    # knowledge: the transfer protocol, random twins per family averaged over seeds
    seeds = list(range(args.random_seeds))
    rows: dict[str, list] = {"teacher": [teacher]}
    rows["random teacher"] = [resolve_model(TEACHER, pretrained=False, seed=s) for s in seeds]
    for f, s in students.items():
        rows[f] = [student_embedder(s.student, s.recipe)]
        rows[f"{f} twin"] = random_students(s.recipe, seeds)
    sets = load_shared_sets(shared / "labeled")
    images = {name: load_images(data.all_paths, 224) for name, data in sets.items()}
    _, scores = score_rows(rows, sets, images, args.cv_repeats, linear=args.linear)
    knn = {m: mean_over_models(scores[m], "knn") for m in rows}
    linear = {m: mean_over_models(scores[m], "linear") if args.linear else float("nan") for m in rows}
    gain = knn["teacher"] - knn["random teacher"]
    kept = {f: (knn[f] - knn[f"{f} twin"]) / gain if gain > 0 else float("nan") for f in families}

    top = max(threads)
    timed = f"batch 1 on {', '.join(f'{t} thread(s)' for t in threads)} and batch {args.batch} on {top}"
    print(
        f"\nteacher {TEACHER}: {n_teacher / 1e6:.2f}M params, kNN {knn['teacher']:.3f} vs random "
        f"{knn['random teacher']:.3f} (gain {100 * gain:+.1f} pts, mean of seeds {seeds}); students timed at "
        f"{sorted(set(size.values()))} px, {timed}"
    )
    lat_cols = "".join(f"{f'b1 ms {t}t':>10}" for t in threads)
    print(
        f"{'family':<13}{'arch':<24}{'params':>8}{'x tch':>7}{lat_cols}{'vs ViT':>8}{'img/s':>8}"
        f"{'kNN':>7}{'twin':>7}{'kept':>7}{'linear' if args.linear else '':>8}{'steps':>7}{'train min':>10}"
    )
    speedup = {f: latency[top]["vit"] / latency[top][f] for f in families}
    for f in families:
        s = students[f]
        params = card[f]["params"]
        lat = "".join(f"{latency[t][f]:>10.2f}" for t in threads)
        lin = f"{linear[f]:>8.3f}" if args.linear else f"{'':>8}"
        minutes = "reused" if runs[f][1] != runs[f][1] else f"{runs[f][1]:.1f}"  # NaN: a finished run reused
        print(
            f"{f:<13}{s.recipe.student.arch:<24}{params / 1e6:>7.2f}M{params / n_teacher:>7.2f}{lat}"
            f"{speedup[f]:>7.2f}x{card[f]['img_per_s']:>8.0f}{knn[f]:>7.3f}{knn[f'{f} twin']:>7.3f}{kept[f]:>7.2f}"
            f"{lin}{s.recipe.schedule.steps:>7}{minutes:>10}"
        )
        print(f"  {'':<11}kwargs {dict(s.recipe.student.kwargs)}, heads {dict(s.recipe.heads)}")

    vit_params = card["vit"]["params"]
    others = [f for f in families if f != "vit"]
    keeping = [f for f in others if kept[f] >= GAIN_GOAL]
    best = min(keeping, key=lambda f: latency[top][f]) if keeping else max(others, key=lambda f: kept[f])
    met = kept[best] >= GAIN_GOAL and speedup[best] >= SPEED_GOAL and card[best]["params"] <= vit_params
    sizes = f"{card[best]['params'] / 1e6:.2f}M vs {vit_params / 1e6:.2f}M params"
    goal = f"goal >= {GAIN_GOAL}x gain, >= {SPEED_GOAL}x faster, <= the ViT's params: {'met' if met else 'not met'}"
    print(
        f"\nsummary: {students[best].recipe.student.arch} keeps {kept[best]:.2f}x of the teacher's kNN gain, "
        f"{speedup[best]:.2f}x faster at batch 1 than the ViT student ({top} thread(s); {sizes}; {goal})"
    )


if __name__ == "__main__":
    main()
