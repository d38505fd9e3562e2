"""Fitting replacement DINO heads on frozen expert features (H-optimus-0's heads are not public)."""

import torch

from multiteach.heads import DINOHead
from multiteach.losses import LossContext, build_loss
from multiteach.losses.expert_heads import fit_expert_head, save_head
from multiteach.teachers import resolve_spec
from multiteach.teachers.base import TeacherOutput


def clustered_views(n=512, d=32, k=8, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    labels = torch.randint(0, k, (n,), generator=g)
    a = centres[labels] + noise * torch.randn(n, d, generator=g)
    b = centres[labels] + noise * torch.randn(n, d, generator=g)
    return a, b, labels


def test_fitted_head_is_view_consistent_and_not_collapsed(tmp_path):
    a, b, labels = clustered_views()
    torch.manual_seed(0)
    head = fit_expert_head(a, b, DINOHead(32, 64, hidden_dim=64, bottleneck_dim=16), steps=150, batch_size=128)
    assert not any(p.requires_grad for p in head.parameters())
    with torch.no_grad():
        pa, pb = head(a).argmax(-1), head(b).argmax(-1)
    agreement = (pa == pb).float().mean().item()
    used = pa.unique().numel()
    assert agreement > 0.8, agreement  # both views of a tile land on the same prototype
    assert used >= 4, used  # the 8 clusters are not all collapsed onto one prototype
    # the fitted head plugs into an H0-mini style term through `target_heads:`
    path = save_head(head, tmp_path / "dino_head.safetensors")
    term = {
        "dino": {
            "type": "dino",
            "out_dim": 64,
            "hidden_dim": 64,
            "bottleneck_dim": 16,
            "target": "t",
            "target_heads": str(path),
        }
    }
    spec = resolve_spec("vit_small_patch16_224").replace(embed_dim=32, summary_dim=None, patch_size=16)
    loss = build_loss(term, 24, {"t": spec})
    assert torch.equal(loss.term("dino").target_head(a[:4]), head(a[:4]))
    ctx = LossContext(
        TeacherOutput(torch.randn(8, 24), torch.randn(8, 4, 24), (2, 2)),
        {"t": TeacherOutput(a[:8], torch.randn(8, 4, 32), (2, 2))},
        n_global=2,
    )
    assert torch.isfinite(loss(ctx)[0])
