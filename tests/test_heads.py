"""Tests for multiteach.heads: shapes, GPFM/DINO head maths, parameter counts and errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.heads import (
    HEAD_TYPES,
    DINOHead,
    GPFMHead,
    LinearHead,
    MLPHead,
    ProjectionHeads,
    build_projection_head,
    weight_normed_linear,
)

from .teacher_helpers import n_params


def _x(*shape: int) -> torch.Tensor:
    """A reproducible random tensor of ``shape``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", sorted(HEAD_TYPES))
def test_head_shapes(kind: str) -> None:
    out = 48 if kind == "identity" else 80  # identity: the student as wide as the teacher
    head = build_projection_head(kind, 48, out)
    assert head(_x(3, 48)).shape == (3, out)
    assert head(_x(3, 7, 48)).shape == (3, 7, out)


def test_identity_head_passes_tokens_through_and_needs_equal_widths() -> None:
    head = build_projection_head("identity", 8, 8)
    x = _x(2, 5, 8)
    assert head(x) is x and not list(head.parameters())
    with pytest.raises(MultiteachError, match=r"'identity' needs the student as wide as the teacher, got 8 -> 12"):
        build_projection_head("identity", 8, 12)


def test_head_kinds_and_defaults() -> None:
    assert isinstance(build_projection_head("linear", 8, 4), LinearHead)
    mlp = build_projection_head("mlp", 8, 12)
    assert isinstance(mlp, MLPHead) and mlp.mlp[0].out_features == 12  # hidden = max(in, out)
    assert build_projection_head("mlp", 8, 12, hidden_dim=5).mlp[0].out_features == 5
    gpfm = build_projection_head("gpfm", 8, 12, bottleneck=6)
    assert isinstance(gpfm, GPFMHead) and gpfm.mlp.out_features == 6


def test_gpfm_head_matches_manual_computation() -> None:
    torch.manual_seed(0)
    head = GPFMHead(32, 24, bottleneck=16)
    x = _x(4, 5, 32)
    g = head.last_layer.parametrizations.weight.original0  # (24, 1)
    v = head.last_layer.parametrizations.weight.original1  # (24, 16)
    z = x @ head.mlp.weight.T + head.mlp.bias
    z = z / z.norm(dim=-1, keepdim=True)
    expected = z @ (g * v / v.norm(dim=1, keepdim=True)).T
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert head.last_layer.bias is None


def test_weight_norm_effective_weight() -> None:
    layer = weight_normed_linear(16, 10)
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1
    assert torch.equal(g, torch.ones(10, 1))  # gain initialised to 1, as DINOv2
    assert torch.allclose(layer.weight.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        g.fill_(2.5)
    assert torch.allclose(layer.weight.norm(dim=1), torch.full((10,), 2.5))
    assert torch.allclose(layer.weight, 2.5 * F.normalize(v, dim=1))
    assert g.requires_grad  # trainable, unlike DINO v1's norm_last_layer


def test_dino_head_shapes_and_param_counts() -> None:
    head3 = DINOHead(384, 1000)  # hidden 2048, bottleneck 256, 3 layers
    assert head3(_x(2, 384)).shape == (2, 1000)
    assert head3(_x(2, 9, 384)).shape == (2, 9, 1000)
    # Linear(384->2048): 384*2048 + 2048 = 788,480
    # Linear(2048->2048): 2048*2048 + 2048 = 4,196,352
    # Linear(2048->256): 2048*256 + 256 = 524,544
    # prototypes: v 1000*256 = 256,000 + g 1000 = 257,000
    assert n_params(head3) == 788_480 + 4_196_352 + 524_544 + 257_000 == 5_766_376
    head1 = DINOHead(384, 1000, nlayers=1)
    assert head1(_x(2, 9, 384)).shape == (2, 9, 1000)
    assert isinstance(head1.mlp, nn.Linear)
    # Linear(384->256): 384*256 + 256 = 98,560; prototypes 257,000
    assert n_params(head1) == 98_560 + 257_000 == 355_560
    head2 = DINOHead(64, 100, hidden_dim=128, bottleneck_dim=32, nlayers=2)
    # Linear(64->128): 8,320; Linear(128->32): 4,128; prototypes 100*32 + 100 = 3,300
    assert n_params(head2) == 8_320 + 4_128 + 3_300


def test_dino_head_bottleneck_is_normalised() -> None:
    head = DINOHead(16, 8, hidden_dim=32, bottleneck_dim=12)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original1.copy_(torch.eye(8, 12))
    out = head(_x(5, 16))  # the identity-like prototypes read back the normalised bottleneck
    assert torch.all(out.norm(dim=-1) <= 1 + 1e-6)


@pytest.fixture()
def heads() -> ProjectionHeads:
    """uni: shared GPFM head (summary+patch); conch: default linear, summary only; phikon: two MLP heads."""
    torch.manual_seed(0)
    targets = {
        "uni": {"summary": 1024, "patch": 1024},
        "conch": {"summary": 512},
        "phikon": {"summary": 768, "patch": 768},
    }
    configs = {"uni": {"kind": "gpfm", "shared": True, "bottleneck": 64}, "phikon": {"kind": "mlp", "hidden": 32}}
    return ProjectionHeads(192, targets, configs)


def test_projection_heads_builds_exactly_requested(heads: ProjectionHeads) -> None:
    assert heads.teachers() == ["uni", "conch", "phikon"]
    assert list(heads.heads["uni"].keys()) == ["shared"]
    assert list(heads.heads["conch"].keys()) == ["summary"]
    assert list(heads.heads["phikon"].keys()) == ["summary", "patch"]
    assert heads.targets("uni") == ("summary", "patch") and heads.targets("conch") == ("summary",)
    # uni gpfm: 192*64 + 64 = 12,352; v 1024*64 = 65,536 + g 1024 -> 78,912
    # conch linear: 192*512 + 512 = 98,816
    # phikon mlp (hidden 32), x2: (192*32 + 32) + (32*768 + 768) = 31,520 -> 63,040
    parts = [n_params(h) for teacher in heads.heads.values() for h in teacher.values()]
    assert n_params(heads) == sum(parts) == 78_912 + 98_816 + 63_040 == 240_768


def test_projection_heads_forward(heads: ProjectionHeads) -> None:
    cls, patches = _x(2, 192), _x(2, 49, 192)
    assert heads("uni", "summary", cls).shape == (2, 1024)
    assert heads("uni", "patch", patches).shape == (2, 49, 1024)
    assert torch.equal(heads("uni", "patch", cls), heads("uni", "summary", cls))  # one shared head
    assert heads("conch", "summary", cls).shape == (2, 512)
    assert heads("phikon", "patch", patches).shape == (2, 49, 768)
    assert not torch.equal(heads("phikon", "patch", cls), heads("phikon", "summary", cls))


def test_projection_heads_default_config() -> None:
    heads = ProjectionHeads(16, {"t": {"patch": 8}})
    assert isinstance(heads.heads["t"]["patch"], LinearHead)


def test_projection_heads_forward_errors(heads: ProjectionHeads) -> None:
    with pytest.raises(MultiteachError, match="has no patch head"):
        heads("conch", "patch", _x(2, 4, 192))
    with pytest.raises(MultiteachError, match="Did you mean: uni"):
        heads("unii", "summary", _x(2, 192))
    with pytest.raises(MultiteachError, match="'summary' or 'patch'"):
        heads("uni", "cls", _x(2, 192))
    with pytest.raises(MultiteachError, match=r"expects \(\.\.\., 192\)"):
        heads("uni", "summary", _x(2, 384))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: build_projection_head("lineer", 8, 8), "Did you mean: linear"),
        (lambda: build_projection_head("linear", 0, 8), "in_dim must be a positive integer"),
        (lambda: build_projection_head("mlp", 8, -3), "out_dim must be a positive integer"),
        (lambda: build_projection_head("mlp", 8, 8, hidden_dim=True), "hidden_dim must be"),
        (lambda: build_projection_head("gpfm", 8, 8, bottleneck=0), "bottleneck must be"),
        (lambda: build_projection_head("linear", 8, 8, bottleneck=4), "takes no option 'bottleneck'"),
        (lambda: build_projection_head("gpfm", 8, 8, bottlenck=4), "Did you mean: bottleneck"),
        (lambda: DINOHead(8, 8, nlayers=0), "nlayers must be"),
        (lambda: ProjectionHeads(0, {"t": {"summary": 4}}), "in_dim must be"),
        (lambda: ProjectionHeads(8, {"t": {"summary": 0}}), "summary dim must be"),
        (lambda: ProjectionHeads(8, {"t": {"summry": 4}}), "Did you mean: summary"),
        (lambda: ProjectionHeads(8, {"t": {}}), "no targets"),
        (lambda: ProjectionHeads(8, {"t": {"summary": 4}}, {"u": {"kind": "mlp"}}), "teacher 'u'"),
        (lambda: ProjectionHeads(8, {"t": {"summary": 4}}, {"t": {"botleneck": 4}}), "Did you mean: bottleneck"),
        (lambda: ProjectionHeads(8, {"t": {"summary": 4}}, {"t": {"shared": "yes"}}), "true or false"),
        (lambda: ProjectionHeads(8, {"t": {"summary": 4}}, {"t": {"kind": "mpl"}}), "Did you mean: mlp"),
        (lambda: ProjectionHeads(8, {"t": {"summary": 4}}, {"t": {"hidden": 4}}), "'linear' takes no 'hidden'"),
        (lambda: ProjectionHeads(8, {"a.b": {"summary": 4}}), "teacher name 'a.b'"),
        (
            lambda: ProjectionHeads(8, {"t": {"summary": 8, "patch": 4}}, {"t": {"kind": "mlp", "shared": True}}),
            "shared head needs equal summary and patch dims",
        ),
    ],
)
def test_head_errors(call: Callable[[], object], match: str) -> None:
    with pytest.raises(MultiteachError, match=match):
        call()
