"""Command-line overrides ``dotted.key=value``, applied to a raw recipe mapping before it is checked.

Values are parsed as YAML (``0.25``, ``[1, 2]``, ``null``, ``{type: koleo}``). Loss term names contain dots,
so each level of the key is matched greedily against the longest existing (or schema) key
(``losses.uni.cls.weight=0`` -> ``losses`` / ``uni.cls`` / ``weight``); unknown paths get close matches.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from typing import Any, Union, get_args, get_origin

import yaml

from multiteach.config.checks import _join, retired_hint
from multiteach.config.convert import _hints, _is_mapping_type
from multiteach.config.recipe import Recipe
from multiteach.config.yamlio import _Loader
from multiteach.errors import MultiteachError, did_you_mean


def _parse_value(text: str, override: str) -> Any:
    """Parse an override's value as YAML."""
    if not text.strip():
        key = override.partition("=")[0]
        raise MultiteachError(f"override {override!r}: empty value; write {key}=null to clear it")
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise MultiteachError(f"override {override!r}: the value is not valid YAML: {exc}") from None


def _strip_none(tp: Any) -> Any:
    """``X | None`` -> ``X``; other types unchanged."""
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if get_origin(tp) in (Union, types.UnionType) and len(args) == 1 else tp


def _child_type(tp: Any, key: str) -> Any:
    """Schema type of ``key`` inside a node of type ``tp`` (Any when free-form or unknown)."""
    if is_dataclass(tp):
        return _strip_none(_hints(tp).get(key, Any))
    if get_origin(tp) is dict:
        return _strip_none(get_args(tp)[1])
    return Any


def _longest_match(parts: list[str], keys: Iterable[str]) -> tuple[str | None, list[str]]:
    """The longest dotted prefix of ``parts`` among ``keys``, and the remaining parts."""
    keys = set(keys)
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in keys:
            return candidate, parts[i:]
    return None, parts


def _suggest(parts: list[str], keys: list[str]) -> str:
    """Close matches for the longest prefix of ``parts`` that has any."""
    for i in range(len(parts), 0, -1):
        hint = did_you_mean(".".join(parts[:i]), keys)
        if hint:
            return hint
    return ""


def _new_key(parts: list[str], value: Any, tp: Any, keys: list[str], at: str, override: str) -> str:
    """The key a new entry gets, or an error naming the unknown path with close matches."""
    names_map = get_origin(tp) is dict and _is_mapping_type(get_args(tp)[1])
    if names_map and isinstance(value, dict):
        return ".".join(parts)
    if not names_map and not is_dataclass(tp) and len(parts) == 1:
        return parts[0]
    where = f"under {at!r}" if at else "at the top level"
    hint = f" To add an entry write {at}.NAME={{...}}." if names_map else ""
    raise MultiteachError(
        f"override {override!r}: unknown key {_join(at, '.'.join(parts))!r}."
        f"{retired_hint(_join(at, parts[0])) or _suggest(parts, keys)} "
        f"Known {where}: {', '.join(keys) or 'none'}.{hint}"
    )


def _assign(node: dict[str, Any], parts: list[str], value: Any, tp: Any, at: str, override: str) -> None:
    """Set ``value`` at the dotted ``parts`` below ``node`` (whose schema type is ``tp``)."""
    keys = [k for k in node if isinstance(k, str)]
    keys += [f.name for f in fields(tp) if f.name not in node] if is_dataclass(tp) else []
    key, rest = _longest_match(parts, keys)
    if key is None:
        node[_new_key(parts, value, tp, keys, at, override)] = value
        return
    if not rest:
        node[key] = value
        return
    child_tp, path = _child_type(tp, key), _join(at, key)
    if node.get(key) is None and _is_mapping_type(child_tp):
        node[key] = {}
    if not isinstance(node.get(key), dict):
        raise MultiteachError(
            f"override {override!r}: {path} is {node.get(key)!r}, not a mapping, so it has no key {'.'.join(rest)!r}"
        )
    _assign(node[key], rest, value, child_tp, path, override)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw recipe mapping, in place.

    Each level of the key is matched greedily against the longest existing (or schema) key, so
    ``losses.uni.cls.weight=0`` reaches the term ``uni.cls``. A new key is created only as the last
    step: ``losses.NAME={type: koleo}`` adds a term, ``student.kwargs.reg_tokens=4`` a free kwarg.

    Raises:
        MultiteachError: for a malformed override or an unknown path (with close matches).
    """
    key, sep, text = override.partition("=")
    if not sep or not key.strip() or "" in key.strip().split("."):
        raise MultiteachError(f"override {override!r}: expected dotted.key=value, e.g. optim.lr=1e-4")
    _assign(tree, key.strip().split("."), _parse_value(text, override), Recipe, "", override)
