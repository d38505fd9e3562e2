"""Atomic checkpoints: a step is written into a temporary folder and renamed into place, so a kill at any
moment leaves either the complete checkpoint or none. Weights use safetensors; optimiser and RNG state
use ``torch.save`` and are read back with ``weights_only=True``.

Weights may come from a module (single process, DDP) or as an already gathered full state dict (FSDP:
``Accelerator.get_state_dict`` or :func:`multiteach.distributed.full_state_dict`); both give the same
file, tensors shared between modules (a DINO head reused by iBOT) stored once, as ``save_model`` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model
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


def shared_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one tensor in ``model`` (e.g. a head shared by two loss terms),
    each sorted; pass them to :func:`save_checkpoint` with a gathered state dict of that model."""
    by_id: dict[int, list[str]] = {}
    for name, t in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(name)
    return [sorted(names) for names in by_id.values() if len(names) > 1]


def save_weights(
    weights: nn.Module | Mapping[str, torch.Tensor], path: str | Path, shared: Sequence[Sequence[str]] = ()
) -> None:
    """Write a module's weights, or a full state dict of one, as safetensors like ``save_model`` does.

    Args:
        weights: The module, or its full state dict (which may hold a shared tensor under any of its names).
        path: Target file.
        shared: For a state dict: the module's :func:`shared_names`. Each group is stored once, under its
            first name, the others recorded in the metadata, exactly as ``save_model`` writes the module.
    """
    if isinstance(weights, nn.Module):
        save_model(weights, str(path))
        return
    tensors = dict(weights)
    metadata: dict[str, str] = {}
    for group in shared:
        present = [n for n in group if n in tensors]
        if not present:
            continue
        kept = sorted(group)[0]
        tensor = tensors[present[0]]
        for name in present:
            del tensors[name]
        tensors[kept] = tensor
        metadata.update({name: kept for name in sorted(group)[1:]})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module | Mapping[str, torch.Tensor],
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None,
    state: dict[str, Any],
    keep: int = 2,
    *,
    shared: Sequence[Sequence[str]] = (),
    move_in: Mapping[str, Path] | None = None,
) -> Path:
    """Write ``checkpoints/step_XXXXXXXX`` atomically and keep the newest ``keep`` checkpoints.

    Args:
        run_dir: Run directory.
        step: Optimiser steps completed.
        model: The unwrapped trainable model (student + heads + loss state such as DINO centres), or its
            full state dict (gathered from a sharded model).
        ema: The EMA model, or None.
        optimizer: Optimiser whose state is saved, or its full index-keyed state dict (gathered), or None
            when another file holds it (DeepSpeed's per-rank engine state in ``move_in``).
        state: JSON-serialisable run state (step, samples seen, recipe hash, ...).
        keep: How many checkpoints to keep (older ones are deleted after the new one is in place).
        shared: With a state-dict ``model``: the module's :func:`shared_names`.
        move_in: Folders other processes wrote (name in the checkpoint -> folder), moved into it before it
            is completed.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors", shared)
    if ema is not None:
        save_model(ema, str(tmp / "ema.safetensors"))
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.state_dict()
    torch.save({"optimizer": optimizer, "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    for name, folder in (move_in or {}).items():
        os.replace(folder, tmp / name)
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
    """Restore model, EMA and optimiser from ``path`` (the optimiser is skipped when None, or when the
    checkpoint holds no index-keyed optimiser state).

    Returns:
        The saved run state, with the torch RNG state under ``"rng"`` for the caller to set at the point
        where the uninterrupted run was.
    """
    path = Path(path)
    load_model(model, str(path / "model.safetensors"))
    if ema is not None and (path / "ema.safetensors").is_file():
        load_model(ema, str(path / "ema.safetensors"))
    extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if optimizer is not None and extra["optimizer"] is not None:
        optimizer.load_state_dict(extra["optimizer"])
    return {**json.loads((path / "state.json").read_text()), "rng": extra["rng"]}


def load_optimizer_state(path: str | Path) -> dict[str, Any] | None:
    """The full, index-keyed optimiser state of checkpoint ``path`` (None when it holds none: DeepSpeed),
    for optimisers that load it after Accelerate prepared them (FSDP)."""
    return torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True)["optimizer"]
