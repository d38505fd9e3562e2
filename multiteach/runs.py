"""Reading a finished (or interrupted) run directory back: its recipe, its last checkpoint, its student."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from multiteach.build import build_student_from
from multiteach.checkpoint import latest_checkpoint
from multiteach.config import load_recipe
from multiteach.errors import MultiteachError
from multiteach.students import Student

STUDENT_PREFIX = "student."
LOSS_PREFIX = "loss."


@dataclass
class RunStudent:
    """A student restored from a run.

    Attributes:
        student: The student with the checkpoint's weights, in eval mode.
        recipe: The run's resolved recipe.
        checkpoint: The checkpoint folder it came from.
        weights: ``"ema"`` or ``"live"``.
        state: Everything else in that weights file (heads, loss state), keyed as saved (``loss.*``).
    """

    student: Student
    recipe: Any
    checkpoint: Path
    weights: str
    state: dict[str, torch.Tensor]


def load_run_student(run_dir: str | Path, use_ema: bool = True) -> RunStudent:
    """Rebuild the student of ``run_dir`` from its recipe and load its last checkpoint.

    Args:
        run_dir: A run directory written by ``multiteach train``.
        use_ema: Take the EMA weights when the recipe kept them on purpose (``train.keep_ema``: the spare
            EMA that DINOv2/H0-mini export); otherwise the live weights. An EMA that only served as the target
            of a DINO/iBOT term is not exported unless ``keep_ema`` says so.

    Raises:
        MultiteachError: when the folder is not a run directory or has no complete checkpoint.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise MultiteachError(f"{run_dir} is not a run directory (no recipe.yaml)")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise MultiteachError(f"{run_dir} has no complete checkpoint to export")
    recipe = load_recipe(run_dir / "recipe.yaml")
    kept = bool(recipe.train.keep_ema) and (ckpt / "ema.safetensors").is_file()
    which = "ema" if use_ema and kept else "live"
    sd = load_file(str(ckpt / ("ema.safetensors" if which == "ema" else "model.safetensors")))
    student = build_student_from(recipe)
    student.load_state_dict({k[len(STUDENT_PREFIX) :]: v for k, v in sd.items() if k.startswith(STUDENT_PREFIX)})
    rest = {k: v for k, v in sd.items() if not k.startswith(STUDENT_PREFIX)}
    return RunStudent(student.eval(), recipe, ckpt, which, rest)


def run_progress(run_dir: str | Path) -> tuple[int, int | None]:
    """``(steps done, steps planned)`` of a run directory, without loading any weights.

    Steps done are those of the last complete checkpoint (0 without one); steps planned are the run's
    ``schedule.steps`` (None when the folder has no ``recipe.yaml``).
    """
    import json

    import yaml

    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    done = int(json.loads((ckpt / "state.json").read_text())["step"]) if ckpt is not None else 0
    try:
        planned = int(yaml.safe_load((run_dir / "recipe.yaml").read_text())["schedule"]["steps"])
    except (OSError, KeyError, TypeError, ValueError):
        planned = None
    return done, planned


def require_complete(run_dir: str | Path, allow_incomplete: bool = False) -> None:
    """Refuse a run that stopped before ``schedule.steps`` (SIGTERM/SIGINT, a kill), unless allowed.

    Raises:
        MultiteachError: naming the steps done and planned and how to finish the run.
    """
    done, planned = run_progress(run_dir)
    if planned is not None and done < planned and not allow_incomplete and latest_checkpoint(run_dir) is not None:
        raise MultiteachError(
            f"{run_dir} is incomplete: its last checkpoint is at step {done} of {planned} (schedule.steps). Re-run "
            "the same `multiteach train` command to finish it, or pass --allow-incomplete (allow_incomplete=True) "
            "to export it anyway; the model card then says it is incomplete"
        )
