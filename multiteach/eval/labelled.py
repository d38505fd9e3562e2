"""Labelled tile folders for evaluation: reading ``<class>/`` or ``train|test/<class>/`` folders with optional
groups (slide/patient ids from ``labels.csv``), skipping unreadable images, and scoring frozen embeddings on
them (kNN + linear probe, on the split or by group-aware cross-validation).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multiteach.data.lists.images import IMAGE_ERRORS, labelled_folder, verify_image
from multiteach.errors import MultiteachError, did_you_mean, missing_path
from multiteach.eval.knn import knn_cv, knn_eval
from multiteach.eval.linear import linear_probe, linear_probe_cv

#: Column names of ``labels.csv`` read as groups by ``groups="auto"``, in order of preference.
GROUP_COLUMNS: tuple[str, ...] = ("group", "slide", "slide_id", "patient", "patient_id", "case", "case_id")
LABELS_CSV = "labels.csv"


# --------------------------------------------------------------------------- labelled data
@dataclass
class LabelledSet:
    """A labelled tile folder, as a train/test split or as one set for cross-validation.

    Attributes:
        root: The folder.
        split: True when it has ``train/`` and ``test/`` sub-folders (scored on that split).
        class_names: Sorted class names; labels index them.
        train_paths: Training images (all images in CV mode), shape (N_train,).
        train_labels: Their integer labels, shape (N_train,).
        test_paths: Test images (empty in CV mode), shape (N_test,).
        test_labels: Their labels, shape (N_test,).
        train_groups: Group ids of the training images, or None.
        test_groups: Group ids of the test images, or None.
        group_source: Where groups came from (``"labels.csv:group"``), or None.
        group_note: Why groups are not used, when they are not.
    """

    root: Path
    split: bool
    class_names: list[str]
    train_paths: list[Path]
    train_labels: np.ndarray
    test_paths: list[Path]
    test_labels: np.ndarray
    train_groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None
    group_source: str | None = None
    group_note: str | None = None

    @property
    def all_paths(self) -> list[Path]:
        """Train then test paths."""
        return [*self.train_paths, *self.test_paths]

    def groups_overlap(self) -> int | None:
        """How many groups occur in both train and test (0: group-disjoint), or None without groups."""
        if not self.split or self.train_groups is None or self.test_groups is None:
            return None
        return len(set(self.train_groups.tolist()) & set(self.test_groups.tolist()))


def _read_groups(root: Path, paths: Sequence[Path], column: str) -> tuple[np.ndarray | None, str | None, str | None]:
    """Groups of ``paths`` from ``root/labels.csv``: (groups, source, note-if-unused)."""
    csv_path = root / LABELS_CSV
    explicit = column != "auto"
    if not csv_path.is_file():
        if explicit:
            raise MultiteachError(f"groups={column!r}: {csv_path} does not exist")
        return None, None, f"no {LABELS_CSV} in the data folder"
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = list(reader)
    path_col = next((c for c in columns if c.lower() in ("file", "path")), None)
    if explicit:
        if column not in columns:
            raise MultiteachError(
                f"groups={column!r}: {csv_path} has no such column.{did_you_mean(column, columns)} "
                f"Columns: {', '.join(columns)}."
            )
        group_col: str | None = column
    else:
        group_col = next((c for g in GROUP_COLUMNS for c in columns if c.lower() == g), None)
    if path_col is None or group_col is None:
        note = f"{csv_path} has no file/path column" if path_col is None else f"{csv_path} has no group column"
        if explicit:
            raise MultiteachError(note)
        return None, None, f"{note} (looked for {', '.join(GROUP_COLUMNS)})"
    by_file = {Path((r.get(path_col) or "").strip()).as_posix(): (r.get(group_col) or "").strip() for r in rows}
    groups = [by_file.get(p.relative_to(root).as_posix(), "") for p in paths]
    lacking = sum(1 for g in groups if not g)
    if lacking:
        note = f"{LABELS_CSV} column {group_col!r} gives no group for {lacking} of {len(paths)} images"
        if explicit:
            raise MultiteachError(note)
        return None, None, note
    return np.asarray(groups), f"{LABELS_CSV}:{group_col}", None


def load_labelled(root: str | os.PathLike[str], groups: str | None = "auto") -> LabelledSet:
    """Read a labelled tile folder: ``root/<class>/...`` or ``root/{train,test}/<class>/...``.

    Args:
        root: The folder.
        groups: ``"auto"`` (groups from ``labels.csv`` when every image has one), a ``labels.csv``
            column name (required to cover every image), or None (no groups).

    Returns:
        The :class:`LabelledSet`.

    Raises:
        MultiteachError: For a missing or image-less folder, fewer than two classes, a test class
            that is not in the training set, or an explicit groups column that does not cover the images.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise missing_path("labelled data folder", root, expected="<class>/ or train/ + test/ sub-folders")
    if not root.is_dir():
        raise MultiteachError(f"labelled data folder {root.resolve()} is a file, not a folder of <class>/ sub-folders")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    if split:
        train_paths, train_y, train_names = labelled_folder(root / "train")
        test_paths, test_y, test_names = labelled_folder(root / "test")
        unknown = sorted(set(test_names) - set(train_names))
        if unknown:
            raise MultiteachError(
                f"{root}/test has class(es) {', '.join(unknown)} that {root}/train lacks; a model cannot "
                "learn them from the training split"
            )
        names = sorted(train_names)
        test_labels = np.asarray([names.index(test_names[i]) for i in test_y], dtype=np.int64)
    else:
        train_paths, train_y, names = labelled_folder(root)
        test_paths, test_labels = [], np.zeros(0, dtype=np.int64)
    data = LabelledSet(
        root, split, list(names), list(train_paths), np.asarray(train_y, dtype=np.int64), list(test_paths), test_labels
    )
    if groups is None:
        data.group_note = "groups not requested"
        return data
    all_groups, source, note = _read_groups(root, data.all_paths, str(groups))
    data.group_source, data.group_note = source, note
    if all_groups is not None:
        n = len(data.train_paths)
        data.train_groups, data.test_groups = all_groups[:n], (all_groups[n:] if split else None)
    return data


def unreadable_images(paths: Sequence[Path]) -> dict[Path, str]:
    """The images among ``paths`` that cannot be decoded (truncated, not an image, empty): path -> reason."""
    bad: dict[Path, str] = {}
    for path in paths:
        try:
            verify_image(path)
        except IMAGE_ERRORS as err:
            bad[Path(path)] = f"{type(err).__name__}: {err}"
    return bad


def drop_images(data: LabelledSet, bad: Mapping[Path, str]) -> None:
    """Remove ``bad`` images, with their labels and groups, from ``data`` in place.

    Raises:
        MultiteachError: When a class is left without a (training) image.
    """
    if not bad:
        return

    def keep(paths: list[Path], labels: np.ndarray, groups: np.ndarray | None) -> tuple:
        idx = np.asarray([i for i, p in enumerate(paths) if p not in bad], dtype=np.int64)
        return [paths[i] for i in idx], labels[idx], None if groups is None else groups[idx]

    data.train_paths, data.train_labels, data.train_groups = keep(
        data.train_paths, data.train_labels, data.train_groups
    )
    data.test_paths, data.test_labels, data.test_groups = keep(data.test_paths, data.test_labels, data.test_groups)
    empty = [c for i, c in enumerate(data.class_names) if not (data.train_labels == i).any()]
    if empty:
        where = f"{data.root}/train" if data.split else str(data.root)
        raise MultiteachError(
            f"class(es) {', '.join(empty)} of {where} have no readable image left after skipping {len(bad)} "
            f"unreadable file(s): {', '.join(str(p) for p in bad)}"
        )


def classification_metrics(
    data: LabelledSet, x: np.ndarray, k: int, n_splits: int, seed: int, probe_c: Any, linear: bool = True
) -> dict:
    """kNN + linear probe on embeddings of a labelled set.

    Args:
        data: The set (train/test split or CV).
        x: Embeddings (N, D), train rows then test rows (``data.all_paths`` order).
        k: kNN neighbours (cosine, majority vote).
        n_splits: CV folds when the set has no split.
        seed: Fold and solver seed.
        probe_c: Logistic-regression C, or ``"auto"`` (inner CV).
        linear: Also fit the linear probe (the slow part: an inner CV over C per fold); kNN only when False.

    Returns:
        ``{"knn": {...}, "linear": {...}}`` with ``balanced_accuracy`` and ``macro_f1`` (CV: (mean, std));
        no ``"linear"`` when ``linear`` is False.
    """
    if data.split:
        n = len(data.train_paths)
        tr, te = x[:n], x[n:]
        out = {"knn": knn_eval(tr, data.train_labels, te, data.test_labels, k=k, metric="cosine")}
        if linear:
            out["linear"] = linear_probe(
                tr, data.train_labels, te, data.test_labels, C=probe_c, train_groups=data.train_groups, seed=seed
            )
        return out
    groups = data.train_groups
    out = {"knn": knn_cv(x, data.train_labels, k=k, n_splits=n_splits, groups=groups, seed=seed, metric="cosine")}
    if linear:
        out["linear"] = linear_probe_cv(x, data.train_labels, n_splits=n_splits, groups=groups, C=probe_c, seed=seed)
    return out
