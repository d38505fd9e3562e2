"""The one-line ``timm.create_model(...)`` call that loads an export with plain timm, and reading it back."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from typing import Any

import timm
import torch

from multiteach.errors import MultiteachError
from multiteach.layers import LAYER_NAMES, resolve_layer_kwargs


def timm_call_kwargs(layer_kwargs: Mapping[str, str]) -> dict[str, str]:
    """Python source of the layer arguments plain timm needs at call time.

    Args:
        layer_kwargs: Layer names as recipes write them (``{"mlp_layer": "swiglu_packed", "act_layer": "silu"}``).

    Returns:
        Argument -> expression, e.g. ``{"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}``.
    """
    resolved = resolve_layer_kwargs(dict(layer_kwargs))
    out = {}
    for key in LAYER_NAMES:
        if key not in resolved:
            continue
        value = resolved[key]
        out[key] = json.dumps(value) if isinstance(value, str) else _public_name(value)
    return out


def _public_name(obj: Any) -> str:
    """``timm.layers.X`` / ``torch.nn.X`` for a layer class (or timm's ``partial`` aliases such as SwiGLUPacked)."""
    for module, prefix in ((timm.layers, "timm.layers"), (torch.nn, "torch.nn")):
        for name in dir(module):
            if not name.startswith("_") and getattr(module, name) is obj:
                return f"{prefix}.{name}"
    if hasattr(obj, "__qualname__"):
        return f"{obj.__module__}.{obj.__qualname__}"
    raise MultiteachError(f"layer {obj!r} has no public import path; use a class from timm.layers or torch.nn")


def timm_load_line(source: str, layer_kwargs: Mapping[str, str]) -> str:
    """The one-line ``timm.create_model(...)`` call that loads an export with plain timm."""
    args = [json.dumps(source), "pretrained=True", *(f"{k}={v}" for k, v in timm_call_kwargs(layer_kwargs).items())]
    return f"model = timm.create_model({', '.join(args)})"


def parse_load_line(line: str) -> tuple[str, dict[str, Any]]:
    """Read a :func:`timm_load_line` back (source and keyword values) without evaluating code.

    Dotted names (``timm.layers.SwiGLUPacked``) are looked up as attributes of ``timm``/``torch``; literals are
    parsed with :func:`ast.literal_eval`. Used by the tests to load exactly what the model card prints.
    """
    expr = ast.parse(line.strip().split("=", 1)[1].strip(), mode="eval").body
    if not isinstance(expr, ast.Call) or ast.unparse(expr.func) != "timm.create_model":
        raise MultiteachError(f"not a timm.create_model call: {line!r}")
    source = ast.literal_eval(expr.args[0])
    kwargs: dict[str, Any] = {}
    for kw in expr.keywords:
        if isinstance(kw.value, (ast.Attribute, ast.Name)):
            parts = ast.unparse(kw.value).split(".")
            obj: Any = {"timm": timm, "torch": torch}[parts[0]]
            for part in parts[1:]:
                obj = getattr(obj, part)
            kwargs[kw.arg] = obj
        else:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
    return source, kwargs
