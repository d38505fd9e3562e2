"""Make PyPI torchvision importable beside a CPU-only torch build.

torchvision 0.28.0 from PyPI is a CUDA build: beside ``torch==2.13.0+cpu`` its ``_C.so`` fails to load
quietly and ``import torchvision`` then dies with ``operator torchvision::nms does not exist``. timm,
open_clip and transformers all import torchvision, so nothing works until the two op schemas that
torchvision's meta registrations expect are declared.

This module stays importable without importing torch: a ``.pth`` file written at install time calls
:func:`install_import_hook`, which defers the fix until torchvision is first imported by any program
(the ``accelerate`` CLI, ``python -c "import timm"``, pytest plugins). ``multiteach/__init__`` calls
:func:`apply` directly. Both are idempotent: the schemas are declared at most once per process.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys

_LIBRARY = None  # keeps the torch.library.Library alive for the process


def _extension_loads(torchvision_dir: str) -> bool:
    import ctypes

    for path in glob.glob(os.path.join(torchvision_dir, "_C*.so")):
        try:
            ctypes.CDLL(path)
            return True
        except OSError:
            continue
    return False


def apply() -> bool:
    """Declare ``torchvision::nms``/``qnms`` when (and only when) that is needed.

    Does nothing on a CUDA build of torch (declaring the ops there aborts the process when the real
    extension registers them), when torchvision is absent, when its extension loads, or when the ops
    already resolve.

    Returns:
        True if the schemas were declared by this call.
    """
    global _LIBRARY
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    if torch.version.cuda or torch.version.hip:
        return False
    try:
        torch.ops.torchvision.nms  # noqa: B018 - resolves only if already declared
        return False
    except (AttributeError, RuntimeError):
        pass
    if _extension_loads(spec.submodule_search_locations[0]):
        return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


class _ShimFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`apply` right before the first ``import torchvision``, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            apply()
        except Exception as exc:  # never break interpreter start-up; report and let the import proceed
            print(f"multiteach torchvision shim skipped: {exc}", file=sys.stderr)
        return None


def install_import_hook() -> None:
    """Register the deferred fix (called from the ``multiteach_tvshim.pth`` file at start-up)."""
    if not any(isinstance(f, _ShimFinder) for f in sys.meta_path) and "torchvision" not in sys.modules:
        sys.meta_path.insert(0, _ShimFinder())
