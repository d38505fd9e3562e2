"""Ablation sweeps: one run directory per combination of ``--grid key=v1,v2,...`` values, one summary table
(CSV + Markdown) of the final metrics, and one plot of every run's loss curve (PNG).

The first SIGTERM/SIGINT stops the sweep after the run in progress has written its checkpoint: no further
run starts, the summary marks every run ``complete``, ``incomplete`` or ``not started`` with its steps done
out of planned, and :class:`SweepInterrupted` carries the exit status (130/143) to the command line.
Re-running the same sweep skips the complete runs and resumes the others from their last checkpoints.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multiteach.atomic import atomic_write_text
from multiteach.checkpoint import latest_checkpoint
from multiteach.config import check_paths, load_recipe
from multiteach.curves import read_metrics, save_png, term_figure, term_names
from multiteach.errors import MultiteachError, RunInterrupted
from multiteach.runs import run_progress
from multiteach.train import StopRequest, recipe_hash, train

log = logging.getLogger("multiteach.sweep")

COMPLETE, INCOMPLETE, NOT_STARTED = "complete", "incomplete", "not started"
TEMPERATURE_TERMS = ("dino", "ibot")  # the loss types that read the scheduled teacher temperature


class SweepInterrupted(RunInterrupted):
    """A sweep stopped on SIGTERM/SIGINT; ``root`` holds its summary, which marks the unfinished runs."""

    def __init__(self, stop: RunInterrupted, root: Path) -> None:
        super().__init__(stop.signum, stop.step, stop.steps, stop.run_dir)
        self.root = root


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

    Runs that already reached ``schedule.steps`` (same recipe) are not trained again; the others resume
    from their last checkpoint, so re-running an interrupted sweep finishes it.

    Raises:
        MultiteachError: for a grid key that does not exist in the recipe (checked for every value before
            anything trains) or a malformed ``--grid``.
        SweepInterrupted: after SIGTERM/SIGINT, once the run in progress has checkpointed and the summary
            (marking the unfinished runs) is written; no further run starts.
    """
    axes = parse_grid(list(grid))
    base = load_recipe(source, list(overrides))
    base.check_trainable()
    check_paths(base)
    for key, values in axes.items():  # validate every value before the first run
        for v in values:
            load_recipe(source, [*overrides, f"{key}={v}"])
    root = Path(root) if root else Path(f"{base.output_dir}_sweep")
    plan = []
    for combo in itertools.product(*axes.values()):
        sets = [f"{k}={v}" for k, v in zip(axes, combo)]
        name = "__".join(_label(k, v) for k, v in zip(axes, combo))
        plan.append(
            (name, dict(zip(axes, combo)), load_recipe(source, [*overrides, *sets, f"output_dir={root / name}"]))
        )
    stopped: RunInterrupted | None = None
    with StopRequest() as stop:  # spans the runs: a signal between two runs also stops the sweep
        for name, _, recipe in plan:
            if stop.requested:
                stopped = RunInterrupted(stop.signum, run_progress(root / name)[0], recipe.schedule.steps, root / name)
                break
            if _is_complete(recipe):
                log.info("sweep run %s: complete, not trained again", name)
                continue
            log.info("sweep run %s", name)
            try:
                train(recipe, stop=stop)
            except RunInterrupted as exc:
                stopped = exc
                break
        root.mkdir(parents=True, exist_ok=True)
        rows = [_row(root / name, name, values, recipe) for name, values, recipe in plan]
        _write_summary(root, list(axes), rows)
        _plot_curves(root, rows, list(axes))
    if stopped is not None:
        raise SweepInterrupted(stopped, root)
    return root


def _is_complete(recipe: Any) -> bool:
    """Whether the recipe's run directory holds a checkpoint of this recipe at ``schedule.steps``."""
    last = latest_checkpoint(recipe.output_dir)
    if last is None:
        return False
    state = json.loads((last / "state.json").read_text())
    return state.get("recipe_hash") == recipe_hash(recipe) and int(state["step"]) >= recipe.schedule.steps


def _row(run_dir: Path, name: str, values: dict[str, str], recipe: Any) -> dict[str, Any]:
    """One summary row: the grid values, whether the run is complete (steps done/planned), its last metrics
    (``teacher_temp`` only when a DINO/iBOT term reads it)."""
    planned = recipe.schedule.steps
    done, _ = run_progress(run_dir)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    status = COMPLETE if done >= planned else (INCOMPLETE if done or lines else NOT_STARTED)
    first, last = (json.loads(lines[0]), json.loads(lines[-1])) if lines else ({}, {})
    if not any(cfg.get("type") in TEMPERATURE_TERMS for cfg in recipe.active_losses().values()):
        last.pop("teacher_temp", None)
    # each term's change over the run beside its last value: an ablation is read term by term
    changes = {f"{k} change": last[k] - first[k] for k in term_names([last]) if k in first}
    return {"run": name, **values, "status": status, "steps": f"{done}/{planned}", **last, **changes}


def _write_summary(root: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    first = ["run", *keys, "status", "steps"]
    columns = first + sorted({c for r in rows for c in r} - set(first))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(root / "summary.csv", buf.getvalue())

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    atomic_write_text(root / "summary.md", "\n".join(md) + "\n")


def _plot_curves(root: Path, rows: list[dict[str, Any]], keys: Sequence[str] = ()) -> list[str]:
    """Write ``loss_curves.png``: one panel per loss term (and the total), one line per run that logged
    anything, labelled by its grid values; unfinished runs dashed and labelled with their status and steps.
    Returns the legend labels."""
    series, labels = [], []
    for row in rows:
        recs = read_metrics(root / row["run"] / "metrics.jsonl")
        if not recs:
            continue
        complete = row["status"] == COMPLETE
        name = ", ".join(f"{k.split('.', 1)[-1]}={row[k]}" for k in keys if k in row) or row["run"]
        labels.append(name if complete else f"{name} ({row['status']}, {row['steps']} steps)")
        series.append((labels[-1], recs, not complete))
    save_png(term_figure(series, title=f"sweep {root.name}: loss terms"), root / "loss_curves.png")
    return labels


__all__ = ["SweepInterrupted", "parse_grid", "run_sweep", "split_values"]
