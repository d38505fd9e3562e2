"""Names for the non-JSON timm arguments a YAML recipe or a hub ``config.json`` cannot hold as objects.

The public hub repos of SwiGLU models (Virchow, UNI2-h, H0-mini) ask users to pass
``mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU`` at call time; recipes write
``mlp_layer: swiglu_packed`` and ``act_layer: silu`` instead, and export writes the names back.
"""

from __future__ import annotations

from typing import Any

import timm.layers
from torch import nn

from multiteach.errors import MultiteachError, did_you_mean

LAYER_NAMES: dict[str, dict[str, Any]] = {
    "mlp_layer": {
        "mlp": timm.layers.Mlp,
        "swiglu_packed": timm.layers.SwiGLUPacked,
        "swiglu": timm.layers.SwiGLU,
        "glu": timm.layers.GluMlp,
    },
    "act_layer": {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "gelu_tanh": "gelu_tanh"},
    "norm_layer": {"layernorm": timm.layers.LayerNorm, "rmsnorm": timm.layers.RmsNorm},
}


def resolve_layer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Replace layer names (``"swiglu_packed"``) by the classes timm expects.

    Args:
        kwargs: Architecture kwargs, possibly holding names for ``mlp_layer``/``act_layer``/``norm_layer``.

    Returns:
        A new dict with those names resolved; other values untouched.

    Raises:
        MultiteachError: for a name that is not in :data:`LAYER_NAMES` (with close matches).
    """
    out = dict(kwargs)
    for key, table in LAYER_NAMES.items():
        value = out.get(key)
        if isinstance(value, str):
            if value not in table:
                raise MultiteachError(
                    f"{key}: unknown layer {value!r}.{did_you_mean(value, table)} Allowed: {', '.join(table)}."
                )
            out[key] = table[value]
    return out


def layer_kwargs_to_names(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`resolve_layer_kwargs`: classes back to names, for JSON configs."""
    out = dict(kwargs)
    for key, table in LAYER_NAMES.items():
        value = out.get(key)
        if value is not None and not isinstance(value, str):
            names = [n for n, cls in table.items() if cls is value]
            if not names:
                raise MultiteachError(f"{key}={value!r} has no name in multiteach.layers.LAYER_NAMES")
            out[key] = names[0]
    return out
