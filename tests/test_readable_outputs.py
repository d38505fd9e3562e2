"""What a person reads: the eval comparison chart (through the figure object) and `config --graph`'s provenance."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer, ErrorbarContainer

from multiteach.build import describe_graph
from multiteach.cli import main
from multiteach.config import load_recipe
from multiteach.errors import MultiteachError
from multiteach.eval.report import (
    HIGHLIGHT_COLOURS,
    OTHER_COLOURS,
    OTHER_FAMILY,
    comparison_chart,
    comparison_figure,
)
from multiteach.eval.run import chart_title
from multiteach.layers import resolve_layer_kwargs
from multiteach.standins import tiny_conch_state, tiny_hf_vit

from .engine_fixtures import recipe_yaml

# --------------------------------------------------------------------------- eval chart
CV = {"knn_bacc": (0.8, 0.05), "knn_f1": (0.78, 0.06), "linear_bacc": (0.86, 0.03), "linear_f1": (0.85, 0.04)}
ROBUST = {"robust_cosine": 0.91, "robust_top1": 0.6, "robust_top3": 0.75}
RESULTS = {
    "run": {
        **CV,
        **ROBUST,
        "fidelity_uni_summary": 0.55,
        "fidelity_uni_patch": 0.41,
        "fidelity_uni_cka": 0.72,
        "fidelity_phikon_summary": 0.3,
        "fidelity_phikon_patch": 0.2,
        "fidelity_phikon_cka": 0.5,
    },
    "uni": {**CV, **ROBUST},
    "phikon": {**CV, **ROBUST},
}
PANELS = [
    "kNN / linear probe",
    "robustness (stain, JPEG, blur, scanner)",
    "fidelity to the teachers (centred cosine, CKA)",
]


def _bars(ax) -> list:
    return [patch for c in ax.containers if isinstance(c, BarContainer) for patch in c.patches]


def _errorbars(ax) -> list:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_one_panel_per_metric_family_with_the_student_highlighted():
    fig = comparison_figure(RESULTS, title="labelled: 5-fold CV\nrun (student) vs uni, phikon", highlight=["run"])
    knn, robust, fidelity = fig.axes
    assert [ax.get_title().replace("\n", " ") for ax in fig.axes] == PANELS
    assert fig.get_suptitle() == "labelled: 5-fold CV\nrun (student) vs uni, phikon"

    # kNN / linear: 4 metrics x 3 models, every value a CV (mean, std) pair, so one error bar per bar
    assert len(_bars(knn)) == 12 and len(_errorbars(knn)) == 12
    # single-value metrics: bars without whiskers
    assert len(_bars(robust)) == 9 and _errorbars(robust) == []
    # teachers have no fidelity: only the student's 6 bars, no empty slots, no whiskers
    assert len(_bars(fidelity)) == 6 and _errorbars(fidelity) == []
    assert [t.get_text() for t in fidelity.get_xticklabels()] == ["summary", "patch", "CKA"] * 2
    assert [t.get_text() for t in fidelity.get_xticklabels(minor=True)] == ["to uni", "to phikon"]

    # fixed colours: the student the first highlight colour everywhere, with an outline; teachers in order
    colours = {title: [to_hex(b.get_facecolor()) for b in _bars(ax)] for title, ax in zip(PANELS, fig.axes)}
    student, first, second = HIGHLIGHT_COLOURS[0], OTHER_COLOURS[0], OTHER_COLOURS[1]
    assert colours[PANELS[0]][:3] == [student, first, second]  # the first metric's group, in model order
    assert set(colours[PANELS[2]]) == {student}
    assert all(b.get_linewidth() > 0 for b in _bars(fidelity))
    assert all(b.get_linewidth() == 0 for b in _bars(robust) if to_hex(b.get_facecolor()) != student)

    # the legend names the student and sits outside every panel
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["run (student)", "uni", "phikon"]
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert all(not box.overlaps(ax.get_window_extent()) for ax in fig.axes)


def test_panel_titles_fit_their_panels():
    """A student and one teacher: the fidelity panel is narrow (3 lone bars); its title wraps, not clips."""
    two = {"run": {k: v for k, v in RESULTS["run"].items() if "phikon" not in k}, "uni": RESULTS["uni"]}
    fig = comparison_figure(two, highlight=["run"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        title, box = ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.x0 - 1 <= title.x0 and title.x1 <= box.x1 + 1, ax.get_title()
    assert fig.axes[2].get_title() == "fidelity to the teachers\n(centred cosine, CKA)"


def test_bars_have_one_width_and_other_metrics_get_their_own_panel(tmp_path):
    results = {
        "a": {"knn_bacc": 0.7, "balanced_accuracy": (0.6, 0.1), "ri": float("nan")},
        "b": {"knn_bacc": 0.5, "balanced_accuracy": 0.4, "ri": 0.3},
    }
    fig = comparison_figure(results, metrics=["knn_bacc", "balanced_accuracy", "ri"])
    assert [ax.get_title().replace("\n", " ") for ax in fig.axes] == ["kNN / linear probe", OTHER_FAMILY]
    other = fig.axes[1]
    assert len(_bars(other)) == 3  # the NaN takes no slot
    assert len(_errorbars(other)) == 1  # only the one (mean, std) value has a spread
    fig.canvas.draw()
    widths = [b.get_window_extent().width for ax in fig.axes for b in _bars(ax)]
    assert max(widths) < 1.05 * min(widths), widths  # one bar width in every panel (a lone bar is not stretched)

    png = comparison_chart(results, tmp_path / "c.png", metrics=["knn_bacc", "balanced_accuracy"], highlight=["a"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MultiteachError, match="highlight names model"):
        comparison_figure(results, highlight=["c"])


def test_chart_title_names_the_data_set_and_the_models():
    cv = {"mode": "cv", "n_splits": 5, "n_train": 40, "n_test": 0}
    split = {"mode": "train/test", "n_splits": None, "n_train": 130, "n_test": 60}
    assert chart_title("labelled", cv, ["run", "uni"], ["run"]) == (
        "multiteach eval on labelled: 5-fold CV (40 images)\nrun (student) vs uni"
    )
    assert chart_title("tcga", split, ["uni", "a", "b"], ["a", "b"]) == (
        "multiteach eval on tcga: train/test split (130 / 60 images)\na, b (students) vs uni"
    )
    assert chart_title("tcga", split, ["uni", "phikon"], []).endswith("\nuni vs phikon")


# --------------------------------------------------------------------------- config --graph
def _standin_params(folder) -> int:
    config = json.loads((folder / "config.json").read_text())
    kwargs = resolve_layer_kwargs({**config["model_args"], "num_classes": 0})
    model = timm.create_model(config["architecture"], pretrained=False, **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_graph_counts_the_weights_folder_and_names_the_catalog_architecture(tmp_path):
    recipe = recipe_yaml(tmp_path)
    graph = describe_graph(load_recipe(recipe))
    info = graph["teacher_architectures"]["uni"]
    standin = _standin_params(tmp_path / "uni")
    assert graph["teachers"] == {"uni": standin}  # what training loads, not the 303M catalog ViT-L
    assert info["counted"] == "weights" and info["params"] == standin
    assert info["weights_config"]["path"] == str(tmp_path / "uni" / "config.json")
    assert info["catalog"] == {"arch": "vit_large_patch16_224", "width": 1024, "depth": 24, "params": 303_350_784}
    assert info["line"] == (
        f"uni: counted the architecture of the folder in `weights:`: vit_large_patch16_224 (64-d, 2 blocks, "
        f"{standin / 1e6:.2f}M params), from {tmp_path / 'uni' / 'config.json'}; the catalog architecture "
        "differs: vit_large_patch16_224 (1024-d, 24 blocks, 303.35M params)"
    )
    # the heads are built for the stand-in's width, as in training: 64-d, not 1024-d
    catalog = describe_graph(load_recipe(recipe, ["teachers.uni.weights=null"]))
    assert graph["projection_heads"] < catalog["projection_heads"]


@pytest.mark.parametrize(
    "override, why",
    [
        ("teachers.uni.weights=null", "no `weights:` folder; the Hub weights are this architecture"),
        ("teachers.uni.pretrained=false", "pretrained: false builds it with random weights"),
        ("FILE", "`weights:` {file} has no config.json"),
    ],
)
def test_graph_says_when_it_counted_the_catalog_architecture(tmp_path, override, why):
    recipe = recipe_yaml(tmp_path)
    file = tmp_path / "uni" / "model.safetensors"
    override = f"teachers.uni.weights={file}" if override == "FILE" else override
    info = describe_graph(load_recipe(recipe, [override]))["teacher_architectures"]["uni"]
    assert info["counted"] == "catalog" and info["params"] == 303_350_784 and info["weights_config"] is None
    assert info["line"] == (
        "uni: counted the catalog architecture, vit_large_patch16_224 (1024-d, 24 blocks, 303.35M params): "
        + why.format(file=file)
    )


def test_graph_same_architecture_and_local_dir_source(tmp_path):
    shipped = describe_graph(load_recipe("demo"))["teacher_architectures"]["multiteach-tiny"]
    assert shipped["counted"] == "weights" and shipped["catalog"]["params"] == shipped["params"]
    assert shipped["line"].startswith("multiteach-tiny: counted the architecture of the folder in the catalog's ")
    assert shipped["line"].endswith("; the same as the catalog architecture")

    recipe = recipe_yaml(tmp_path)
    local = describe_graph(
        load_recipe(recipe, [f"teachers.uni.source=local-dir:{tmp_path / 'uni'}", "teachers.uni.weights=null"])
    )["teacher_architectures"]["uni"]
    assert local["counted"] == "weights" and local["catalog"] is None
    assert local["line"].startswith("uni: counted the architecture of the folder in `source: local-dir:`: ")


def test_graph_reads_a_transformers_folder_and_keeps_conch_from_the_catalog(tmp_path):
    tiny_hf_vit("vit").save_pretrained(tmp_path / "phikon")
    (tmp_path / "conch").mkdir()
    torch.save(tiny_conch_state()[1], tmp_path / "conch" / "pytorch_model.bin")
    overrides = [f"teachers.{name}.weights={tmp_path / name}" for name in ("phikon", "conch")]
    graph = describe_graph(load_recipe("gpfm", overrides))["teacher_architectures"]
    phikon, conch = graph["phikon"], graph["conch"]
    assert phikon["counted"] == "weights" and (phikon["width"], phikon["depth"]) == (64, 2)
    assert phikon["line"].endswith("; the catalog architecture differs: ViTConfig (768-d, 12 blocks, 85.80M params)")
    assert conch["counted"] == "catalog" and conch["params"] == 90_392_832
    assert conch["line"].endswith(f": the conch loader builds it for any weights (`weights:` {tmp_path / 'conch'})")


def test_cli_graph_prints_the_provenance_line(tmp_path, capsys):
    recipe = recipe_yaml(tmp_path)
    assert main(["config", str(recipe), "--graph"]) == 0
    graph = json.loads(capsys.readouterr().out)
    line = graph["teacher_architectures"]["uni"]["line"]
    assert line.startswith("uni: counted the architecture of the folder in `weights:`")
    assert "the catalog architecture differs: vit_large_patch16_224 (1024-d, 24 blocks, 303.35M params)" in line
