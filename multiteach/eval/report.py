"""Result tables and charts: Markdown, JSON and a PNG chart comparing models, one panel per metric family.

Results are ``{model: {metric: value}}`` where a value is a number or a ``(mean, std)`` pair (as
returned by the cross-validated evaluations). Every file is written atomically: to a temporary
file in the target folder, then ``os.replace``, so a reader never sees a half-written report.
The chart uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from multiteach import atomic
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
    return atomic.atomic_write_bytes(path, data, mode=0o644)


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
#: Metric families, one chart panel each: (panel title, metric-name prefixes). Metrics matching none go
#: to a last panel.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kNN / linear probe", ("knn_", "linear_")),
    ("robustness (stain, JPEG, blur, scanner)", ("robust_",)),
    ("fidelity to the teachers (centred cosine, CKA)", ("fidelity_",)),
)
OTHER_FAMILY = "other metrics"
#: Bar colours in model order: highlighted models (students) take the first, the others the second
#: list, so a model's colour depends only on its place among the models given.
HIGHLIGHT_COLOURS = ("#d62728", "#ff7f0e", "#e377c2", "#8c564b")
OTHER_COLOURS = ("#1f77b4", "#7f7f7f", "#2ca02c", "#17becf", "#9467bd", "#bcbd22")
_LABELS = {
    "knn_bacc": "kNN\nbal. acc",
    "knn_f1": "kNN\nmacro F1",
    "linear_bacc": "linear\nbal. acc",
    "linear_f1": "linear\nmacro F1",
    "robust_cosine": "matched\ncosine",
    "robust_ri": "robustness\nindex",
}
_FIDELITY_LABELS = {"summary": "summary", "patch": "patch", "cka": "CKA"}
BAR_INCHES = 0.2
#: Characters of a panel title per inch of panel width; a longer title wraps (a narrow fidelity panel).
TITLE_CHARS_PER_INCH = 13
MIN_GROUP_INCHES = 0.65


def _default_chart_metrics(results: Results, metrics: list[str]) -> list[str]:
    """Metrics whose values all lie in [-1, 1] (scores), skipping ones like C, k or odds."""
    keep = []
    for metric in metrics:
        means = [_split(row[metric], metric)[0] for row in results.values() if metric in row]
        if means and all(math.isfinite(m) and -1.0 <= m <= 1.0 for m in means):
            keep.append(metric)
    return keep


def metric_families(metrics: Sequence[str]) -> dict[str, list[str]]:
    """Group metric names into the chart's panels (:data:`FAMILIES` order, then :data:`OTHER_FAMILY`).

    Args:
        metrics: Metric names, in the order they should appear inside a panel.

    Returns:
        Panel title -> its metrics; panels without a metric are left out.
    """
    panels: dict[str, list[str]] = {title: [] for title, _ in FAMILIES}
    panels[OTHER_FAMILY] = []
    for metric in metrics:
        title = next((t for t, prefixes in FAMILIES if metric.startswith(prefixes)), OTHER_FAMILY)
        panels[title].append(metric)
    return {title: ms for title, ms in panels.items() if ms}


def _fidelity_parts(metric: str) -> tuple[str, str] | None:
    """``fidelity_<teacher>_<measure>`` -> (teacher, measure label), else None."""
    if not metric.startswith("fidelity_"):
        return None
    teacher, _, measure = metric[len("fidelity_") :].rpartition("_")
    return (teacher, _FIDELITY_LABELS[measure]) if teacher and measure in _FIDELITY_LABELS else None


def metric_label(metric: str) -> str:
    """A short tick label: ``knn_bacc`` -> ``kNN`` over ``bal. acc``; ``fidelity_uni_cka`` -> ``CKA`` (the
    fidelity panel names each teacher once, under its measures)."""
    if metric in _LABELS:
        return _LABELS[metric]
    if metric.startswith("robust_top"):
        return f"top-{metric[len('robust_top') :]}\nretrieval"
    parts = _fidelity_parts(metric)
    return parts[1] if parts else metric


def model_colours(models: Sequence[str], highlight: Sequence[str] = ()) -> dict[str, str]:
    """A fixed colour per model: highlighted ones from :data:`HIGHLIGHT_COLOURS`, the rest from
    :data:`OTHER_COLOURS`, each in the order the models are given (cycling when there are more)."""
    colours: dict[str, str] = {}
    n_hi = n_other = 0
    for model in models:
        if model in highlight:
            colours[model] = HIGHLIGHT_COLOURS[n_hi % len(HIGHLIGHT_COLOURS)]
            n_hi += 1
        else:
            colours[model] = OTHER_COLOURS[n_other % len(OTHER_COLOURS)]
            n_other += 1
    return colours


def comparison_figure(
    results: Results,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    highlight: Sequence[str] = (),
) -> Any:
    """The comparison chart as a matplotlib ``Figure`` (Agg canvas attached; no pyplot state).

    One panel per metric family (:func:`metric_families`), side by side: kNN / linear probe, robustness,
    fidelity, then any other metric. Inside a panel, one group of bars per metric and one bar per model
    that has the metric (a model without it, such as a teacher in the fidelity panel, takes no slot).
    Each model keeps one colour in every panel (:func:`model_colours`); highlighted models (the students)
    get a black outline and a bold legend entry. Error bars are drawn only for ``(mean, std)`` values; a
    single value gets none. The legend sits below the panels, never over a bar.

    Args:
        results: ``{model: {metric: value or (mean, std)}}`` with at least two models.
        metrics: Metrics to plot, in order; default every metric whose values all lie in [-1, 1]
            (accuracies, F1, cosine, top-k, CKA), leaving out scale-free extras such as C or k.
        title: Figure title (name the data set and the models in it).
        highlight: Models to highlight (the students).

    Returns:
        The ``matplotlib.figure.Figure``: its axes are the panels, in order.

    Raises:
        MultiteachError: With fewer than two models, no metric to plot, or a highlighted model that is
            not in the results.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    all_metrics = _check_results(results)
    if len(results) < 2:
        raise MultiteachError(
            f"comparison_chart compares models and needs at least two; got {len(results)}. "
            "Use to_markdown for a single model."
        )
    unknown = [m for m in highlight if m not in results]
    if unknown:
        raise MultiteachError(f"highlight names model(s) not in the results: {', '.join(map(repr, unknown))}")
    cols = list(metrics) if metrics is not None else _default_chart_metrics(results, all_metrics)
    cols = [m for m in cols if any(_has(row, m) for row in results.values())]
    if not cols:
        raise MultiteachError("No metric to plot: pass metrics=[...] naming at least one metric in the results.")

    models = list(results)
    colours = model_colours(models, highlight)
    panels = metric_families(cols)
    # one x unit per metric; a panel is as wide as its widest group needs, so every bar has the same
    # physical width (BAR_INCHES) and a lone student bar in the fidelity panel is not stretched
    inches, bar_widths = [], []
    for ms in panels.values():
        slots = max(sum(_has(results[x], m) for x in models) for m in ms)
        group = max(MIN_GROUP_INCHES, BAR_INCHES * (slots + 1))
        inches.append(group * (len(ms) + 0.2))  # the x range, -0.6 .. n - 0.4
        bar_widths.append(BAR_INCHES / group)
    margins = 1.0 + 0.3 * len(panels)  # y label, tick labels, gaps between panels
    fig_width = max(7.0, margins + sum(inches))
    stretch = (fig_width - margins) / sum(inches)  # > 1 when the minimum figure width widens the panels
    fig = Figure(figsize=(fig_width, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), width_ratios=inches, squeeze=False)[0]
    for ax, (panel, panel_metrics), width, wide in zip(axes, panels.items(), bar_widths, inches):
        _draw_panel(ax, results, models, panel_metrics, colours, set(highlight), width)
        ax.set_title(_wrap_title(panel, int(wide * stretch * TITLE_CHARS_PER_INCH)), fontsize="medium")
    fig.supylabel("score", fontsize="medium")  # not on the first panel: it would narrow that panel's bars
    handles = [
        Patch(
            facecolor=colours[m],
            edgecolor="black" if m in highlight else colours[m],
            linewidth=1.5 if m in highlight else 0.0,
            label=f"{m} (student)" if m in highlight else str(m),
        )
        for m in models
    ]
    legend = fig.legend(handles=handles, loc="outside lower center", ncols=min(len(models), 4), frameon=False)
    for text, model in zip(legend.get_texts(), models):
        if model in highlight:
            text.set_fontweight("bold")
    if title:
        fig.suptitle(title)
    return fig


def _wrap_title(title: str, width: int) -> str:
    """``title`` on one line when it fits ``width`` characters, else broken before its ``(detail)``."""
    if len(title) <= width:
        return title
    head, sep, detail = title.partition(" (")
    if sep and len(head) <= width:
        return f"{head}\n({textwrap.fill(detail, max(16, width))}"
    return textwrap.fill(title, max(16, width))


def _has(row: Mapping[str, Value], metric: str) -> bool:
    """Whether ``row`` has a finite value of ``metric`` (a missing or NaN value takes no bar slot)."""
    return metric in row and math.isfinite(_split(row[metric], metric)[0])


def _draw_panel(
    ax: Any,
    results: Results,
    models: list[str],
    metrics: list[str],
    colours: Mapping[str, str],
    highlight: set[str],
    width: float,
) -> None:
    """One family's grouped bars: metric groups on x, a bar of ``width`` per model that has the metric."""
    lows, highs = [0.0], [1.0]
    for j, metric in enumerate(metrics):
        present = [x for x in models if _has(results[x], metric)]
        for i, model in enumerate(present):
            mean, std = _split(results[model][metric], f"results[{model!r}][{metric!r}]")
            x = j + width * (i - (len(present) - 1) / 2)
            is_hi = model in highlight
            ax.bar(
                x,
                mean,
                width=width,
                color=colours[model],
                edgecolor="black" if is_hi else colours[model],
                linewidth=1.5 if is_hi else 0.0,
                zorder=2,
            )
            spread = std if std is not None and math.isfinite(std) else None
            if spread is not None:
                ax.errorbar(x, mean, yerr=spread, fmt="none", ecolor="black", elinewidth=1.0, capsize=3, zorder=3)
            lows.append(mean - (spread or 0.0))
            highs.append(mean + (spread or 0.0))
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([metric_label(m) for m in metrics], fontsize="small")
    teachers: dict[str, list[int]] = {}
    for j, metric in enumerate(metrics):
        parts = _fidelity_parts(metric)
        if parts:
            teachers.setdefault(parts[0], []).append(j)
    if teachers:  # each teacher's name once, under its measures (minor ticks, padded below the major labels)
        ax.set_xticks([sum(js) / len(js) for js in teachers.values()], [f"to {t}" for t in teachers], minor=True)
        ax.tick_params(axis="x", which="minor", length=0, pad=20, labelsize="small")
        for js in list(teachers.values())[1:]:
            ax.axvline(js[0] - 0.5, color="grey", linewidth=0.6, linestyle="--", zorder=1)
        ax.xaxis.remove_overlapping_locs = False  # a teacher centred on its middle measure keeps its label
    ax.set_xlim(-0.6, len(metrics) - 0.4)
    ax.set_ylim(min(-0.05, min(lows) - 0.05), max(highs) + 0.05)
    ax.axhline(0.0, color="black", linewidth=0.6, zorder=1)
    ax.grid(axis="y", alpha=0.3, zorder=0)


def comparison_chart(
    results: Results,
    path: str | os.PathLike[str],
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 120,
    highlight: Sequence[str] = (),
) -> Path:
    """Write the comparison chart of :func:`comparison_figure` as a PNG.

    Args:
        results: ``{model: {metric: value or (mean, std)}}`` with at least two models.
        path: Output PNG path (written atomically; parent folders are created).
        metrics: Metrics to plot; default every metric whose values all lie in [-1, 1].
        title: Figure title.
        dpi: Resolution.
        highlight: Models to highlight (the students).

    Returns:
        The written path.

    Raises:
        MultiteachError: With fewer than two models or no metric to plot.
    """
    fig = comparison_figure(results, metrics=metrics, title=title, highlight=highlight)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())
