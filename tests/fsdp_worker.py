"""torch FSDP2 on CPU: the sharded code path that Accelerate will not run without CUDA, driven directly.

Run under ``torchrun --standalone --nproc_per_node 2`` (gloo)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py \\
        RECIPE RUN_DIR STOP_STEP [RESUMED_RUN_DIR]

It builds the recipe's :class:`~multiteach.model.DistillModel` with ``build_components`` exactly as
``multiteach train`` does (seed, EMA, AdamW groups, expert heads), shards it with
:func:`multiteach.distributed.shard_model_fsdp2`, and trains on the batches the DDP engine gives each rank
(``data_loader`` with rank/world) up to ``STOP_STEP``. It then gathers the full weights and optimiser
state and writes them as a multiteach checkpoint into ``RUN_DIR`` (``recipe.yaml`` and ``state.json``
with the recipe hash included), so ``multiteach train`` can resume it and ``load_run_student`` read it.

With ``RESUMED_RUN_DIR`` it also checks the sharded resume: a fresh model loads that checkpoint, is
sharded, gets the full optimiser state with ``load_full_optimizer_state_dict`` (what the Accelerate FSDP
engine does after ``prepare``) and trains to the end of the schedule, checkpointing into
``RESUMED_RUN_DIR``. Not collected by pytest (no ``test_`` prefix); ``tests/test_fsdp.py`` runs it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import set_seed

from multiteach.build import build_components, data_loader, training_source
from multiteach.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
    shared_names,
)
from multiteach.config import load_recipe, save_resolved
from multiteach.distributed import (
    full_optimizer_state_dict,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state_dict,
    shard_model_fsdp2,
)
from multiteach.ema import EMA
from multiteach.losses.expert_heads import fit_missing_heads, terms_needing_heads
from multiteach.schedules import cosine, linear_warmup
from multiteach.train import _param_groups, _set_hparams, recipe_hash


def _build(recipe: Any, tiles: Any, resume_from: Path | None) -> tuple[Any, Any, EMA | None, dict[str, Any]]:
    """Model, teachers and EMA as ``multiteach.train.train`` builds them (before ``prepare``)."""
    set_seed(recipe.seed)
    comps = build_components(recipe)
    model, teachers = comps.model, comps.teachers
    ema = EMA(model) if (model.needs_ema() or recipe.train.keep_ema) else None
    state: dict[str, Any] = {"step": 0, "rng": None}
    if resume_from is None:
        fit_missing_heads(model.loss, teachers, lambda: data_loader(recipe, tiles, model.student, 0, 1, 0), recipe.seed)
    else:  # weights and EMA now, the optimiser once it is sharded (as the FSDP engine does)
        state = load_checkpoint(resume_from, model, ema.module if ema else None, None)
        for term in terms_needing_heads(model.loss):
            term.target_ready = True
    return model, teachers, ema, state


def train_sharded(recipe: Any, run_dir: Path, stop_step: int, resume_from: Path | None = None) -> None:
    """Train the recipe's model sharded over the process group to ``stop_step``; checkpoint into ``run_dir``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tiles = training_source(recipe)
    model, teachers, ema, state = _build(recipe, tiles, resume_from)
    shard_model_fsdp2(model)
    # the same AdamW groups as the engine, over the sharded (DTensor) parameters: fully_shard replaces the
    # parameters, so an optimiser built before it would hold stale tensors (Accelerate swaps them in prepare)
    optimizer = torch.optim.AdamW(
        _param_groups(model, recipe.optim.weight_decay, recipe.optim.layer_decay),
        lr=recipe.optim.lr,
        betas=tuple(recipe.optim.betas),
    )
    assert is_sharded(model) and not is_sharded(ema.module if ema else torch.nn.Linear(1, 1))
    if resume_from is not None:
        load_full_optimizer_state_dict(model, optimizer, load_optimizer_state(resume_from))
    batches = iter(data_loader(recipe, tiles, model.student, rank, world, state["step"]))
    if state["rng"] is not None:
        torch.set_rng_state(state["rng"])

    o, sch, n_global = recipe.optim, recipe.schedule, recipe.data.global_crops.n
    step, steps = state["step"], sch.steps
    micro = o.batch_size // world
    while step < stop_step:
        batch = next(batches)
        lr = cosine(step, steps, o.lr, o.min_lr, o.warmup_steps)
        wd = cosine(
            step, steps, o.weight_decay, o.weight_decay_end if o.weight_decay_end is not None else o.weight_decay
        )
        temp = linear_warmup(step, sch.teacher_temp.start, sch.teacher_temp.end, sch.teacher_temp.warmup_steps)
        _set_hparams(optimizer, lr, wd)
        with torch.no_grad():
            targets = {name: t(batch["global"]).as_target() for name, t in teachers.items()}
        total, _ = model(batch, targets, n_global, temp, ema.module if ema else None)
        total.backward()  # FSDP2 reduce-scatters the gradients, averaged over ranks like DDP's all-reduce
        if o.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(model, cosine(step, steps, sch.ema_momentum.start, sch.ema_momentum.end))

    weights = full_state_dict(model)  # collectives: every rank takes part, rank 0 gets the tensors
    optim_state = full_optimizer_state_dict(model, optimizer)
    if rank == 0:
        save_resolved(recipe, run_dir)
        save_checkpoint(
            run_dir,
            step,
            weights,
            ema.module if ema else None,
            optim_state,
            {
                "recipe_hash": recipe_hash(recipe),
                "images": step * micro * world,
                "strategy": "fsdp",
                "processes": world,
            },
            shared=shared_names(model),
        )
    dist.barrier()


def main(argv: list[str]) -> None:
    """``RECIPE RUN_DIR STOP_STEP [RESUMED_RUN_DIR]`` (see the module docstring)."""
    recipe_path, run_dir, stop = Path(argv[0]), Path(argv[1]), int(argv[2])
    dist.init_process_group("gloo")
    recipe = load_recipe(recipe_path, [f"output_dir={run_dir}"])
    train_sharded(recipe, run_dir, stop)
    if len(argv) > 3:
        resumed = Path(argv[3])
        train_sharded(
            load_recipe(recipe_path, [f"output_dir={resumed}"]),
            resumed,
            recipe.schedule.steps,
            latest_checkpoint(run_dir),
        )
    if dist.get_rank() == 0:
        print(json.dumps({"fsdp_worker": "ok", "world": dist.get_world_size()}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # the gloo teardown abort of torch 2.13 (environment.md section 5)


if __name__ == "__main__":
    main(sys.argv[1:])
