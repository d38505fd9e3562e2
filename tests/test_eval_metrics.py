"""Metric code in multiteach.eval: hand-computable values, chance levels, splits, perturbations, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from multiteach.data.views.augment import hed_to_rgb
from multiteach.errors import MultiteachError
from multiteach.eval import (
    comparison_chart,
    evaluate_perturbations,
    jpeg_compress,
    knn_cv,
    knn_eval,
    linear_probe,
    linear_probe_cv,
    matched_cosine,
    perturbation_suite,
    robustness_index,
    to_json,
    to_markdown,
    topk_retrieval,
)
from multiteach.eval.knn import cv_splits

KS = (1, 3, 5, 10)


def clusters(n_per: int = 30, n_classes: int = 3, dim: int = 16, spread: float = 0.05, seed: int = 0):
    """Well-separated Gaussian clusters: (x (N, dim), y (N,))."""
    rng = np.random.default_rng(seed)
    centres = np.eye(n_classes, dim) * 10.0
    y = np.repeat(np.arange(n_classes), n_per)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def tiles(batch: int = 2, size: int = 64) -> torch.Tensor:
    """Smooth H&E-like RGB tiles (B, 3, size, size) in [0, 1], made from stain concentration fields."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for b in range(batch):
        h = 0.04 + 0.04 * torch.sin(2 * math.pi * (xx + yy + 0.3 * b))
        e = 0.08 + 0.05 * torch.cos(3 * math.pi * xx + b)
        out.append(hed_to_rgb(torch.stack([h, e, torch.zeros_like(h)])))
    return torch.stack(out).float()


# --------------------------------------------------------------------------- PLISM metrics
def test_identical_embeddings_are_perfectly_matched():
    a = np.random.default_rng(0).normal(size=(50, 8))
    assert matched_cosine(a, a.copy()) == pytest.approx(1.0, abs=1e-12)
    assert topk_retrieval(a, a.copy(), KS) == {"top1": 1.0, "top3": 1.0, "top5": 1.0, "top10": 1.0}
    # torch input works the same
    assert matched_cosine(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(1.0, abs=1e-6)


def test_four_point_example_by_hand():
    # cos(a0,a1)=0, cos(a0,b0)=.8, cos(a0,b1)=.6, cos(a1,b0)=.6, cos(a1,b1)=.8, cos(b0,b1)=.96.
    # a0 -> nearest b0 (its match), a1 -> b1 (match): a->b top-1 = 1.
    # b0 -> nearest b1 (.96) before a0 (.8); b1 -> b0 before a1: b->a top-1 = 0, each match ranked 2nd.
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.8, 0.6], [0.6, 0.8]])
    assert matched_cosine(a, b) == pytest.approx(0.8)
    assert topk_retrieval(a, b, ks=(1, 2, 3)) == {"top1": 0.5, "top2": 1.0, "top3": 1.0}


def test_unmatched_embeddings_retrieve_at_chance():
    # b is unrelated to a (a shuffled independent set), so b[i] is exchangeable with the other 2n - 2
    # candidates of a[i]: P(hit@k) = k / (2n - 1). Each direction's accuracy is a mean of n
    # Bernoulli(p); the two directions are averaged, so its std is at most sqrt(p (1 - p) / n)
    # (the bound for fully correlated directions). Allow 5 of those.
    n = 400
    rng = np.random.default_rng(1)
    a = rng.normal(size=(n, 64))
    b = rng.normal(size=(n, 64))[rng.permutation(n)]
    res = topk_retrieval(a, b, KS)
    for k in KS:
        p = k / (2 * n - 1)
        assert abs(res[f"top{k}"] - p) <= 5 * math.sqrt(p * (1 - p) / n), (k, res)
    # and a shuffle of a well-matched b destroys retrieval (at most chance)
    b_matched = a + 0.3 * rng.normal(size=a.shape)
    assert topk_retrieval(a, b_matched, (1,))["top1"] == 1.0
    derangement = np.roll(np.arange(n), 1)
    shuffled = topk_retrieval(a, b_matched[derangement], (10,))["top10"]
    p10 = 10 / (2 * n - 1)
    assert shuffled <= p10 + 5 * math.sqrt(p10 * (1 - p10) / n)


def test_topk_chunking_does_not_change_result():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(60, 8))
    b = a + 0.8 * rng.normal(size=a.shape)
    assert topk_retrieval(a, b, KS, chunk_size=7) == topk_retrieval(a, b, KS, chunk_size=4096)


def test_topk_counts_ties_against_the_match():
    a = np.ones((5, 4))  # collapsed embeddings: every candidate ties with the match
    assert topk_retrieval(a, a, (1, 9))["top1"] == 0.0
    assert topk_retrieval(a, a, (1, 9))["top9"] == 1.0


# --------------------------------------------------------------------------- kNN and linear probe
def test_knn_separated_clusters_are_perfect():
    x, y = clusters()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    tr, te = idx[:60], idx[60:]
    for weighting in ("uniform", "distance", "temperature"):
        res = knn_eval(x[tr], y[tr], x[te], y[te], k=5, weighting=weighting)
        assert res == {"balanced_accuracy": 1.0, "macro_f1": 1.0}
    assert knn_eval(x[tr], y[tr], x[te], y[te], k=5, metric="euclidean")["balanced_accuracy"] == 1.0
    cv = knn_cv(x, y, k=5, n_splits=3, seed=0)
    assert cv == {"balanced_accuracy": (1.0, 0.0), "macro_f1": (1.0, 0.0)}


def test_knn_string_labels_and_torch_inputs():
    x, y = clusters(n_per=10, n_classes=2)
    names = np.array(["tumour", "stroma"])[y]
    res = knn_eval(torch.from_numpy(x), names.tolist(), torch.from_numpy(x), names, k=3)
    assert res["balanced_accuracy"] == 1.0


def test_linear_probe_separable_is_perfect():
    x, y = clusters(n_per=20, dim=12, spread=0.5)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    tr, te = idx[:40], idx[40:]
    res = linear_probe(x[tr], y[tr], x[te], y[te])
    assert res["balanced_accuracy"] == 1.0 and res["macro_f1"] == 1.0
    assert res["C"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    assert linear_probe(x[tr], y[tr], x[te], y[te], C=0.5)["C"] == 0.5
    cv = linear_probe_cv(x, y, n_splits=3, C=1.0)
    assert cv == {"balanced_accuracy": (1.0, 0.0), "macro_f1": (1.0, 0.0)}


def test_group_cv_never_shares_a_group():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(12), 10)  # 12 slides x 10 tiles
    y = groups % 3  # slide-level label
    seen_test = []
    for train_idx, test_idx in cv_splits(y, groups, n_splits=4, seed=0):
        assert not set(groups[train_idx]) & set(groups[test_idx])
        seen_test.extend(test_idx.tolist())
    assert sorted(seen_test) == list(range(len(y)))  # every row tested exactly once
    # and the evaluations use it: a slide-level signal shared within a slide cannot leak
    x = rng.normal(size=(len(y), 12)) + 5 * np.eye(12)[groups]  # slide identity only, no class signal
    leaky = knn_cv(x, y, k=3, n_splits=4, seed=0)["balanced_accuracy"][0]
    grouped = knn_cv(x, y, k=3, n_splits=4, groups=groups, seed=0)["balanced_accuracy"][0]
    assert leaky > 0.9 and grouped < 0.7
    res = linear_probe_cv(x, y, n_splits=4, groups=groups, seed=0, C=1.0)
    assert res["balanced_accuracy"][0] < 0.7 and set(res) == {"balanced_accuracy", "macro_f1"}


def test_cv_is_deterministic_with_a_seed():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(90, 10))
    y = np.repeat([0, 1, 2], 30)
    x[:, 0] += y  # weak signal, so folds matter
    groups = np.repeat(np.arange(18), 5)
    assert knn_cv(x, y, k=7, seed=5) == knn_cv(x, y, k=7, seed=5)
    assert knn_cv(x, y, k=7, groups=groups, seed=5) == knn_cv(x, y, k=7, groups=groups, seed=5)
    grid = (0.1, 1.0)  # a two-point grid still runs the inner C search
    assert linear_probe_cv(x, y, n_splits=3, C=grid, seed=5) == linear_probe_cv(x, y, n_splits=3, C=grid, seed=5)
    assert knn_cv(x, y, k=7, seed=5) != knn_cv(x, y, k=7, seed=6)


# --------------------------------------------------------------------------- robustness index
def test_robustness_index_known_value():
    # Points on the unit circle at 0, 10, 22, 37, 55 degrees; (class, site):
    # p0 (A,1) p1 (A,2) p2 (B,1) p3 (B,2) p4 (A,2). k = 2 nearest (angle gaps):
    # p0: p1 SO, p2 OS | p1: p0 SO, p2 OO | p2: p1 OO, p3 SO | p3: p2 SO, p4 OS | p4: p3 OS, p2 OO
    # SO = 4, OS = 3 -> RI = 4 / 7, odds 4 / 3; every sample has an SO or OS neighbour.
    pytest.importorskip("croma")
    ang = np.deg2rad([0, 10, 22, 37, 55])
    x = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    res = robustness_index(x, ["A", "A", "B", "B", "A"], [1, 2, 1, 2, 2], k=2)
    assert res["ri"] == pytest.approx(4 / 7)
    assert res["ri_odds"] == pytest.approx(4 / 3)
    assert res["k"] == 2 and res["support"] == 1.0


@pytest.mark.filterwarnings("ignore:.*RI/MaRI support:RuntimeWarning")
def test_robustness_index_extremes_and_groups():
    pytest.importorskip("croma")
    rng = np.random.default_rng(5)
    bio = np.tile([0, 1], 40)
    site = np.repeat([0, 1], 40)
    by_bio = np.eye(2)[bio] * 10 + 0.1 * rng.normal(size=(80, 2))
    by_site = np.eye(2)[site] * 10 + 0.1 * rng.normal(size=(80, 2))
    assert robustness_index(by_bio, bio, site, k=5)["ri"] == pytest.approx(1.0)
    assert robustness_index(by_site, bio, site, k=5)["ri"] == pytest.approx(0.0)
    res = robustness_index(by_bio, bio, site, k=(3, 5), groups=np.arange(80) // 4)
    assert res["k"] in (3, 5) and 0.0 <= res["ri"] <= 1.0


# --------------------------------------------------------------------------- perturbations
def test_perturbations_keep_shape_and_range_and_change_the_image():
    x = tiles()
    suite = perturbation_suite(seed=0)
    assert set(suite) == {
        "hed_light",
        "hed_strong",
        "jpeg_q80",
        "jpeg_q50",
        "blur_s1",
        "blur_s2",
        "scanner_warm",
        "scanner_cool",
    }
    for name, fn in suite.items():
        y = fn(x)
        assert y.shape == x.shape and y.dtype == x.dtype, name
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0, name
        assert float((y - x).abs().mean()) > 1e-3, name
        assert torch.equal(fn(x), y), name  # fixed parameters
        assert fn(x[0]).shape == x[0].shape, name  # a single (3, H, W) image too
    # same seed -> same suite; another seed -> another stain direction
    assert torch.equal(perturbation_suite(0)["hed_strong"](x), suite["hed_strong"](x))
    assert not torch.equal(perturbation_suite(1)["hed_strong"](x), suite["hed_strong"](x))


def test_jpeg_quality_100_is_close_to_identity():
    x = tiles()
    err100 = (jpeg_compress(x, 100) - x).abs()
    assert float(err100.mean()) < 1 / 255 and float(err100.max()) < 0.03
    assert float((jpeg_compress(x, 20) - x).abs().mean()) > float(err100.mean())


def test_evaluate_perturbations_with_a_toy_encoder():
    x = tiles(batch=6, size=32)

    def embed(batch: torch.Tensor) -> torch.Tensor:  # 4x4 average-pooled colours
        return torch.nn.functional.adaptive_avg_pool2d(batch, 4).flatten(1)

    res = evaluate_perturbations(embed, x, ks=(1, 3), batch_size=4)
    assert set(res) == set(perturbation_suite(0))
    for metrics in res.values():
        assert set(metrics) == {"cosine", "top1", "top3"}
        assert -1.0 <= metrics["cosine"] <= 1.0 and 0.0 <= metrics["top1"] <= 1.0
    assert res["blur_s1"]["cosine"] > 0.99  # pooling barely sees a 1-pixel blur


# --------------------------------------------------------------------------- reports
RESULTS = {
    "student-s": {"balanced_accuracy": (0.9123, 0.0131), "macro_f1": 0.9, "top10": 0.5, "k": 20},
    "teacher|uni": {"balanced_accuracy": (0.95, 0.01), "macro_f1": 0.93, "top10": 0.7, "ri": float("nan")},
}


def test_markdown_json_png_written(tmp_path):
    md = to_markdown(RESULTS, tmp_path / "out" / "table.md")
    assert (tmp_path / "out" / "table.md").read_text() == md
    lines = md.splitlines()
    assert lines[0] == "| model | balanced_accuracy | macro_f1 | top10 | k | ri |"
    assert "| student-s | 0.912 ± 0.013 | 0.900 | 0.500 | 20 | — |" in lines
    assert "teacher\\|uni" in md and "nan" in md

    text = to_json(RESULTS, tmp_path / "table.json")
    data = json.loads((tmp_path / "table.json").read_text())
    assert data == json.loads(text)
    assert data["student-s"]["balanced_accuracy"] == {"mean": 0.9123, "std": 0.0131}
    assert data["student-s"]["k"] == 20 and data["teacher|uni"]["ri"] is None

    png = comparison_chart(RESULTS, tmp_path / "chart.png", title="demo")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png", "out", "table.json"]  # no temp files left


def test_report_errors(tmp_path):
    with pytest.raises(MultiteachError, match="at least two"):
        comparison_chart({"only": {"acc": 1.0}}, tmp_path / "c.png")
    with pytest.raises(MultiteachError, match="empty"):
        to_markdown({})
    with pytest.raises(MultiteachError, match="mean, std"):
        to_json({"m": {"acc": (1.0, 2.0, 3.0)}})
    with pytest.raises(MultiteachError, match="number"):
        to_json({"m": {"acc": "high"}})
    assert not (tmp_path / "c.png").exists()


# --------------------------------------------------------------------------- input errors
def test_clear_errors():
    x, y = clusters(n_per=5, n_classes=2)
    with pytest.raises(MultiteachError, match="single class"):
        knn_eval(x, np.zeros(len(x)), x, y, k=3)
    with pytest.raises(MultiteachError, match="single class"):
        linear_probe_cv(x, np.zeros(len(x)), n_splits=2)
    with pytest.raises(MultiteachError, match="lengths must match"):
        knn_eval(x, y[:-1], x, y, k=3)
    with pytest.raises(MultiteachError, match="equal lengths"):
        matched_cosine(x, x[:-1])
    with pytest.raises(MultiteachError, match="at least k=20"):
        knn_eval(x, y, x, y, k=20)
    with pytest.raises(MultiteachError, match="2n - 1"):
        topk_retrieval(x[:3], x[:3], ks=(10,))
    with pytest.raises(MultiteachError, match="empty"):
        knn_eval(np.zeros((0, 4)), [], x, y)
    with pytest.raises(MultiteachError, match="empty"):
        topk_retrieval(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(MultiteachError, match="smallest class"):
        knn_cv(x, y, k=1, n_splits=6)
    with pytest.raises(MultiteachError, match="groups"):
        knn_cv(x, y, k=1, n_splits=3, groups=np.zeros(len(x)))
    with pytest.raises(MultiteachError, match="dimension"):
        knn_eval(x, y, x[:, :3], y, k=3)
    with pytest.raises(MultiteachError, match="NaN"):
        matched_cosine(np.full((2, 2), np.nan), np.ones((2, 2)))
    with pytest.raises(MultiteachError, match="weighting"):
        knn_eval(x, y, x, y, k=3, weighting="softmax")
    with pytest.raises(MultiteachError, match="single class"):
        robustness_index(x, np.zeros(len(x)), y, k=2)
    with pytest.raises(MultiteachError, match="one site"):
        robustness_index(x, y, np.zeros(len(x)), k=2)
    with pytest.raises(MultiteachError, match="at least 21 samples"):
        robustness_index(x, y, y, k=20)
    with pytest.raises(MultiteachError, match="float image"):
        jpeg_compress(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 90)


def test_repeated_cv_averages_fold_seeds_and_a_fixed_split_is_scored_once():
    from pathlib import Path

    from multiteach.eval.labelled import LabelledSet
    from multiteach.eval.transfer import classification_scores

    rng = np.random.default_rng(0)
    y = np.tile([0, 1, 2], 20)
    x = rng.normal(size=(60, 8)) + 0.8 * np.eye(8)[y]  # overlapping classes: fold seeds disagree
    paths = [Path(f"{i}.png") for i in range(60)]
    cv = LabelledSet(Path("."), False, ["a", "b", "c"], paths, y, [], np.array([]))
    single = [classification_scores(cv, x, seed=s)["knn"] for s in range(3)]
    assert len(set(single)) > 1
    assert classification_scores(cv, x, seed=0, cv_repeats=3)["knn"] == pytest.approx(np.mean(single))
    split = LabelledSet(Path("."), True, ["a", "b", "c"], paths[:45], y[:45], paths[45:], y[45:])
    assert classification_scores(split, x, cv_repeats=5) == classification_scores(split, x)
