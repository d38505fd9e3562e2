"""Evaluation speed: kNN (k=20, cosine) + linear probe of a random-init ViT-S/16 at 224 px on the 190 TCGA
LUAD/LUSC tiles (slide-disjoint train/test) on this machine. Goal: under a minute on 2 CPU cores.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eval_speed.py [--data ../shared/data/labeled/tcga_luad_lusc_uni]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from multiteach.eval.run import evaluate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "labeled" / "tcga_luad_lusc_uni"),
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate(["vit_small_patch16_224"], Path(args.data), pretrained=False, seed=0, out_dir=Path(tmp))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rec = {
        "bench": "eval_speed",
        "model": "vit_small_patch16_224 (random init)",
        "tiles": 190,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "threads": torch.get_num_threads(),
        "load_avg": round(os.getloadavg()[0], 2),
        "metrics": res["metrics"]["vit_small_patch16_224"],
        "goal": "wall < 60 s",
    }
    print(json.dumps(rec))
    print(
        f"SUMMARY eval speed: kNN + linear probe for ViT-S on 190 TCGA tiles in {wall:.1f} s wall "
        f"({cpu:.1f} s CPU, load {rec['load_avg']})"
    )


if __name__ == "__main__":
    main()
