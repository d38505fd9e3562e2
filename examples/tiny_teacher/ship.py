"""Package a `pretrain_tiny` checkpoint as the shipped `multiteach-tiny` teacher.

    python examples/tiny_teacher/ship.py RUN_DIR [--step N] [--curve curve.csv] [--out DIR]

Writes, in timm's hub layout: ``model.safetensors`` (the EMA student's timm weights in float16, metadata:
mean/std, input size, token layout), ``config.json`` (timm ``architecture`` + ``model_args`` +
``pretrained_cfg``), ``curve.csv`` and ``metrics.jsonl`` (how it was measured while training), and
``SHA256SUMS`` (checked before every load). The model card (README.md) is written by hand next to them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from multiteach.atomic import atomic_save_safetensors, atomic_write_json
from multiteach.build import build_student_from
from multiteach.config import load_recipe
from multiteach.runs import STUDENT_PREFIX
from multiteach.standins import timm_config
from multiteach.teachers.shipped import shipped_dir, write_digests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    ap.add_argument("--curve", default=None, help="curve.csv from examples/tiny_teacher/curve.py")
    ap.add_argument("--live", action="store_true", help="ship the live weights instead of the EMA weights")
    ap.add_argument("--out", default=str(shipped_dir("multiteach-tiny")))
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    ckpt = ckpts[-1] if args.step is None else run / "checkpoints" / f"step_{args.step:08d}"
    recipe = load_recipe(run / "recipe.yaml")
    student = build_student_from(recipe)
    sd = load_file(str(ckpt / ("model.safetensors" if args.live else "ema.safetensors")))
    student.load_state_dict({k[len(STUDENT_PREFIX) :]: v for k, v in sd.items() if k.startswith(STUDENT_PREFIX)})
    model = student.model.eval()
    weights = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    size = int(recipe.student.img_size)
    args_json = {"img_size": size, **student.model_kwargs}
    meta = {
        "format": "pt",
        "multiteach_teacher": "multiteach-tiny",
        "architecture": student.arch,
        "mean": json.dumps(list(recipe.student.mean)),
        "std": json.dumps(list(recipe.student.std)),
        "input_size": str(size),
        "num_prefix_tokens": str(model.num_prefix_tokens),
        "patch_size": str(student.patch_size),
        "trained_steps": ckpt.name.split("_")[1].lstrip("0"),
        "weights": "live" if args.live else "ema",
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out / "model.safetensors", weights, metadata=meta)
    cfg = timm_config(student.arch, args_json, int(model.num_features), recipe.student.mean, recipe.student.std, size)
    atomic_write_json(out / "config.json", cfg)
    shutil.copyfile(run / "metrics.jsonl", out / "metrics.jsonl")
    if args.curve:
        shutil.copyfile(args.curve, out / "curve.csv")
    write_digests(out)
    for f in out.iterdir():
        f.chmod(0o644)  # package data: readable by everyone (temp files are created 0600)
    print(f"shipped {ckpt} -> {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
