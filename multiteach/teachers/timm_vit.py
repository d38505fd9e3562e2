"""timm-backed teachers: UNI, UNI2-h, H-optimus-0/1, H0-mini, Virchow/2, Prov-GigaPath, Kaiko, GPFM,
and any ``hf-hub:``/``local-dir:``/timm model name.

The architecture comes from the weights' own ``config.json`` when there is one (Hub repo or folder,
timm's format: ``architecture`` + ``model_args``), otherwise from the catalog entry. The model is
built on the meta device and the weights are assigned, never copied.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from multiteach.errors import MultiteachError, did_you_mean
from multiteach.layers import LAYER_NAMES, resolve_layer_kwargs
from multiteach.teachers.base import TeacherOutput, TeacherSpec, TokenBackbone, split_tokens
from multiteach.teachers.keycheck import group_keys
from multiteach.teachers.weights import (
    assign_state_dict,
    check_hub_reachable,
    hub_file,
    hub_weights,
    local_weights,
    read_json,
    read_state_dict,
)

CONFIG_FILE = "config.json"


class TimmTokens(TokenBackbone):
    """Adapter for a timm ViT: final-norm tokens -> summary + patch tokens.

    Args:
        model: A timm ``VisionTransformer`` (``num_classes=0``).
        embedding: Tile-embedding rule (``cls``, ``cls+mean``, ``pooled``).
    """

    def __init__(self, model: nn.Module, embedding: str) -> None:
        super().__init__()
        self.model = model
        self.embedding = embedding
        self.patch = model.patch_embed.patch_size[0]

    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) normalised -> TeacherOutput(summary (B, Ds), patches (B, H/p*W/p, D), grid)."""
        tokens = self.model.forward_features(x)
        pooled = self.model.forward_head(tokens, pre_logits=True) if self.embedding == "pooled" else None
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        return split_tokens(tokens, self.model.num_prefix_tokens, grid, self.embedding, pooled)


def create_timm(arch: str, kwargs: dict[str, Any], device: str | torch.device = "meta") -> nn.Module:
    """Build a timm model without weights (on ``device``) with a clear error for an unknown arch."""
    if not timm.is_model(arch):
        raise MultiteachError(f"unknown timm architecture {arch!r}.{did_you_mean(arch, timm.list_models())}")
    kw = {"num_classes": 0, "dynamic_img_size": True, **resolve_layer_kwargs(kwargs)}
    with torch.device(device):
        return timm.create_model(arch, pretrained=False, **kw)


def architecture(spec: TeacherSpec) -> nn.Module:
    """The catalog architecture on the meta device (parameter counts, token layout)."""
    return create_timm(spec.arch, spec.model_kwargs)


def _call_kwargs(spec: TeacherSpec) -> dict[str, Any]:
    """Kwargs a hub config cannot hold (layer classes), passed at call time as the model cards do."""
    return {k: v for k, v in spec.model_kwargs.items() if k in LAYER_NAMES}


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def prepare_state_dict(
    spec: TeacherSpec, sd: dict[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a checkpoint the way the entry's public loading code does, before the strict load.

    * ``strip_prefixes`` (GPFM: ``backbone.``): when keys carry the prefix, keep only those keys, without it
      (GPFM's own loader keeps the ``backbone`` keys; ``dino_head.*`` and the like are dropped);
    * ``weights_format: dinov2`` on an original DINOv2 checkpoint (a ``mask_token`` or chunked
      ``blocks.C.I.`` keys): unchunk the blocks (FSDP ``block_chunks``) and convert with timm's DINOv2
      filter. Checkpoints already in timm's layout (e.g. the Hub copy TRIDENT loads) pass unchanged.

    Works on meta tensors, so the weights doctor runs the very same steps without reading the weights.

    Returns:
        The state dict and notes on what was changed.
    """
    notes = []
    for prefix in spec.strip_prefixes:
        if any(k.startswith(prefix) for k in sd):
            kept = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
            dropped = [k for k in sd if not k.startswith(prefix)]
            notes.append(
                f"kept the {len(kept)} {prefix!r} keys without the prefix"
                + (f", dropped {len(dropped)} other key(s) ({', '.join(group_keys(dropped)[:3])})" if dropped else "")
            )
            sd = kept
    if spec.weights_format == "dinov2" and ("mask_token" in sd or any(_CHUNKED_BLOCK.match(k) for k in sd)):
        from timm.models.vision_transformer import checkpoint_filter_fn

        if any(_CHUNKED_BLOCK.match(k) for k in sd):
            sd = {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in sd.items()}
            notes.append("unchunked DINOv2 blocks (blocks.C.I. -> blocks.I.)")
        sd = checkpoint_filter_fn(dict(sd), model)
        notes.append("converted the DINOv2 layout with timm's checkpoint filter (mask_token dropped)")
    return sd, notes


def find_files(spec: TeacherSpec) -> tuple[dict[str, Any] | None, Path]:
    """Locate (config, weights file) for ``spec`` from ``weights:`` or the Hub."""
    if spec.weights:
        root = Path(spec.weights).expanduser()
        config = read_json(root / CONFIG_FILE) if root.is_dir() and (root / CONFIG_FILE).is_file() else None
        return config, local_weights(root, spec.weight_files)
    if not spec.hub_id:
        raise MultiteachError(f"teacher {spec.name!r} has neither a hub_id nor `weights:`; set `weights:`")
    try:
        config = read_json(hub_file(spec.hub_id, CONFIG_FILE, spec.gated, spec.revision))
    except FileNotFoundError:
        config = None
    return config, hub_weights(spec.hub_id, spec.gated, spec.weight_files, spec.revision)


def resolve_spec_from_config(spec: TeacherSpec, config: dict[str, Any]) -> tuple[str, dict[str, Any], TeacherSpec]:
    """Architecture and kwargs from a timm ``config.json``; preprocessing from it for non-catalog sources."""
    arch = config.get("architecture") or spec.arch
    kwargs = {**config.get("model_args", {}), **_call_kwargs(spec)}
    if spec.name.startswith(("hf-hub:", "local-dir:")):
        pcfg = config.get("pretrained_cfg", {})
        changes: dict[str, Any] = {}
        if "mean" in pcfg:
            changes["mean"] = tuple(pcfg["mean"])
            changes["std"] = tuple(pcfg["std"])
        if "input_size" in pcfg:
            changes["input_size"] = int(pcfg["input_size"][-1])
        if pcfg.get("interpolation") in ("bicubic", "bilinear"):
            changes["interpolation"] = pcfg["interpolation"]
        spec = spec.replace(**changes)
    return arch, kwargs, spec


def load(
    spec: TeacherSpec, pretrained: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[TimmTokens, TeacherSpec]:
    """Build a timm teacher and load its weights.

    Args:
        spec: Catalog or generic spec (``hub_id`` and/or ``weights`` say where the weights are).
        pretrained: False builds a random-initialised model (benchmarks, tests).
        dtype: Parameter dtype after loading.

    Returns:
        The adapter and the spec updated with the loaded model's real token layout.
    """
    arch, kwargs = spec.arch, dict(spec.model_kwargs)
    if not pretrained:
        model = create_timm(arch, kwargs, device="cpu").to(dtype)
    elif spec.hub_id is None and spec.weights is None and timm.is_model(arch):
        model = _timm_pretrained(arch, kwargs).to(dtype)
    else:
        config, weights = find_files(spec)
        if config is not None:
            arch, kwargs, spec = resolve_spec_from_config(spec, config)
        model = create_timm(arch, kwargs)
        sd, _ = prepare_state_dict(spec, read_state_dict(weights), model)
        assign_state_dict(model, sd, weights, dtype, teacher=spec.name)
    model.eval()
    resolved = spec.replace(
        arch=arch,
        embed_dim=int(model.num_features),
        patch_size=int(model.patch_embed.patch_size[0]),
        num_prefix_tokens=int(model.num_prefix_tokens),
        summary_dim=None,
    )
    return TimmTokens(model, spec.embedding), resolved


def _timm_pretrained(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """A plain timm name with timm's own pretrained weights (downloaded by timm)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    check_hub_reachable()  # timm downloads through huggingface_hub: offline, it fails at once
    try:
        return timm.create_model(
            arch, pretrained=True, num_classes=0, dynamic_img_size=True, **resolve_layer_kwargs(kwargs)
        )
    except (LocalEntryNotFoundError, OSError) as exc:
        raise MultiteachError(
            f"timm could not fetch pretrained weights for {arch!r} ({type(exc).__name__}); the Hub is unreachable "
            "or the file is not cached. Set `weights:` to a local file, or `pretrained: false` for random init."
        ) from None
