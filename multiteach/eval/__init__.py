"""Evaluation of frozen embeddings: kNN and linear probes, PLISM-style robustness, RI, reports.

Everything here is metric code over embeddings (numpy arrays or torch tensors in, dicts out); it
never loads or runs a model, except :func:`evaluate_perturbations`, which calls an encoder the
caller passes in.
"""

from multiteach.eval.knn import knn_cv, knn_eval
from multiteach.eval.linear import DEFAULT_C_GRID, linear_probe, linear_probe_cv
from multiteach.eval.report import atomic_write_bytes, comparison_chart, comparison_figure, to_json, to_markdown
from multiteach.eval.robustness import (
    CROMA_PIN,
    SCANNER_PROFILES,
    blur,
    evaluate_perturbations,
    hed_shift,
    jpeg_compress,
    matched_cosine,
    perturbation_suite,
    plism_pair_metrics,
    robustness_index,
    scanner_colour,
    topk_retrieval,
)

__all__ = [
    "CROMA_PIN",
    "DEFAULT_C_GRID",
    "SCANNER_PROFILES",
    "atomic_write_bytes",
    "blur",
    "comparison_chart",
    "comparison_figure",
    "evaluate_perturbations",
    "hed_shift",
    "jpeg_compress",
    "knn_cv",
    "knn_eval",
    "linear_probe",
    "linear_probe_cv",
    "matched_cosine",
    "perturbation_suite",
    "plism_pair_metrics",
    "robustness_index",
    "scanner_colour",
    "to_json",
    "to_markdown",
    "topk_retrieval",
]

# Model-running entry points (they import timm and the teacher loaders), loaded on first use so that
# ``import multiteach.eval`` stays a light, metric-only import.
_LAZY = {
    "Embedder": "multiteach.eval.embed",
    "embed_folder": "multiteach.eval.embed",
    "resolve_model": "multiteach.eval.embed",
    "teacher_fidelity": "multiteach.eval.fidelity",
    "evaluate": "multiteach.eval.run",
    "load_labelled": "multiteach.eval.run",
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
