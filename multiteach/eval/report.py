"""Result tables and charts: Markdown, JSON and a PNG bar chart comparing models.

Results are ``{model: {metric: value}}`` where a value is a number or a ``(mean, std)`` pair (as
returned by the cross-validated evaluations). Every file is written atomically: to a temporary
file in the target folder, then ``os.replace``, so a reader never sees a half-written report.
The chart uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from multiteach.errors import MultiteachError

Value = float | int | tuple[float, float]
Results = Mapping[str, Mapping[str, Value]]


# --------------------------------------------------------------------------- helpers
def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    Creates the parent folder if needed. The file ends up with mode 0644.

    Args:
        path: Destination file.
        data: The bytes to write.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _split(value: Any, where: str) -> tuple[float, float | None]:
    """(mean, std or None) of a result value; validates its type."""
    if isinstance(value, bool):
        raise MultiteachError(f"{where}: expected a number or a (mean, std) pair, got a bool.")
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise MultiteachError(f"{where}: a pair must be (mean, std), got {len(value)} items.")
        return float(value[0]), float(value[1])
    try:
        return float(value), None
    except (TypeError, ValueError) as exc:
        raise MultiteachError(f"{where}: expected a number or a (mean, std) pair, got {type(value).__name__}.") from exc


def _check_results(results: Results) -> list[str]:
    """Validate the nested mapping and return the metric names in first-seen order."""
    if not isinstance(results, Mapping) or not results:
        raise MultiteachError("results is empty; expected {model: {metric: value or (mean, std)}}.")
    metrics: list[str] = []
    for model, row in results.items():
        if not isinstance(row, Mapping):
            raise MultiteachError(f"results[{model!r}] must be a {{metric: value}} mapping, got {type(row).__name__}.")
        for metric, value in row.items():
            _split(value, f"results[{model!r}][{metric!r}]")
            if metric not in metrics:
                metrics.append(str(metric))
    return metrics


def _fmt(x: float, precision: int) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{precision}f}"


# --------------------------------------------------------------------------- markdown / json
def to_markdown(
    results: Results,
    path: str | os.PathLike[str] | None = None,
    metrics: Sequence[str] | None = None,
    precision: int = 3,
) -> str:
    """A Markdown table: one row per model, one column per metric.

    Floats print with ``precision`` decimals and ints (such as k) as they are;
    ``(mean, std)`` pairs print as ``mean ± std``; a metric a model lacks prints as ``—``.

    Args:
        results: ``{model: {metric: value or (mean, std)}}``.
        path: If given, the table is also written there (atomically).
        metrics: Columns to show, in order; default every metric in first-seen order.
        precision: Decimals.

    Returns:
        The table text (ending with a newline).
    """
    all_metrics = _check_results(results)
    cols = list(metrics) if metrics is not None else all_metrics

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = [
        "| " + " | ".join(["model", *[cell(c) for c in cols]]) + " |",
        "|" + "---|" + "---:|" * len(cols),
    ]
    for model, row in results.items():
        cells = [cell(model)]
        for metric in cols:
            if metric not in row:
                cells.append("—")
                continue
            value = row[metric]
            mean, std = _split(value, f"results[{model!r}][{metric!r}]")
            if std is not None:
                cells.append(f"{_fmt(mean, precision)} ± {_fmt(std, precision)}")
            elif isinstance(value, numbers.Integral):
                cells.append(str(value))
            else:
                cells.append(_fmt(mean, precision))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if path is not None:
        atomic_write_bytes(path, text.encode("utf-8"))
    return text


def _json_number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def to_json(results: Results, path: str | os.PathLike[str] | None = None, indent: int = 2) -> str:
    """JSON text of the results; pairs become ``{"mean": m, "std": s}``, NaN/inf become ``null``.

    Args:
        results: ``{model: {metric: value or (mean, std)}}``.
        path: If given, the JSON is also written there (atomically).
        indent: JSON indentation.

    Returns:
        The JSON text (strict JSON: no NaN tokens).
    """
    _check_results(results)
    out: dict[str, dict[str, Any]] = {}
    for model, row in results.items():
        out[str(model)] = {}
        for metric, value in row.items():
            mean, std = _split(value, f"results[{model!r}][{metric!r}]")
            if std is not None:
                out[str(model)][str(metric)] = {"mean": _json_number(mean), "std": _json_number(std)}
            elif isinstance(value, numbers.Integral):
                out[str(model)][str(metric)] = int(value)
            else:
                out[str(model)][str(metric)] = _json_number(mean)
    text = json.dumps(out, indent=indent, allow_nan=False) + "\n"
    if path is not None:
        atomic_write_bytes(path, text.encode("utf-8"))
    return text


# --------------------------------------------------------------------------- chart
def _default_chart_metrics(results: Results, metrics: list[str]) -> list[str]:
    """Metrics whose values all lie in [-1, 1] (scores), skipping ones like C, k or odds."""
    keep = []
    for metric in metrics:
        means = [_split(row[metric], metric)[0] for row in results.values() if metric in row]
        if means and all(math.isfinite(m) and -1.0 <= m <= 1.0 for m in means):
            keep.append(metric)
    return keep


def comparison_chart(
    results: Results,
    path: str | os.PathLike[str],
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Write a grouped bar chart (PNG) comparing two or more models, with std error bars.

    Args:
        results: ``{model: {metric: value or (mean, std)}}`` with at least two models.
        path: Output PNG path (written atomically; parent folders are created).
        metrics: Metrics to plot (x axis), in order; default every metric whose values all lie in
            [-1, 1] (accuracies, F1, cosine, top-k, RI), leaving out scale-free extras such as C or k.
        title: Optional chart title.
        dpi: Resolution.

    Returns:
        The written path.

    Raises:
        MultiteachError: With fewer than two models or no metric to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    all_metrics = _check_results(results)
    if len(results) < 2:
        raise MultiteachError(
            f"comparison_chart compares models and needs at least two; got {len(results)}. "
            "Use to_markdown for a single model."
        )
    cols = list(metrics) if metrics is not None else _default_chart_metrics(results, all_metrics)
    if not cols:
        raise MultiteachError("No metric to plot: pass metrics=[...] naming at least one metric in the results.")

    models = list(results)
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(6.0, 1.0 + 0.35 * len(cols) * len(models)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, model in enumerate(models):
        row = results[model]
        xs, heights, errs = [], [], []
        for j, metric in enumerate(cols):
            if metric not in row:
                continue
            mean, std = _split(row[metric], f"results[{model!r}][{metric!r}]")
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(mean)
            errs.append(0.0 if std is None else std)
        ax.bar(xs, heights, width=width, yerr=errs if any(errs) else None, capsize=3, label=str(model))
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30, ha="right")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())
