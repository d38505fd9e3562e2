"""The end-of-run summary a person reads: wall time, steps done / planned, images/s, each term first -> last,
the unreadable inputs skipped (found at start and met while reading) and the health warnings raised; printed,
appended to ``train.log`` and written as ``summary.json``.

A run resumed from a checkpoint is summarised from its step 1: each term's first value comes from the run's
``metrics.jsonl`` (the records up to the resume step, :func:`history`), the wall time of the processes before
this one from the checkpoint's ``state.json`` (:meth:`RunSummary.progress` is saved with every checkpoint), and
the summary says at which step(s) the run was resumed; images/s counts the steps this process ran.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from multiteach.eval.report import atomic_write_bytes

#: the ``state.json`` key of a checkpoint that holds :meth:`RunSummary.progress`
STATE_KEY = "run_summary"
#: at most this many skipped inputs are listed by name (all are counted)
LISTED_SKIPPED = 1000


class RunSummary:
    """Collects what the loop logs and renders the summary at the end.

    Args:
        planned: ``schedule.steps``.
        start: The step the run (re)started from.
        skipped: ``{"what", "reason"}`` of the inputs the source found unusable at start (missing list entries,
            slides without tissue), as its ``describe()["skipped"]``.
        skipped_unlisted: Further ones counted at start but not named (a sampled presence check).
    """

    def __init__(
        self, planned: int, start: int, skipped: Sequence[Mapping[str, str]] = (), skipped_unlisted: int = 0
    ) -> None:
        self.planned, self.start = planned, start
        self.skipped: dict[str, str] = {}  # what -> reason, each unusable input once, in the order met
        self.skipped_unlisted = skipped_unlisted
        self.add_skipped((s["what"], s["reason"]) for s in skipped)
        self.t0 = time.perf_counter()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.images = 0
        self.warnings: list[str] = []
        self.wall_before = 0.0  # wall time of the processes that ran the steps before ``start``
        self.resumed_at: list[int] = []  # the steps the run was resumed at, oldest first

    def resume(self, records: Sequence[Mapping[str, Any]], names: Sequence[str], saved: Mapping[str, Any]) -> None:
        """Continue the summary of a run resumed at ``start`` from what the earlier processes left.

        Args:
            records: The run's ``metrics.jsonl`` records up to ``start`` (:func:`history`), oldest first.
            names: The values to take from them (``loss`` and the term names).
            saved: :meth:`progress` as the checkpoint resumed from saved it (empty for older checkpoints).
        """
        for rec in records:
            self.record({k: rec[k] for k in names if k in rec}, 0)
        self.wall_before = float(saved.get("wall_s", 0.0))
        self.resumed_at = [*(int(s) for s in saved.get("resumed_at", [])), self.start]
        earlier = {str(w): str(r) for w, r in saved.get("skipped", [])}
        self.skipped = {**earlier, **self.skipped}

    def add_skipped(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Note unreadable inputs met while reading: ``(what, reason)`` pairs; each input is counted once."""
        for what, reason in pairs:
            self.skipped.setdefault(str(what), str(reason))

    def progress(self) -> dict[str, Any]:
        """What a checkpoint saves for a later resume's summary: ``{STATE_KEY: {wall_s, resumed_at, skipped}}``."""
        wall = self.wall_before + time.perf_counter() - self.t0
        listed = [[w, r] for w, r in list(self.skipped.items())[:LISTED_SKIPPED]]
        return {STATE_KEY: {"wall_s": round(wall, 3), "resumed_at": list(self.resumed_at), "skipped": listed}}

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
            "resumed_at": list(self.resumed_at),
            "wall_s": round(self.wall_before + elapsed, 1),
            "steps_this_process": step - self.start,
            "img_per_s": round(self.images / max(elapsed, 1e-9), 2),
            "terms": {k: {"first": self.first[k], "last": self.last[k]} for k in self.first},
            "skipped_tiles": len(self.skipped) + self.skipped_unlisted,
            "skipped": [{"what": w, "reason": r} for w, r in list(self.skipped.items())[:LISTED_SKIPPED]],
            "warnings": list(self.warnings),
        }
        atomic_write_bytes(Path(run_dir) / "summary.json", json.dumps(summary, indent=2).encode())
        return summary


def render(summary: Mapping[str, Any]) -> str:
    """The summary as a short text block."""
    resumed = summary.get("resumed_at") or []
    speed = f"{summary['img_per_s']:.1f} img/s"
    if resumed:
        at = ", ".join(str(s) for s in resumed)
        speed = f"resumed at step{'s' * (len(resumed) > 1)} {at}; {speed} over the "
        speed += f"{summary.get('steps_this_process', '?')} steps of the last process"
    lines = [
        f"run {summary['status']}: {summary['steps_done']} of {summary['steps_planned']} steps in "
        f"{summary['wall_s'] / 60:.1f} min ({speed})",
    ]
    lines += [f"  {k}: {v['first']:.4g} -> {v['last']:.4g}" for k, v in summary["terms"].items()]
    if summary["skipped_tiles"]:
        first = summary.get("skipped") or [{"what": "?", "reason": "?"}]
        lines.append(
            f"  skipped unreadable inputs: {summary['skipped_tiles']} (listed in summary.json; first: "
            f"{first[0]['what']}: {first[0]['reason']})"
        )
    lines += [f"  warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)


def history(metrics_file: Path, upto: int) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` up to step ``upto``, one per step, in step order.

    Lines past ``upto`` (a process killed after its last checkpoint logged them) are left out: the resumed
    run logs those steps again. A step logged more than once (by such a process and by the one that went on
    to the checkpoint) keeps its last record. Unreadable lines are skipped.
    """
    by_step: dict[int, dict[str, Any]] = {}
    if Path(metrics_file).is_file():
        for line in Path(metrics_file).read_text().splitlines():
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if step <= upto:
                by_step[step] = rec
    return [by_step[s] for s in sorted(by_step)]


def stored_summary(run_dir: Path, state: Mapping[str, Any], planned: int) -> dict[str, Any]:
    """The summary of a run that already reached its last step (re-running it trains nothing).

    ``summary.json`` when it describes the checkpoint's step; otherwise (the process was killed between its
    last checkpoint and the summary) one rebuilt from ``metrics.jsonl`` and the checkpoint's saved progress,
    and written as ``summary.json``.

    Args:
        run_dir: The run directory.
        state: The last checkpoint's ``state.json``.
        planned: ``schedule.steps``.
    """
    path = Path(run_dir) / "summary.json"
    step = int(state["step"])
    try:
        saved = json.loads(path.read_text())
        if int(saved["steps_done"]) == step:
            return saved
    except (OSError, ValueError, KeyError, TypeError):
        pass
    records = history(Path(run_dir) / "metrics.jsonl", step)
    names = [k for r in records for k in r if k not in _NOT_TERMS and not k.startswith("robust_")]
    summary = RunSummary(planned, step)
    summary.resume(records, list(dict.fromkeys(names)), state.get(STATE_KEY, {}))
    summary.resumed_at = summary.resumed_at[:-1]  # nothing was resumed: no process ran after the checkpoint
    summary.t0 = time.perf_counter()
    return summary.finish(Path(run_dir), step)


# metrics.jsonl keys that are neither the loss nor a term (robust-view strengths start with ``robust_``)
_NOT_TERMS = ("step", "lr", "weight_decay", "teacher_temp", "img_per_s")
