"""Per-step schedules: learning rate, weight decay, teacher temperature, EMA momentum.

Every schedule is a pure function of the step, so a resumed run recomputes exactly the same values.
"""

from __future__ import annotations

import math


def cosine(step: int, total: int, start: float, end: float, warmup_steps: int = 0, warmup_from: float = 0.0) -> float:
    """Linear warm-up from ``warmup_from`` to ``start`` over ``warmup_steps``, then cosine from ``start`` to ``end``.

    Args:
        step: Current optimiser step (0-based).
        total: Total steps of the run.
        start: Value at the end of warm-up.
        end: Value at ``total``.
        warmup_steps: Steps of linear warm-up.
        warmup_from: Value at step 0 when warming up.
    """
    if step < warmup_steps:
        return warmup_from + (start - warmup_from) * step / warmup_steps
    span = max(total - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then constant ``end`` (DINO teacher temperature)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
