"""Exponential moving average of the trainable model (the DINO/iBOT target branch and the spare EMA)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen copy of ``model`` updated as ``ema = m * ema + (1 - m) * live`` after each step.

    Buffers (DINO centres, standardiser statistics) are copied from the live model.

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
        torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1.0 - momentum)
        for ema_b, live_b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(live_b)
