"""multiteach without the CLI: teachers, a student and a loss from Python, in your own training loop.

For users who already have a training framework: everything multiteach trains with is a plain
``nn.Module``. Run it as is (CPU, about 20 s):

    python examples/python_api.py

It uses tiny random stand-ins of two teacher families written to a temporary folder, because real teacher
weights need a Hub login. With access, replace the two ``build_teacher`` calls by e.g.
``build_teacher("uni", dtype="bfloat16")`` and ``build_teacher("h-optimus-0", dtype="bfloat16")``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from multiteach import LossContext, build_loss, build_student, build_teacher
from multiteach.standins import save_timm_folder, tiny_timm
from multiteach.students import student_mean_std
from multiteach.teachers import resolve_spec


def main(steps: int = 5) -> float:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # 1. Teachers: each takes RGB in [0, 1] at any size, resizes + normalises itself, and is frozen.
        teachers = {}
        for name in ("uni", "h-optimus-0"):
            model, arch, args = tiny_timm(name)
            spec = resolve_spec(name)
            folder = save_timm_folder(model, Path(tmp) / name, arch, args, spec.mean, spec.std)
            teachers[name] = build_teacher(name, weights=str(folder), input_size=112)

        # 2. A student: any timm ViT; forward(normalised x) -> TeacherOutput(summary, patch_tokens, grid).
        student = build_student("vit_tiny_patch16_224", img_size=112)

        # 3. Loss terms, as a recipe would write them; heads are built for exactly what the terms use.
        loss = build_loss(
            {
                "uni.cls": {"type": "cosine", "teacher": "uni", "standardize": "running"},
                "uni.patch": {"type": "mixed", "teacher": "uni", "on": "patch", "weight": 0.25},
                "hopt.cls": {"type": "cosine", "teacher": "h-optimus-0", "weight": 0.5},
                "koleo": {"type": "koleo", "weight": 0.1},
            },
            student_dim=student.embed_dim,
            teachers={name: t.spec for name, t in teachers.items()},
            heads={"uni": {"kind": "gpfm", "shared": True, "bottleneck": 64}},
        )
        print(loss)  # Loss = 1*uni.cls + 0.25*uni.patch + 0.5*hopt.cls + 0.1*koleo

        # 4. Your own loop.
        params = [*student.parameters(), *loss.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-4)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in student_mean_std())  # ImageNet by default
        for step in range(steps):
            x = torch.rand(8, 3, 112, 112)  # your batch of tiles, RGB in [0, 1]
            with torch.no_grad():
                targets = {name: t(x).as_target() for name, t in teachers.items()}
            out = student((x - mean) / std)
            total, values = loss(LossContext(student_global=out, teachers=targets))
            opt.zero_grad()
            total.backward()
            opt.step()
            print(step, f"{total.item():.4f}", {k: round(v.item(), 4) for k, v in values.items()})
    return total.item()


if __name__ == "__main__":
    main()
