"""Teacher targets at a lab's scale: what a cached tile costs at each storage setting, how faithful the stored
targets are, and whether a student trained from compressed targets is as good.

    HF_HUB_OFFLINE=1 python benchmarks/cache_scale.py [--shared ../shared/data] [--out runs/bench_cache_scale]
        [--steps 150] [--views 4] [--patch-dims 32] [--variants float32,bfloat16,int8,int8+pca]

In one run, on the same data, with the demo's two teachers (``multiteach-tiny``, the real pretrained teacher shipped
in the package, and the H-optimus-0-like random stand-in ``multiteach demo`` writes), the built-in ``demo`` recipe on
the shared unlabelled tiles (``data.train``), ``--views`` replayed views per tile:

1. for every storage variant (``cache.dtype`` and, for ``+pca``, ``cache.patch_dims``), one run trains the demo
   student for ``--steps`` steps with ``cache.dir`` set to a fresh folder: the run computes the teachers' targets,
   stores them compressed and trains on what a reader of the folder gets back (the same steps, data, views and seed
   in every variant: only the storage differs);
2. bytes per tile per teacher: the folder's shard bytes per stored (tile, view) row, times the views per tile
   (:func:`multiteach.cache.cache_info`);
3. target fidelity: the first batches' targets read from each folder against those of the float32 folder (the
   uncompressed reference), mean cosine per row, summary and patch tokens;
4. the student's kNN (k = 10, balanced accuracy; LC25000 subset: 5-fold CV over --cv-repeats fold seeds; TCGA
   LUAD/LUSC: its slide-disjoint split; NCT smoke set: CV) on the labelled shared sets, mean over sets.

Prints one JSON line per variant, a table, and on its last line the summary (KiB/tile, fidelity, kNN change of the
smallest variant against float32; goal: <= 100 KiB per tile for the two teachers, kNN not more than 1 point below
float32), after a line estimating an 8-run sweep of 10^6 tile draws (time per draw of a live run, of the run that
fills the smallest folder and of a sweep's next run reading it, all measured here; disk from KiB/tile).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from multiteach.build import build_student_from, data_loader, training_source
from multiteach.cache import cache_info, cosine_fidelity, open_cache
from multiteach.config import load_recipe
from multiteach.eval.embed import load_images
from multiteach.eval.transfer import classification_scores, embed_images, load_shared_sets, student_embedder
from multiteach.runs import load_run_student
from multiteach.standins import write_standin_teachers
from multiteach.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GOAL_KIB, GOAL_KNN_PTS = 100.0, 1.0
SWEEP_RUNS, SWEEP_TILES = 8, 1e6


def variant_overrides(name: str, patch_dims: int) -> list[str]:
    dtype, _, pca = name.partition("+")
    return [f"cache.dtype={dtype}"] + ([f"cache.patch_dims={patch_dims}"] if pca else [])


def distil(base: list[str], out: Path, name: str, patch_dims: int) -> tuple[Path, float]:
    """Train the demo student from a fresh cache folder stored as ``name``; (run dir, minutes)."""
    over = [*base, f"output_dir={out / 'runs' / name}", f"cache.dir={out / 'caches' / name}"]
    t0 = time.perf_counter()
    run = train(load_recipe("demo", [*over, *variant_overrides(name, patch_dims)]))
    return run, (time.perf_counter() - t0) / 60


def fidelity(base: list[str], out: Path, name: str, patch_dims: int, batches: int) -> dict[str, dict[str, float]]:
    """Mean cosine of the first ``batches`` batches' targets read from folder ``name`` vs the float32 folder."""
    recipes = {
        v: load_recipe("demo", [*base, f"cache.dir={out / 'caches' / v}", *variant_overrides(v, patch_dims)])
        for v in ("float32", name)
    }
    caches = {v: open_cache(r) for v, r in recipes.items()}
    recipe = recipes["float32"]
    loader = data_loader(
        recipe, training_source(recipe), build_student_from(recipe), 0, 1, 0, cache=caches[name].replay
    )
    got: dict[str, dict[str, list[float]]] = {}
    for _, batch in zip(range(batches), loader):
        ref, test = caches["float32"](batch, "cpu"), caches[name](batch, "cpu")
        for teacher in ref:
            per = got.setdefault(teacher, {"summary": [], "patch": []})
            per["summary"].append(cosine_fidelity(test[teacher].summary, ref[teacher].summary))
            per["patch"].append(cosine_fidelity(test[teacher].patch_tokens, ref[teacher].patch_tokens))
    computed = sum(c.computed_rows for c in caches.values())
    if computed:
        raise SystemExit(f"fidelity read {computed} rows the runs had not stored: the views differ between variants")
    return {t: {k: float(np.mean(v)) for k, v in parts.items()} for t, parts in got.items()}


def knn(run: Path, sets: dict, images: dict, cv_repeats: int) -> dict[str, float]:
    loaded = load_run_student(run)
    embed = student_embedder(loaded.student, loaded.recipe)
    scores = {
        n: classification_scores(sets[n], embed_images(embed, images[n]), cv_repeats=cv_repeats, linear=False)["knn"]
        for n in sets
    }
    return {**scores, "mean": float(np.mean(list(scores.values())))}


def sweep_times(base: list[str], out: Path, best: str, patch_dims: int, rows: dict) -> dict[str, float]:
    """Per tile draw: a live run, the run that fills the ``best`` folder (its variant run) and a sweep's next run
    that reads it; and the cost of an 8-run sweep of 10^6 tile draws from them."""
    recipe = load_recipe("demo", base)
    draws = recipe.schedule.steps * recipe.optim.batch_size
    t0 = time.perf_counter()
    train(load_recipe("demo", [*base, "cache=null", f"output_dir={out / 'runs' / 'live'}"]))
    live = time.perf_counter() - t0
    over = [
        *base,
        f"output_dir={out / 'runs' / 'reread'}",
        f"cache.dir={out / 'caches' / best}",
        "losses.dino.weight=0.05",
    ]
    t0 = time.perf_counter()
    run = train(load_recipe("demo", [*over, *variant_overrides(best, patch_dims)]))
    read = time.perf_counter() - t0
    line = [x for x in (run / "train.log").read_text().splitlines() if "target rows read" in x][-1]
    fill = rows[best]["train_min"] * 60
    per = {"live_s_per_draw": live / draws, "fill_s_per_draw": fill / draws, "read_s_per_draw": read / draws}
    sweep_live = SWEEP_RUNS * SWEEP_TILES * per["live_s_per_draw"]
    sweep_cached = SWEEP_TILES * (per["fill_s_per_draw"] + (SWEEP_RUNS - 1) * per["read_s_per_draw"])
    return {
        "draws_per_run": draws,
        "live_min": round(live / 60, 2),
        "fill_min": round(fill / 60, 2),
        "read_min": round(read / 60, 2),
        "reread_log": line.split(": ", 2)[-1],
        **{k: round(v * 1000, 2) for k, v in per.items()},
        "sweep_live_h": sweep_live / 3600,
        "sweep_cached_h": sweep_cached / 3600,
        "sweep_speedup": sweep_live / sweep_cached,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--out", type=Path, default=Path("runs/bench_cache_scale"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--views", type=int, default=4, help="cache.views_per_tile")
    p.add_argument("--patch-dims", type=int, default=32, help="cache.patch_dims of the +pca variants")
    p.add_argument("--variants", default="float32,bfloat16,int8,int8+pca")
    p.add_argument("--fidelity-batches", type=int, default=4)
    p.add_argument("--cv-repeats", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    variants = args.variants.split(",")
    if variants[0] != "float32":
        raise SystemExit("the first variant must be float32 (the uncompressed reference)")
    tiles = args.shared / "unlabeled_tiles_224" / "tiles"
    if not tiles.is_dir():
        raise SystemExit(f"needs the shared unlabelled tiles at {tiles}")
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    standins = write_standin_teachers(args.out / "standins", ("h-optimus-0",))
    base = [
        f"data.train={tiles}",
        "data.slides=null",
        f"schedule.steps={args.steps}",
        f"cache.views_per_tile={args.views}",
        "train.checkpoint_every=100000",
        *[f"teachers.{n}.weights={w}" for n, w in standins.items()],
    ]
    sets = load_shared_sets(args.shared / "labeled")
    images = {name: load_images(data.all_paths, 224) for name, data in sets.items()}
    rows = {}
    for name in variants:
        run, minutes = distil(base, args.out, name, args.patch_dims)
        info = cache_info(args.out / "caches" / name)
        rows[name] = {
            "bench": "cache_scale",
            "variant": name,
            "dtype": info["storage"]["dtype"],
            "patch_dims": info["storage"]["patch_dims"],
            "views_per_tile": info["views_per_tile"],
            "rows": info["rows"],
            "kib_per_tile": {t: round(b / 1024, 2) for t, b in info["bytes_per_tile"].items()},
            "kib_per_tile_total": round(sum(info["bytes_per_tile"].values()) / 1024, 2),
            "kib_per_view_total": round(sum(info["bytes_per_row"].values()) / 1024, 2),
            "train_min": round(minutes, 2),
            "knn": {k: round(v, 4) for k, v in knn(run, sets, images, args.cv_repeats).items()},
        }
        if name != "float32":
            rows[name]["fidelity"] = fidelity(base, args.out, name, args.patch_dims, args.fidelity_batches)
        print(json.dumps(rows[name]), flush=True)

    # the sweep's next run on the smallest folder (reads every row) and a live run (no cache), for the time figures
    best = min(rows.values(), key=lambda r: r["kib_per_tile_total"])
    timing = sweep_times(base, args.out, best["variant"], args.patch_dims, rows)
    print(json.dumps({"bench": "cache_scale", "timing": timing}), flush=True)

    ref = rows["float32"]
    header = "variant | KiB/tile (both teachers) | KiB/view | x smaller | fidelity summary / patch (min) | kNN mean"
    print(f"\n| {header} | vs float32 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        fid = r.get("fidelity")
        fid_s = "1 / 1 (reference)" if fid is None else (
            f"{min(f['summary'] for f in fid.values()):.4f} / {min(f['patch'] for f in fid.values()):.4f}"
        )  # fmt: skip
        delta = 100 * (r["knn"]["mean"] - ref["knn"]["mean"])
        ratio = ref["kib_per_tile_total"] / r["kib_per_tile_total"]
        print(f"| {name} | {r['kib_per_tile_total']:.1f} | {r['kib_per_view_total']:.1f} | {ratio:.1f}x | {fid_s} | "
              f"{r['knn']['mean']:.3f} | {delta:+.1f} pts |")  # fmt: skip
    delta = 100 * (best["knn"]["mean"] - ref["knn"]["mean"])
    fid = best.get("fidelity") or {}
    fid_s = ", ".join(f"{t} {f['summary']:.4f}/{f['patch']:.4f}" for t, f in fid.items()) or "reference"
    met = best["kib_per_tile_total"] <= GOAL_KIB and delta >= -GOAL_KNN_PTS
    print(
        f"\nsweep at scale (from these per-tile figures): {SWEEP_RUNS} runs x {SWEEP_TILES:.0e} tile draws: live "
        f"{timing['sweep_live_h']:.0f} h, cached {timing['sweep_cached_h']:.0f} h ({timing['sweep_speedup']:.2f}x); "
        f"disk {SWEEP_TILES * best['kib_per_tile_total'] / 2**20:.1f} GiB ({best['variant']}, "
        f"all {best['views_per_tile']} views) vs {SWEEP_TILES * ref['kib_per_tile_total'] / 2**20:.0f} GiB float32"
    )
    print(
        f"summary: {best['variant']}: {best['kib_per_tile_total']:.1f} KiB/tile for {len(best['kib_per_tile'])} "
        f"teachers x {best['views_per_tile']} views vs float32 {ref['kib_per_tile_total']:.1f} KiB/tile "
        f"({ref['kib_per_tile_total'] / best['kib_per_tile_total']:.1f}x smaller); fidelity (summary/patch) {fid_s}; "
        f"kNN {best['knn']['mean']:.3f} vs {ref['knn']['mean']:.3f} ({delta:+.1f} pts) after {args.steps} steps "
        f"(goal <= {GOAL_KIB:g} KiB/tile, kNN at most {GOAL_KNN_PTS:g} pt below: {'met' if met else 'NOT met'}); "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {(time.perf_counter() - t_start) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
