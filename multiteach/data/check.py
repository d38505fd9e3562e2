"""``multiteach data check``: the full scan that training no longer makes at start, on demand and in parallel.

Every tile of a source is read and decoded (for slides and coordinates: the region read from its slide), in
worker processes, with a progress bar. The report counts and lists what is unreadable; ``--out-good`` writes the
readable tiles of a path list as a new list, so a corpus checked once can be trained from without re-checking.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from multiteach.data.lists.paths import write_text_list
from multiteach.errors import MultiteachError
from multiteach.processes import worker_context

_SOURCE: Any = None  # the source each worker process reads (set by the pool initializer)


def _init(source: Any) -> None:
    global _SOURCE
    _SOURCE = source


def _check_chunk(bounds: tuple[int, int]) -> list[tuple[int, str, str]]:
    """``(index, what, reason)`` of every unreadable tile in ``range(*bounds)`` of the worker's source."""
    bad = []
    for i in range(*bounds):
        tile = _SOURCE.read(i, 0)
        bad += [(i, what, reason) for what, reason in tile.skipped]
    return bad


@dataclass
class CheckReport:
    """What a full scan found.

    Attributes:
        total: Tiles checked.
        bad: ``(what, reason)`` per unreadable tile or slide, in index order.
        bad_indices: Their tile indices (for path lists: the entries to drop).
        seconds: Wall time of the scan.
    """

    total: int
    bad: list[tuple[str, str]] = field(default_factory=list)
    bad_indices: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def render(self, listed: int = 10) -> str:
        """A short text report naming at most ``listed`` bad entries."""
        rate = self.total / max(self.seconds, 1e-9)
        lines = [f"checked {self.total} tile(s) in {self.seconds:.1f} s ({rate:.0f}/s): {len(self.bad)} unreadable"]
        lines += [f"  {what}: {reason}" for what, reason in self.bad[:listed]]
        if len(self.bad) > listed:
            lines.append(f"  ... and {len(self.bad) - listed} more")
        return "\n".join(lines)


def check_source(source: Any, processes: int = 2, chunk: int = 512, progress: bool = True) -> CheckReport:
    """Read every tile of a finite source once, in ``processes`` worker processes.

    A tile whose read had to skip unreadable inputs reports them (its ``SourceTile.skipped``); each unreadable
    input is counted once, at the first index that met it.
    """
    n = len(source)
    t0 = time.perf_counter()
    spans = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
    found: dict[str, tuple[int, str]] = {}
    bar = tqdm(total=n, unit="tile", desc="data check", disable=not progress)
    if processes <= 1:
        _init(source)
        results = map(_check_chunk, spans)
        for (lo, hi), bad in zip(spans, results):
            _collect(found, bad)
            bar.update(hi - lo)
    else:
        with worker_context().Pool(processes, initializer=_init, initargs=(source,)) as pool:
            for (lo, hi), bad in zip(spans, pool.imap(_check_chunk, spans)):
                _collect(found, bad)
                bar.update(hi - lo)
    bar.close()
    ordered = sorted(found.items(), key=lambda item: item[1][0])
    return CheckReport(
        total=n,
        bad=[(what, reason) for what, (_, reason) in ordered],
        bad_indices=[i for _, (i, _) in ordered],
        seconds=time.perf_counter() - t0,
    )


def _collect(found: dict[str, tuple[int, str]], bad: list[tuple[int, str, str]]) -> None:
    for i, what, reason in bad:
        found.setdefault(what, (i, reason))


def good_list(source: Any, report: CheckReport, out: str | os.PathLike[str]) -> Path:
    """Write the readable tiles of a path-list source (every path not reported bad) as a text list."""
    table = getattr(source, "table", None)
    if table is None or not hasattr(table, "select"):
        raise MultiteachError("--out-good writes a path list; it works for tile folders and lists only")
    bad_paths = {what for what, _ in report.bad}
    keep = np.fromiter((table[i] not in bad_paths for i in range(len(table))), dtype=bool, count=len(table))
    return write_text_list(table.select(keep), out)
