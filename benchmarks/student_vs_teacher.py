"""Inference speed and memory: an H0-mini-architecture student vs the H-optimus-0 architecture, side by side.

Random-init weights of the real architectures (parameter ratio ~13x), 224 px, bf16 (weights cast + autocast),
``inference_mode``. Each model runs in its own child process so peak-memory figures do not mix; the timings
alternate student/teacher rounds to share the machine's noise. Goal: student >= 8x faster.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/student_vs_teacher.py [--batch 8] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch


def child(name: str, batch: int, iters: int) -> None:
    import psutil

    from multiteach.teachers import build_teacher

    proc = psutil.Process()
    before = proc.memory_info().rss
    model = build_teacher(name, pretrained=False, dtype="bfloat16")
    params = sum(p.numel() for p in model.parameters())
    x = torch.rand(batch, 3, 224, 224)
    if torch.cuda.is_available():
        model, x = model.cuda(), x.cuda()
        torch.cuda.reset_peak_memory_stats()
    model(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model(x)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else proc.memory_info().rss - before
    print(
        json.dumps(
            {
                "name": name,
                "params": params,
                "img_s": batch / sorted(times)[len(times) // 2],
                "peak_bytes": peak,
                "memory": "cuda max allocated" if torch.cuda.is_available() else "RSS growth after the forward passes",
            }
        )
    )


def run(name: str, batch: int, iters: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, "--batch", str(batch), "--iters", str(iters)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        child(args.child, args.batch, args.iters)
        return
    student, teacher = [], []
    for _ in range(args.rounds):
        student.append(run("h0-mini", args.batch, args.iters))
        teacher.append(run("h-optimus-0", args.batch, args.iters))
    s = max(student, key=lambda r: r["img_s"])
    t = max(teacher, key=lambda r: r["img_s"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"
    rec = {
        "bench": "student_vs_teacher",
        "student": "H0-mini arch (ViT-B/14 reg4 SwiGLU)",
        "teacher": "H-optimus-0 arch (ViT-g/14 reg4 SwiGLU)",
        "res": 224,
        "dtype": "bf16",
        "batch": args.batch,
        "student_img_s": round(s["img_s"], 2),
        "teacher_img_s": round(t["img_s"], 3),
        "speedup": round(s["img_s"] / t["img_s"], 2),
        "param_ratio": round(t["params"] / s["params"], 2),
        "student_peak_gb": round(s["peak_bytes"] / 1e9, 2),
        "teacher_peak_gb": round(t["peak_bytes"] / 1e9, 2),
        "memory": s["memory"],
        "device": device,
        "goal": "speedup >= 8",
    }
    print(json.dumps(rec))
    print(
        f"SUMMARY student vs teacher @224 bf16 on {device}: {rec['student_img_s']} vs {rec['teacher_img_s']} img/s "
        f"= {rec['speedup']}x faster (params {rec['param_ratio']}x fewer), peak memory "
        f"{rec['student_peak_gb']} vs {rec['teacher_peak_gb']} GB"
    )


if __name__ == "__main__":
    main()
