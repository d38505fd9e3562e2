"""A small per-process pool of open slides: OpenSlide handles cannot be pickled or shared across ``fork``, so
each DataLoader worker opens its own, keeps at most ``size`` of them and closes the least recently used first."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from multiteach.data.wsi.slide import open_slide


class SlidePool:
    """Least-recently-used open slides of this process.

    Args:
        size: Most slides kept open.
        opener: Opens one slide path (default :func:`multiteach.data.wsi.slide.open_slide`).
        on_open: Called with ``(path, handle)`` after a slide is opened; its return value is kept beside the
            handle (e.g. the slide's tissue mask) and given back by :meth:`extra`.
    """

    def __init__(
        self,
        size: int,
        opener: Callable[[str], Any] = open_slide,
        on_open: Callable[[str, Any], Any] | None = None,
    ) -> None:
        self.size = max(1, int(size))
        self.opener, self.on_open = opener, on_open
        self._open: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._pid = os.getpid()
        self.opened = 0  # slides opened by this process so far (a benchmark reads it)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # handles are not picklable; the receiving process reopens
        return state

    def _entry(self, path: str) -> tuple[Any, Any]:
        if self._pid != os.getpid():  # a forked worker: the inherited handles belong to the parent
            self._open, self._pid = OrderedDict(), os.getpid()
        entry = self._open.get(path)
        if entry is not None:
            self._open.move_to_end(path)
            return entry
        handle = self.opener(path)
        self.opened += 1
        entry = (handle, self.on_open(path, handle) if self.on_open else None)
        self._open[path] = entry
        while len(self._open) > self.size:
            _, (old, _) = self._open.popitem(last=False)
            old.close()
        return entry

    def get(self, path: str) -> Any:
        """The open slide at ``path`` (opened now if it is not in the pool)."""
        return self._entry(path)[0]

    def extra(self, path: str) -> Any:
        """What ``on_open`` returned for ``path`` (opening it if needed)."""
        return self._entry(path)[1]

    def drop(self, path: str) -> None:
        """Close ``path`` if it is open (after a read failed)."""
        entry = self._open.pop(path, None)
        if entry is not None:
            entry[0].close()

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        """Close every slide this process opened."""
        while self._open:
            _, (handle, _) = self._open.popitem()
            handle.close()
