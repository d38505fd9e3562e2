"""Linear-probe evaluation of frozen embeddings: logistic regression on standardised features.

The probe is ``StandardScaler -> LogisticRegression`` (lbfgs, L2, multinomial for more than two
classes). The regularisation strength ``C`` is either fixed (a float) or chosen from a grid
(the default :data:`DEFAULT_C_GRID`) by an inner 3-fold cross-validation on the training data
only, scored by balanced accuracy; the inner folds are group-aware when groups are given. The
scaler is fitted on the training data only, so no test statistics leak into the probe.

Two modes, like :mod:`multiteach.eval.knn`: :func:`linear_probe` (train/test) and
:func:`linear_probe_cv` (stratified or group-aware k-fold over one labelled set).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from multiteach.errors import MultiteachError
from multiteach.eval.knn import as_labels, classification_scores, cv_folds, summarise_folds, train_test_inputs

#: C values searched when ``C="auto"`` (log-spaced; features are standardised).
DEFAULT_C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: C used when the training set is too small for the inner search (a class with < 3 samples).
FALLBACK_C = 1.0
_INNER_FOLDS = 3


def _pipeline(c: float, max_iter: int, seed: int) -> Pipeline:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("logreg", LogisticRegression(C=float(c), max_iter=int(max_iter), random_state=seed)),
        ]
    )


def _resolve_grid(C: float | Sequence[float] | str) -> tuple[float, ...]:
    if isinstance(C, str):
        if C != "auto":
            raise MultiteachError(f"C must be a positive float, a sequence of them or 'auto', got {C!r}.")
        return DEFAULT_C_GRID
    grid = (float(C),) if np.isscalar(C) else tuple(float(c) for c in C)
    if not grid or min(grid) <= 0:
        raise MultiteachError(f"C must be positive (a float or a non-empty grid), got {C!r}.")
    return grid


def _fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None,
    grid: tuple[float, ...],
    max_iter: int,
    seed: int,
) -> tuple[Pipeline, float]:
    """Fit the probe on (x, y), choosing C from ``grid`` by inner CV when it has several values."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        if len(grid) == 1:
            return _pipeline(grid[0], max_iter, seed).fit(x, y), grid[0]
        _, counts = np.unique(y, return_counts=True)
        if groups is None:
            if counts.min() < _INNER_FOLDS:
                return _pipeline(FALLBACK_C, max_iter, seed).fit(x, y), FALLBACK_C
            inner = StratifiedKFold(n_splits=_INNER_FOLDS, shuffle=True, random_state=seed)
        else:
            if len(np.unique(groups)) < _INNER_FOLDS:
                return _pipeline(FALLBACK_C, max_iter, seed).fit(x, y), FALLBACK_C
            inner = StratifiedGroupKFold(n_splits=_INNER_FOLDS, shuffle=True, random_state=seed)
        search = GridSearchCV(
            _pipeline(grid[0], max_iter, seed),
            {"logreg__C": list(grid)},
            scoring="balanced_accuracy",
            cv=inner,
            refit=True,
            n_jobs=None,
            error_score=np.nan,
        )
        search.fit(x, y, groups=groups)
        return search.best_estimator_, float(search.best_params_["logreg__C"])


def linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    C: float | Sequence[float] | str = "auto",
    train_groups: Any | None = None,
    max_iter: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Train a logistic-regression probe on train embeddings and score it on test embeddings.

    Args:
        train_x: Train embeddings, shape (N_train, D).
        train_y: Train labels, shape (N_train,), at least two classes.
        test_x: Test embeddings, shape (N_test, D).
        test_y: Test labels, shape (N_test,).
        C: Inverse L2 strength: a float (fixed), a sequence (searched) or ``"auto"``
            (:data:`DEFAULT_C_GRID`, searched by inner 3-fold CV on the training set).
        train_groups: Optional group ids of the training rows (N_train,) for a group-aware inner search.
        max_iter: lbfgs iterations (2000 converges in well under a second on ~200 x 1536 features).
        seed: Seed for the inner folds and the solver.

    Returns:
        ``{"balanced_accuracy": float, "macro_f1": float, "C": float}`` (``C`` is the value used).

    Raises:
        MultiteachError: On empty inputs, mismatched lengths or dimensions, a single training class
            or an invalid ``C``.
    """
    train_x, train_y, test_x, test_y = train_test_inputs(train_x, train_y, test_x, test_y)
    g = None if train_groups is None else as_labels(train_groups, len(train_x), "train_groups")
    probe, c = _fit_probe(train_x, train_y, g, _resolve_grid(C), max_iter, seed)
    return {**classification_scores(test_y, probe.predict(test_x)), "C": c}


def linear_probe_cv(
    x: Any,
    y: Any,
    n_splits: int = 5,
    groups: Any | None = None,
    C: float | Sequence[float] | str = "auto",
    max_iter: int = 2000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Cross-validated linear probe over one labelled set.

    Outer folds come from ``StratifiedKFold`` or, with ``groups``, ``StratifiedGroupKFold`` (a
    group is never in both train and test); C is searched inside each training fold only.

    Args:
        x: Embeddings, shape (N, D).
        y: Labels, shape (N,), at least two classes.
        n_splits: Number of outer folds.
        groups: Optional group ids (e.g. slide or patient ids), shape (N,).
        C: See :func:`linear_probe`.
        max_iter: See :func:`linear_probe`.
        seed: Seed for outer and inner folds and the solver; the same seed gives the same result.

    Returns:
        ``{"balanced_accuracy": (mean, std), "macro_f1": (mean, std)}`` over folds (std ddof=0).

    Raises:
        MultiteachError: As :func:`linear_probe`, plus too few samples per class or groups for ``n_splits``.
    """
    x, y, g, folds = cv_folds(x, y, groups, n_splits, seed)
    grid = _resolve_grid(C)
    scores = []
    for train_idx, test_idx in folds:
        probe, _ = _fit_probe(x[train_idx], y[train_idx], None if g is None else g[train_idx], grid, max_iter, seed)
        scores.append(classification_scores(y[test_idx], probe.predict(x[test_idx])))
    return summarise_folds(scores)
