"""The ``multiteach`` command line: one sub-command per job.

``multiteach teachers [--json]`` lists the teacher catalog.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from multiteach.errors import MultiteachError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str):
    """Register a sub-command: the decorated function adds its arguments and returns the runner."""

    def wrap(add_args: Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]):
        COMMANDS[name] = (help_text, add_args, None)  # type: ignore[assignment]
        return add_args

    return wrap


@command("teachers", "list the teacher catalog (name, dims, tokens, params, preprocessing, licence)")
def _teachers(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true", help="machine-readable output")

    def run(args: argparse.Namespace) -> int:
        from multiteach.teachers.describe import render

        print(render(as_json=args.json))
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="multiteach", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_run=add_args(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``multiteach`` console script and ``python -m multiteach``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MultiteachError as exc:
        print(f"multiteach {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
