"""CompositeLoss overhead: the GPFM term set vs the same maths written inline (same tensors, one process).

Run: ``.venv/bin/python benchmarks/loss_overhead.py [--iters 30]``. Goal: ratio <= 1.05.
Forward + backward of the loss only (the heads are shared by both paths), batch of 2 global crops x 16.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from multiteach.losses import LossContext, build_loss
from multiteach.teachers import resolve_spec
from multiteach.teachers.base import TeacherOutput

D, B = 384, 32
SPECS = {n: resolve_spec(n) for n in ("uni", "phikon", "conch")}
TERMS = {
    "uni.cls": {"type": "cosine", "teacher": "uni", "weight": 1.0},
    "uni.patch": {"type": "mixed", "teacher": "uni", "on": "patch", "weight": 0.25},
    "phikon.cls": {"type": "cosine", "teacher": "phikon", "weight": 0.5},
    "phikon.patch": {"type": "mixed", "teacher": "phikon", "on": "patch", "weight": 0.125},
    "conch.cls": {"type": "cosine", "teacher": "conch", "weight": 1.0},
}
HEADS = {n: {"kind": "gpfm", "shared": True, "bottleneck": 256} for n in SPECS}


def inline(heads, s: TeacherOutput, t: dict[str, TeacherOutput]) -> torch.Tensor:
    def cos(a, b):
        return 1 - F.cosine_similarity(a, b, dim=-1).mean()

    def patch(name):
        tt = t[name].patch_tokens
        h, w = t[name].grid
        grid = tt.transpose(1, 2).reshape(B, -1, h, w)
        tt = F.interpolate(grid, size=s.grid, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        p = heads.heads[name]["shared"](s.patch_tokens)
        return 0.9 * cos(p, tt) + 0.1 * F.smooth_l1_loss(p, tt)

    total = cos(heads.heads["uni"]["shared"](s.summary), t["uni"].summary)
    total = total + 0.25 * patch("uni")
    total = total + 0.5 * cos(heads.heads["phikon"]["shared"](s.summary), t["phikon"].summary)
    total = total + 0.125 * patch("phikon")
    return total + cos(heads.heads["conch"]["shared"](s.summary), t["conch"].summary)


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    loss = build_loss(TERMS, D, SPECS, HEADS)
    s_sum = torch.randn(B, D, requires_grad=True)
    s_patch = torch.randn(B, 256, D, requires_grad=True)
    student = TeacherOutput(s_sum, s_patch, (16, 16))
    teachers = {
        n: TeacherOutput(torch.randn(B, sp.summary_dim), torch.randn(B, 196, sp.embed_dim), (14, 14))
        for n, sp in SPECS.items()
    }
    ref = inline(loss.heads, student, teachers)
    got, _ = loss(LossContext(student, teachers))
    assert torch.allclose(ref, got, rtol=1e-5), (ref, got)

    def run_composite():
        loss.zero_grad(set_to_none=True)
        loss(LossContext(student, teachers))[0].backward()

    def run_inline():
        loss.zero_grad(set_to_none=True)
        inline(loss.heads, student, teachers).backward()

    t_inline, t_comp = [], []
    for _ in range(3):  # interleave to share the machine's noise
        t_inline.append(timed(run_inline, args.iters // 3))
        t_comp.append(timed(run_composite, args.iters // 3))
    ti, tc = min(t_inline), min(t_comp)
    rec = {
        "bench": "loss_overhead",
        "terms": list(TERMS),
        "batch": B,
        "student_dim": D,
        "inline_ms": round(ti * 1e3, 2),
        "composite_ms": round(tc * 1e3, 2),
        "ratio": round(tc / ti, 3),
        "goal": "<= 1.05",
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(rec))
    print(
        f"SUMMARY loss overhead: CompositeLoss {tc * 1e3:.1f} ms vs inline {ti * 1e3:.1f} ms per fwd+bwd "
        f"(ratio {tc / ti:.3f}, goal <= 1.05)"
    )


if __name__ == "__main__":
    main()
