"""What a training run records per step: the metrics.jsonl line, the progress bar, trackers, the health watch.

Used by the loop of :mod:`multiteach.train` (one :class:`StepLog` per run) and free of ``accelerate``: the loop
says whether this process is the main one and passes the function that logs to the trackers
(``Accelerator.log``) when a recipe names any. Each log window (``train.log_every`` optimiser steps, and the
last step) becomes one metrics.jsonl line: the step, the total loss and every term's value (of the step's
last micro-batch), the scheduled hyper-parameters, images per second over all processes and, with
``data.robust_views``, the perturbation strengths drawn in the window (:class:`StrengthLog`).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from multiteach.atomic import atomic_write_text
from multiteach.curves import write_run_curves
from multiteach.data.views.perturb import StrengthLog
from multiteach.health import FlatTermWatch, check_standardizers, check_teacher_outputs
from multiteach.run_summary import STATE_KEY, RunSummary, history
from multiteach.run_summary import render as render_summary

__all__ = ["StepLog"]

log = logging.getLogger("multiteach.train")  # the loop's own log lines


class StepLog:
    """The per-step record of one run: metrics, progress bar, trackers, health warnings and run summary.

    Dead teachers, collapsed standardisers and flat loss terms are warned about by the main process only;
    in ``train.health_check: error`` mode every rank raises, so that no rank waits for a peer that stopped.

    Args:
        recipe: The validated recipe (``name``, ``schedule.steps``, ``train.log_every``, ``train.health_check``).
        run_dir: The run directory (``metrics.jsonl`` is appended to, ``summary.json`` written at the end).
        loss: The composed loss (its term names and weights order the progress bar's terms).
        start: The step the run starts (or resumes) at.
        skipped: The source's ``describe()``: its ``skipped`` inputs found at start (and ``skipped_total``) start
            the run summary's list of unreadable inputs; those met while reading are added per micro-batch.
        world: Number of processes (images per second count all of them).
        main: Whether this is the main process (writes metrics.jsonl, shows the bar, warns).
        tracker_log: ``Accelerator.log`` when the recipe names trackers, else None.
    """

    def __init__(
        self,
        recipe: Any,
        run_dir: Path,
        loss: Any,
        start: int,
        skipped: Mapping[str, Any],
        world: int,
        main: bool,
        tracker_log: Callable[..., None] | None = None,
    ) -> None:
        self.steps, self.log_every = recipe.schedule.steps, recipe.train.log_every
        self.loss, self.world, self.main, self.tracker_log = loss, world, main, tracker_log
        self.metrics_file = run_dir / "metrics.jsonl"
        self.bar = tqdm(total=self.steps, initial=start, disable=not main, desc=recipe.name, unit="step")
        self.window_t, self.window_imgs = time.perf_counter(), 0
        self.health = recipe.train.health_check if main or recipe.train.health_check == "error" else "off"
        self.flat_terms = FlatTermWatch(mode=self.health)
        self.strengths = StrengthLog()  # robust views: perturbation strengths per log window
        listed = list(skipped.get("skipped", []))
        unlisted = max(int(skipped.get("skipped_total", len(listed))) - len(listed), 0)
        self.summary = RunSummary(self.steps, start, listed, unlisted)

    def resumed(self, state: Mapping[str, Any]) -> None:
        """Carry the run's history into this process's summary when it resumed from a checkpoint.

        The main process also drops the ``metrics.jsonl`` lines past the checkpoint's step (logged by a process
        killed before its next checkpoint; this one logs those steps again), so the file holds each step once.

        Args:
            state: The ``state.json`` of the checkpoint resumed from (nothing to do when ``step`` is 0).
        """
        start = int(state.get("step", 0))
        if not start:
            return
        records = history(self.metrics_file, start)
        if self.main and self.metrics_file.is_file():
            lines = [x for x in self.metrics_file.read_text().splitlines() if x.strip()]
            if len(lines) != len(records):
                atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in records))
                dropped = len(lines) - len(records)
                log.info("metrics.jsonl: %d line(s) past step %d dropped (those steps run again)", dropped, start)
        self.summary.resume(records, ["loss", *self.loss.names], state.get(STATE_KEY, {}))

    def check_targets(self, targets: Mapping[str, Any]) -> None:
        """Health-check the teachers' targets of an optimiser step's first micro-batch (dead teachers)."""
        self.summary.warnings += check_teacher_outputs(targets, self.health)

    def check_standardizers(self, loss: torch.nn.Module) -> None:
        """Health-check the loss's running standardisers (after the run's first optimiser step)."""
        self.summary.warnings += check_standardizers(loss, self.health)

    def add_micro_batch(self, batch: Mapping[str, Any], n_global: int) -> None:
        """Count a micro-batch's images, note the unreadable inputs met and record its robust-view strengths.

        Args:
            batch: The collated batch: ``global`` (n_global * B, 3, H, W), crop-major, and with robust views
                ``robust`` (n_global * B, len(ORDER)) perturbation strengths (0: not applied); ``skipped``:
                ``(what, reason)`` pairs of unreadable inputs the source replaced.
            n_global: Global crops per image.
        """
        self.window_imgs += batch["global"].shape[0] // n_global
        self.strengths.add(batch.get("robust"))
        self.summary.add_skipped(batch.get("skipped") or ())

    def step(
        self, step: int, total: torch.Tensor, values: Mapping[str, torch.Tensor], hparams: Mapping[str, float]
    ) -> None:
        """Advance the bar by one optimiser step; at a log step, write and report the window's record.

        Args:
            step: Optimiser steps completed.
            total: The weighted loss of the step's last micro-batch, shape ().
            values: Each term's (unweighted) value, shape () each.
            hparams: The step's scheduled hyper-parameters (``lr``, ``weight_decay``, ``teacher_temp``).
        """
        self.bar.update(1)
        if step % self.log_every != 0 and step != self.steps:
            return
        elapsed = time.perf_counter() - self.window_t
        imgs = self.window_imgs * self.world
        record = {
            "step": step,
            "loss": total.item(),
            **{k: v.item() for k, v in values.items()},
            **hparams,
            "img_per_s": imgs / max(elapsed, 1e-9),
            **self.strengths.flush(),
        }
        record = {k: (float(v) if isinstance(v, float) else v) for k, v in record.items()}
        if self.main:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.bar.set_postfix(_largest_terms(self.loss, record), img_s=f"{record['img_per_s']:.1f}")
        self.summary.warnings += self.flat_terms.update({k: record[k] for k in values}, step)
        self.summary.record({"loss": record["loss"], **{k: record[k] for k in values}}, imgs)
        if self.tracker_log is not None:
            self.tracker_log(record, step=step)
        self.window_t, self.window_imgs = time.perf_counter(), 0

    def finish(self, run_dir: Path, step: int, stopped_by: int) -> None:
        """Write ``summary.json`` (and log it) and the run's ``curves.png``; the main process calls this.

        Args:
            run_dir: The run directory.
            step: The last optimiser step completed.
            stopped_by: The signal that stopped the run early (0: it ran to its end).
        """
        done = self.summary.finish(run_dir, step, signal.Signals(stopped_by).name if stopped_by else None)
        log.info("summary (also in summary.json):\n%s", render_summary(done))
        write_run_curves(run_dir)

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


def _largest_terms(loss: Any, record: dict[str, Any], n: int = 3) -> dict[str, str]:
    """Progress-bar postfix: the total and the ``n`` terms with the largest weighted values."""
    weighted = {k: abs(loss.term(k).weight * record[k]) for k in loss.names if k in record}
    top = sorted(weighted, key=weighted.get, reverse=True)[:n]
    return {"loss": f"{record['loss']:.4f}", **{k: f"{record[k]:.4f}" for k in top}}
