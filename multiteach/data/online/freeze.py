"""Freezing an online-patching stream: its first N positions as a coordinate CSV that a feature cache can key."""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from multiteach.data.online.sampler import SlideSource
from multiteach.data.sources.coords import write_coord_csv


def sample_positions(
    source: SlideSource, n: int, out: str | os.PathLike[str], epoch: int = 0, progress: bool = True
) -> tuple[os.PathLike[str], int]:
    """Freeze the first ``n`` samples of an online-patching stream as a coordinate CSV.

    The CSV (``slide,x,y,size0,tile_size,target_mpp``) is a finite ``data.train`` source whose tiles a
    teacher-feature cache can key by ``(slide, x, y, µm/px)``; training on it reads the same regions the stream
    would have drawn at ``epoch`` (with ``hsv_filter`` each sample is read to apply the filter, so it is slower).

    Args:
        source: The online-patching source.
        n: Number of samples (stream positions ``0 .. n-1``).
        out: The CSV to write (atomically).
        epoch: The stream epoch to take them from.
        progress: Show a progress bar.

    Returns:
        ``(path written, slides named)``.
    """
    row_of = {slide: s for s, slide in enumerate(source.index.slides)}
    rows = []
    for i in tqdm(range(int(n)), disable=not progress, desc="sample", unit="tile"):
        if source.hsv_filter:  # the filter looks at pixels: only a read knows which candidate it kept
            slide, xy, mpp = source.read(i, epoch).provenance.rsplit("@", 2)
            x, y = (int(v) for v in xy.split(","))
            s, t = row_of[slide], int(np.abs(source.targets - float(mpp)).argmin())  # provenance rounds µm/px
        else:
            d = source.draw(i, epoch)
            slide, x, y, s = d.slide, d.x, d.y, d.slide_index
            t = int(np.flatnonzero(source.targets == d.target_mpp)[0])
        rows.append((slide, x, y, float(source.plan.extent[s, t]), source.tile_size, float(source.targets[t])))
    return write_coord_csv(rows, out), len({r[0] for r in rows})
