"""Error types and the close-match helper used by every user-facing check."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
