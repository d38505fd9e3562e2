"""Ablation sweeps: one run per grid value, one summary table, one loss-curve plot."""

import csv
import signal
import sys

import pytest

from multiteach.checkpoint import latest_checkpoint
from multiteach.cli import main
from multiteach.errors import MultiteachError
from multiteach.sweep import _plot_curves, _row, parse_grid, run_sweep, split_values

from .engine_fixtures import cli, interrupt, recipe_yaml


def test_split_values_respects_brackets():
    assert split_values("0,0.25,[1, 2],{a: 1, b: 2}") == ["0", "0.25", "[1, 2]", "{a: 1, b: 2}"]
    with pytest.raises(MultiteachError, match="expected key=v1,v2"):
        parse_grid(["losses.uni.patch.weight"])


def test_sweep_over_three_values(tmp_path, capsys):
    recipe = recipe_yaml(tmp_path, steps=3, checkpoint_every=2)
    grid = ["--grid", "losses.uni.patch.weight=0,0.25,0.5"]
    # overrides after --grid count as those before it do (they used to be "unrecognized arguments")
    assert main(["sweep", str(recipe), *grid, "schedule.steps=2", "--out", str(tmp_path / "sw")]) == 0
    root = tmp_path / "sw"
    runs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert runs == ["uni.patch.weight=0", "uni.patch.weight=0.25", "uni.patch.weight=0.5"]
    rows = list(csv.DictReader((root / "summary.csv").open()))
    assert len(rows) == 3 and [r["losses.uni.patch.weight"] for r in rows] == ["0", "0.25", "0.5"]
    assert [r["steps"] for r in rows] == ["2/2"] * 3 and "teacher_temp" in rows[0]  # the recipe has DINO
    assert rows[0]["uni.patch"] == "" and rows[1]["uni.patch"] != ""  # weight 0: the term was not built
    assert (root / "summary.md").read_text().count("\n") == 5 and (root / "loss_curves.png").stat().st_size > 0
    assert "uni.patch.weight=0.5" in capsys.readouterr().out


def test_overrides_go_anywhere_on_the_command_line_and_typos_are_refused(capsys):
    from multiteach.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["sweep", "r.yaml", "a=0", "--grid", "b=1,2", "c=3", "--out", "o", "d=4"])
    assert args.overrides == ["a=0", "c=3", "d=4"] and args.grid == ["b=1,2"] and args.out == "o"
    assert parse_args(build_parser(), ["train", "r.yaml", "--resume", "a=1"]).overrides == ["a=1"]
    for argv in (["sweep", "r.yaml", "--grid", "b=1,2", "--gird", "c=1,2"], ["export", "run", "--out", "o", "a=1"]):
        with pytest.raises(SystemExit):
            parse_args(build_parser(), argv)
        assert "unrecognized arguments" in capsys.readouterr().err


def test_summary_has_no_teacher_temp_column_without_dino_or_ibot(tmp_path):
    from types import SimpleNamespace

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0, "uni.cls": 1.0, "lr": 0.1, "teacher_temp": 0.04}\n')

    def recipe(kind):
        losses = {"uni.cls": {"type": "cosine", "teacher": "uni"}, "x": {"type": kind}}
        return SimpleNamespace(schedule=SimpleNamespace(steps=2), active_losses=lambda: losses)

    assert "teacher_temp" not in _row(run, "r", {}, recipe("koleo"))
    assert _row(run, "r", {}, recipe("dino"))["teacher_temp"] == 0.04


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
