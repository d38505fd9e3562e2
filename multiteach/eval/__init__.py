"""Evaluation of frozen embeddings: kNN and linear probes, PLISM-style robustness, RI, reports.

Everything here is metric code over embeddings (numpy arrays or torch tensors in, dicts out); it
never loads or runs a model, except :func:`evaluate_perturbations`, which calls an encoder the
caller passes in.
"""

from multiteach.eval.knn import knn_cv, knn_eval
from multiteach.eval.linear import DEFAULT_C_GRID, linear_probe, linear_probe_cv
from multiteach.eval.report import atomic_write_bytes, comparison_chart, to_json, to_markdown
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
