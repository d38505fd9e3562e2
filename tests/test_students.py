"""Tests for multiteach.students: token layout, mask token, kwargs resolution and errors."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.layers import DropPath, GluMlp, SwiGLUPacked

from multiteach.errors import MultiteachError
from multiteach.layers import resolve_layer_kwargs
from multiteach.students import Student, build_student, student_mean_std
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD, TeacherOutput


@pytest.fixture(scope="module")
def tiny() -> Student:
    """A randomly initialised ViT-Ti/16 student in eval mode, shared by the module."""
    torch.manual_seed(0)
    return build_student("vit_tiny_patch16_224").eval()


def _batch(size: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    """A reproducible normalised-looking batch, shape (b, 3, size, size)."""
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("size", "grid"), [(224, (14, 14)), (112, (7, 7))])
def test_tiny_tokens_and_grid(tiny: Student, size: int, grid: tuple[int, int]) -> None:
    out = tiny(_batch(size))
    assert isinstance(out, TeacherOutput)
    assert out.grid == grid
    assert out.summary.shape == (2, 192)
    assert out.patch_tokens.shape == (2, grid[0] * grid[1], 192)
    assert (tiny.embed_dim, tiny.patch_size, tiny.num_prefix_tokens, tiny.num_registers) == (192, 16, 1, 0)


@pytest.mark.parametrize("size", [224, 112])
def test_forward_features_equals_timm(tiny: Student, size: int) -> None:
    x = _batch(size)
    with torch.no_grad():
        ref = tiny.model.forward_features(x)
        tokens = tiny.forward_tokens(x)
        out = tiny(x)
    assert torch.equal(tokens, ref)
    assert torch.equal(out.summary, ref[:, 0])
    assert torch.equal(out.patch_tokens, ref[:, 1:])


def test_registers_removed() -> None:
    student = build_student("vit_small_patch14_reg4_dinov2", img_size=224).eval()
    assert (student.num_prefix_tokens, student.num_registers, student.patch_size) == (5, 4, 14)
    with torch.no_grad():
        out = student(_batch(224, b=1))
        ref = student.model.forward_features(_batch(224, b=1))
    assert ref.shape[1] == 261
    assert out.patch_tokens.shape == (1, 256, 384) and out.grid == (16, 16)
    assert torch.equal(out.patch_tokens, ref[:, 5:])
    assert torch.equal(out.summary, ref[:, 0])


def test_h0_mini_architecture_on_meta() -> None:
    kwargs = {"mlp_layer": "swiglu_packed", "act_layer": "silu", "mlp_ratio": 5.33334}
    student = build_student("vit_base_patch14_reg4_dinov2", img_size=224, device="meta", **kwargs)
    assert student.mask_token.device.type == "meta"
    # Backbone = the timm module alone; the Student adds exactly one (1, 1, D) mask token.
    backbone = sum(p.numel() for p in student.model.parameters())
    assert backbone == 85_739_520
    assert sum(p.numel() for p in student.parameters()) == backbone + 768
    mlp = student.model.blocks[0].mlp  # SwiGLUPacked = partial(GluMlp, gate_last=False): fused 2 x 2048 fc1
    assert isinstance(mlp, GluMlp) and isinstance(mlp.act, torch.nn.SiLU)
    assert (mlp.fc1.out_features, mlp.fc2.in_features) == (4096, 2048)
    assert resolve_layer_kwargs({"mlp_layer": "swiglu_packed"})["mlp_layer"] is SwiGLUPacked
    assert (student.num_prefix_tokens, student.num_registers, student.embed_dim) == (5, 4, 768)
    # The export form is JSON and rebuilds the same model in plain timm.
    exported = json.loads(json.dumps(student.model_kwargs))
    assert exported["mlp_layer"] == "swiglu_packed" and exported["act_layer"] == "silu"
    assert exported["num_classes"] == 0 and exported["dynamic_img_size"] is True
    plain = timm.create_model(student.arch, device="meta", **resolve_layer_kwargs(exported))
    assert sum(p.numel() for p in plain.parameters()) == backbone


def test_mask_token(tiny: Student) -> None:
    x = _batch(224)
    n = 14 * 14
    assert tiny.mask_token.shape == (1, 1, 192) and not tiny.mask_token.any()
    none_masked = torch.zeros(2, n, dtype=torch.bool)
    some_masked = none_masked.clone()
    some_masked[:, :20] = True
    with torch.no_grad():
        ref = tiny.model.forward_features(x)
        unmasked = tiny(x, none_masked)
        masked = tiny(x, some_masked)
        all_masked = [tiny(_batch(224, seed=s), torch.ones(2, n, dtype=torch.bool)) for s in (1, 2)]
    assert torch.equal(unmasked.patch_tokens, ref[:, 1:]) and torch.equal(unmasked.summary, ref[:, 0])
    assert not torch.allclose(masked.patch_tokens, unmasked.patch_tokens)
    assert not torch.allclose(masked.summary, unmasked.summary)
    # Everything masked: the image content no longer matters, only mask token + positions.
    assert torch.allclose(all_masked[0].patch_tokens, all_masked[1].patch_tokens)
    assert not torch.allclose(all_masked[0].patch_tokens[:, 0], all_masked[0].patch_tokens[:, 1])


def test_mask_token_gets_gradient() -> None:
    student = build_student("vit_tiny_patch16_224")
    masks = torch.zeros(1, 49, dtype=torch.bool)
    masks[0, 3] = True
    student(_batch(112, b=1), masks).patch_tokens.sum().backward()
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0


def test_grad_checkpointing_same_output(tiny: Student) -> None:
    x = _batch(112)
    with torch.no_grad():
        ref = tiny(x).patch_tokens
    tiny.set_grad_checkpointing(True)
    try:
        out = tiny(x.requires_grad_()).patch_tokens
    finally:
        tiny.set_grad_checkpointing(False)
    assert torch.allclose(out, ref)


def test_drop_path_passed_through() -> None:
    student = build_student("vit_tiny_patch16_224", drop_path_rate=0.2, device="meta")
    last = student.model.blocks[-1].drop_path1
    assert isinstance(last, DropPath) and last.drop_prob == pytest.approx(0.2)
    assert isinstance(student.model.blocks[0].drop_path1, torch.nn.Identity)  # linear decay from 0
    assert "drop_path_rate" not in student.model_kwargs


def test_static_size_when_not_dynamic() -> None:
    student = build_student("vit_tiny_patch16_224", dynamic_img_size=False).eval()
    assert student(_batch(224, b=1)).grid == (14, 14)
    with pytest.raises(MultiteachError, match="dynamic_img_size=True"):
        student(_batch(112, b=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "vit_tiny_patch16_22"}, "Did you mean: vit_tiny_patch16_224"),
        ({"arch": "levit_128"}, "LevitDistilled returns .* not a spatial feature map"),
        ({"arch": "vit_tiny_patch16_224", "mlp_layer": "swiglupacked"}, "Did you mean: swiglu_packed"),
        ({"arch": "vit_tiny_patch16_224", "act_layer": "silo"}, "act_layer: unknown layer 'silo'.*silu"),
        ({"arch": "vit_tiny_patch16_224", "mlp_ratoi": 2.0}, "Did you mean: mlp_ratio"),
        ({"arch": "vit_tiny_patch16_224", "num_classes": 10}, "num_classes must be 0"),
        ({"arch": "vit_tiny_patch16_224", "class_token": False, "global_pool": "avg"}, "no class token"),
        ({"arch": "vit_tiny_patch16_224", "patch_drop_rate": 0.1}, "patch_drop_rate"),
    ],
)
def test_build_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(MultiteachError, match=match):
        build_student(device="meta", **kwargs)


def test_bad_inputs(tiny: Student) -> None:
    with pytest.raises(MultiteachError, match="not a multiple of patch size 16"):
        tiny(_batch(100))
    with pytest.raises(MultiteachError, match=r"\(B, 3, H, W\)"):
        tiny(torch.zeros(2, 1, 224, 224))
    with pytest.raises(MultiteachError, match=r"\(2, 49\)"):
        tiny(_batch(112), torch.zeros(2, 196, dtype=torch.bool))
    with pytest.raises(MultiteachError, match="bool"):
        tiny(_batch(112), torch.zeros(2, 49))


def test_student_mean_std() -> None:
    assert student_mean_std() == (IMAGENET_MEAN, IMAGENET_STD)
    assert student_mean_std([0.5] * 3, [0.25] * 3) == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(MultiteachError, match="3 values"):
        student_mean_std([0.5, 0.5])
    with pytest.raises(MultiteachError, match="positive"):
        student_mean_std(std=[0.2, 0.0, 0.2])
