"""Teacher forward throughput (fp32 vs bf16) and peak RSS while loading a teacher's weights.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/teacher_forward.py [--sizes base large] [--batch 8]``.
Prints one JSON line per measurement and a one-line summary. Random-init teachers (figures are about
the engine, not the weights). The RSS goal: loading a weights file of N bytes costs <= 1.2 x N.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARCHS = {"base": "vit_base_patch16_224", "large": "vit_large_patch16_224"}


def throughput(arch: str, dtype: str, batch: int, iters: int) -> float:
    from multiteach.teachers import build_teacher

    teacher = build_teacher(arch, pretrained=False, dtype=dtype)
    x = torch.rand(batch, 3, 224, 224)
    teacher(x)  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        teacher(x)
        times.append(time.perf_counter() - t0)
    return batch / sorted(times)[len(times) // 2]


def _load_and_report(weights: str) -> None:
    """Child process: RSS before, peak RSS after loading (KiB -> bytes)."""
    import psutil

    from multiteach.teachers import build_teacher

    before = psutil.Process().memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    teacher = build_teacher("uni", weights=weights)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(p.numel() * p.element_size() for p in teacher.parameters())
    print(json.dumps({"rss_before": before, "peak_before": peak_before, "peak_after": peak, "param_bytes": n}))


def load_rss() -> dict:
    import timm
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        model = timm.create_model("vit_large_patch16_224", num_classes=0, init_values=1e-5)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        del model
        size = path.stat().st_size
        out = subprocess.run(
            [sys.executable, __file__, "--child-load", str(path)], capture_output=True, text=True, check=True
        )
        rec = json.loads(out.stdout.strip().splitlines()[-1])
    growth = rec["peak_after"] - max(rec["rss_before"], 0)
    return {
        "bench": "teacher_load_rss",
        "weights_bytes": size,
        "peak_rss_growth_bytes": growth,
        "ratio_to_file": round(growth / size, 3),
        "goal": "<= 1.2",
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=["base", "large"], choices=list(ARCHS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--child-load")
    args = p.parse_args()
    if args.child_load:
        _load_and_report(args.child_load)
        return
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    summary = []
    for size in args.sizes:
        fp32 = throughput(ARCHS[size], "float32", args.batch, args.iters)
        bf16 = throughput(ARCHS[size], "bfloat16", args.batch, args.iters)
        rec = {
            "bench": "teacher_forward",
            "arch": ARCHS[size],
            "res": 224,
            "batch": args.batch,
            "img_s_fp32": round(fp32, 2),
            "img_s_bf16": round(bf16, 2),
            "bf16_speedup": round(bf16 / fp32, 2),
            "machine": machine,
        }
        print(json.dumps(rec))
        summary.append(f"{size}: {fp32:.1f} -> {bf16:.1f} img/s bf16 ({bf16 / fp32:.2f}x)")
    rss = load_rss()
    rss["machine"] = machine
    print(json.dumps(rss))
    summary.append(f"load RSS {rss['ratio_to_file']}x file size ({rss['weights_bytes'] / 1e9:.2f} GB)")
    print("SUMMARY teacher forward @224: " + "; ".join(summary))


if __name__ == "__main__":
    main()
