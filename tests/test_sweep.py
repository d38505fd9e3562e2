"""Ablation sweeps: one run per grid value, one summary table, one loss-curve plot."""

import csv

import pytest

from multiteach.cli import main
from multiteach.errors import MultiteachError
from multiteach.sweep import parse_grid, run_sweep, split_values

from .engine_fixtures import recipe_yaml


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
