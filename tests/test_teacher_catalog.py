"""Real teacher architectures on the meta device: published parameter counts and token layouts."""

import pytest
import torch

from multiteach.teachers import CATALOG, LOADERS, Teacher, resolve_spec, teacher_architecture

from .teacher_helpers import n_params

# Published / model-card parameter counts (backbone only).
PUBLISHED = {
    "uni": 303.35e6,
    "uni2-h": 681.39e6,
    "h-optimus-0": 1134.77e6,
    "virchow2": 631.24e6,
    "prov-gigapath": 1134.95e6,
    "phikon": 85.80e6,
    "h0-mini": 85.74e6,
    "conch": 90.39e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    count = n_params(teacher_architecture(name))
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 1e-3, f"{name}: {count:,} vs {PUBLISHED[name]:,.0f}"


def meta_teacher(name: str) -> Teacher:
    spec = resolve_spec(name)
    module = LOADERS[spec.loader]
    model = teacher_architecture(name)
    adapter = {
        "timm": lambda: module.TimmTokens(model, spec.embedding),
        "conch": lambda: module.ConchTokens(model, spec.embedding),
        "transformers": lambda: module.HFTokens(model, spec.embedding, spec.num_prefix_tokens, spec.patch_size),
    }[spec.loader]()
    return Teacher(spec, adapter).to("meta")


@pytest.mark.parametrize(
    "name, prefix, grid, patch_dim, summary_dim",
    [
        ("h-optimus-0", 5, (16, 16), 1536, 1536),  # 1 CLS + 4 registers + 256 patches
        ("virchow2", 5, (16, 16), 1280, 2560),  # summary = CLS || mean(patches)
        ("prov-gigapath", 1, (14, 14), 1536, 1536),  # patch 16: 197 tokens
        ("uni2-h", 9, (16, 16), 1536, 1536),
        ("uni", 1, (14, 14), 1024, 1024),
        ("phikon", 1, (14, 14), 768, 768),
        ("hibou-b", 5, (16, 16), 768, 768),
        ("conch", 1, (28, 28), 768, 512),
    ],
)
def test_token_layout_on_meta(name, prefix, grid, patch_dim, summary_dim):
    teacher = meta_teacher(name)
    spec = teacher.spec
    size = spec.input_size
    assert spec.num_prefix_tokens == prefix
    assert spec.tokens_at(size) == prefix + grid[0] * grid[1]
    out = teacher(torch.empty(2, 3, 224, 224, device="meta"))
    assert out.grid == grid
    assert tuple(out.patch_tokens.shape) == (2, grid[0] * grid[1], patch_dim)
    assert tuple(out.summary.shape) == (2, summary_dim)
    assert spec.summary_dim == summary_dim


def test_every_catalog_entry_builds_on_meta():
    for name in CATALOG:
        model = teacher_architecture(name)
        # the foundation models are large; multiteach-tiny, shipped inside the package, is a ViT-Ti (5.5M)
        assert n_params(model) > (5e6 if name == "multiteach-tiny" else 50e6), name
        assert all(p.is_meta for p in model.parameters())


def test_catalog_records_licences_and_gating():
    for name in ("uni", "uni2-h", "conch", "h0-mini"):
        assert CATALOG.get(name).noncommercial_derivatives, name
    assert not CATALOG.get("h-optimus-0").gated
    assert CATALOG.get("uni").gated
