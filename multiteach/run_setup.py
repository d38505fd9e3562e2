"""A run's folder before its first step: which recipe it holds, where to resume, and what the main process writes.

:func:`recipe_hash` names the maths of a recipe; :func:`resume_from` checks a re-used run directory holds the same
recipe and finds the checkpoint to resume from; :func:`start_run_dir` opens ``train.log`` and writes
``recipe.yaml``, ``data.json`` and ``expert_heads.json``. The loop that uses them is :mod:`multiteach.train`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multiteach.checkpoint import latest_checkpoint
from multiteach.config import save_resolved
from multiteach.errors import MultiteachError

log = logging.getLogger("multiteach.train")  # the loop's log: these lines are part of the run's train.log


def recipe_hash(recipe: Any) -> str:
    """Hash of the parts of a recipe that define the maths of a run (not logging/checkpoint cadence)."""
    d = recipe.to_dict()
    d.pop("train", None)
    d.pop("output_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_from(run_dir: Path, digest: str, resume: bool | None) -> Path | None:
    """The checkpoint to resume from (None: start afresh), after checking the run directory holds this recipe.

    Args:
        run_dir: The recipe's ``output_dir``.
        digest: :func:`recipe_hash` of the recipe.
        resume: As :func:`multiteach.train.train`'s ``resume``.

    Raises:
        MultiteachError: the directory holds a run of another recipe; ``resume=False`` and it holds
            checkpoints; ``resume=True`` and it holds none.
    """
    last = latest_checkpoint(run_dir)
    if last is not None:
        saved = json.loads((last / "state.json").read_text())
        if saved.get("recipe_hash") != digest:
            raise MultiteachError(
                f"{run_dir} holds a run of a different recipe (checkpoint {last.name}); choose another "
                "output_dir, or delete the old checkpoints to start over"
            )
        if resume is False:
            raise MultiteachError(f"{run_dir} already has checkpoints; pass --resume or use a new output_dir")
    elif resume:
        raise MultiteachError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    return last


def start_run_dir(
    recipe: Any,
    run_dir: Path,
    model: Any,
    teachers: Mapping[str, Any],
    cache: Any,
    tiles: Any,
    state: dict[str, Any],
    threads: tuple[int, str],
) -> logging.Handler:
    """Main process: create the run directory, log to its ``train.log`` (appending across resumes), write
    ``recipe.yaml``, ``data.json`` and (fitted heads) ``expert_heads.json``, and log what is trained.

    Returns:
        The ``train.log`` handler on the ``multiteach`` logger (the caller removes and closes it).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("multiteach")
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    root.addHandler(file_log)
    root.setLevel(logging.INFO)
    if state.get("fitted_expert_heads"):
        (run_dir / "expert_heads.json").write_text(json.dumps({"fitted": state["fitted_expert_heads"]}))
        log.warning("fitted expert heads (not the teacher's own): %s", ", ".join(state["fitted_expert_heads"]))
    save_resolved(recipe, run_dir)
    log.info(
        "%s | student %s (%.2fM params) | teachers: %s",
        model.loss,
        recipe.student.arch,
        sum(p.numel() for p in model.student.parameters()) / 1e6,
        ", ".join(teachers) or (f"{', '.join(cache.names)} (cached in {cache.dir})" if cache else "none"),
    )
    log.info("intra-op threads per process: %d (%s)", *threads)
    facts = tiles.describe()
    (run_dir / "data.json").write_text(json.dumps({"tiles": len(tiles), **facts}, indent=2))
    if facts["skipped"]:
        log.warning("skipped %d unreadable input(s) in %s (listed in data.json)", len(facts["skipped"]), tiles.source)
    return file_log
