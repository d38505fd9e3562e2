"""The ``train`` and ``sweep`` commands: distil one student, or one per combination of grid values."""

from __future__ import annotations

import argparse
import os
import sys

from multiteach.cli.command import Command, Runner
from multiteach.errors import RunInterrupted


def add_train(p: argparse.ArgumentParser) -> Runner:
    """``multiteach train``: its arguments; returns its runner."""
    p.add_argument("recipe", help="a recipe YAML file or the name of a built-in recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. losses.uni.cls.weight=0")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", default=None, help="require a checkpoint to resume from")
    group.add_argument("--no-resume", dest="resume", action="store_false", help="refuse to reuse a run directory")

    def run(args: argparse.Namespace) -> int:
        from multiteach.config import check_paths, load_recipe
        from multiteach.train import finish_process, train

        recipe = load_recipe(args.recipe, args.overrides)
        recipe.check_trainable()
        check_paths(recipe)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            run_dir = train(recipe, resume=args.resume)
        except RunInterrupted as stop:  # every rank leaves with 128 + signal: 130 (SIGINT), 143 (SIGTERM)
            print(f"multiteach train: {stop}", file=sys.stderr)
            finish_process(world, stop.exit_code)
            return stop.exit_code
        print(f"run directory: {run_dir}")
        finish_process(world)
        return 0

    return run


def add_sweep(p: argparse.ArgumentParser) -> Runner:
    """``multiteach sweep``: its arguments; returns its runner."""
    p.add_argument("recipe", help="a recipe YAML file or the name of a built-in recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every run")
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="key=v1,v2",
        help="an axis of the sweep, e.g. losses.uni.patch.weight=0,0.25,0.5 (repeatable)",
    )
    p.add_argument("--out", metavar="DIR", help="sweep folder (default: <output_dir>_sweep)")

    def run(args: argparse.Namespace) -> int:
        from multiteach.sweep import SweepInterrupted, run_sweep

        try:
            root = run_sweep(args.recipe, args.grid, args.overrides, args.out)
        except SweepInterrupted as stop:  # the summary marks the runs that are not complete
            print((stop.root / "summary.md").read_text(), end="", flush=True)
            print(
                f"multiteach sweep: {stop}; the summary marks the unfinished runs, and re-running the same "
                "sweep resumes them",
                file=sys.stderr,
            )
            return stop.exit_code
        print((root / "summary.md").read_text(), end="")
        print(f"runs, summary.csv/.md and loss_curves.png in {root}")
        return 0

    return run


TRAIN = Command("train", "distil a student as a recipe says (resumes a run directory's last checkpoint)", add_train)
SWEEP = Command("sweep", "train every combination of --grid values, one run each, and summarise them", add_sweep)
