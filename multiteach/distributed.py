"""Sharded training helpers: which strategy a machine can run, and torch FSDP2 pieces the engine and its
CPU check share.

The engine (:mod:`multiteach.train`) asks Accelerate for FSDP2 or DeepSpeed, which only shard on CUDA:
on CPU Accelerate silently falls back to DDP (or, with ``ACCELERATE_USE_FSDP=true`` and no ``cpu=True``,
runs independent single processes). :func:`check_strategy` therefore refuses those strategies there,
before anything is built. What *can* run on CPU is torch's own FSDP2 (``fully_shard`` over gloo):
:func:`shard_model_fsdp2` shards a :class:`~multiteach.model.DistillModel` the way the Accelerate plugin
does (one unit per student block, then the whole model), and ``tests/test_fsdp.py`` trains it under
``torchrun --standalone --nproc_per_node 2``, gathers :func:`full_state_dict` and
:func:`full_optimizer_state_dict`, writes a multiteach checkpoint and resumes it with ``multiteach train``.

Checkpoints are always *full* (unsharded) and in the single-process format: weights keyed like
``model.state_dict()``, optimiser state keyed by parameter index like ``optimizer.state_dict()``. A run
can therefore resume under another process count or strategy (DDP <-> FSDP), and exports the same way.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from multiteach.errors import MultiteachError

__all__ = [
    "block_class_names",
    "check_strategy",
    "full_optimizer_state_dict",
    "full_state_dict",
    "full_tensor",
    "is_sharded",
    "launcher_strategy",
    "load_full_optimizer_state_dict",
    "shard_model_fsdp2",
    "student_blocks",
]

CPU_CHECK = "tests/test_fsdp.py (torch FSDP2 on CPU via multiteach.distributed.shard_model_fsdp2)"
"""Where the sharded code path is tested on machines without CUDA."""


def launcher_strategy(environ: Mapping[str, str] | None = None) -> str | None:
    """The sharding strategy a launcher asked for through the environment (``accelerate launch
    --use_fsdp``, an Accelerate config with ``distributed_type: FSDP``/``DEEPSPEED``), or None."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def check_strategy(cfg: Any, cuda_available: bool | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a ``train.distributed`` configuration Accelerate cannot give on this machine.

    Call it before anything is built: a refused run must not load teachers or write a run directory.

    Args:
        cfg: The recipe's :class:`multiteach.config.DistributedConfig`.
        cuda_available: Override of ``torch.cuda.is_available()`` (tests).
        environ: Override of ``os.environ`` (tests).

    Raises:
        MultiteachError: for ``fsdp``/``deepspeed`` without CUDA (Accelerate does not shard on CPU), for
            ``deepspeed`` without the package, and when the launcher asked for a different strategy than
            the recipe.
    """
    strategy = cfg.strategy
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    launched = launcher_strategy(environ)
    by_launcher = (
        f"the launcher asked for {launched} (ACCELERATE_USE_{(launched or '').upper()}=true, e.g. `accelerate launch "
        f"--use_{launched}` or an Accelerate config with distributed_type {(launched or '').upper()})"
    )
    if not cuda and (strategy != "ddp" or launched is not None):
        what = f"train.distributed.strategy={strategy}" if strategy != "ddp" else by_launcher
        raise MultiteachError(
            f"{what}: Accelerate does not shard on CPU (with {strategy if strategy != 'ddp' else launched} on a "
            "machine without CUDA it silently falls back to DDP, or runs each process alone), so multiteach refuses "
            "it here. On CPU use strategy ddp, the multi-process CPU path: `torchrun --standalone --nproc_per_node 2 "
            "-m multiteach train RECIPE` or `accelerate launch --multi_gpu --num_processes 2 -m multiteach train "
            f"RECIPE`. The sharded (FSDP2) code path is checked on CPU by {CPU_CHECK}."
        )
    if launched is not None and launched != strategy:
        raise MultiteachError(
            f"{by_launcher} but the recipe says train.distributed.strategy={strategy}; the recipe decides: set "
            f"train.distributed.strategy={launched}, or launch without the {launched} option"
        )
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise MultiteachError(
            "train.distributed.strategy=deepspeed: the deepspeed package is not installed (pip install deepspeed, "
            "on a CUDA machine); or use strategy fsdp, which needs nothing beyond torch"
        )


def student_blocks(model: nn.Module) -> list[nn.Module]:
    """The student's transformer blocks (``model.student.model.blocks``), the FSDP wrapping units."""
    blocks = getattr(getattr(getattr(model, "student", None), "model", None), "blocks", None)
    if blocks is None:
        raise MultiteachError(
            f"{type(model).__name__} has no student.model.blocks; FSDP auto_wrap: blocks needs a timm ViT student"
        )
    return list(blocks)


def block_class_names(model: nn.Module) -> list[str]:
    """Class names of the student's blocks (``Block``, ``ParallelScalingBlock``, ...), for Accelerate's
    ``transformer_cls_names_to_wrap``."""
    return sorted({type(b).__name__ for b in student_blocks(model)})


def shard_model_fsdp2(
    model: nn.Module, *, reshard_after_forward: bool = True, auto_wrap: str = "blocks", mesh: Any = None
) -> nn.Module:
    """Shard a :class:`~multiteach.model.DistillModel` in place with torch's FSDP2 (``fully_shard``).

    Each student block becomes its own unit, then the whole model (embeddings, final norm, loss heads
    and loss state) the root unit, as Accelerate's FSDP2 plugin does with ``auto_wrap: blocks``. Teachers
    and the EMA copy are separate modules and are not touched. Needs an initialised process group (gloo
    on CPU, nccl on CUDA).

    Args:
        model: The trainable model.
        reshard_after_forward: Free each block's gathered weights after its forward.
        auto_wrap: ``blocks`` (one unit per student block) or ``none`` (the root unit only).
        mesh: Device mesh (default: all ranks of the default group).

    Returns:
        The same module, now with DTensor parameters.
    """
    from torch.distributed.fsdp import fully_shard

    if auto_wrap == "blocks":
        for block in student_blocks(model):
            fully_shard(block, reshard_after_forward=reshard_after_forward, mesh=mesh)
    fully_shard(model, reshard_after_forward=reshard_after_forward, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2-sharded)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered for a DTensor shard (a collective: every rank must call it), the
    tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) state dict of a sharded model, on CPU, on rank 0; ``{}`` on other ranks.

    A collective: every rank must call it. A tensor shared by two modules (a DINO head reused by iBOT)
    appears once, under one of its names (``multiteach.checkpoint`` writes it like ``save_model``).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def _param_names(model: nn.Module) -> dict[int, list[str]]:
    """Parameter object id -> every name it has in ``model`` (several for shared heads)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _flat_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimiser state of a sharded model, keyed like ``optimizer.state_dict()`` of the unsharded
    model (parameter indices in param-group order), on rank 0; ``{}`` on other ranks. A collective.

    Args:
        model: The sharded model.
        optimizer: Its (plain torch) optimiser, whose parameters are the model's DTensors.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_fqn = get_optimizer_state_dict(model, optimizer, options=_options())
    if not by_fqn:
        return {}
    names = _param_names(model)
    state: dict[int, Any] = {}
    for index, p in enumerate(_flat_params(optimizer)):
        found = [n for n in names[id(p)] if n in by_fqn["state"]]
        if found:
            state[index] = by_fqn["state"][found[0]]
    groups, start = [], 0
    for group, saved in zip(optimizer.param_groups, by_fqn["param_groups"], strict=True):
        n = len(group["params"])
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": list(range(start, start + n))})
        start += n
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]
) -> None:
    """Load a full, index-keyed optimiser state (:func:`full_optimizer_state_dict`, or a single-process
    ``optimizer.state_dict()``) into the optimiser of a sharded model; each rank keeps its shard.

    Every rank must call it with the same full state (each reads the checkpoint).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model)
    params = _flat_params(optimizer)
    saved_groups = state_dict["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise MultiteachError("the checkpoint's optimiser state has other parameter groups than this model's")
    fqn = [names[id(p)][0] for p in params]
    by_fqn = {
        "state": {fqn[int(i)]: value for i, value in state_dict["state"].items()},
        "param_groups": [{**g, "params": [fqn[int(i)] for i in g["params"]]} for g in saved_groups],
    }
    set_optimizer_state_dict(model, optimizer, by_fqn, options=StateDictOptions(full_state_dict=True))
