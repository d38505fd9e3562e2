"""Exponential moving average of the trainable model (the DINO/iBOT target branch and the spare EMA)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from multiteach.distributed import full_tensor


class EMA(nn.Module):
    """A frozen copy of ``model`` updated as ``ema = m * ema + (1 - m) * live`` after each step.

    Buffers (DINO centres, standardiser statistics) are copied from the live model. With an FSDP-sharded
    live model the EMA stays a whole (unsharded) copy on every rank, updated from the gathered weights.

    Args:
        model: The live (unwrapped) model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float) -> None:
        """Move every parameter towards the live model's by ``1 - momentum``."""
        ema_params = list(self.module.parameters())
        live_params = list(model.parameters())
        if len(ema_params) != len(live_params):
            raise RuntimeError("EMA and live model have different parameter lists")
        if any(isinstance(p, DTensor) for p in live_params):
            # FSDP: the EMA stays whole on every rank; gather one live parameter at a time (a collective,
            # so every rank runs it) to keep the transient memory at one parameter, not a model copy
            for ema_p, live_p in zip(ema_params, live_params):
                ema_p.lerp_(full_tensor(live_p.detach()).to(ema_p.dtype), 1.0 - momentum)
        else:
            torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1.0 - momentum)
        for ema_b, live_b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(live_b)
