"""Nested mappings as flat ``{"a.b.c": leaf}`` dicts, for naming what differs between two recipes or cache keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(tree: Any, prefix: str = "", keep_empty: bool = False) -> dict[str, Any]:
    """``tree``'s leaves under dotted paths: ``{"a": {"b": 1}, "c": [2]}`` -> ``{"a.b": 1, "c": [2]}``.

    Lists and other non-mappings are leaves; ``tree`` itself when not a mapping is ``{prefix: tree}``.

    Args:
        tree: A nested mapping (or a leaf).
        prefix: The path of ``tree`` itself (``""`` for the root).
        keep_empty: An empty mapping below the root is a leaf (``{"a": {}}`` -> ``{"a": {}}``); else it leaves
            no entry (``{}``).
    """
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if keep_empty and isinstance(value, Mapping) and not value:
            out[path] = value
        else:
            out.update(flatten(value, path, keep_empty))
    return out
