"""open_clip image towers (CLIP-style pathology models such as PLIP or QuiltNet), image tower only.

Sources: ``hf-hub:ORG/NAME`` and ``local-dir:PATH`` (``open_clip_config.json`` +
``open_clip_model.safetensors``), or an open_clip architecture name with ``weights:`` a local file.
Summary = the projected image embedding (``encode_image`` without normalisation); patch tokens =
the tower's final-norm spatial tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.teachers.base import TeacherOutput, TeacherSpec, TokenBackbone, split_tokens


class OpenClipTokens(TokenBackbone):
    """Adapter for an open_clip ``VisionTransformer`` tower.

    Args:
        visual: ``model.visual`` of an open_clip CLIP model.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.visual.output_tokens = True
        size = visual.patch_size
        self.patch = size[0] if isinstance(size, tuple) else int(size)

    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) normalised -> TeacherOutput(summary (B, D_proj), patches (B, N, D), grid)."""
        pooled, tokens = self.visual(x)
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        return split_tokens(tokens, 0, grid, "pooled", pooled)


def load(
    spec: TeacherSpec, pretrained: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[OpenClipTokens, TeacherSpec]:
    """Load an open_clip model and keep its image tower."""
    import open_clip

    try:
        if spec.arch.startswith(("hf-hub:", "local-dir:")):
            model, preprocess = open_clip.create_model_from_pretrained(spec.arch)
        else:
            model, preprocess = open_clip.create_model_from_pretrained(
                spec.arch, pretrained=spec.weights if pretrained else None
            )
    except RuntimeError as exc:
        raise MultiteachError(f"open_clip could not load {spec.arch!r}: {str(exc).splitlines()[0]}") from None
    visual = model.visual.to(dtype).eval()
    if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "class_embedding"):
        raise MultiteachError(f"open_clip tower {spec.arch!r} is not a plain ViT; only CLIP ViT towers are supported")
    del model
    size = visual.image_size
    mean = tuple(getattr(visual, "image_mean", None) or spec.mean)
    std = tuple(getattr(visual, "image_std", None) or spec.std)
    resolved = spec.replace(
        embed_dim=int(visual.transformer.width),
        patch_size=int(visual.patch_size[0]),
        num_prefix_tokens=1,
        input_size=int(size[0] if isinstance(size, tuple) else size),
        mean=mean,
        std=std,
        summary_dim=int(visual.output_dim),
        embedding="pooled",
    )
    tokens = OpenClipTokens(visual)
    return tokens, resolved
