"""The end-of-run summary a person reads: wall time, steps done / planned, images/s, each term first -> last,
skipped tiles and the health warnings raised; printed, appended to ``train.log`` and written as ``summary.json``."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multiteach.eval.report import atomic_write_bytes


class RunSummary:
    """Collects what the loop logs and renders the summary at the end.

    Args:
        planned: ``schedule.steps``.
        start: The step the run (re)started from.
        skipped: Unreadable tiles the data set skipped.
    """

    def __init__(self, planned: int, start: int, skipped: int = 0) -> None:
        self.planned, self.start, self.skipped = planned, start, skipped
        self.t0 = time.perf_counter()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.images = 0
        self.warnings: list[str] = []

    def record(self, values: Mapping[str, float], images: int) -> None:
        """One logged step's term values (unweighted) and the images since the previous log."""
        for name, value in values.items():
            self.first.setdefault(name, float(value))
            self.last[name] = float(value)
        self.images += images

    def finish(self, run_dir: Path, step: int, stopped_by: str | None = None) -> dict[str, Any]:
        """Write ``summary.json`` and return the summary."""
        elapsed = time.perf_counter() - self.t0
        summary = {
            "status": "finished" if step >= self.planned else f"stopped by {stopped_by or 'an interrupt'}",
            "steps_done": step,
            "steps_planned": self.planned,
            "resumed_from": self.start,
            "wall_s": round(elapsed, 1),
            "img_per_s": round(self.images / max(elapsed, 1e-9), 2),
            "terms": {k: {"first": self.first[k], "last": self.last[k]} for k in self.first},
            "skipped_tiles": self.skipped,
            "warnings": list(self.warnings),
        }
        atomic_write_bytes(Path(run_dir) / "summary.json", json.dumps(summary, indent=2).encode())
        return summary


def render(summary: Mapping[str, Any]) -> str:
    """The summary as a short text block."""
    lines = [
        f"run {summary['status']}: {summary['steps_done']} of {summary['steps_planned']} steps in "
        f"{summary['wall_s'] / 60:.1f} min ({summary['img_per_s']:.1f} img/s)",
    ]
    lines += [f"  {k}: {v['first']:.4g} -> {v['last']:.4g}" for k, v in summary["terms"].items()]
    if summary["skipped_tiles"]:
        lines.append(f"  skipped tiles: {summary['skipped_tiles']} (listed in data.json)")
    lines += [f"  warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)
