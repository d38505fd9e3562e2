"""Weight-space interpolation of two students of one architecture (WiSE-FT, Wortsman et al. 2022; model soups).

``merge_students(A, B, alpha, out)`` writes ``theta = (1 - alpha) * theta_A + alpha * theta_B`` as a normal export
(:mod:`multiteach.publish.export`): ``model.safetensors`` (the backbone), ``heads.safetensors`` (the heads and loss
state both parents have with the same shape), ``config.json``, ``recipe.yaml`` and a model card naming both parents
and alpha. ``alpha = 0`` gives A and ``alpha = 1`` gives B bit for bit. A parent is a run directory (its student is
exported first, as ``multiteach export`` would) or an export folder.

Students of different architectures are refused, naming the first tensor that differs; students of one
architecture trained from different recipes (teachers, crops, robust views, ...) are merged with a
:class:`MergeWarning` naming the recipe keys that differ.

    multiteach merge runs/distill_tiny runs/robust_tiny --alpha 0.5 --out exports/tiny_wise
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import multiteach
from multiteach.atomic import atomic_save_safetensors, atomic_write_json
from multiteach.errors import MultiteachError
from multiteach.nested import flatten
from multiteach.publish.export import EXPORT_FILES, _swap_in, export_run, load_heads, split_shared
from multiteach.publish.merged_card import merged_card

log = logging.getLogger("multiteach.publish.merge")

#: Recipe keys that say where or how fast a run went (or which seed of one recipe it was, the model-soup case), not
#: what its student learnt: not reported as differences.
IGNORED_RECIPE_KEYS = (
    "name",
    "output_dir",
    "data.train",
    "seed",
    "data.num_workers",
    "train.threads",
    "train.log_every",
    "train.checkpoint_every",
)


class MergeWarning(UserWarning):
    """Two parents of one architecture were trained from different recipes."""


@dataclass
class Parent:
    """One side of a merge, read from an export folder.

    Attributes:
        source: The run or export folder as given.
        backbone: ``model.safetensors`` tensors (timm names).
        heads: ``heads.safetensors`` tensors (``loss.*`` and the mask token), tied names restored.
        config: ``config.json``.
        recipe: ``recipe.yaml``, parsed.
        recipe_text: ``recipe.yaml`` as written.
        card: ``README.md``.
        folder: The export folder it was read from (a temporary one for a run).
    """

    source: str
    backbone: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    config: dict[str, Any]
    recipe: dict[str, Any]
    recipe_text: str
    card: str
    folder: Path

    def describe(self) -> dict[str, Any]:
        """What the merged card and config record of this parent."""
        info = self.config.get("multiteach", {})
        return {
            "source": Path(self.source).name or self.source,
            "recipe": info.get("recipe", self.recipe.get("name")),
            "weights": info.get("weights"),
            "step": info.get("step"),
            "teachers": sorted(info.get("teachers", {})),
        }


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float in [0, 1].

    Raises:
        MultiteachError: naming the value and the allowed range.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise MultiteachError(
            f"merge: alpha must be a number in [0, 1] (0 gives the first student, 1 the second), got {alpha!r}"
        )
    return float(alpha)


def first_mismatch(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor (in ``a``'s order, then ``b``'s) that only one side has or whose shape/dtype differ.

    Returns:
        A sentence naming the tensor and both sides' shapes, or None when the two match tensor for tensor.
    """
    for name, t in a.items():
        if name not in b:
            return f"tensor {name!r} {tuple(t.shape)} is in the first student only"
        if t.shape != b[name].shape or t.dtype != b[name].dtype:
            return (
                f"tensor {name!r} differs: {tuple(t.shape)} {t.dtype} in the first student, "
                f"{tuple(b[name].shape)} {b[name].dtype} in the second"
            )
    for name, t in b.items():
        if name not in a:
            return f"tensor {name!r} {tuple(t.shape)} is in the second student only"
    return None


def interpolate_state(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` per tensor, for two state dicts of one architecture.

    Floating tensors are interpolated in their own dtype (``alpha`` 0 and 1 copy a parent's tensor, so the result
    is that parent bit for bit; ``alpha = 0.5`` is exactly the mean). Integer and bool tensors (counters, masks)
    cannot be interpolated and come from the nearer parent (``a`` for ``alpha <= 0.5``).

    Args:
        a: First state dict, name -> tensor of any shape.
        b: Second state dict, the same names, shapes and dtypes.
        alpha: Weight of ``b``, in [0, 1].

    Returns:
        Name -> interpolated tensor (new tensors, in ``a``'s order).

    Raises:
        MultiteachError: for ``alpha`` outside [0, 1], or naming the first tensor that differs in name, shape or
            dtype (different architectures).
    """
    alpha = check_alpha(alpha)
    mismatch = first_mismatch(a, b)
    if mismatch is not None:
        raise MultiteachError(f"merge: the students have different architectures: {mismatch}")
    out = {}
    for name, ta in a.items():
        tb = b[name]
        if not ta.is_floating_point() or alpha in (0.0, 1.0):
            out[name] = (ta if alpha <= 0.5 else tb).detach().clone()
        else:
            out[name] = (1.0 - alpha) * ta.detach() + alpha * tb.detach()
    return out


def recipe_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The recipe keys two parents differ in, ``"key: A-value vs B-value"``, in sorted key order.

    Where a run lived (:data:`IGNORED_RECIPE_KEYS`) is left out; a section only one side has is one entry.
    """
    fa, fb = flatten(a, keep_empty=True), flatten(b, keep_empty=True)
    keys = sorted(k for k in set(fa) | set(fb) if not any(k == i or k.startswith(i + ".") for i in IGNORED_RECIPE_KEYS))
    absent = "(absent)"
    return [f"{k}: {_short(fa.get(k, absent))} vs {_short(fb.get(k, absent))}" for k in keys if fa.get(k) != fb.get(k)]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_parent(source: str | Path, tmp: Path, use_ema: bool = True) -> Parent:
    """Read an export folder, or export a run directory into ``tmp`` first and read that.

    Raises:
        MultiteachError: when ``source`` is neither an export (``config.json`` + ``model.safetensors``) nor a run
            directory (``recipe.yaml`` and a checkpoint), or the run is incomplete.
    """
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise MultiteachError(f"merge: {source} is not a folder; give a run directory or an export folder")
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        if not (folder / "recipe.yaml").is_file():
            raise MultiteachError(
                f"merge: {source} is neither an export (config.json + model.safetensors) nor a run directory "
                "(recipe.yaml + checkpoints)"
            )
        folder = export_run(folder, tmp / f"parent{len(list(tmp.iterdir()))}", use_ema=use_ema)
    recipe_text = (folder / "recipe.yaml").read_text(encoding="utf-8") if (folder / "recipe.yaml").is_file() else ""
    return Parent(
        source=str(source),
        backbone=load_file(str(folder / "model.safetensors")),
        heads=load_heads(folder) if (folder / "heads.safetensors").is_file() else {},
        config=json.loads((folder / "config.json").read_text()),
        recipe=yaml.safe_load(recipe_text) or {},
        recipe_text=recipe_text,
        card=(folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else "",
        folder=folder,
    )


def merge_students(
    a: str | Path,
    b: str | Path,
    alpha: float,
    out_dir: str | Path,
    overwrite: bool = False,
    use_ema: bool = True,
) -> Path:
    """Write ``(1 - alpha) * A + alpha * B`` as an export folder that plain timm loads.

    Args:
        a: First parent: a run directory or an export folder.
        b: Second parent, of the same architecture.
        alpha: Weight of ``b`` in [0, 1] (WiSE-FT's alpha: 0 is ``a``, 1 is ``b``).
        out_dir: Export folder to create (must not exist or be empty, unless ``overwrite``).
        overwrite: Replace a non-empty ``out_dir``.
        use_ema: For a run parent: its EMA when the recipe kept one on purpose (as ``multiteach export``).

    Returns:
        ``out_dir``, resolved.

    Raises:
        MultiteachError: for ``alpha`` outside [0, 1], a parent that is not a run or export, different
            architectures (naming the first tensor that differs), or an ``out_dir`` in the way.

    Warns:
        MergeWarning: naming the recipe keys the parents differ in (teachers, crops, ...), and heads only one
            parent has (left out of ``heads.safetensors``).
    """
    alpha = check_alpha(alpha)
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise MultiteachError(f"merge: {out_dir} exists and is not an empty folder; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.merge-") as scratch:
        parents_dir, folder = Path(scratch) / "parents", Path(scratch) / "out"
        parents_dir.mkdir()
        folder.mkdir()
        pa, pb = read_parent(a, parents_dir, use_ema), read_parent(b, parents_dir, use_ema)
        arch_a, arch_b = pa.config.get("architecture"), pb.config.get("architecture")
        backbone = interpolate_state(pa.backbone, pb.backbone, alpha)  # refuses mismatched tensors first
        if arch_a != arch_b:
            raise MultiteachError(f"merge: the students have different architectures: {arch_a!r} vs {arch_b!r}")
        differences = recipe_differences(pa.recipe, pb.recipe)
        kwargs_a = pa.config.get("multiteach", {}).get("model_kwargs")
        kwargs_b = pb.config.get("multiteach", {}).get("model_kwargs")
        if kwargs_a != kwargs_b:
            differences.insert(0, f"model_kwargs: {_short(kwargs_a)} vs {_short(kwargs_b)}")
        shared = {k for k in pa.heads if k in pb.heads and first_mismatch({k: pa.heads[k]}, {k: pb.heads[k]}) is None}
        dropped = sorted((set(pa.heads) | set(pb.heads)) - shared)
        heads = interpolate_state(
            {k: v for k, v in pa.heads.items() if k in shared}, {k: pb.heads[k] for k in pa.heads if k in shared}, alpha
        )
        if differences:
            warnings.warn(
                f"merging students trained from different recipes ({pa.describe()['recipe']} and "
                f"{pb.describe()['recipe']}); they differ in: " + "; ".join(differences),
                MergeWarning,
                stacklevel=2,
            )
        if dropped:
            warnings.warn(
                f"heads not in both students (or of different shapes) are left out: {', '.join(dropped)}",
                MergeWarning,
                stacklevel=2,
            )
        _write_merge(pa, pb, alpha, backbone, heads, differences, dropped, folder)
        _swap_in(folder, out_dir)
    log.info("merged %s and %s at alpha %g into %s", a, b, alpha, out_dir)
    return out_dir


def _write_merge(
    pa: Parent,
    pb: Parent,
    alpha: float,
    backbone: dict[str, torch.Tensor],
    heads: dict[str, torch.Tensor],
    differences: list[str],
    dropped: list[str],
    folder: Path,
) -> None:
    """Write the export files of a merge into ``folder``; recipe, card text and config come from the nearer parent."""
    near = pa if alpha <= 0.5 else pb
    atomic_save_safetensors(folder / "model.safetensors", backbone, metadata={"format": "pt"})
    unique, aliases = split_shared(heads)
    with safe_open(str(near.folder / "heads.safetensors"), framework="pt") as f:
        near_meta = f.metadata() or {}
    meta = {
        "format": "pt",
        "multiteach": multiteach.__version__,
        "weights": "merged",
        "aliases": json.dumps(aliases, sort_keys=True),
        "share_head_with": near_meta.get("share_head_with", "{}"),
    }
    atomic_save_safetensors(folder / "heads.safetensors", unique, metadata=meta)
    parents = [pa.describe(), pb.describe()]
    config = json.loads(json.dumps(near.config))
    config.setdefault("multiteach", {})
    config["multiteach"]["weights"] = "merged"
    config["multiteach"]["merge"] = {
        "alpha": alpha,
        "formula": "(1 - alpha) * first + alpha * second",
        "parents": parents,
        "differences": differences,
        "heads_left_out": dropped,
    }
    atomic_write_json(folder / "config.json", config)
    (folder / "recipe.yaml").write_text(near.recipe_text, encoding="utf-8")
    card = merged_card(near.card, parents, alpha, differences, nearer=0 if near is pa else 1)
    (folder / "README.md").write_text(card, encoding="utf-8")
    for parent in (pb, pa):  # teacher cards the parents' cards link to (the nearer parent's win)
        for extra in parent.folder.iterdir():
            if extra.is_file() and extra.name not in EXPORT_FILES:
                shutil.copyfile(extra, folder / extra.name)
