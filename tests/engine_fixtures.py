"""A tiny but complete training set-up: tiles written here, a ViT-L/16-family teacher stand-in, a recipe."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from multiteach.standins import save_timm_folder, tiny_timm
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def write_tiles(folder: Path, n: int = 24, size: int = 80, seed: int = 0) -> Path:
    """n RGB tiles of smooth random colour fields (PNG)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.random((5, 5, 3))
        img = Image.fromarray((small * 255).astype("uint8")).resize((size, size), Image.BICUBIC)
        img.save(folder / f"tile_{i:03d}.png")
    return folder


def recipe_yaml(root: Path, steps: int = 6, checkpoint_every: int = 3, batch: int = 8, extra: str = "") -> Path:
    """Write tiles + a teacher stand-in under ``root`` and a recipe that trains on them."""
    if not (root / "tiles").is_dir():
        write_tiles(root / "tiles")
    if not (root / "uni").is_dir():
        model, arch, args = tiny_timm("uni")
        save_timm_folder(model, root / "uni", arch, args, IMAGENET_MEAN, IMAGENET_STD)
    path = root / "recipe.yaml"
    path.write_text(f"""
name: tiny
seed: 0
output_dir: {root}/run
data:
  train: {root}/tiles
  global_crops: {{n: 2, size: 64}}
  local_crops: {{n: 2, size: 32}}
  masking: {{probability: 0.5, ratio: [0.1, 0.5]}}
student:
  arch: vit_tiny_patch16_224
  img_size: 64
  kwargs: {{depth: 2}}
teachers:
  uni: {{weights: {root}/uni, input_size: 64, dtype: float32}}
heads:
  uni: {{kind: gpfm, shared: true, bottleneck: 16}}
losses:
  uni.cls: {{type: cosine, teacher: uni}}
  uni.patch: {{type: mixed, teacher: uni, on: patch, weight: 0.5}}
  dino: {{type: dino, out_dim: 64, hidden_dim: 32, bottleneck_dim: 16}}
  ibot: {{type: ibot, out_dim: 64, hidden_dim: 32, bottleneck_dim: 16, share_head_with: dino}}
optim: {{lr: 1.0e-3, batch_size: {batch}, warmup_steps: 2}}
schedule: {{steps: {steps}}}
train: {{log_every: 2, checkpoint_every: {checkpoint_every}, keep_ema: true}}
{extra}
""")
    return path


def cli(*args: str, launcher: tuple[str, ...] = (), timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m multiteach ARGS`` (optionally under a launcher such as torchrun)."""
    cmd = [*launcher, "-m", "multiteach", *args] if launcher else [sys.executable, "-m", "multiteach", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO, **kw)


def torchrun(nproc: int) -> tuple[str, ...]:
    exe = Path(sys.executable).parent / "torchrun"
    return (str(exe), "--standalone", "--nproc_per_node", str(nproc))


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun's ranks live in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def interrupt(cmd: list[str], run, sig: signal.Signals, log, every_process: bool = False) -> int:
    """Start ``cmd`` in a session of its own, let it train a few steps, then signal its whole process group
    (a shell's Ctrl-C, ``kill -- -PGID``) or, with ``every_process``, every process of the job as SLURM does
    (launcher, ranks and DataLoader workers); return the exit status."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)  # the first metrics line: the loop runs and the DataLoader workers are up
        assert proc.poll() is None, Path(log).read_text()[-3000:]
        if every_process:
            for pid in descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        else:
            os.killpg(proc.pid, sig)
        return proc.wait(timeout=240)
