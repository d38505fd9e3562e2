"""Error types and the close-match helper used by every user-facing check."""

from __future__ import annotations

import difflib
import os
import signal
from collections.abc import Iterable
from pathlib import Path


class MultiteachError(ValueError):
    """A user-facing configuration or input error.

    The message always names the offending key, file or value and says what is allowed.
    """


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ``" Did you mean: a, b?"`` suffix listing close matches, or ``""``.

    Args:
        name: The unknown name the user typed.
        choices: The valid names.
        n: How many suggestions at most.
    """
    choices = list(choices)
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not matches:
        lowered = name.lower()
        matches = [c for c in choices if lowered in c.lower() or c.lower() in lowered][:n]
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


class RunInterrupted(Exception):
    """A run stopped early on SIGTERM/SIGINT, after writing a checkpoint at the step it was on.

    Not a :class:`MultiteachError`: nothing is wrong with the input, the run is only not finished. The
    command line turns it into the shell's "killed by a signal" exit status, ``128 + signal``.

    Attributes:
        signum: The first signal received (``signal.SIGINT`` or ``signal.SIGTERM``).
        step: Optimiser steps completed (and checkpointed) when the run stopped.
        steps: Steps the recipe plans (``schedule.steps``).
        run_dir: The run directory; re-running the same command resumes it.
    """

    def __init__(self, signum: int, step: int, steps: int, run_dir: str | os.PathLike[str]) -> None:
        self.signum, self.step, self.steps, self.run_dir = int(signum), int(step), int(steps), Path(run_dir)
        super().__init__(
            f"stopped by {signal.Signals(self.signum).name} at step {self.step} of {self.steps}; "
            f"{'checkpoint written' if self.step else 'nothing trained yet'} in {self.run_dir}. Re-run the same "
            f"command to resume (exit status {self.exit_code})"
        )

    @property
    def exit_code(self) -> int:
        """``128 + signal``: 130 for SIGINT, 143 for SIGTERM (what shells and SLURM report for a signal)."""
        return 128 + self.signum


def missing_path(
    what: str, path: str | os.PathLike[str], rule: str | None = None, expected: str | None = None
) -> MultiteachError:
    """The error for a path that does not exist: the absolute path tried and the rule that produced it.

    Args:
        what: What the path is for, e.g. ``"data.train"`` or ``"--data"``.
        path: The path as given (or as made absolute by a recipe rule).
        rule: How ``path`` was resolved (e.g. "'tiles' in /x/r.yaml, relative to its folder /x"); default:
            the current folder for a relative path, "as given" otherwise.
        expected: What should be there, e.g. "a tile folder or a list file".
    """
    given = Path(path).expanduser()
    tried = Path(os.path.abspath(given))
    if rule is None:
        rule = "as given" if given.is_absolute() else f"{str(path)!r} relative to the current folder {Path.cwd()}"
    return MultiteachError(
        f"{what}: {tried} does not exist ({rule})" + (f"; expected {expected} there" if expected else "")
    )
