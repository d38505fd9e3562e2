"""One small generic registry, instantiated once per kind (teachers, losses, heads, ...)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from multiteach.errors import MultiteachError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping with loud failures.

    Registering a name twice raises; looking up an unknown name raises a
    :class:`MultiteachError` that lists the close matches.

    Example:
        >>> LOSSES = Registry("loss term type")
        >>> @LOSSES.register("cosine")
        ... class Cosine: ...
        >>> LOSSES.get("cosine") is Cosine
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def _add(o: T) -> T:
            if name in self._items:
                raise MultiteachError(f"{self.kind} {name!r} is already registered; pick another name.")
            self._items[name] = o
            return o

        return _add if obj is None else _add(obj)

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises:
            MultiteachError: if ``name`` is unknown (the message lists close matches).
        """
        try:
            return self._items[name]
        except KeyError:
            raise MultiteachError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, self._items)} "
                f"Known: {', '.join(sorted(self._items))}."
            ) from None

    def keys(self) -> list[str]:
        """All registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
