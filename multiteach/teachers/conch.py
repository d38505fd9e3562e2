"""CONCH (MahmoodLab): the image tower of a CoCa model, built with the ``conch`` package's own tower
builder (extra ``conch``: ``pip install --no-deps conch-fork``).

We do not call ``conch.open_clip_custom.create_model_from_pretrained``: it unpickles the checkpoint
with ``torch.load`` (no ``weights_only``) and builds the text towers too. Instead the visual tower is
built on the meta device from the package's ``conch_ViT-B-16`` config and the ``visual.*`` tensors of
``pytorch_model.bin`` are assigned with ``weights_only=True``.

Summary = ``encode_image(proj_contrast=False, normalize=False)`` (attentional pool + LayerNorm, 512-d,
as TRIDENT uses); patch tokens = the trunk's final-norm spatial tokens (768-d, 28x28 at 448 px).
"""

from __future__ import annotations

import copy
import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.teachers.base import TeacherOutput, TeacherSpec, TokenBackbone, split_tokens
from multiteach.teachers.keycheck import group_keys
from multiteach.teachers.weights import assign_state_dict, hub_file, read_state_dict, spec_weights


def _conch():
    try:
        with warnings.catch_warnings():  # the package imports timm.models.layers (deprecated alias)
            warnings.simplefilter("ignore", FutureWarning)
            from conch.open_clip_custom import coca_model
    except ImportError:
        raise MultiteachError(
            "CONCH needs the `conch` package: pip install 'multiteach[conch]' (or pip install --no-deps conch-fork)"
        ) from None
    return coca_model


def tower_config(spec: TeacherSpec) -> dict[str, Any]:
    """The package's CoCa config (``spec.arch``) with ``spec.model_kwargs`` merged over it."""
    _conch()
    text = resources.files("conch.open_clip_custom").joinpath("model_configs", f"{spec.arch}.json").read_text()
    cfg = json.loads(text)
    over = copy.deepcopy(spec.model_kwargs)
    cfg["vision_cfg"].update(over.pop("vision_cfg", {}))
    cfg.update(over)
    return cfg


def tower_output(tower: nn.Module, x: torch.Tensor, patch: int, embedding: str) -> TeacherOutput:
    """Run a CONCH-style image tower: a timm-like ``trunk``, an attentional pooler ``attn_pool_contrast`` and a
    LayerNorm ``ln_contrast`` (CONCH's ``VisualModel``; :class:`~multiteach.teachers.conch_v15.ConchV15Tower`)."""
    tokens = tower.trunk.forward_features(x)
    pooled = tower.ln_contrast(tower.attn_pool_contrast(tokens)[:, 0])
    grid = (x.shape[-2] // patch, x.shape[-1] // patch)
    return split_tokens(tokens, tower.trunk.num_prefix_tokens, grid, embedding, pooled)


def tower_spec(spec: TeacherSpec, tower: nn.Module) -> TeacherSpec:
    """``spec`` with the widths, patch size and prefix tokens of the loaded CONCH-style ``tower``."""
    trunk = tower.trunk
    return spec.replace(
        embed_dim=int(trunk.num_features),
        patch_size=int(trunk.patch_embed.patch_size[0]),
        num_prefix_tokens=int(trunk.num_prefix_tokens),
        summary_dim=int(tower.ln_contrast.normalized_shape[0]) if spec.embedding == "pooled" else None,
    )


def strip_prefixes(spec: TeacherSpec, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove each of the entry's ``strip_prefixes`` from the keys that carry it (other keys are kept).

    Returns:
        The state dict and a note per stripped prefix.
    """
    notes = []
    for prefix in spec.strip_prefixes:
        if any(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
            notes.append(f"stripped the {prefix!r} prefix")
    return sd, notes


class ConchTokens(TokenBackbone):
    """Adapter for CONCH's ``VisualModel``.

    Args:
        visual: ``conch.open_clip_custom.vision_tower.VisualModel``.
        embedding: ``pooled`` (contrastive attentional pool, default) or ``cls``.
    """

    def __init__(self, visual: nn.Module, embedding: str) -> None:
        super().__init__()
        self.visual = visual
        self.embedding = embedding
        self.patch = visual.trunk.patch_embed.patch_size[0]

    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) normalised -> TeacherOutput(summary (B, 512), patches (B, H/16*W/16, 768), grid)."""
        return tower_output(self.visual, x, self.patch, self.embedding)


def architecture(spec: TeacherSpec, device: str = "meta") -> nn.Module:
    """CONCH's visual tower, without weights, on ``device``."""
    cfg = tower_config(spec)
    with torch.device(device):
        return _conch()._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("embed_dim_caption"))


def prepare_state_dict(spec: TeacherSpec, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep the image tower of a CONCH checkpoint, as the loader does before the strict load.

    The Hub's ``pytorch_model.bin`` is the full CoCa model (``visual.*``, ``text.*``, ``text_decoder.*``,
    ``logit_scale``); conch's own loader builds all of it, multiteach keeps the ``visual.*`` tensors. A
    vision-only file (keys without ``visual.``) is used as it is.

    Returns:
        The image-tower state dict and notes on what was dropped.
    """
    sd, notes = strip_prefixes(spec, sd)
    if any(k.startswith("visual.") for k in sd):
        dropped = [k for k in sd if not k.startswith("visual.")]
        sd = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
        if dropped:
            notes.append(
                f"kept the image tower (visual.*), dropped {len(dropped)} key(s) of the CoCa text side "
                f"({', '.join(group_keys(dropped)[:3])}) as designed"
            )
    return sd, notes


def weights_file(spec: TeacherSpec) -> Path:
    """The checkpoint for ``spec``: ``weights:`` (file or folder) or the Hub (pinned to ``spec.revision``)."""
    return spec_weights(spec, ("pytorch_model.bin", "model.safetensors"), ("pytorch_model.bin",))


def load(
    spec: TeacherSpec, pretrained: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[ConchTokens, TeacherSpec]:
    """Build CONCH's visual tower on meta and assign the ``visual.*`` weights."""
    visual = architecture(spec, device="meta" if pretrained else "cpu")
    if pretrained:
        path = weights_file(spec)
        if spec.hub_id and not spec.weights:
            # the repo's own marker file, as conch's loader reads it
            hub_file(spec.hub_id, "meta.yaml", spec.gated, spec.revision)
        sd, _ = prepare_state_dict(spec, read_state_dict(path))
        assign_state_dict(visual, sd, path, dtype, teacher=spec.name)
    else:
        visual = visual.to(dtype)
    visual.eval()
    return ConchTokens(visual, spec.embedding), tower_spec(spec, visual)
