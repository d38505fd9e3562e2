"""Seed every random generator a run draws from, without importing ``accelerate``.

:func:`seed_everything` does what ``accelerate.utils.set_seed(seed)`` does on CPU and CUDA machines, so code
outside the training loop (the feature-cache writer, tools) builds the same random-init models a live run
builds, and only :mod:`multiteach.train` needs ``accelerate``.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator, torch's CPU generator and every CUDA device's.

    Args:
        seed: The seed (the same value goes to every generator, as ``accelerate.utils.set_seed`` does).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)  # lazy: a no-op until CUDA is initialised, safe without CUDA
