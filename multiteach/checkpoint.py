"""Atomic checkpoints: a step is written into a temporary folder and renamed into place, so a kill at any
moment leaves either the complete checkpoint or none. Weights use safetensors; optimiser and RNG state
use ``torch.save`` and are read back with ``weights_only=True``."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``checkpoints/step_XXXXXXXX`` atomically and keep the newest ``keep`` checkpoints.

    Args:
        run_dir: Run directory.
        step: Optimiser steps completed.
        model: The unwrapped trainable model (student + heads + loss state such as DINO centres).
        ema: The EMA model, or None.
        optimizer: Optimiser whose state is saved.
        state: JSON-serialisable run state (step, samples seen, recipe hash, ...).
        keep: How many checkpoints to keep (older ones are deleted after the new one is in place).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    if ema is not None:
        save_model(ema, str(tmp / "ema.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))  # written last: completeness
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore model, EMA and optimiser from ``path``.

    Returns:
        The saved run state, with the torch RNG state under ``"rng"`` for the caller to set at the point
        where the uninterrupted run was.
    """
    path = Path(path)
    load_model(model, str(path / "model.safetensors"))
    if ema is not None and (path / "ema.safetensors").is_file():
        load_model(ema, str(path / "ema.safetensors"))
    extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(extra["optimizer"])
    return {**json.loads((path / "state.json").read_text()), "rng": extra["rng"]}
