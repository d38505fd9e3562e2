"""Robust distillation: robust and accurate? The robustness-accuracy curve, ablations, and the recipe's own student.

    python benchmarks/robust_distill.py [--shared ../shared/data] [--out runs/bench_robust] [--steps N]
        [--run-off DIR] [--run-on DIR] [--run ID=DIR ...] [--ablations ID,ID] [--curve-end ID]
        [--alphas 0,0.25,0.5,0.75,1] [--cv-repeats 10] [--threads N] [--png FILE]

In one run, on this machine:
1. distils the shipped `multiteach-tiny` teacher on the tiles it was pretrained on (see
   benchmarks/knowledge_transfer.py) into `distill_tiny` (switch off), `robust_tiny` (the recipe's own robust
   student: the clean teacher distilled into the student's clean AND perturbed views) and the ablation variants of
   :data:`ABLATIONS` (overrides of `robust_tiny`); a run given with --run-off / --run-on / --run ID=DIR is scored as
   it is instead of trained, so the figures can be re-read without retraining;
2. merges the switch-off student and the curve's robust end (--curve-end, default the earlier, all-robust form of
   `robust_tiny`) in weight space (WiSE-FT: ``(1 - alpha) * off + alpha * robust``, :func:`interpolate_state`, the
   function behind ``multiteach merge``) at every --alphas point;
3. on the labelled images of shared/data/labeled (LC25000 subset: repeated 5-fold CV; TCGA LUAD/LUSC: the
   slide-disjoint split) scores every model: kNN (LC25000: 5-fold CV repeated over --cv-repeats fold seeds) and
   linear-probe (one CV fold seed: the slow part) balanced accuracy per set and their mean; kNN on the
   grey tiles (colour removed), and a colour-only baseline (per-image RGB mean and std), so a student that
   stops reading a set's colour cue is told apart from one that lost tissue knowledge; and at **held-out
   severities** (:func:`multiteach.data.views.perturb.heldout_suite`: every kind of the family at 1.25x, 1.5x and 2x
   beyond the training ranges) matched cosine and top-1 retrieval of each perturbed image's clean twin among all
   2N - 1 other embeddings (PLISM protocol), over the trained kinds and over all kinds, and the robustness index;
4. prints the per-model table, the curve (and writes it as a PNG: kNN vs held-out top-1 on the trained kinds, the
   teacher, both end points, the recipe's student and the ablations marked), the ablation table, the checks of
   the recipe's student against its targets, and on its last line the summary: the recipe's student's top-1 over
   the teacher's and its kNN change against the switch-off student, then the best merge.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from knowledge_transfer import TEACHER, distil

from multiteach.config import load_recipe
from multiteach.data.views.perturb import HELDOUT_FACTORS, ORDER, heldout_suite
from multiteach.eval.embed import load_images, resolve_model
from multiteach.eval.knn import knn_cv, knn_eval
from multiteach.eval.robustness import copies_ri, plism_pair_metrics
from multiteach.eval.transfer import classification_scores, embed_images, load_shared_sets, student_embedder
from multiteach.publish.merge import interpolate_state
from multiteach.runs import load_run_student

#: Ablation variants: id -> (what it changes, overrides of `robust_tiny`). ``on`` is the recipe as shipped (clean
#: view distilled, invariance 0.1 on the summary, hed/gamma/gain at p 0.8).
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "strong": (
        "perturbed view + inv 1.0 (old robust)",
        [
            "losses.tiny.cls.student_view=perturbed",
            "losses.tiny.patch.student_view=perturbed",
            "losses.tiny.invariance={type: invariance, on: summary, weight: 1.0}",
        ],
    ),
    "inv03": ("clean view + inv 0.3", ["losses.tiny.invariance.weight=0.3"]),
    "both": (
        "both views, no invariance",
        [
            "losses.tiny.cls.student_view=both",
            "losses.tiny.patch.student_view=both",
            "losses.tiny.invariance.weight=0",
        ],
    ),
}
#: The kinds the blur/JPEG target reads (never trained by `robust_tiny`).
UNTRAINED = ("blur", "jpeg")
#: Targets of the recipe's own student (the issue's "Must show").
MIN_TOP1_OVER_TEACHER, MAX_KNN_LOSS_PTS, MAX_BLUR_JPEG_LOSS = 2.0, 2.0, 0.02


def grey(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> the same shape, every channel the luminance (colour removed)."""
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return lum.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def colour_features(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) -> (N, 6): per-channel mean and std, a colour-only embedding."""
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).numpy()


class Bench:
    """The labelled images (clean, grey, perturbed once for every model) and the scoring of one model.

    Args:
        shared: shared/data.
        crop: The students' training crop size (held-out perturbations are applied at it).
        suite: Held-out perturbations, ``name@level -> fn``.
        trained: Perturbation kinds the robust students trained on.
        cv_repeats: Fold seeds of the repeated CV of sets without a split.
    """

    def __init__(self, shared: Path, crop: int, suite: Mapping[str, Callable], trained: list[str], cv_repeats: int):
        self.sets = load_shared_sets(shared / "labeled")
        self.images = {name: load_images(data.all_paths, 224) for name, data in self.sets.items()}
        self.grey = {name: grey(x) for name, x in self.images.items()}
        clean = torch.cat([load_images(data.all_paths, crop) for data in self.sets.values()])
        self.copies = {"clean": clean, **{p: fn(clean) for p, fn in suite.items()}}  # perturbed once, for all
        self.labels = np.concatenate(
            [np.concatenate([d.train_labels, d.test_labels]) + 100 * i for i, d in enumerate(self.sets.values())]
        )
        self.suite, self.cv_repeats = list(suite), cv_repeats
        self.groups = {
            "trained": [p for p in suite if p.split("@")[0] in trained],
            "untrained": [p for p in suite if p.split("@")[0] in UNTRAINED],
            "all": list(suite),
        }

    def knn(self, feats: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Per set kNN (k 10, cosine) balanced accuracy of embeddings ``feats[set]`` (N, D): the split, or 5-fold
        CV repeated over ``cv_repeats`` fold seeds."""
        out = {}
        for name, data in self.sets.items():
            x = feats[name]
            if data.split:
                n = len(data.train_paths)
                res = knn_eval(x[:n], data.train_labels, x[n:], data.test_labels, k=10, metric="cosine")
                out[name] = float(res["balanced_accuracy"])
                continue
            folds = [
                knn_cv(x, data.train_labels, k=10, n_splits=5, groups=data.train_groups, seed=seed, metric="cosine")
                for seed in range(self.cv_repeats)
            ]
            out[name] = float(np.mean([f["balanced_accuracy"][0] for f in folds]))
        return out

    def linear(self, feats: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Per set linear-probe balanced accuracy (C by inner CV; one CV fold seed: the probe is the slow part)."""
        return {n: classification_scores(self.sets[n], feats[n], cv_repeats=1)["linear"] for n in self.sets}

    def colour_only(self) -> dict[str, dict[str, float]]:
        """The colour-only baseline per set: ``{set: {"knn", "linear"}}``."""
        feats = {n: colour_features(x) for n, x in self.images.items()}
        knn, linear = self.knn(feats), self.linear(feats)
        return {n: {"knn": knn[n], "linear": linear[n]} for n in self.sets}

    def score(self, embed: Callable) -> dict[str, Any]:
        """Every figure of one model (see the module docstring)."""
        colour = {n: embed_images(embed, x) for n, x in self.images.items()}
        knn, linear = self.knn(colour), self.linear(colour)
        sets = {n: {"knn": knn[n], "linear": linear[n]} for n in self.sets}
        greys = {n: {"knn": v} for n, v in self.knn({n: embed_images(embed, x) for n, x in self.grey.items()}).items()}
        feats = {name: embed_images(embed, x) for name, x in self.copies.items()}
        per = {p: plism_pair_metrics(feats["clean"], feats[p], ks=(1, 5)) for p in self.suite}
        row: dict[str, Any] = {
            "sets": sets,
            "grey": greys,
            "knn": float(np.mean([s["knn"] for s in sets.values()])),
            "linear": float(np.mean([s["linear"] for s in sets.values()])),
            "per_top1": {p: v["top1"] for p, v in per.items()},
            "ri": copies_ri(feats, self.labels)["ri"],
        }
        for group, names in self.groups.items():
            row[f"top1_{group}"] = float(np.mean([per[p]["top1"] for p in names]))
            row[f"cos_{group}"] = float(np.mean([per[p]["cosine"] for p in names]))
        return row


class ScoreCache:
    """Scored rows saved as JSON under ``OUT/scores.json``, keyed by checkpoint (or merge) and scoring settings, so
    a re-run with the same run directories scores only what is new."""

    def __init__(self, path: Path, settings: str) -> None:
        self.path, self.settings = path, settings
        self.rows = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, score: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        full = f"{key}|{self.settings}"
        if full not in self.rows:
            self.rows[full] = score()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.rows))
        return self.rows[full]


def parse_runs(args: argparse.Namespace) -> dict[str, Path]:
    """Given run directories: ``off``, ``on`` and ablation ids -> folder."""
    given = {"off": args.run_off, "on": args.run_on}
    for item in args.run or []:
        key, sep, value = item.partition("=")
        if not sep or key not in (*ABLATIONS, "off", "on"):
            raise SystemExit(f"--run {item!r}: expected ID=DIR with ID one of off, on, {', '.join(ABLATIONS)}")
        given[key] = value
    return {k: Path(v) for k, v in given.items() if v}


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(id, recipe, overrides) of every student the benchmark reads, switch-off and recipe first."""
    ids = [a for a in args.ablations.split(",") if a] if args.ablations is not None else list(ABLATIONS)
    unknown = [a for a in [*ids, args.curve_end] if a not in ABLATIONS]
    if unknown:
        raise SystemExit(f"--ablations/--curve-end: unknown id(s) {unknown}; known: {', '.join(ABLATIONS)}")
    ids = ids if args.curve_end in ids else [args.curve_end, *ids]
    return [("off", "distill_tiny", []), ("on", "robust_tiny", [])] + [(a, "robust_tiny", ABLATIONS[a][1]) for a in ids]


def train_missing(shared: Path, out: Path, steps: int | None, todo: list, runs: dict[str, Path]) -> dict[str, float]:
    """Train every planned student without a given run directory (minutes per id; NaN for given runs)."""
    minutes = {}
    for key, recipe, overrides in todo:
        if key in runs:
            minutes[key] = float("nan")
            continue
        extra = [*overrides, *([f"schedule.steps={steps}"] if steps else [])]
        t0 = time.perf_counter()
        runs[key] = distil_with(shared, out, recipe, key, extra)
        minutes[key] = (time.perf_counter() - t0) / 60
    return minutes


def distil_with(shared: Path, out: Path, recipe: str, run: str, overrides: list[str]) -> Path:
    """:func:`knowledge_transfer.distil` with extra recipe overrides."""
    from knowledge_transfer import training_tiles

    from multiteach.train import train

    if not overrides:
        return distil(shared, out, None, recipe, run)[0]
    base = [f"data.train=[{','.join(training_tiles(shared, out))}]", f"output_dir={out / run}"]
    return train(load_recipe(recipe, [*base, *overrides]))


def describe(recipe: Any) -> str:
    """One line of what a run trained with: steps, robust views, and each loss term's settings."""
    terms = []
    for name, cfg in recipe.active_losses().items():
        extra = ", ".join(f"{k} {v}" for k, v in cfg.items() if k in ("on", "student_view"))
        terms.append(f"{cfg.get('weight', 1.0):g}*{name}" + (f" ({extra})" if extra else ""))
    return f"{recipe.name}, {recipe.schedule.steps} steps, robust_views {recipe.data.robust_views}, " + " + ".join(
        terms
    )


def merged_embedder(a: Any, b: Any, alpha: float) -> Callable:
    """Embedder of ``(1 - alpha) * a + alpha * b`` (two :class:`RunStudent` of one architecture)."""
    import copy

    student = copy.deepcopy(a.student)
    state = interpolate_state(a.student.model.state_dict(), b.student.model.state_dict(), alpha)
    student.model.load_state_dict(state)
    return student_embedder(student, a.recipe)


#: Columns of the per-model table after the per-set ones: (header, row key, width).
MODEL_COLUMNS = (
    ("top1 tr", "top1_trained", 9),
    ("cos tr", "cos_trained", 8),
    ("top1 all", "top1_all", 9),
    ("cos all", "cos_all", 8),
    ("blur+jpg", "top1_untrained", 10),
    ("RI", "ri", 7),
)


def fmt_row(name: str, r: Mapping[str, Any], set_names: list[str]) -> str:
    per_set = "".join(f"{r['sets'][s]['knn']:>14.3f}{r['grey'][s]['knn']:>7.3f}" for s in set_names)
    tail = "".join(f"{r[key]:>{width}.3f}" for _, key, width in MODEL_COLUMNS)
    return f"{name[:44]:<44}{r['knn']:>7.3f}{r['linear']:>8.3f}{per_set}{tail}"


def print_models(rows: Mapping[str, Mapping[str, Any]], set_names: list[str], colour: Mapping[str, Any]) -> None:
    head = "".join(f"{s.split('_')[0][:10] + ' kNN':>14}{'grey':>7}" for s in set_names)
    tail = "".join(f"{title:>{width}}" for title, _, width in MODEL_COLUMNS)
    print(f"\n{'model':<44}{'kNN':>7}{'linear':>8}{head}{tail}")
    for name, r in rows.items():
        print(fmt_row(name, r, set_names))
    print(
        "  kNN/linear: balanced accuracy, mean over the sets; per set: kNN on the tiles and on grey tiles (colour "
        "removed); top1/cos: held-out top-1 retrieval / matched cosine, over the trained kinds (tr), all kinds, and "
        "blur + JPEG top-1 (never trained)."
    )
    print(
        "  colour-only baseline (per-image RGB mean + std), kNN / linear: "
        + ", ".join(f"{s} {colour[s]['knn']:.3f} / {colour[s]['linear']:.3f}" for s in set_names)
    )


def print_per_perturbation(rows: Mapping[str, Mapping[str, Any]], suite: list[str]) -> None:
    print("\ntop-1 retrieval per held-out perturbation (severity factor beyond the training range)")
    for start in range(0, len(suite), len(ORDER)):
        chunk = suite[start : start + len(ORDER)]
        print(f"  x{HELDOUT_FACTORS[start // len(ORDER)]:<5}" + "".join(f"{p:>18}" for p in chunk))
        for name, r in rows.items():
            print(f"  {name[:30]:<30}" + "".join(f"{r['per_top1'][p]:>18.3f}" for p in chunk)[10:])


def print_curve(curve: Mapping[float, Mapping[str, Any]], teacher: Mapping[str, Any], end: str) -> None:
    print(f"\nrobustness-accuracy curve: (1 - alpha) * switch-off + alpha * {end} (weight space, WiSE-FT)")
    print(
        f"{'alpha':>6}{'kNN':>7}{'linear':>8}{'top1 tr':>9}{'cos tr':>8}{'top1 all':>9}{'cos all':>8}{'x teacher':>10}"
    )
    for alpha, r in curve.items():
        ratio = r["top1_trained"] / max(teacher["top1_trained"], 1e-9)
        print(
            f"{alpha:>6.2f}{r['knn']:>7.3f}{r['linear']:>8.3f}{r['top1_trained']:>9.3f}{r['cos_trained']:>8.3f}"
            f"{r['top1_all']:>9.3f}{r['cos_all']:>8.3f}{ratio:>9.2f}x"
        )


def print_ablations(
    rows: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str], set_names: list[str], minutes: Mapping
) -> None:
    off, teacher = rows["student, switch off"], rows["teacher"]
    print("\nablations (each a robust_tiny variant; deltas against the switch-off student)")
    per_set = "".join(f"{'d kNN ' + s.split('_')[0][:7]:>15}{'grey':>7}" for s in set_names)
    print(f"{'variant':<54}{'d kNN':>7}{'d lin':>7}{per_set}{'top1 tr':>8}{'x tchr':>8}{'d blur+jpg':>11}{'min':>6}")
    for key, label in labels.items():
        r = rows[label]
        d_sets = "".join(
            f"{100 * (r['sets'][s]['knn'] - off['sets'][s]['knn']):>+15.1f}"
            f"{100 * (r['grey'][s]['knn'] - off['grey'][s]['knn']):>+7.1f}"
            for s in set_names
        )
        print(
            f"{label[:54]:<54}{100 * (r['knn'] - off['knn']):>+7.1f}"
            f"{100 * (r['linear'] - off['linear']):>+7.1f}{d_sets}"
            f"{r['top1_trained']:>8.3f}{r['top1_trained'] / max(teacher['top1_trained'], 1e-9):>7.1f}x"
            f"{r['top1_untrained'] - off['top1_untrained']:>+11.3f}{minutes.get(key, float('nan')):>6.1f}"
        )
    print("  (d: points of balanced accuracy; grey: the same on grey tiles; one TCGA test tile moves it ~1.7 points)")


def plot_curve(path: Path, curve: Mapping[float, Mapping], points: Mapping[str, Mapping], teacher: Mapping) -> None:
    """PNG: kNN balanced accuracy vs held-out top-1 on the trained kinds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    xs = [r["top1_trained"] for r in curve.values()]
    ax.plot(xs, [r["knn"] for r in curve.values()], "o-", color="tab:blue", label="merge (1-a)*off + a*robust")
    for alpha, r in curve.items():
        ax.annotate(f"a={alpha:g}", (r["top1_trained"], r["knn"]), textcoords="offset points", xytext=(5, 5))
    ax.scatter([teacher["top1_trained"]], [teacher["knn"]], marker="*", s=200, color="black", label="teacher")
    ends = list(curve.values())
    ax.scatter([ends[0]["top1_trained"]], [ends[0]["knn"]], marker="s", s=90, color="tab:green", label="switch off")
    ax.scatter([ends[-1]["top1_trained"]], [ends[-1]["knn"]], marker="s", s=90, color="tab:red", label="curve end")
    colours = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
    for (name, r), marker, colour in zip(points.items(), "D^vP<>", colours, strict=False):
        ax.scatter([r["top1_trained"]], [r["knn"]], marker=marker, s=80, color=colour, label=name)
    ax.set_xlabel("held-out top-1 retrieval, trained kinds (robustness)")
    ax.set_ylabel("kNN balanced accuracy, mean over sets (accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checks(on: Mapping, off: Mapping, teacher: Mapping) -> tuple[float, float, float, list[str]]:
    """The recipe's student against its targets: (top-1 / teacher, kNN pts vs off, blur+JPEG top-1 vs off, lines)."""
    ratio = on["top1_trained"] / max(teacher["top1_trained"], 1e-9)
    d_knn, d_untrained = 100 * (on["knn"] - off["knn"]), on["top1_untrained"] - off["top1_untrained"]
    lines = [
        f"held-out top-1, trained kinds >= {MIN_TOP1_OVER_TEACHER:g}x the teacher's: {ratio:.2f}x "
        f"({on['top1_trained']:.3f} vs {teacher['top1_trained']:.3f}) -> {'met' if ratio >= 2 else 'NOT met'}",
        f"kNN within {MAX_KNN_LOSS_PTS:g} points of the switch-off student: {d_knn:+.1f} pts "
        f"({on['knn']:.3f} vs {off['knn']:.3f}) -> {'met' if d_knn >= -MAX_KNN_LOSS_PTS else 'NOT met'}",
        f"blur/JPEG top-1 not more than {MAX_BLUR_JPEG_LOSS:g} below the switch-off student: {d_untrained:+.3f} "
        f"({on['top1_untrained']:.3f} vs {off['top1_untrained']:.3f}) -> "
        f"{'met' if d_untrained >= -MAX_BLUR_JPEG_LOSS else 'NOT met'}",
    ]
    return ratio, d_knn, d_untrained, lines


def best_merge(curve: Mapping[float, Mapping], off: Mapping, teacher: Mapping) -> tuple[float, float, float]:
    """(alpha, top-1 / teacher, kNN pts vs off) of the most robust merge within 2 kNN points of the switch-off
    student (the best kNN one when none is)."""
    inner = {a: r for a, r in curve.items() if 0 < a < 1} or dict(curve)
    ok = {a: r for a, r in inner.items() if 100 * (r["knn"] - off["knn"]) >= -MAX_KNN_LOSS_PTS}
    alpha = max(ok, key=lambda a: ok[a]["top1_trained"]) if ok else max(inner, key=lambda a: inner[a]["knn"])
    r = curve[alpha]
    return alpha, r["top1_trained"] / max(teacher["top1_trained"], 1e-9), 100 * (r["knn"] - off["knn"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.environ.get("MULTITEACH_SHARED", "../shared/data"))
    ap.add_argument("--out", default="runs/bench_robust")
    ap.add_argument("--steps", type=int, default=None, help="override every trained recipe's schedule.steps")
    ap.add_argument("--run-off", default=None, help="score this distill_tiny run instead of training one")
    ap.add_argument("--run-on", default=None, help="score this robust_tiny run instead of training one")
    ap.add_argument("--run", action="append", metavar="ID=DIR", help=f"reuse a run: ID in {', '.join(ABLATIONS)}")
    ap.add_argument("--ablations", default=None, help=f"ablation ids to score (default all: {','.join(ABLATIONS)})")
    ap.add_argument("--curve-end", default="strong", help="ablation id merged with the switch-off student")
    ap.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="merge weights of the curve's robust end")
    ap.add_argument("--cv-repeats", type=int, default=10, help="fold seeds of the repeated kNN CV (LC25000)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    ap.add_argument("--png", default=None, help="curve image (default OUT/robust_curve.png)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    shared, out = Path(args.shared), Path(args.out)
    alphas = sorted({float(a) for a in args.alphas.split(",")} | {0.0, 1.0})
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")

    todo, runs = plan(args), parse_runs(args)
    minutes = train_missing(shared, out, args.steps, todo, runs)
    loaded = {key: load_run_student(runs[key]) for key, _, _ in todo}
    labels = {"off": "student, switch off", "on": "student, robust_tiny (recipe)"}
    labels.update({a: f"{a}: {ABLATIONS[a][0]}" for a, _, _ in todo[2:]})
    for key, _, _ in todo:
        print(f"{labels[key]}: {runs[key]}, {minutes[key]:.1f} min; {describe(loaded[key].recipe)}")
    views = loaded["on"].recipe.data.robust_views or load_recipe("robust_tiny").data.robust_views  # a plain --run-on
    ranges = {k: tuple(v) for k, v in views.items() if k != "p"}
    suite = heldout_suite(ranges)
    crop = int(loaded["on"].recipe.data.global_crops.size)
    bench = Bench(shared, crop, suite, list(ranges), args.cv_repeats)
    print(f"training ranges (robust_tiny): {ranges}; p {views['p']}")
    print(f"held-out severities: {', '.join(suite)}")

    t0 = time.perf_counter()
    cache = ScoreCache(out / "scores.json", f"cv{args.cv_repeats}|crop{crop}|{','.join(suite)}")
    rows = {"teacher": cache.get("teacher", lambda: bench.score(resolve_model(TEACHER)))}
    for key, label in labels.items():  # one run given twice (e.g. as an ablation too) is scored once
        r = loaded[key]
        rows[label] = cache.get(
            str(r.checkpoint.resolve()), lambda r=r: bench.score(student_embedder(r.student, r.recipe))
        )
    end, a, b = labels[args.curve_end], loaded["off"], loaded[args.curve_end]
    curve = {0.0: rows[labels["off"]], 1.0: rows[end]}  # alpha 0 and 1 are the parents bit for bit
    for alpha in alphas:
        if alpha not in curve:
            key = f"merge {alpha:g}|{a.checkpoint.resolve()}|{b.checkpoint.resolve()}"
            curve[alpha] = cache.get(key, lambda alpha=alpha: bench.score(merged_embedder(a, b, alpha)))
    curve = dict(sorted(curve.items()))
    scoring = (time.perf_counter() - t0) / 60

    set_names = list(bench.sets)
    n = bench.copies["clean"].shape[0]
    print(
        f"\n{n} labelled images ({', '.join(set_names)}), {len(suite)} held-out perturbations; chance top-1 = ", end=""
    )
    print(f"{1 / (2 * n - 1):.4f}; scoring took {scoring:.1f} min")
    print_models(
        {**rows, **{f"merge alpha {a:g}": r for a, r in curve.items() if 0 < a < 1}}, set_names, bench.colour_only()
    )
    print_per_perturbation(rows, list(suite))
    print_curve(curve, rows["teacher"], ABLATIONS[args.curve_end][0])
    png = Path(args.png) if args.png else out / "robust_curve.png"
    plot_curve(
        png, curve, {labels[k]: rows[labels[k]] for k in labels if k not in ("off", args.curve_end)}, rows["teacher"]
    )
    print(f"curve written to {png}")
    print_ablations(rows, {k: v for k, v in labels.items() if k != "off"}, set_names, minutes)

    on, off, teacher = rows[labels["on"]], rows[labels["off"]], rows["teacher"]
    ratio, d_knn, _, lines = checks(on, off, teacher)
    print("\nthe recipe's own student (robust_tiny, no merge) against its targets:")
    print("\n".join(f"  {line}" for line in lines))
    alpha, m_ratio, m_knn = best_merge(curve, off, teacher)
    print(
        f"\nsummary: robust student / teacher {ratio:.2f}x, kNN {d_knn:+.1f} pts vs switch-off; "
        f"best merge alpha {alpha:.2f}: {m_ratio:.2f}x, kNN {m_knn:+.1f} pts"
    )


if __name__ == "__main__":
    main()
