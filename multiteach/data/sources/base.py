"""The contract every training source keeps: a global sample index (and epoch) -> one RGB tile + its provenance.

A source knows nothing of ranks, workers or steps: the loader (:mod:`multiteach.data.loader`) maps optimiser
steps and processes to ``(index, epoch)`` keys, so one process x batch 32 equals two x 16 and a resumed run
sees exactly the tiles an uninterrupted run would, for every source, by construction. What a source must
guarantee is that :meth:`TileSource.read` is a pure function of ``(index, epoch)`` (and the run seed it was
built with): the same tile in every process, on every call.

Sources:
    tiles: pre-extracted image files from folders and list files, held as one compact path table.
    slides: online patching, tiles drawn at random tissue positions straight from whole-slide images.
    trident: the tiles TRIDENT/CLAM coordinate ``.h5`` files name, read from their slides.
    shards: tiles in WebDataset-layout tar shards, read by offset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

from PIL import Image

from multiteach.errors import MultiteachError


class SourceTile(NamedTuple):
    """One tile as a source returns it.

    Attributes:
        image: RGB PIL image.
        provenance: Where it came from, as one string: a file path, or ``slide@x,y@mpp`` for a tile read from a
            slide (level-0 pixel corner, µm/px). This is what a teacher-feature cache keys and what logs name.
        skipped: ``(what, reason)`` for every file or slide found unreadable while producing this tile (the
            source replaced it by the next readable one). The loader carries these to the main process, which
            counts and lists them in the run's ``summary.json``.
    """

    image: Image.Image
    provenance: str
    skipped: tuple[tuple[str, str], ...] = ()


@runtime_checkable
class TileSource(Protocol):
    """What the training loader needs of a source.

    Attributes:
        shuffle: True when the loader should permute indices every epoch (a finite list of tiles); False when
            the source draws its own random positions from ``(index, epoch)`` (online patching), so consecutive
            indices may share a slide visit.
        source: What to name in messages (a folder, a list file, a slide list).
    """

    shuffle: bool
    source: str

    def __len__(self) -> int:
        """Samples per epoch."""
        ...

    def read(self, index: int, epoch: int) -> SourceTile:
        """The tile at ``index`` of ``epoch`` (a pure function of both)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for the run's ``data.json``: at least ``kind``, ``source``, ``samples`` and
        ``skipped`` (``[{"what": ..., "reason": ...}]`` found before training started)."""
        ...


def read_or_next(
    index: int,
    n: int,
    attempt: Callable[[int], tuple[Image.Image, str] | None],
    errors: type[BaseException] | tuple[type[BaseException], ...],
    on_error: Callable[[int, BaseException], tuple[str, str]],
    gave_up: str,
) -> SourceTile:
    """Tile ``index`` of a finite source, or the first readable one after it (wrapping around).

    The shared rule of the finite sources: an unreadable input is replaced by the next readable tile and
    reported with the tile (``SourceTile.skipped``), so one bad file never stops a run.

    Args:
        index: The tile asked for, in ``[0, n)``.
        n: Tiles in the source.
        attempt: Reads tile ``i``: ``(image, provenance)``, or None to pass over a tile known to be bad.
        errors: The exceptions that mean "unreadable" (anything else propagates).
        on_error: Records a failure of tile ``i`` and returns the ``(what, reason)`` to report.
        gave_up: The message when no tile is readable.

    Raises:
        MultiteachError: ``gave_up``, when every tile failed.
    """
    skipped: list[tuple[str, str]] = []
    for offset in range(n):
        i = (index + offset) % n
        try:
            got = attempt(i)
        except errors as err:
            skipped.append(on_error(i, err))
            continue
        if got is not None:
            return SourceTile(got[0], got[1], tuple(skipped))
    raise MultiteachError(gave_up)
