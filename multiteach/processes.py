"""The start method of CPU worker pools (tissue index, ``multiteach data check``): one rule for the package."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import sys


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of data worker pools: ``fork`` on Linux, ``spawn`` elsewhere.

    Measured on the 2-core development machine (6 small slides, 2 workers; shared, noisy): fork 1.8-5.3 s,
    forkserver 10.0 s, spawn 16.8 s, one process 3.7 s. ``forkserver`` and ``spawn`` start by importing
    multiteach (and so torch, about 4 s) and re-run the main script in every worker, so a script without an
    ``if __name__ == "__main__":`` guard runs its whole body again per worker. ``fork`` is safe here because a
    worker only opens files of its own (never a slide handle inherited from the parent; OpenSlide handles must
    not cross a fork) and runs no torch or OpenMP code; it is also what torch's DataLoader uses on Linux.
    """
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")
