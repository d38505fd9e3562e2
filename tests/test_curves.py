"""Loss curves are read term by term: one panel per term (plus the total), one line per run."""

from __future__ import annotations

import json

from multiteach.curves import term_figure, write_run_curves
from multiteach.sweep import _plot_curves


def _records(scale: float, terms=("uni.cls", "dino")):
    return [
        {"step": s, "loss": scale / s, **{t: scale / s for t in terms}, "lr": 1e-3, "img_per_s": 5.0} for s in (1, 2, 3)
    ]


def test_one_panel_per_term_and_the_total_one_line_per_run():
    fig = term_figure([("a", _records(1.0), False), ("b", _records(2.0, ("uni.cls", "koleo")), True)])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["total (weighted sum)", "uni.cls", "dino", "koleo"]
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert len(by_title["uni.cls"].lines) == 2 and len(by_title["dino"].lines) == 1  # run b has no dino
    assert by_title["koleo"].lines[0].get_linestyle() == "--"  # an unfinished run is dashed
    assert all(fig.axes[0].get_shared_x_axes().joined(fig.axes[0], ax) for ax in fig.axes)  # one step axis


def test_sweep_plot_labels_runs_by_their_overrides(tmp_path):
    rows = []
    for i, w in enumerate(("0", "0.5")):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _records(1.0 + i)))
        rows.append({"run": run.name, "losses.uni.patch.weight": w, "status": "complete", "steps": "3/3"})
    labels = _plot_curves(tmp_path, rows, ["losses.uni.patch.weight"])
    assert labels == ["uni.patch.weight=0", "uni.patch.weight=0.5"]
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_curves_png(tmp_path):
    assert write_run_curves(tmp_path) is None  # nothing logged, nothing drawn
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _records(1.0)))
    assert write_run_curves(tmp_path).read_bytes()[:4] == b"\x89PNG"
