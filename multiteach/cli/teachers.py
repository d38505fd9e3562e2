"""The ``teachers`` command: list the teacher catalog, or check local weights against a teacher."""

from __future__ import annotations

import argparse

from multiteach.cli.command import Command, Runner
from multiteach.errors import MultiteachError


def add_teachers(p: argparse.ArgumentParser) -> Runner:
    """``multiteach teachers``: its arguments; returns its runner."""
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--check",
        metavar="NAME",
        help="check a local checkpoint against teacher NAME before training (needs --weights); exit 0 only when it "
        "will load exactly, 2 otherwise",
    )
    p.add_argument("--weights", metavar="PATH", help="with --check: the weights file or folder (a recipe's `weights:`)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="with --check: allow a teacher whose loading runs code from its Hub repo (Hibou)",
    )

    def run(args: argparse.Namespace) -> int:
        if args.check or args.weights:
            if not (args.check and args.weights):
                raise MultiteachError("--check NAME and --weights PATH go together")
            from multiteach.teachers.doctor import check_weights

            report = check_weights(args.check, args.weights, trust_remote_code=args.trust_remote_code or None)
            print(report.render())
            return report.exit_code
        from multiteach.teachers.describe import render

        print(render(as_json=args.json))
        return 0

    return run


TEACHERS = Command(
    "teachers",
    "list the teacher catalog (name, dims, tokens, params, preprocessing, licence); check weights",
    add_teachers,
)
