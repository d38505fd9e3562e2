"""Teachers: name a model (catalog key or generic source) and get a frozen, self-preprocessing teacher.

Sources a user can name:

* a catalog key: ``uni``, ``conch``, ``h-optimus-0``, ... (``multiteach teachers`` lists them);
* ``hf-hub:ORG/NAME`` or ``local-dir:PATH``: a timm model with a timm ``config.json``;
* ``transformers:ID_OR_DIR``: a transformers ViT/DINOv2 model;
* ``open_clip:hf-hub:ORG/NAME``, ``open_clip:local-dir:PATH`` or ``open_clip:ARCH`` (+ ``weights:``):
  a CLIP image tower (PLIP, QuiltNet, ...);
* any timm model name (``vit_small_patch16_224.augreg_in21k``).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import timm
import torch
from torch import nn

from multiteach.errors import MultiteachError, did_you_mean
from multiteach.hardware import resolve_dtype
from multiteach.teachers import conch, conch_v15, hf_vit, open_clip_tower, timm_vit
from multiteach.teachers.base import Teacher, TeacherOutput, TeacherSpec, TokenBackbone
from multiteach.teachers.catalog import CATALOG
from multiteach.teachers.shipped import is_shipped, verify_shipped
from multiteach.teachers.weights import read_json

LOADERS: dict[str, ModuleType] = {
    "timm": timm_vit,
    "transformers": hf_vit,
    "conch": conch,
    "conch_v15": conch_v15,
    "open_clip": open_clip_tower,
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
GENERIC_PREFIXES = ("hf-hub:", "local-dir:", "transformers:", "open_clip:")

__all__ = [
    "CATALOG",
    "LOADERS",
    "Teacher",
    "TeacherOutput",
    "TeacherSpec",
    "TokenBackbone",
    "build_teacher",
    "resolve_spec",
    "spec_overrides",
    "teacher_architecture",
    "weights_architecture",
]


def _generic_spec(source: str) -> TeacherSpec | None:
    """A spec for a generic source string; layout fields are filled in at load time."""
    base = {"name": source, "embed_dim": 0, "patch_size": 1, "num_prefix_tokens": 1}
    if source.startswith("hf-hub:"):
        return TeacherSpec(loader="timm", hub_id=source[len("hf-hub:") :], arch="", **base)
    if source.startswith("local-dir:"):
        return TeacherSpec(loader="timm", hub_id=None, arch="", weights=source[len("local-dir:") :], **base)
    if source.startswith("transformers:"):
        ref = source[len("transformers:") :]
        return TeacherSpec(loader="transformers", hub_id=ref, arch="ViTConfig", **base)
    if source.startswith("open_clip:"):
        return TeacherSpec(loader="open_clip", hub_id=None, arch=source[len("open_clip:") :], **base)
    if timm.is_model(source):
        return TeacherSpec(loader="timm", hub_id=None, arch=source, **base)
    return None


def resolve_spec(name: str, **overrides: Any) -> TeacherSpec:
    """Return the :class:`TeacherSpec` for a catalog key or generic source, with ``overrides`` applied.

    Args:
        name: Catalog key or generic source (see the module docstring).
        **overrides: Spec fields to replace, e.g. ``weights="/data/uni"`` or ``embedding="cls+mean"``.

    Raises:
        MultiteachError: for an unknown name (with close catalog matches) or an unknown override field.
    """
    if name in CATALOG:
        spec = CATALOG.get(name)
    else:
        spec = _generic_spec(name)
        if spec is None:
            raise MultiteachError(
                f"unknown teacher {name!r}.{did_you_mean(name, CATALOG.keys())} Use a catalog name "
                f"({', '.join(CATALOG.keys())}), a timm model name, or a source prefixed with "
                f"{', '.join(GENERIC_PREFIXES)}."
            )
    fields = set(TeacherSpec.__dataclass_fields__)
    bad = [k for k in overrides if k not in fields]
    if bad:
        raise MultiteachError(f"teacher {name!r}: unknown field(s) {', '.join(bad)}.{did_you_mean(bad[0], fields)}")
    return spec.replace(**overrides) if overrides else spec


def spec_overrides(cfg: Any) -> dict[str, Any]:
    """The :class:`TeacherSpec` fields a recipe's teacher entry changes (architecture kwargs, embedding rule,
    the opt-in to run Hub code).

    Args:
        cfg: A recipe's teacher entry (``TeacherConfig``: ``model_kwargs``, ``embedding``, ``trust_remote_code``).

    Returns:
        Field -> value, for :func:`resolve_spec` / :func:`build_teacher`.
    """
    overrides: dict[str, Any] = {}
    if cfg.model_kwargs:
        overrides["model_kwargs"] = dict(cfg.model_kwargs)
    if cfg.embedding:
        overrides["embedding"] = cfg.embedding
    if getattr(cfg, "trust_remote_code", False):
        overrides["trust_remote_code"] = True
    return overrides


def teacher_architecture(name: str, **overrides: Any) -> nn.Module:
    """Build a catalog teacher's architecture on the meta device (no weights, no memory).

    Used for parameter counts and token layouts of real teachers that cannot be downloaded.
    """
    spec = resolve_spec(name, **overrides)
    loader = LOADERS[spec.loader]
    if not hasattr(loader, "architecture") or not spec.arch or spec.arch.startswith(("hf-hub:", "local-dir:")):
        raise MultiteachError(f"teacher {name!r}: its architecture is only known after loading its config")
    return loader.architecture(spec)


def weights_architecture(spec: TeacherSpec) -> tuple[nn.Module, TeacherSpec, Path] | None:
    """The architecture a loader builds from the ``config.json`` in ``spec.weights``, on the meta device.

    Mirrors the loaders: a timm teacher whose ``weights:`` folder holds a timm ``config.json`` is built as
    that config says (``architecture`` + ``model_args``), whatever the catalog entry says; a transformers
    teacher as its folder's model config (read into a native class: no Hub code runs here). CONCH and
    OpenCLIP towers always take the catalog architecture.

    Args:
        spec: The teacher's spec with ``weights`` set as the loader would see it.

    Returns:
        ``(model on meta, spec with that model's width, patch size and prefix tokens, the config.json)``,
        or None when ``spec.weights`` is not a folder with a ``config.json`` or the loader ignores it.
    """
    if not spec.weights:
        return None
    root = Path(spec.weights).expanduser()
    path = root / timm_vit.CONFIG_FILE
    if not (root.is_dir() and path.is_file()):
        return None
    raw = read_json(path)
    if spec.loader == "timm":
        arch, kwargs, resolved = timm_vit.resolve_spec_from_config(spec, raw)
        model = timm_vit.create_timm(arch, kwargs)
        patch, prefix = int(model.patch_embed.patch_size[0]), int(model.num_prefix_tokens)
        width = int(model.num_features)
    elif spec.loader == "transformers" and raw.get("model_type"):
        from transformers import CONFIG_MAPPING

        native = raw["model_type"] in CONFIG_MAPPING and not raw.get("auto_map")
        config = (CONFIG_MAPPING[raw["model_type"]] if native else hf_vit.config_class(spec.arch)).from_dict(raw)
        with torch.device("meta"):
            model = hf_vit.model_from_config(config)
        arch, resolved = type(config).__name__, spec
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        prefix, width = 1 + int(getattr(config, "num_register_tokens", 0) or 0), int(config.hidden_size)
    else:
        return None
    layout = {"embed_dim": width, "patch_size": int(patch), "num_prefix_tokens": prefix, "summary_dim": None}
    return model, resolved.replace(arch=arch, **layout), path


def build_teacher(
    name: str,
    *,
    weights: str | None = None,
    input_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> Teacher:
    """Load a frozen teacher ready to embed (B, 3, H, W) RGB batches in [0, 1].

    Args:
        name: Catalog key or generic source.
        weights: Local file or folder used instead of the Hub (the recipe's ``weights:``).
        input_size: Square size the teacher resizes its input to (default: its native size).
        dtype: ``float32`` or ``bfloat16`` (weights cast and autocast for the forward pass).
        pretrained: False gives random-initialised weights (benchmarks and tests).
        device: Where the teacher lives.
        **overrides: Other :class:`TeacherSpec` fields to replace.

    Returns:
        A :class:`Teacher` in eval mode with ``requires_grad=False`` everywhere.
    """
    if weights is not None:
        overrides["weights"] = weights
    spec = resolve_spec(name, **overrides)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
        if dtype not in DTYPES:
            raise MultiteachError(
                f"teacher {name!r}: dtype {dtype!r} not supported; use one of auto, {', '.join(DTYPES)}"
            )
        dtype = DTYPES[dtype]
    if pretrained and is_shipped(spec.weights):
        verify_shipped(spec.weights)
    backbone, resolved = LOADERS[spec.loader].load(spec, pretrained=pretrained, dtype=dtype)
    return Teacher(resolved, backbone, input_size=input_size, dtype=dtype).to(device)
