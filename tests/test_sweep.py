"""Ablation sweeps: one run per grid value, one summary table, one loss-curve plot."""

import csv
import signal
import sys

import pytest

from multiteach.checkpoint import latest_checkpoint
from multiteach.cli import main
from multiteach.errors import MultiteachError
from multiteach.sweep import _plot_curves, parse_grid, run_sweep, split_values

from .engine_fixtures import cli, interrupt, recipe_yaml


def test_split_values_respects_brackets():
    assert split_values("0,0.25,[1, 2],{a: 1, b: 2}") == ["0", "0.25", "[1, 2]", "{a: 1, b: 2}"]
    with pytest.raises(MultiteachError, match="expected key=v1,v2"):
        parse_grid(["losses.uni.patch.weight"])


def test_sweep_over_three_values(tmp_path, capsys):
    recipe = recipe_yaml(tmp_path, steps=2, checkpoint_every=2)
    assert (
        main(["sweep", str(recipe), "--grid", "losses.uni.patch.weight=0,0.25,0.5", "--out", str(tmp_path / "sw")]) == 0
    )
    root = tmp_path / "sw"
    runs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert runs == ["uni.patch.weight=0", "uni.patch.weight=0.25", "uni.patch.weight=0.5"]
    rows = list(csv.DictReader((root / "summary.csv").open()))
    assert len(rows) == 3 and [r["losses.uni.patch.weight"] for r in rows] == ["0", "0.25", "0.5"]
    assert rows[0]["uni.patch"] == "" and rows[1]["uni.patch"] != ""  # weight 0: the term was not built
    assert (root / "summary.md").read_text().count("\n") == 5 and (root / "loss_curves.png").stat().st_size > 0
    assert "uni.patch.weight=0.5" in capsys.readouterr().out


def test_grid_key_that_does_not_exist(tmp_path):
    recipe = recipe_yaml(tmp_path, steps=2, checkpoint_every=2)
    with pytest.raises(MultiteachError, match=r"losses\.uni\.pach"):
        run_sweep(str(recipe), ["losses.uni.pach.weight=0,1"], root=tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def summary_rows(root):
    """summary.csv rows without the one column that is a timing (img/s differs between any two runs)."""
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in csv.DictReader((root / "summary.csv").open())]


def test_sigint_stops_the_sweep_after_the_run_in_progress_and_a_rerun_finishes_it(tmp_path):
    recipe = recipe_yaml(tmp_path, steps=8, checkpoint_every=8)
    grid = ["--grid", "losses.uni.patch.weight=0.25,0.5"]
    ref = cli("sweep", str(recipe), *grid, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    root, first, second = tmp_path / "sw", "uni.patch.weight=0.25", "uni.patch.weight=0.5"
    cmd = [sys.executable, "-m", "multiteach", "sweep", str(recipe), *grid, "--out", str(root)]
    assert interrupt(cmd, root / first, signal.SIGINT, tmp_path / "err.txt") == 130
    err = (tmp_path / "err.txt").read_text()
    assert not (root / second).exists(), err[-3000:]  # the second run never started
    step = int(latest_checkpoint(root / first).name.removeprefix("step_"))
    rows = summary_rows(root)
    assert [(r["run"], r["status"], r["steps"]) for r in rows] == [
        (first, "incomplete", f"{step}/8"),
        (second, "not started", "0/8"),
    ]
    assert "| incomplete |" in (root / "summary.md").read_text() and "re-running the same sweep resumes" in err
    labels = _plot_curves(root, list(csv.DictReader((root / "summary.csv").open())))
    assert labels == [f"{first} (incomplete, {step}/8 steps)"]  # the PNG's legend (curve dashed)

    again = cli("sweep", str(recipe), *grid, "--out", str(root))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {step})" in again.stderr  # the first run resumed, not restarted
    assert summary_rows(root) == summary_rows(tmp_path / "ref")
    assert [r["status"] for r in summary_rows(root)] == ["complete", "complete"]
