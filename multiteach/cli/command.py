"""``Command``: a sub-command's name, help text and the function that adds its arguments and returns its runner."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

Runner = Callable[[argparse.Namespace], int]


class Command(NamedTuple):
    """One sub-command: ``add_args(parser)`` adds its arguments and returns the runner of parsed arguments."""

    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], Runner]
