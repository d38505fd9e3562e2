"""Ablation sweeps: one run directory per combination of ``--grid key=v1,v2,...`` values, one summary table
(CSV + Markdown) of the final metrics, and one plot of every run's loss curve (PNG)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
from pathlib import Path
from typing import Any

from multiteach.config import load_recipe
from multiteach.errors import MultiteachError

log = logging.getLogger("multiteach.sweep")


def split_values(text: str) -> list[str]:
    """Split ``"0,0.25,[1, 2]"`` on the commas that are not inside brackets/braces."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [v for v in out if v != ""]


def parse_grid(grid: list[str]) -> dict[str, list[str]]:
    """``["losses.uni.patch.weight=0,0.25"]`` -> ``{"losses.uni.patch.weight": ["0", "0.25"]}``."""
    axes: dict[str, list[str]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not split_values(values):
            raise MultiteachError(f"--grid {item!r}: expected key=v1,v2,... (e.g. losses.uni.patch.weight=0,0.25)")
        axes[key.strip()] = split_values(values)
    return axes


def _label(key: str, value: str) -> str:
    short = key.removeprefix("losses.").replace("/", "_")
    return f"{short}={value}".replace(" ", "")


def run_sweep(source: str, grid: list[str], overrides: list[str] = (), root: str | Path | None = None) -> Path:
    """Train every combination of the grid; return the sweep folder.

    Args:
        source: Recipe file or built-in name.
        grid: ``key=v1,v2`` items; the product of all axes is run.
        overrides: Overrides applied to every run.
        root: Sweep folder (default: ``<output_dir>_sweep`` of the base recipe).

    Raises:
        MultiteachError: for a grid key that does not exist in the recipe (checked for every value before
            anything trains) or a malformed ``--grid``.
    """
    from multiteach.train import train

    axes = parse_grid(list(grid))
    base = load_recipe(source, list(overrides))
    base.check_trainable()
    for key, values in axes.items():  # validate every value before the first run
        for v in values:
            load_recipe(source, [*overrides, f"{key}={v}"])
    root = Path(root) if root else Path(f"{base.output_dir}_sweep")
    rows = []
    for combo in itertools.product(*axes.values()):
        sets = [f"{k}={v}" for k, v in zip(axes, combo)]
        name = "__".join(_label(k, v) for k, v in zip(axes, combo))
        run_dir = root / name
        recipe = load_recipe(source, [*overrides, *sets, f"output_dir={run_dir}"])
        log.info("sweep run %s", name)
        train(recipe)
        rows.append({"run": name, **dict(zip(axes, combo)), **_final_metrics(run_dir)})
    _write_summary(root, list(axes), rows)
    _plot_curves(root, [r["run"] for r in rows])
    return root


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _write_summary(root: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    from multiteach.standins import _atomic

    columns = ["run", *keys] + sorted({c for r in rows for c in r} - {"run", *keys})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    _atomic(root / "summary.csv", lambda p: p.write_text(buf.getvalue()))

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    _atomic(root / "summary.md", lambda p: p.write_text("\n".join(md) + "\n"))


def _plot_curves(root: Path, runs: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from multiteach.standins import _atomic

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for run in runs:
        recs = [json.loads(x) for x in (root / run / "metrics.jsonl").read_text().splitlines()]
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=run)
    ax.set_xlabel("step")
    ax.set_ylabel("total loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _atomic(root / "loss_curves.png", lambda p: fig.savefig(p, format="png", dpi=100))


__all__ = ["parse_grid", "run_sweep", "split_values"]
