"""Accelerate plumbing of the training loop: engine plugins, sharded set-up, checkpoints, rank agreement.

Owned by :mod:`multiteach.train`, and with it (and :mod:`multiteach.distributed`) the only modules that import
``accelerate``; nothing else in the package may call this module. Whatever the strategy (DDP, FSDP2,
DeepSpeed), a checkpoint is written in the single-process format of :mod:`multiteach.checkpoint`, so any run
resumes under any strategy and :func:`multiteach.runs.load_run_student` reads it without Accelerate.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState

from multiteach.checkpoint import CHECKPOINTS, load_optimizer_state, save_checkpoint, shared_names
from multiteach.distributed import (
    block_class_names,
    full_optimizer_state_dict,
    full_tensor,
    load_full_optimizer_state_dict,
)
from multiteach.ema import EMA
from multiteach.errors import MultiteachError

__all__ = [
    "check_ranks_agree",
    "configure_engine",
    "engine_plugins",
    "fresh_accelerator_state",
    "restore_sharded_optimizer",
    "write_checkpoint",
]

log = logging.getLogger("multiteach.train")


def fresh_accelerator_state() -> None:
    """Let one Python process run several single-process trainings (tests, sweeps) with different settings:
    Accelerate keeps a process-wide singleton state that otherwise refuses a new mixed-precision mode."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def engine_plugins(recipe: Any) -> dict[str, Any]:
    """Accelerate plugins for ``train.distributed`` (none for ddp: Accelerate takes DDP from the launcher).

    Args:
        recipe: A validated :class:`multiteach.config.Recipe`.

    Returns:
        Keyword arguments for :class:`accelerate.Accelerator`: ``fsdp_plugin`` or ``deepspeed_plugin``, or none.
    """
    cfg = recipe.train.distributed
    if cfg.strategy == "fsdp":
        return {
            "fsdp_plugin": FullyShardedDataParallelPlugin(
                fsdp_version=cfg.fsdp.version,
                reshard_after_forward=cfg.fsdp.reshard_after_forward,
                cpu_offload=cfg.fsdp.cpu_offload,
                # the block class names are only known once the student is built (configure_engine)
                auto_wrap_policy="transformer_based_wrap" if cfg.fsdp.auto_wrap == "blocks" else "no_wrap",
                state_dict_type="FULL_STATE_DICT",
            )
        }
    if cfg.strategy == "deepspeed":
        return {
            "deepspeed_plugin": DeepSpeedPlugin(
                zero_stage=cfg.deepspeed.zero_stage,
                gradient_accumulation_steps=recipe.optim.grad_accum,
                gradient_clipping=recipe.optim.clip_grad or 0.0,
            )
        }
    return {}


def configure_engine(acc: Accelerator, model: torch.nn.Module, micro: int) -> None:
    """Settings only known once the model is built: FSDP wraps each student block (its timm class);
    DeepSpeed needs the per-process micro-batch (no data loader goes through ``prepare``).

    Args:
        acc: The run's Accelerator (before ``prepare``).
        model: The distillation model (possibly ``torch.compile``-wrapped).
        micro: Images per process per micro-batch.
    """
    fsdp = getattr(acc.state, "fsdp_plugin", None)
    if acc.is_fsdp2 and fsdp is not None and fsdp.auto_wrap_policy is not None:
        fsdp.transformer_cls_names_to_wrap = block_class_names(getattr(model, "_orig_mod", model))
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None:
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = micro


def restore_sharded_optimizer(
    acc: Accelerator, model: torch.nn.Module, optimizer: Any, last: Path, strategy: str
) -> None:
    """Resume the optimiser of a sharded run after ``prepare``: FSDP loads the full state (any strategy's
    checkpoint) and keeps its shard; DeepSpeed reloads its own per-rank engine state.

    Args:
        acc: The run's Accelerator.
        model: The prepared (sharded) model.
        optimizer: The prepared optimiser (Accelerate's wrapper; ``.optimizer`` is the torch one).
        last: The checkpoint directory to resume from.
        strategy: ``"fsdp"`` or ``"deepspeed"``.
    """
    if strategy == "fsdp":
        saved = load_optimizer_state(last)
        if saved is not None:
            load_full_optimizer_state_dict(model, optimizer.optimizer, saved)
            return
    elif (last / "engine").is_dir():
        acc.load_state(str(last / "engine"))
        return
    log.warning("%s holds no optimiser state %s can load: AdamW moments restart from zero", last.name, strategy)


def write_checkpoint(
    acc: Accelerator,
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    digest: str,
    batch: int,
    strategy: str = "ddp",
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint in the single-process format whatever the strategy: FSDP gathers the full
    weights and optimiser state (every rank takes part, rank 0 writes); DeepSpeed adds its per-rank
    engine state (``engine/``, from ``Accelerator.save_state``) beside the full weights.

    Args:
        acc: The run's Accelerator (every rank calls this).
        run_dir: The run directory (the checkpoint goes under ``checkpoints/step_XXXXXXXX``).
        step: Optimiser steps completed.
        model: The unwrapped model.
        ema: The EMA copy, if the run keeps one.
        optimizer: The prepared optimiser.
        digest: :func:`multiteach.train.recipe_hash` of the recipe (refuses resuming another recipe).
        batch: Images per optimiser step over all processes (``images`` = ``step * batch``).
        strategy: ``train.distributed.strategy``.
        extra: More JSON values for the checkpoint's ``state.json`` (the run summary's progress so far).
    """
    acc.wait_for_everyone()
    weights: Any = model
    optim_state: Any = optimizer
    move_in: dict[str, Path] = {}
    if strategy == "fsdp":
        weights = acc.get_state_dict(model)
        optim_state = full_optimizer_state_dict(model, optimizer.optimizer)
    elif strategy == "deepspeed":
        weights, optim_state = acc.get_state_dict(model), None
        move_in["engine"] = Path(run_dir) / CHECKPOINTS / f".engine-step_{step:08d}"
        acc.save_state(str(move_in["engine"]))
        acc.wait_for_everyone()
    if acc.is_main_process:
        save_checkpoint(
            run_dir,
            step,
            weights,
            ema.module if ema else None,
            optim_state,
            {
                **(extra or {}),
                "recipe_hash": digest,
                "images": step * batch,
                "strategy": strategy,
                "processes": acc.num_processes,
            },
            shared=shared_names(model),
            move_in=move_in,
        )
    acc.wait_for_everyone()


def check_ranks_agree(acc: Accelerator, model: torch.nn.Module, run_dir: Path) -> None:
    """All processes must end with identical weights; record each rank's checksum in ``ranks.json``.

    Parameter by parameter (FSDP shards are gathered one at a time), never a flat copy of the model: each
    rank's checksum is (sum of all weights, position-weighted sum), float64, shape (2,).

    Raises:
        MultiteachError: when the checksums of two ranks differ.
    """
    mine, offset = torch.zeros(2, dtype=torch.float64), 0
    with torch.no_grad():
        for p in model.parameters():
            flat = full_tensor(p.detach()).double().flatten().cpu()
            index = torch.arange(offset + 1, offset + flat.numel() + 1, dtype=torch.float64)
            mine += torch.stack([flat.sum(), (flat * index).sum()])
            offset += flat.numel()
    sums = acc.gather(mine.to(acc.device).unsqueeze(0)).cpu()
    if acc.is_main_process:
        (run_dir / "ranks.json").write_text(json.dumps({"checksums": sums.tolist()}))
    if not torch.equal(sums, sums[:1].expand_as(sums)):
        raise MultiteachError(f"processes ended with different weights: checksums {sums.tolist()}")
