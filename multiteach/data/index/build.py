"""Building the tissue index of a slide list: the missing entries in parallel worker processes, then its summary."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm import tqdm

from multiteach.data.index.entries import (
    ENTRIES_DIR,
    ENV_INDEX_DIR,
    IndexSettings,
    build_entry,
    default_index_dir,
    read_entry_header,
)
from multiteach.data.index.table import Listed, SlideIndex, assemble, identify, summary_path
from multiteach.data.lists.slide_list import SlideTable
from multiteach.errors import MultiteachError
from multiteach.processes import worker_context

logger = logging.getLogger("multiteach.data")


def _run_builds(tasks: list[tuple[str, str, str, int, int]], processes: int, progress: bool) -> dict[str, dict]:
    """Build every task's entry, in ``processes`` workers when there is more than one task; returns entry file ->
    header. A pool whose workers die at start (a script without an ``if __name__ == "__main__":`` guard re-runs
    itself in them) is abandoned for an in-process build, with a warning."""
    headers: dict[str, dict] = {}
    workers = max(1, min(int(processes), len(tasks)))
    with tqdm(total=len(tasks), desc="tissue index", unit="slide", disable=not progress, leave=False) as bar:
        if workers > 1:
            try:
                with ProcessPoolExecutor(workers, mp_context=worker_context()) as pool:
                    for future in as_completed([pool.submit(build_entry, task) for task in tasks]):
                        target, header, _ = future.result()
                        headers[target] = header
                        bar.update()
            except (BrokenProcessPool, RuntimeError) as err:
                logger.warning(
                    "tissue index: worker processes failed (%s: %s); building the remaining entries in this process. "
                    'A script that builds the index must start with `if __name__ == "__main__":`.',
                    type(err).__name__,
                    err,
                )
        for task in tasks:
            if task[1] not in headers:
                target, header, _ = build_entry(task)
                headers[target] = header
                bar.update()
    return headers


def build_index(
    slides: SlideTable,
    settings: Any = None,
    index_dir: str | os.PathLike[str] | None = None,
    processes: int = 2,
    progress: bool = True,
    retry_failed: bool = False,
) -> SlideIndex:
    """Load the tissue index of a slide list, building the entries it lacks.

    A warm start (every entry built, same list and settings) reads one summary file after a ``stat`` of every
    slide. Otherwise the entries present are reused, the missing ones built in ``processes`` worker processes
    (with a progress bar) and a new summary written.

    Args:
        slides: The slide list (:func:`~multiteach.data.lists.slide_list.read_slide_list`).
        settings: ``IndexSettings``, or ``SlidesConfig`` (its ``thumb_size``, ``min_saturation`` and ``mpp``).
        index_dir: The index folder (default :func:`default_index_dir`).
        processes: Worker processes for missing entries (1: build in this process).
        progress: Show a progress bar while building.
        retry_failed: Rebuild entries recorded as unreadable (e.g. after a storage hiccup).

    Returns:
        The :class:`SlideIndex` of the usable slides, with every other listed slide in ``skipped``.

    Raises:
        MultiteachError: If no listed slide is usable (naming the first reason), or the index folder cannot be
            written when entries must be built.
    """
    start = time.perf_counter()
    settings = IndexSettings.of(settings)
    root = Path(index_dir).expanduser() if index_dir else default_index_dir()
    listed, gone = identify(slides, settings, root)
    missing = list(slides.missing) + gone
    summary = summary_path(root, listed, settings)
    index = None if retry_failed else SlideIndex._load(summary) if summary.is_file() else None
    if index is not None and all(os.path.exists(e) for e in set(index.entries)):
        index.built, index.reused = 0, len({item.entry for item in listed})
    else:
        index = _build_missing(listed, settings, root, summary, processes, progress, retry_failed)
    index.skipped = missing + index.skipped
    index.index_dir, index.source = str(root), slides.source
    index.seconds = time.perf_counter() - start
    _report(index, len(slides) + len(slides.missing))
    return index


def _build_missing(
    listed: list[Listed],
    settings: IndexSettings,
    root: Path,
    summary: Path,
    processes: int,
    progress: bool,
    retry_failed: bool,
) -> SlideIndex:
    """Read the entries present, build the others, assemble the index and write its summary."""
    tasks: list[tuple[str, str, str, int, int]] = []
    headers: dict[str, dict[str, Any] | None] = {}  # entry -> header; a slide linked twice has one entry
    for item in listed:
        if item.entry not in headers:
            header = read_entry_header(item.entry) if os.path.exists(item.entry) else None
            if header is None or (retry_failed and not bool(header["ok"])):
                header = None
                tasks.append((item.path, item.entry, item.identity, settings.thumb_size, settings.min_saturation))
            headers[item.entry] = header
        item.header = headers[item.entry]
    if tasks:
        _check_writable(root)
        built = _run_builds(tasks, processes, progress)
        for item in listed:
            if item.header is None:
                item.header = built[item.entry]
    arrays, skipped = assemble(listed, settings)
    index = SlideIndex(**arrays, skipped=skipped, built=len(tasks), reused=len(headers) - len(tasks))
    try:
        index._save(summary)
    except OSError as err:  # a read-only shared index still serves this run
        logger.warning(
            "tissue index: could not write the summary %s (%s); the next start re-reads entries", summary, err
        )
    return index


def _check_writable(root: Path) -> None:
    try:
        (root / ENTRIES_DIR).mkdir(parents=True, exist_ok=True)
        probe = root / ENTRIES_DIR / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise MultiteachError(
            f"The tissue index folder {root} cannot be written ({type(err).__name__}: {err}); point "
            f"data.slides.index_dir (or ${ENV_INDEX_DIR}, or `multiteach data index --index-dir`) at a writable folder."
        ) from err


def _report(index: SlideIndex, listed: int) -> None:
    if not len(index):
        first, reason = index.skipped[0] if index.skipped else ("", "no slides")
        raise MultiteachError(
            f"None of the {listed} slide(s) of {index.source} is usable; first: {first}: {reason.rstrip('.')}. "
            f"(tissue index: {index.index_dir})"
        )
    logger.info(
        "tissue index: %d usable slide(s), %d skipped, %d entries built, %d reused, %.2f s (%s)",
        len(index),
        len(index.skipped),
        index.built,
        index.reused,
        index.seconds,
        index.index_dir,
    )
