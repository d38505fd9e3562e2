"""Loss curves a person reads term by term: one panel per loss term (plus the total), one line per run.

A total loss is a weighted sum, so it cannot be compared across runs with different weights; each term can.
Used for a sweep's ``loss_curves.png`` (one line per run, the differing overrides as the legend) and for each
run's ``curves.png`` at the end of ``multiteach train``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multiteach.atomic import atomic_write_bytes

#: metrics.jsonl keys that are not loss terms
NOT_TERMS = ("step", "loss", "lr", "weight_decay", "teacher_temp", "img_per_s")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (empty when the file does not exist)."""
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def term_names(records: Sequence[dict[str, Any]]) -> list[str]:
    """Loss term names in first-seen order."""
    names: dict[str, None] = {}
    for r in records:
        names.update({k: None for k in r if k not in NOT_TERMS})
    return list(names)


def term_figure(series: Sequence[tuple[str, Sequence[dict[str, Any]], bool]], title: str = "") -> Any:
    """Small multiples: the total and each term against the step, one line per series.

    Args:
        series: ``(label, metrics records, dashed)`` per run (dashed: an unfinished run).
        title: Figure title.

    Returns:
        The matplotlib ``Figure`` (Agg canvas), one axis per panel: ``total`` first, then the terms.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    terms: dict[str, None] = {}
    for _, recs, _ in series:
        terms.update({t: None for t in term_names(recs)})
    panels = ["loss", *terms]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4 * cols, 2.8 * rows + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False).ravel()
    for ax, name in zip(axes, panels):
        for label, recs, dashed in series:
            pts = [(r["step"], r[name]) for r in recs if name in r]
            if pts:
                ax.plot(*zip(*pts), "--" if dashed else "-", label=label)
        ax.set_title("total (weighted sum)" if name == "loss" else name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels) :]:
        ax.remove()
    for ax in axes[max(0, len(panels) - cols) : len(panels)]:
        ax.set_xlabel("step", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(series) > 1:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if len(series) > 1 else 0, 1, 1))
    return fig


def save_png(fig: Any, path: str | Path) -> Path:
    """Write a figure as PNG via a temp file + rename."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())


def write_run_curves(run_dir: str | Path) -> Path | None:
    """``run_dir/curves.png`` from its ``metrics.jsonl`` (None when nothing was logged)."""
    run_dir = Path(run_dir)
    recs = read_metrics(run_dir / "metrics.jsonl")
    if not recs:
        return None
    return save_png(
        term_figure([(run_dir.name, recs, False)], title=f"{run_dir.name}: loss terms"), run_dir / "curves.png"
    )
