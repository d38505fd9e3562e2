"""CONCH v1.5 (MahmoodLab, the patch encoder of TITAN): a ViT-L/16 trunk with LayerScale, a one-query
attentional pooler to 768-d and a LayerNorm, as MahmoodLab's TRIDENT builds it
(``trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py``).

Its checkpoint (``pytorch_model_vision.bin`` in ``MahmoodLab/conchv1_5``) is not CONCH v1's CoCa layout: the
trunk has LayerScale (``trunk.blocks.N.ls1.gamma``), the pooler projects with three bias-free linears
(``to_q``, ``to_kv``, ``to_out``) instead of ``nn.MultiheadAttention``, and there is no ``proj_contrast``
matrix. The trunk's key names are timm's, so the trunk is a timm ``VisionTransformer``; the pooler is
rebuilt here. TRIDENT resamples ``trunk.pos_embed`` to the model's grid before a strict load; so does this
loader (bilinear, no antialias, as there). Needs no extra package.

Summary = ``ln_contrast(pooler(tokens))`` (768-d, as TRIDENT returns); patch tokens = the trunk's final-norm
spatial tokens (1024-d, 28x28 at 448 px).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from multiteach.teachers.base import TeacherOutput, TeacherSpec, TokenBackbone
from multiteach.teachers.conch import strip_prefixes, tower_output, tower_spec
from multiteach.teachers.timm_vit import create_timm
from multiteach.teachers.weights import assign_state_dict, read_state_dict, spec_weights

POOL_KEYS = ("pool_dim", "pool_heads", "pool_queries")


class AttentionalPooler(nn.Module):
    """Cross-attention from learnt queries to the trunk's tokens (TRIDENT's CONCH v1.5 pooler).

    Args:
        d_model: Query and output width.
        context_dim: Token width of the trunk.
        n_head: Attention heads.
        n_queries: Learnt queries (1 for the contrastive embedding).

    Shapes:
        forward: (B, N, context_dim) -> (B, n_queries, d_model).
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        dim_head = d_model // n_head
        self.scale = dim_head**-0.5
        inner = dim_head * n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, d_model, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens -> (B, n_queries, d_model) pooled queries."""
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        q = self._heads(self.to_q(q)) * self.scale
        k, v = (self._heads(t) for t in self.to_kv(x).chunk(2, dim=-1))
        sim = q @ k.transpose(-2, -1)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()  # as the reference: stable softmax
        out = sim.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(x.shape[0], q.shape[2], -1)
        return self.to_out(out)


class ConchV15Tower(nn.Module):
    """Trunk + attentional pooler + LayerNorm, with TRIDENT's module names (``trunk``, ``attn_pool_contrast``,
    ``ln_contrast``) so the checkpoint's keys load as they are.

    Args:
        trunk: A timm ``VisionTransformer`` (``num_classes=0``).
        pool_dim: Width of the pooled embedding.
        pool_heads: Pooler attention heads.
        pool_queries: Pooler queries.
    """

    def __init__(self, trunk: nn.Module, pool_dim: int = 768, pool_heads: int = 8, pool_queries: int = 1) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(pool_dim, int(trunk.num_features), pool_heads, pool_queries)
        self.ln_contrast = nn.LayerNorm(pool_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, pool_dim) pooled embedding."""
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


class ConchV15Tokens(TokenBackbone):
    """Adapter: trunk tokens -> summary (pooled, 768-d) + patch tokens (1024-d).

    Args:
        tower: The :class:`ConchV15Tower`.
        embedding: ``pooled`` (default) or ``cls``/``cls+mean`` on the trunk tokens.
    """

    def __init__(self, tower: ConchV15Tower, embedding: str) -> None:
        super().__init__()
        self.tower = tower
        self.embedding = embedding
        self.patch = tower.trunk.patch_embed.patch_size[0]

    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) normalised -> TeacherOutput(summary (B, 768), patches (B, H/16*W/16, 1024), grid)."""
        return tower_output(self.tower, x, self.patch, self.embedding)


def _split_kwargs(spec: TeacherSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    kwargs = dict(spec.model_kwargs)
    pool = {k: kwargs.pop(k) for k in POOL_KEYS if k in kwargs}
    return kwargs, pool


def architecture(spec: TeacherSpec, device: str = "meta") -> ConchV15Tower:
    """The tower without weights, on ``device`` (trunk ``spec.arch`` + ``model_kwargs``; ``pool_*`` for the pooler)."""
    trunk_kwargs, pool = _split_kwargs(spec)
    trunk = create_timm(spec.arch, trunk_kwargs, device=device)
    with torch.device(device):
        return ConchV15Tower(trunk, **pool)


def prepare_state_dict(
    spec: TeacherSpec, sd: dict[str, torch.Tensor], model: ConchV15Tower
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What the loader does to the checkpoint before the strict load: strip the entry's prefixes and resample
    ``trunk.pos_embed`` to the model's grid (as TRIDENT does). Works on meta tensors too.

    Returns:
        The state dict and notes on what was changed.
    """
    from timm.layers import resample_abs_pos_embed

    sd, notes = strip_prefixes(spec, sd)
    pos, want = sd.get("trunk.pos_embed"), model.trunk.pos_embed
    if pos is not None and pos.ndim == 3 and pos.shape[-1] == want.shape[-1] and pos.shape[1] != want.shape[1]:
        n_prefix = 0 if getattr(model.trunk, "no_embed_class", False) else model.trunk.num_prefix_tokens
        side = int(round((pos.shape[1] - n_prefix) ** 0.5))
        if side * side + n_prefix == pos.shape[1]:
            sd = dict(sd)
            sd["trunk.pos_embed"] = resample_abs_pos_embed(
                pos,
                new_size=list(model.trunk.patch_embed.grid_size),
                num_prefix_tokens=n_prefix,
                interpolation="bilinear",
                antialias=False,
                verbose=False,
            )
            notes.append(
                f"resampled trunk.pos_embed from a {side}x{side} to a "
                f"{'x'.join(map(str, model.trunk.patch_embed.grid_size))} grid (as TRIDENT does)"
            )
    return sd, notes


def weights_file(spec: TeacherSpec) -> Path:
    """The checkpoint file for ``spec`` (``weights:`` or the Hub, pinned to ``spec.revision``)."""
    return spec_weights(spec, spec.weight_files, spec.weight_files)


def load(
    spec: TeacherSpec, pretrained: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[ConchV15Tokens, TeacherSpec]:
    """Build the tower on meta and assign the checkpoint's tensors (``weights_only=True``)."""
    tower = architecture(spec, device="meta" if pretrained else "cpu")
    if pretrained:
        path = weights_file(spec)
        sd, _ = prepare_state_dict(spec, read_state_dict(path), tower)
        assign_state_dict(tower, sd, path, dtype, teacher=spec.name)
    else:
        tower = tower.to(dtype)
    tower.eval()
    return ConchV15Tokens(tower, spec.embedding), tower_spec(spec, tower)
