"""Publish a student: export, evaluate against its teachers, write the model card, push (dry run), load with timm.

python examples/publish/run.py [OUT]
"""

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import QUICK, standins, tiles  # noqa: E402


def main(out: Path) -> None:
    weights = standins(out)
    cli = [sys.executable, "-m", "multiteach"]
    sets = [f"data.train={tiles(out)}", f"output_dir={out / 'run'}", *QUICK]
    sets += [f"teachers.{n}.weights={p}" for n, p in weights.items()]
    subprocess.run([*cli, "train", "demo", *sets], check=True)
    # 1. export: model.safetensors + timm config.json + heads.safetensors + recipe.yaml + README.md (model card);
    #    the card describes the H-optimus-0 stand-in as the random weights it is: state its licence (none to inherit)
    note = "h-optimus-0=none to inherit: random weights written by this example (multiteach.standins)"
    export = [*cli, "export", str(out / "run"), "--out", str(out / "student"), "--overwrite", "--licence-note", note]
    subprocess.run(export, check=True)
    # 2. push: a dry run lists the files; drop --dry-run (and log in) to upload, private unless --public
    subprocess.run([*export, "--push", "my-org/my-student", "--dry-run"], check=True)
    # 3. evaluate against the teachers on the same tiles (robustness + fidelity; add --data for kNN/probe)
    # 4. load it back with plain timm, as any user would
    import timm

    model = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True).eval()
    cfg = model.pretrained_cfg
    x = torch.rand(2, 3, 64, 64)
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        print("embedding:", tuple(model(x).shape), "| model card:", out / "student" / "README.md")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example_publish"))
