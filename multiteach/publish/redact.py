"""Local-path redaction: ``/home/me/data/tiles`` -> ``<local>/tiles``, so no export names a local folder.

The string-level rules shared by the export files (:mod:`multiteach.publish.export`: ``recipe.yaml``,
``config.json``) and the model card (:mod:`multiteach.publish.card`); which recipe slots are redacted is decided
by their callers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Stands for the folder part of a local path in an export: ``/home/me/data/tiles`` -> ``<local>/tiles``.
LOCAL_PLACEHOLDER = "<local>"
#: Source prefixes that may stand before a local path (``local-dir:/models/uni``, ``open_clip:local-dir:...``).
_PATH_PREFIXES = ("open_clip:", "transformers:", "local-dir:", "file://", "file:")
#: An absolute path inside free text (at its start, or after a space, quote, backtick, ``(``, ``:`` or ``=``).
_PATH_IN_TEXT = re.compile(r"(?<![^\s'\"`(:=])(?:[A-Za-z]:\\|/(?!/)|~)[^\s'\"`,;()]+")


def redact_local_path(value: str, force: bool = False) -> str:
    """``<local>/`` + the last part of a local path, keeping a source prefix; other text unchanged.

    ``/home/me/data/tiles`` -> ``<local>/tiles``; ``local-dir:/models/uni`` -> ``local-dir:<local>/uni``;
    ``hf-hub:org/name``, ``uni`` and relative paths stay as they are unless ``force`` (a value known to be a
    path, such as ``data.train``).

    Args:
        value: A recipe value.
        force: Redact a relative path too.
    """
    prefix, rest = "", value
    while True:
        head = next((p for p in _PATH_PREFIXES if rest.startswith(p)), None)
        if head is None:
            break
        prefix, rest = prefix + head, rest[len(head) :]
    local = rest.startswith(("/", "~", "\\")) or (len(rest) > 2 and rest[1] == ":" and rest[2] in "/\\")
    if not rest or rest.startswith(LOCAL_PLACEHOLDER) or not (local or force or prefix.endswith("local-dir:")):
        return value
    name = rest.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return f"{prefix}{LOCAL_PLACEHOLDER}/{name}" if name not in ("", "~", ".") else f"{prefix}{LOCAL_PLACEHOLDER}"


def redact_local_paths(tree: Any) -> Any:
    """A copy of nested mappings/lists with every local path string redacted (:func:`redact_local_path`)."""
    if isinstance(tree, Mapping):
        return {k: redact_local_paths(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact_local_paths(v) for v in tree]
    return redact_local_path(tree) if isinstance(tree, str) else tree


def redact_path_slot(value: Any) -> Any:
    """A known path slot (a path or a list of paths) redacted even when relative; null stays null."""
    if isinstance(value, list):
        return [redact_path_slot(v) for v in value]
    return redact_local_path(value, force=True) if isinstance(value, str) else value


def redact_text(text: str) -> str:
    """``text`` with every absolute path in it as ``<local>/`` + its last part."""
    return _PATH_IN_TEXT.sub(lambda m: redact_local_path(m.group(0)), text)
