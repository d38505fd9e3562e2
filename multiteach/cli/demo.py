"""The ``demo`` command: the whole path on CPU in minutes (patch a slide online, distil, export, check knowledge)."""

from __future__ import annotations

import argparse

from multiteach.cli.command import Command, Runner


def add_demo(p: argparse.ArgumentParser) -> Runner:
    """``multiteach demo``: its arguments; returns its runner."""
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where everything goes (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. schedule.steps=20")

    def run(args: argparse.Namespace) -> int:
        from multiteach.demo import run_demo

        paths = run_demo(args.out, args.overrides)
        print(paths["results"]["markdown"])
        for key in ("slide", "index", "held_out", "run", "export", "knowledge"):
            print(f"{key:>9}: {paths[key]}")
        print(f"  model card: {paths['export'] / 'README.md'}")
        return 0

    return run


DEMO = Command(
    "demo",
    "the whole path on CPU in minutes: patch a real slide online, distil, export, check knowledge moved",
    add_demo,
)
