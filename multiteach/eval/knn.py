"""k-nearest-neighbour evaluation of frozen embeddings: balanced accuracy and macro-F1.

Two modes share one scoring path:

- :func:`knn_eval`: fit on a labelled train set, score on a labelled test set.
- :func:`knn_cv`: k-fold cross-validation over one labelled set, stratified by label, and
  group-aware (``StratifiedGroupKFold``) when ``groups`` (e.g. slide or patient ids) are given
  so that no group is ever in both the train and the test fold. Returns the mean and standard
  deviation (``ddof=0``) over folds.

Neighbours are found by brute force (exact and deterministic). The input checks shared by the
whole ``multiteach.eval`` package live here too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

from multiteach.errors import MultiteachError

WEIGHTINGS = ("uniform", "distance", "temperature")
METRICS = ("cosine", "euclidean")


# --------------------------------------------------------------------------- shared input checks
def as_features(x: Any, name: str = "x") -> np.ndarray:
    """Convert embeddings (numpy array, torch tensor or nested list) to a float64 (N, D) array.

    Args:
        x: Embeddings, shape (N, D).
        name: Argument name used in error messages.

    Returns:
        A float64 array of shape (N, D).

    Raises:
        MultiteachError: When ``x`` is empty, not 2-D, or holds NaN/inf.
    """
    if hasattr(x, "detach"):  # torch tensor (any float/int dtype, any device), without importing torch here
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        raise MultiteachError(f"{name}: embeddings are empty (shape {arr.shape}); need at least one row.")
    if arr.ndim != 2:
        raise MultiteachError(f"{name}: expected embeddings of shape (N, D), got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise MultiteachError(f"{name}: embeddings contain NaN or inf values.")
    return arr


def as_labels(y: Any, n: int, name: str = "y") -> np.ndarray:
    """Convert labels (ints or strings; numpy, torch or list) to a 1-D array of length ``n``.

    Args:
        y: Labels, shape (N,).
        n: The number of embedding rows they must match.
        name: Argument name used in error messages.

    Raises:
        MultiteachError: When ``y`` is empty, not 1-D or its length is not ``n``.
    """
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.size == 0:
        raise MultiteachError(f"{name}: labels are empty; need one label per embedding row.")
    if arr.ndim != 1:
        raise MultiteachError(f"{name}: expected labels of shape (N,), got shape {arr.shape}.")
    if len(arr) != n:
        raise MultiteachError(f"{name}: {len(arr)} labels for {n} embedding rows; the lengths must match.")
    return arr


def check_classes(y: np.ndarray, name: str = "y") -> np.ndarray:
    """Return the sorted unique classes of ``y``, requiring at least two.

    Args:
        y: Labels, shape (N,).
        name: Argument name used in error messages.

    Raises:
        MultiteachError: When ``y`` holds a single class.
    """
    classes = np.unique(y)
    if len(classes) < 2:
        raise MultiteachError(
            f"{name}: the labelled set has a single class ({classes[0]!r}); classification metrics need at least two."
        )
    return classes


def check_same_dim(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    """Require two embedding arrays to have the same feature dimension D.

    Args:
        a: Embeddings, shape (N, D).
        b: Embeddings, shape (M, D).
        names: The two argument names, for the error message.

    Raises:
        MultiteachError: When the dimensions differ.
    """
    if a.shape[1] != b.shape[1]:
        raise MultiteachError(
            f"{names[0]} has dimension {a.shape[1]} but {names[1]} has {b.shape[1]}; they must come from one model."
        )


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Balanced accuracy and macro-F1 (sklearn) of predictions.

    Macro-F1 averages over the classes present in ``y_true`` or ``y_pred`` (sklearn's default), with
    ``zero_division=0``. The warning sklearn raises when a fold's predictions contain a class absent
    from its ground truth is silenced (the score is still well defined).

    Args:
        y_true: True labels, shape (N,).
        y_pred: Predicted labels, shape (N,).

    Returns:
        ``{"balanced_accuracy": float, "macro_f1": float}``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true", category=UserWarning)
        bacc = float(balanced_accuracy_score(y_true, y_pred))
    f1 = float(f1_score(y_true, y_pred, average="macro", zero_division=0))
    return {"balanced_accuracy": bacc, "macro_f1": f1}


def cv_splits(
    y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified (and, with ``groups``, group-disjoint) shuffled k-fold splits.

    Args:
        y: Labels, shape (N,).
        groups: Group ids (e.g. slide ids), shape (N,), or None for plain stratified folds.
        n_splits: Number of folds (>= 2).
        seed: Shuffling seed; the same seed gives the same folds.

    Returns:
        One ``(train_idx, test_idx)`` pair of integer index arrays per fold.

    Raises:
        MultiteachError: When there are fewer than ``n_splits`` groups, or (without groups) the
            smallest class has fewer than ``n_splits`` members.
    """
    if int(n_splits) < 2:
        raise MultiteachError(f"n_splits must be at least 2, got {n_splits}.")
    n_splits = int(n_splits)
    if groups is None:
        _, counts = np.unique(y, return_counts=True)
        if counts.min() < n_splits:
            raise MultiteachError(
                f"The smallest class has {counts.min()} samples, fewer than n_splits={n_splits}; "
                "lower n_splits or add samples."
            )
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise MultiteachError(f"Only {n_groups} groups for n_splits={n_splits}; each fold needs its own groups.")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only m members" is expected with few slides per class.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(splitter.split(np.zeros(len(y)), y, groups))


def train_test_inputs(
    train_x: Any, train_y: Any, test_x: Any, test_y: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The checked ``(train_x, train_y, test_x, test_y)`` of a train/test evaluation.

    Raises:
        MultiteachError: On empty inputs, mismatched lengths or dimensions, or a single training class.
    """
    train_x = as_features(train_x, "train_x")
    test_x = as_features(test_x, "test_x")
    check_same_dim(train_x, test_x, ("train_x", "test_x"))
    train_y = as_labels(train_y, len(train_x), "train_y")
    test_y = as_labels(test_y, len(test_x), "test_y")
    check_classes(train_y, "train_y")
    return train_x, train_y, test_x, test_y


def cv_folds(
    x: Any, y: Any, groups: Any | None, n_splits: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[tuple[np.ndarray, np.ndarray]]]:
    """The checked embeddings, labels and groups of one labelled set, and its :func:`cv_splits` folds.

    Returns:
        ``(x, y, groups or None, folds)``.

    Raises:
        MultiteachError: On bad inputs (see :func:`as_features`, :func:`as_labels`), fewer than two
            classes, too few samples per class or groups for ``n_splits``, or a training fold that
            holds a single class.
    """
    x = as_features(x, "x")
    y = as_labels(y, len(x), "y")
    check_classes(y, "y")
    g = None if groups is None else as_labels(groups, len(x), "groups")
    folds = cv_splits(y, g, n_splits, seed)
    if any(len(np.unique(y[train_idx])) < 2 for train_idx, _ in folds):
        raise MultiteachError("A training fold holds a single class; use fewer folds or more groups per class.")
    return x, y, g, folds


def summarise_folds(fold_scores: Sequence[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation (ddof=0) of each metric over folds.

    Args:
        fold_scores: One ``{metric: value}`` dict per fold.

    Returns:
        ``{metric: (mean, std)}``.
    """
    keys = fold_scores[0].keys()
    out: dict[str, tuple[float, float]] = {}
    for key in keys:
        values = np.array([s[key] for s in fold_scores], dtype=np.float64)
        out[key] = (float(values.mean()), float(values.std()))
    return out


# --------------------------------------------------------------------------- kNN
def _vote_weights(weighting: str, metric: str, temperature: float) -> str | Callable[[np.ndarray], np.ndarray]:
    if weighting not in WEIGHTINGS:
        raise MultiteachError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    if metric not in METRICS:
        raise MultiteachError(f"metric must be one of {METRICS}, got {metric!r}.")
    if weighting != "temperature":
        return weighting
    if metric != "cosine":
        raise MultiteachError("weighting='temperature' uses cosine similarities; set metric='cosine'.")
    if temperature <= 0:
        raise MultiteachError(f"temperature must be > 0, got {temperature}.")

    def weights(dist: np.ndarray) -> np.ndarray:
        # Cosine distance d = 1 - cos, so exp(-d / T) = exp(cos / T) * exp(-1 / T): the same votes, no overflow.
        return np.exp(-np.asarray(dist, dtype=np.float64) / temperature)

    return weights


def _knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int,
    metric: str,
    weighting: str,
    temperature: float,
) -> np.ndarray:
    if int(k) < 1:
        raise MultiteachError(f"k must be at least 1, got {k}.")
    if len(train_x) < k:
        raise MultiteachError(f"kNN needs at least k={k} training samples, got {len(train_x)}; lower k.")
    clf = KNeighborsClassifier(
        n_neighbors=int(k), metric=metric, weights=_vote_weights(weighting, metric, temperature), algorithm="brute"
    )
    clf.fit(train_x, train_y)
    return clf.predict(test_x)


def knn_eval(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    k: int = 20,
    metric: str = "cosine",
    weighting: str = "uniform",
    temperature: float = 0.07,
) -> dict[str, float]:
    """Fit a kNN classifier on train embeddings and score it on test embeddings.

    Args:
        train_x: Train embeddings, shape (N_train, D).
        train_y: Train labels, shape (N_train,), ints or strings; at least two classes.
        test_x: Test embeddings, shape (N_test, D).
        test_y: Test labels, shape (N_test,).
        k: Number of neighbours (<= N_train).
        metric: ``"cosine"`` or ``"euclidean"``.
        weighting: Vote weights: ``"uniform"`` (majority vote), ``"distance"`` (1 / distance) or
            ``"temperature"`` (``exp(cos / temperature)``, the DINO kNN protocol; cosine only).
        temperature: Softness of ``"temperature"`` weighting (DINO: 0.07).

    Returns:
        ``{"balanced_accuracy": float, "macro_f1": float}``.

    Raises:
        MultiteachError: On empty inputs, mismatched lengths or dimensions, a single training
            class, fewer training samples than ``k`` or an unknown metric/weighting.
    """
    train_x, train_y, test_x, test_y = train_test_inputs(train_x, train_y, test_x, test_y)
    pred = _knn_predict(train_x, train_y, test_x, k, metric, weighting, temperature)
    return classification_scores(test_y, pred)


def knn_cv(
    x: Any,
    y: Any,
    k: int = 20,
    n_splits: int = 5,
    groups: Any | None = None,
    seed: int = 0,
    metric: str = "cosine",
    weighting: str = "uniform",
    temperature: float = 0.07,
) -> dict[str, tuple[float, float]]:
    """Cross-validated kNN over one labelled set.

    Folds come from ``StratifiedKFold`` or, when ``groups`` is given, ``StratifiedGroupKFold``
    (no group in both train and test), shuffled with ``seed``: the same seed gives the same result.

    Args:
        x: Embeddings, shape (N, D).
        y: Labels, shape (N,), at least two classes.
        k: Number of neighbours (<= size of every training fold).
        n_splits: Number of folds.
        groups: Optional group ids (e.g. slide or patient ids), shape (N,).
        seed: Fold shuffling seed.
        metric: See :func:`knn_eval`.
        weighting: See :func:`knn_eval`.
        temperature: See :func:`knn_eval`.

    Returns:
        ``{"balanced_accuracy": (mean, std), "macro_f1": (mean, std)}`` over folds (std ddof=0).

    Raises:
        MultiteachError: As :func:`knn_eval`, plus too few samples per class or groups for ``n_splits``.
    """
    x, y, _, folds = cv_folds(x, y, groups, n_splits, seed)
    scores = []
    for train_idx, test_idx in folds:
        pred = _knn_predict(x[train_idx], y[train_idx], x[test_idx], k, metric, weighting, temperature)
        scores.append(classification_scores(y[test_idx], pred))
    return summarise_folds(scores)
