"""The ``multiteach`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import sys

from multiteach.cli.cache import CACHE
from multiteach.cli.command import Command
from multiteach.cli.config import CONFIG
from multiteach.cli.data import DATA, TILE
from multiteach.cli.demo import DEMO
from multiteach.cli.eval import EVAL
from multiteach.cli.publish import EXPORT, MERGE
from multiteach.cli.teachers import TEACHERS
from multiteach.cli.train import SWEEP, TRAIN
from multiteach.errors import MultiteachError, RunInterrupted

# Each command's runner imports the modules it needs itself: most of them pull in timm, transformers or
# sklearn (seconds), and `multiteach --help` or a mistyped argument should not wait for those.

# The sub-commands, in the order `multiteach --help` lists them.
COMMANDS: tuple[Command, ...] = (TEACHERS, TILE, CONFIG, TRAIN, CACHE, SWEEP, EXPORT, EVAL, DATA, MERGE, DEMO)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command of ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="multiteach", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_args in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_run=add_args(p))
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may also follow the options (``sweep R --grid a=1,2 b=3``).

    argparse fills a ``nargs="*"`` positional with the words before the first option only; the ``key=value``
    words it leaves over are appended to ``overrides`` of the commands that take them. Anything else left over
    is refused as argparse would.
    """
    args, extra = parser.parse_known_args(argv)
    overrides = [w for w in extra if "=" in w and not w.startswith("-")]
    if overrides and isinstance(getattr(args, "overrides", None), list):
        args.overrides += overrides
        extra = [w for w in extra if w not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``multiteach`` console script and ``python -m multiteach``."""
    args = parse_args(build_parser(), argv)
    try:
        return int(args._run(args) or 0)
    except MultiteachError as exc:
        print(f"multiteach {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        print(f"multiteach {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C before a run installed its own handler (loading, building)
        print(f"multiteach {args.command}: interrupted (SIGINT)", file=sys.stderr)
        return 130  # 128 + SIGINT, as for a run that stopped on it
