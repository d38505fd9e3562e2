"""Engine overhead and data-pipeline speed, measured side by side in one run.

1. ``multiteach.train.train`` (Accelerate, schedules, checkpoint/NaN/stop checks, metrics) vs a hand-written
   PyTorch loop doing the same maths: same student (ViT-Ti/16 @112), same frozen teacher (random ViT-S/16),
   same loss (cosine on summary + patch through linear heads), same batches from the same loader, AdamW.
   Goal: engine step time <= 1.05 x hand-written.
2. The data pipeline alone (decode + multi-crop + collate) in img/s vs the training step in img/s.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/engine_overhead.py [--steps 30] [--data DIR]``.
Uses ../shared/data/unlabeled_tiles_224 when present, else writes synthetic tiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from multiteach.build import build_components, data_loader, training_source
from multiteach.config import load_recipe
from multiteach.train import train

RECIPE = """
name: bench
seed: 0
output_dir: {out}
data:
  train: {data}
  global_crops: {{n: 2, size: 112}}
  local_crops: {{n: 0}}
student: {{arch: vit_tiny_patch16_224, img_size: 112}}
teachers:
  t: {{source: vit_small_patch16_224, pretrained: false, input_size: 112, dtype: bfloat16}}
heads:
  t: {{kind: linear}}
losses:
  t.cls: {{type: cosine, teacher: t}}
  t.patch: {{type: cosine, teacher: t, on: patch}}
optim: {{lr: 1.0e-4, batch_size: {batch}, clip_grad: null}}
schedule: {{steps: {steps}}}
train: {{log_every: 1, checkpoint_every: 100000, keep_ema: false}}
"""


def hand_loop(recipe, steps: int) -> list[float]:
    """The same maths without the engine: returns per-step seconds."""
    torch.manual_seed(recipe.seed)
    comps = build_components(recipe)
    model, teacher = comps.model, comps.teachers["t"]
    student, heads = model.student, model.loss.heads
    mean, std = model.mean, model.std
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay
    )
    loader = data_loader(recipe, training_source(recipe), student, 0, 1, 0)
    times, t0 = [], time.perf_counter()
    for batch in loader:
        x = batch["global"]
        with torch.no_grad():
            t = teacher(x).as_target()
        s = student((x - mean) / std)
        cls = 1 - torch.nn.functional.cosine_similarity(heads("t", "summary", s.summary), t.summary, dim=-1).mean()
        patch = (
            1
            - torch.nn.functional.cosine_similarity(heads("t", "patch", s.patch_tokens), t.patch_tokens, dim=-1).mean()
        )
        loss = cls + patch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        now = time.perf_counter()
        times.append(now - t0)
        t0 = now
    return times


def engine_step_times(recipe) -> list[float]:
    run = train(recipe)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [recipe.optim.batch_size / r["img_per_s"] for r in recs]


def data_only(recipe, batches: int) -> float:
    comps_student = build_components(recipe).model.student
    loader = data_loader(recipe, training_source(recipe), comps_student, 0, 1, 0)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(it)["global"].shape[0] // recipe.data.global_crops.n
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "unlabeled_tiles_224" / "tiles")
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data)
        if not data.is_dir():
            from tests.engine_fixtures import write_tiles  # synthetic tiles when ../shared is absent

            data = write_tiles(Path(tmp) / "tiles", n=128, size=224)
        rows = {"engine": [], "hand": []}
        for rnd in range(2):  # alternate to share the machine's noise
            path = Path(tmp) / f"recipe{rnd}.yaml"
            path.write_text(RECIPE.format(out=f"{tmp}/run{rnd}", data=data, batch=args.batch, steps=args.steps))
            recipe = load_recipe(path)
            rows["hand"] += hand_loop(recipe, args.steps)[3:]
            rows["engine"] += engine_step_times(recipe)[3:]
        hand, engine = statistics.median(rows["hand"]), statistics.median(rows["engine"])
        data_ips = data_only(recipe, 10)
    step_ips = args.batch / engine
    rec = {
        "bench": "engine_overhead",
        "student": "vit_tiny_patch16 @112",
        "teacher": "vit_small_patch16 (bf16)",
        "batch": args.batch,
        "hand_step_s": round(hand, 4),
        "engine_step_s": round(engine, 4),
        "ratio": round(engine / hand, 3),
        "goal": "<= 1.05",
        "data_img_s": round(data_ips, 1),
        "train_img_s": round(step_ips, 1),
        "data_vs_train": round(data_ips / step_ips, 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(rec))
    print(
        f"SUMMARY engine overhead: {engine:.3f} s/step vs hand-written {hand:.3f} s/step (ratio {engine / hand:.3f}); "
        f"data pipeline {data_ips:.0f} img/s vs training {step_ips:.0f} img/s ({data_ips / step_ips:.1f}x)"
    )


if __name__ == "__main__":
    main()
