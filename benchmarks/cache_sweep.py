"""A 4-run ablation sweep with and without the teacher-feature cache.

Four loss-weight variants (``losses.t.patch.weight`` = 0, 0.25, 0.5, 1) of one recipe: a ViT-B/16 teacher
(``vit_base_patch16_224``, random init, bf16) distilled into a ViT-Ti/16 student at 112 px, ``--steps`` steps
of ``--batch`` tiles (2 global crops each), on CPU. The teacher resizes the 112 px global crops to
``--teacher-size`` (default 160 px, a 10x10 grid): at its native 224 px one teacher batch costs ~4x the
112 px one (measured 16 s vs 4 s for 64 crops side by side on 2 cores) and the sweep would not fit in ~8
minutes; at 160 px (~2x the 112 px cost) the teacher costs ~3x the student step, still far less than a real
pathology teacher (ViT-L/H/g at 224 px) next to a small student, where the cache gains more.

* live: each run runs the teacher on its own global crops every step;
* cached: ``write_cache`` runs the teacher once on the ``views_per_tile = 2`` replayed views of every tile (one
  epoch of tiles: exactly one run's worth of crops), then every run reads its targets from the cache.

Live and cached runs alternate (sharing the machine's noise). From the runs' per-step times (metrics with
``log_every: 1``, first step dropped): s = student step (cached run: student + data + cache read) and
t = teacher forward per batch (live step - cached step). The ideal speedup of N runs is
``N (t + s) / (t + N s)``; the measured one is (sum of live runs) / (cache write + sum of cached runs), all
wall time including each run's set-up (also given in this process's CPU time, which other processes on a
shared machine do not inflate). Goals: measured / ideal >= 0.9, measured >= 1.8x. The cached targets
are checked against the live teacher on the same views (bitwise after the cast to bf16, else within bf16
rounding), and the cache size is reported per 1,000 tiles.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cache_sweep.py [--steps 12] [--batch 32] [--teacher-size 160]
[--data DIR]`` (about 5 minutes on 2 idle cores).
Uses ../shared/data/unlabeled_tiles_224/tiles when present (the first steps x batch tiles), else synthetic tiles.
Prints one JSON line and a SUMMARY line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from multiteach.build import build_student_from, build_teachers, data_loader, training_source
from multiteach.cache import cache_info, open_cache, write_cache
from multiteach.config import load_recipe
from multiteach.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = ["0", "0.25", "0.5", "1"]
RECIPE = """
name: cache-sweep
seed: 0
output_dir: {out}
data:
  train: {data}
  global_crops: {{n: 2, size: 112}}
  local_crops: {{n: 0}}
student: {{arch: vit_tiny_patch16_224, img_size: 112}}
teachers:
  t: {{source: vit_base_patch16_224, pretrained: false, input_size: {teacher_size}, dtype: bfloat16}}
heads:
  t: {{kind: linear}}
losses:
  t.cls: {{type: cosine, teacher: t}}
  t.patch: {{type: cosine, teacher: t, on: patch}}
optim: {{lr: 1.0e-4, batch_size: {batch}, clip_grad: null}}
schedule: {{steps: {steps}}}
train: {{log_every: 1, checkpoint_every: 100000, keep_ema: false}}
cache: {{views_per_tile: 2, dtype: bfloat16}}
"""


def tile_list(root: Path, n: int, data: Path) -> Path:
    """A list file of the first ``n`` tiles of ``data`` (or of ``n`` synthetic tiles)."""
    if data.is_dir():
        paths = sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    else:
        from tests.engine_fixtures import write_tiles  # synthetic tiles when ../shared is absent

        paths = sorted(write_tiles(root / "tiles", n=n, size=224).iterdir())
    if len(paths) < n:
        raise SystemExit(f"need {n} tiles, {data} has {len(paths)}")
    listing = root / "tiles.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    return listing


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, result) of ``fn(*args)``."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0, out


def run(recipe) -> tuple[float, float, list[float]]:
    """Train; return (wall s, CPU s, both including set-up; per-step wall seconds after the first)."""
    wall, cpu, run_dir = timed(train, recipe)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return wall, cpu, [recipe.optim.batch_size / r["img_per_s"] for r in recs[1:]]


def check_targets(recipe) -> dict:
    """Cached targets vs the live teacher on the same replayed views: the first batch of a run, read from the cache."""
    set_seed(recipe.seed)  # the teacher exactly as a live run (and the writer) builds it
    teacher = build_teachers(recipe, ["t"])["t"]
    cache = open_cache(recipe)
    loader = data_loader(recipe, training_source(recipe), build_student_from(recipe), 0, 1, 0, cache=cache.replay)
    batch = next(iter(loader))
    got, ref = cache(batch, "cpu")["t"], teacher(batch["global"])
    out = {"rows_read": cache.read_rows, "rows_computed": cache.computed_rows}
    for part, a, b in (("summary", got.summary, ref.summary), ("patch", got.patch_tokens, ref.patch_tokens)):
        bf16 = b.to(torch.bfloat16).float()
        rel = ((a - b).abs() / b.abs().clamp_min(1e-6)).max().item()
        out[part] = {"bitwise_bf16": bool(torch.equal(a, bf16)), "max_rel_err": rel, "within_bf16": rel <= 2**-8}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--teacher-size", type=int, default=160, help="teacher input size in pixels (native: 224)")
    p.add_argument("--data", default=str(SHARED / "unlabeled_tiles_224" / "tiles"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    n_runs = len(VARIANTS)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_tiles = args.steps * args.batch  # one epoch = one run's crops = n_views (2) views per tile
        path = root / "recipe.yaml"
        path.write_text(
            RECIPE.format(
                out=root / "run",
                data=tile_list(root, n_tiles, Path(args.data)),
                batch=args.batch,
                steps=args.steps,
                teacher_size=args.teacher_size,
            )
        )
        cache_dir = root / "cache"

        def recipe(mode: str, i: int):
            extra = [f"cache.dir={cache_dir}"] if mode == "cached" else []
            return load_recipe(path, [f"losses.t.patch.weight={VARIANTS[i]}", f"output_dir={root}/{mode}{i}", *extra])

        write_s, write_cpu, _ = timed(write_cache, recipe("cached", 0))
        walls, cpus, steps = {"live": [], "cached": []}, {"live": [], "cached": []}, {"live": [], "cached": []}
        for i in range(n_runs):  # alternate, to share the machine's noise
            for mode in ("live", "cached"):
                wall, cpu, per_step = run(recipe(mode, i))
                walls[mode].append(wall)
                cpus[mode].append(cpu)
                steps[mode] += per_step
        match = check_targets(recipe("cached", 0))
        info = cache_info(cache_dir)
        size_per_1000 = info["bytes"] / info["tiles"] * 1000

    live_step, cached_step = statistics.median(steps["live"]), statistics.median(steps["cached"])
    s, t = cached_step, max(live_step - cached_step, 0.0)
    ideal = n_runs * (t + s) / (t + n_runs * s)
    live_total, cached_total = sum(walls["live"]), write_s + sum(walls["cached"])
    speedup = live_total / cached_total
    speedup_cpu = sum(cpus["live"]) / (write_cpu + sum(cpus["cached"]))  # insensitive to other processes
    parts = [match["summary"], match["patch"]]
    bitwise = all(m["bitwise_bf16"] for m in parts)
    within = all(m["within_bf16"] for m in parts)
    matched = "bitwise (bf16)" if bitwise else ("within bf16 rounding" if within else "NO")
    rec = {
        "bench": "cache_sweep",
        "teacher": f"vit_base_patch16_224 (random init, bf16, {args.teacher_size} px)",
        "student": "vit_tiny_patch16 @112",
        "runs": n_runs,
        "variants": f"losses.t.patch.weight={','.join(VARIANTS)}",
        "steps": args.steps,
        "batch": args.batch,
        "tiles": n_tiles,
        "views_per_tile": 2,
        "t_teacher_s": round(t, 3),
        "s_student_s": round(s, 3),
        "live_step_s": round(live_step, 3),
        "cache_write_s": round(write_s, 1),
        "live_runs_s": [round(w, 1) for w in walls["live"]],
        "cached_runs_s": [round(w, 1) for w in walls["cached"]],
        "live_total_s": round(live_total, 1),
        "cached_total_s": round(cached_total, 1),
        "speedup": round(speedup, 3),
        "ideal": round(ideal, 3),
        "measured_vs_ideal": round(speedup / ideal, 3),
        "cpu_s": {"live": [round(c, 1) for c in cpus["live"]], "write": round(write_cpu, 1)}
        | {"cached": [round(c, 1) for c in cpus["cached"]]},
        "speedup_cpu_time": round(speedup_cpu, 3),
        "measured_vs_ideal_cpu_time": round(speedup_cpu / ideal, 3),
        "goals": {"measured_vs_ideal": ">= 0.9", "speedup": ">= 1.8"},
        "targets_match": matched,
        "target_check": match,
        "cache_mib_per_1000_tiles": round(size_per_1000 / 2**20, 1),
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "bench_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(rec))
    print(
        f"SUMMARY cache sweep ({n_runs} runs x {args.steps} steps x batch {args.batch}, ViT-B teacher @"
        f"{args.teacher_size} -> ViT-Ti @112, "
        f"CPU): t={t:.2f} s/batch teacher, s={s:.2f} s/batch student; speedup {speedup:.2f}x measured vs "
        f"{ideal:.2f}x ideal (ratio {speedup / ideal:.2f}, goal >= 0.9; goal >= 1.8x) [CPU time: {speedup_cpu:.2f}x, "
        f"ratio {speedup_cpu / ideal:.2f}]; targets {matched}; {size_per_1000 / 2**20:.0f} MiB per 1,000 tiles; "
        f"load avg {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
