"""The typed converter: plain data (parsed YAML) -> the schema dataclasses, and back.

Each value is checked against its field's type (bools are not numbers, ints are floats, YAML lists become
fixed-length tuples); unknown keys get close matches, missing required keys a hint of what to write, and
every error names the full key path. Each built dataclass then runs its own ``_finish(at)`` range checks.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
from collections.abc import Mapping
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from multiteach.config.checks import _join, retired_hint
from multiteach.errors import MultiteachError, did_you_mean

T = TypeVar("T")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Evaluated field types of a schema dataclass."""
    return get_type_hints(cls)


def _required(f: Field) -> bool:
    """Whether a schema field has no default."""
    return f.default is MISSING and f.default_factory is MISSING


def _build(cls: type[T], raw: Any, at: str) -> T:
    """Convert a mapping to the schema dataclass ``cls``, checking keys, types and ranges."""
    names = [f.name for f in fields(cls)]
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise MultiteachError(f"{at or 'recipe'}: expected a mapping with keys {', '.join(names)}; got {raw!r}")
    for key in raw:
        if key not in names:
            raise MultiteachError(
                f"{_join(at, key)}: unknown key.{retired_hint(_join(at, key)) or did_you_mean(str(key), names)} "
                f"Allowed: {', '.join(names)}."
            )
    kwargs = {}
    for f in fields(cls):
        path, tp = _join(at, f.name), _hints(cls)[f.name]
        if f.name in raw:
            kwargs[f.name] = _convert(tp, raw[f.name], path)
        elif _required(f) and is_dataclass(tp):
            kwargs[f.name] = _build(tp, {}, path)
        elif _required(f):
            hint = f" ({f.metadata['hint']})" if "hint" in f.metadata else ""
            raise MultiteachError(f"{path}: required key is missing{hint}")
    obj = cls(**kwargs)
    obj._finish(at)
    return obj


def _convert(tp: Any, value: Any, at: str) -> Any:
    """Check ``value`` against the type ``tp`` and return it in that type (tuples, floats, dataclasses)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(tp, args, value, at)
    if is_dataclass(tp):
        return _build(tp, value, at)
    if tp is Any:
        return copy.deepcopy(value)
    if origin is Literal:
        if value not in args:
            hint = did_you_mean(str(value), [str(a) for a in args])
            raise MultiteachError(f"{at}: {value!r} is not allowed; use one of {', '.join(map(str, args))}.{hint}")
        return value
    if origin in (list, tuple, dict):
        return _convert_container(tp, origin, args, value, at)
    if _is_scalar(tp, value):
        return float(value) if tp is float else value
    raise MultiteachError(f"{at}: expected {_describe(tp)}, got {value!r}")


def _convert_union(tp: Any, args: tuple[Any, ...], value: Any, at: str) -> Any:
    """``X | None`` passes None and reports X's own errors; wider unions take the first fitting option."""
    options = [a for a in args if a is not type(None)]
    if value is None and len(options) < len(args):
        return None
    if len(options) == 1:
        return _convert(options[0], value, at)
    for option in options:
        with contextlib.suppress(MultiteachError):
            return _convert(option, value, at)
    raise MultiteachError(f"{at}: expected {_describe(tp)}, got {value!r}")


def _convert_container(tp: Any, origin: type, args: tuple[Any, ...], value: Any, at: str) -> Any:
    """Lists, fixed-length tuples (written as YAML lists) and string-keyed mappings."""
    if origin is dict:
        if not isinstance(value, Mapping):
            raise MultiteachError(f"{at}: expected {_describe(tp)}, got {value!r}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise MultiteachError(f"{at}: keys must be strings, got {key!r}")
            if item is None and _is_mapping_type(args[1]):
                continue  # a null entry removes what a lower layer configured
            out[key] = _convert(args[1], item, _join(at, key))
        return out
    if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
        raise MultiteachError(f"{at}: expected {_describe(tp)}, got {value!r}")
    if origin is tuple:
        return tuple(_convert(a, v, f"{at}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    return [_convert(args[0], v, f"{at}[{i}]") for i, v in enumerate(value)]


def _is_scalar(tp: Any, value: Any) -> bool:
    """Whether ``value`` is a valid ``tp`` scalar (bools are not numbers; ints are floats)."""
    if tp is bool or isinstance(value, bool):
        return tp is bool and isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float))
    return tp in (int, str) and isinstance(value, tp)


_SCALAR_WORDS = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def _describe(tp: Any) -> str:
    """Human wording of a schema type, e.g. ``"null or a list of 2 numbers"``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"a list of {_SCALAR_WORDS.get(args[0], ('', 'values'))[1]}"
    if origin is tuple:
        return f"a list of {len(args)} {_SCALAR_WORDS.get(args[0], ('', 'values'))[1]}"
    if origin is dict or is_dataclass(tp):
        return "a mapping"
    return _SCALAR_WORDS.get(tp, ("any value",))[0]


def _is_mapping_type(tp: Any) -> bool:
    """Whether values of schema type ``tp`` are mappings (a dataclass section or a dict)."""
    return is_dataclass(tp) or get_origin(tp) is dict


def _plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively (YAML- and JSON-friendly)."""
    if is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
