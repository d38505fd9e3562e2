"""transformers-backed teachers: Phikon (ViT), Phikon-v2 (DINOv2), Hibou (DINOv2 + registers), and any
transformers vision model id or folder. transformers itself builds on the meta device and loads
safetensors; we only pick the class and split the tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.teachers.base import TeacherOutput, TeacherSpec, TokenBackbone, split_tokens


class HFTokens(TokenBackbone):
    """Adapter for a transformers ViT-like model: ``last_hidden_state`` -> summary + patch tokens.

    Args:
        model: ``ViTModel``/``Dinov2Model``/``Dinov2WithRegistersModel``-like module.
        embedding: Tile-embedding rule (``cls``, ``cls+mean``, ``pooled`` = ``pooler_output``).
        num_prefix: CLS + register tokens.
        patch_size: Patch size in pixels.
    """

    def __init__(self, model: nn.Module, embedding: str, num_prefix: int, patch_size: int) -> None:
        super().__init__()
        self.model = model
        self.embedding = embedding
        self.num_prefix = num_prefix
        self.patch = patch_size
        self._interpolate = model.config.model_type == "vit"

    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) normalised -> TeacherOutput(summary (B, Ds), patches (B, H/p*W/p, D), grid)."""
        kw = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.model(pixel_values=x, **kw)
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        pooled = getattr(out, "pooler_output", None)
        return split_tokens(out.last_hidden_state, self.num_prefix, grid, self.embedding, pooled)


def _config_class(name: str) -> Any:
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not name.endswith("Config"):
        raise MultiteachError(f"unknown transformers config class {name!r} (e.g. ViTConfig, Dinov2Config)")
    return cls


def _model_from_config(config: Any, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModel, ViTModel

    if config.model_type == "vit":
        return ViTModel(config, add_pooling_layer=False)
    return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def architecture(spec: TeacherSpec) -> nn.Module:
    """The catalog architecture on the meta device."""
    config = _config_class(spec.arch)(**spec.model_kwargs)
    with torch.device("meta"):
        return _model_from_config(config)


def _num_prefix(config: Any) -> int:
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def load(
    spec: TeacherSpec, pretrained: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[HFTokens, TeacherSpec]:
    """Load a transformers teacher from ``weights:`` (a folder) or its hub id.

    Returns:
        The adapter and the spec updated with the model's real width, patch size and prefix tokens.
    """
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    from transformers import AutoConfig, AutoModel, ViTModel

    source = str(Path(spec.weights).expanduser()) if spec.weights else spec.hub_id
    if source is None:
        raise MultiteachError(f"teacher {spec.name!r} has neither a hub_id nor `weights:`")
    remote = bool(spec.model_kwargs.get("trust_remote_code", False))
    if not pretrained:
        model = _model_from_config(_config_class(spec.arch)(**spec.model_kwargs), remote)
    else:
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=remote)
            if config.model_type == "vit":
                model = ViTModel.from_pretrained(source, add_pooling_layer=False, dtype=dtype)
            else:
                model = AutoModel.from_pretrained(source, trust_remote_code=remote, dtype=dtype)
        except GatedRepoError:
            raise MultiteachError(
                f"{source} is gated: accept its terms on huggingface.co and run `hf auth login`, "
                "or point `weights:` at a local folder"
            ) from None
        except (LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as exc:
            gated = " (gated: accept its terms and `hf auth login`)" if spec.gated else ""
            raise MultiteachError(
                f"cannot load transformers model {source!r}{gated}: {str(exc).splitlines()[0]}. "
                "Offline, copy the Hugging Face cache or point `weights:` at a local folder."
            ) from None
    model = model.to(dtype).eval()
    cfg = model.config
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    resolved = spec.replace(
        embed_dim=int(cfg.hidden_size), patch_size=int(patch), num_prefix_tokens=_num_prefix(cfg), summary_dim=None
    )
    return HFTokens(model, spec.embedding, resolved.num_prefix_tokens, resolved.patch_size), resolved
