"""The loss library: criteria (feature distances, DINO, iBOT, KoLeo, standardisers) and composable terms.

Importing this package registers the built-in term types in :data:`LOSSES`.
"""

from multiteach.losses import similarity, terms  # noqa: F401  (register the built-in term types)
from multiteach.losses.base import (
    LOSSES,
    BuildInfo,
    CompositeLoss,
    LossContext,
    LossTerm,
    active_teachers,
    build_loss,
    check_term,
)

__all__ = [
    "LOSSES",
    "BuildInfo",
    "CompositeLoss",
    "LossContext",
    "LossTerm",
    "active_teachers",
    "build_loss",
    "check_term",
]
