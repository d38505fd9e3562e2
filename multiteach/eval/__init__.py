"""Evaluation of frozen embeddings: kNN and linear probes, PLISM-style robustness, RI, reports.

Everything here is metric code over embeddings (numpy arrays or torch tensors in, dicts out); it
never loads or runs a model, except :func:`evaluate_perturbations`, which calls an encoder the
caller passes in.
"""

import importlib

# Every public name is loaded on first use: the training loop imports single metric modules (the health
# check reads ``agreement.spread``), and an eager package import would pull in scikit-learn, matplotlib and
# the model loaders with them (~1.8 s on every ``multiteach train`` start).
_LAZY = {
    **dict.fromkeys(("knn_cv", "knn_eval"), "multiteach.eval.knn"),
    **dict.fromkeys(("DEFAULT_C_GRID", "linear_probe", "linear_probe_cv"), "multiteach.eval.linear"),
    **dict.fromkeys(
        ("atomic_write_bytes", "comparison_chart", "comparison_figure", "to_json", "to_markdown"),
        "multiteach.eval.report",
    ),
    **dict.fromkeys(
        (
            "CROMA_PIN",
            "SCANNER_PROFILES",
            "blur",
            "evaluate_perturbations",
            "hed_shift",
            "jpeg_compress",
            "matched_cosine",
            "perturbation_suite",
            "plism_pair_metrics",
            "robustness_index",
            "scanner_colour",
            "topk_retrieval",
        ),
        "multiteach.eval.robustness",
    ),
    **dict.fromkeys(("Embedder", "embed_folder", "resolve_model"), "multiteach.eval.embed"),
    "teacher_fidelity": "multiteach.eval.fidelity",
    **dict.fromkeys(("evaluate", "load_labelled"), "multiteach.eval.run"),
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):  # PEP 562
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
