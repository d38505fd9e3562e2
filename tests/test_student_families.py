"""Students of any timm family with a spatial feature map: outputs, a few training steps, config-time refusals, export.

Every model here is tiny (narrow widths, 64 px inputs) so the whole file stays well under a minute on 2 CPUs.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import timm
import torch

from multiteach.build import build_components
from multiteach.config import load_recipe
from multiteach.errors import MultiteachError
from multiteach.eval.embed import resolve_model
from multiteach.losses import build_loss
from multiteach.model import DistillModel
from multiteach.publish import export_run
from multiteach.runs import load_run_student
from multiteach.students import FeatureMapStudent, Student, ViTStudent, build_student, init_from_teacher
from multiteach.teachers.base import TeacherOutput, TeacherSpec
from multiteach.train import _param_groups, train

from .engine_fixtures import recipe_yaml

SIZE = 64
#: family -> (timm arch, kwargs: tiny widths where the family takes them).
FAMILIES = {
    "convnext": ("convnext_atto", {"dims": [16, 32, 48, 64], "depths": [1, 1, 1, 1], "conv_mlp": False}),
    "efficientnet": ("tinynet_e", {}),  # timm's EfficientNet class, its smallest entry
    "resnet": ("resnet18", {"channels": [16, 32, 64, 96]}),
    "regnet": ("regnetx_002", {}),
    "fastvit": ("fastvit_t8", {"layers": [1, 1, 1, 1]}),
    "mobilenetv3": ("mobilenetv3_small_050", {}),
    "mobilenetv4": ("mobilenetv4_conv_small", {}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4},
    ),
    "maxvit": ("maxvit_nano_rw_256", {"embed_dim": [32, 64, 96, 128], "depths": [1, 1, 1, 1], "stem_width": 16}),
}
TEACHER = TeacherSpec(
    name="t", loader="timm", hub_id=None, arch="stand-in", embed_dim=48, patch_size=16, num_prefix_tokens=1
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models are op-overhead bound, and 2 threads on a shared 2-CPU machine only
    wait for each other."""
    torch.set_num_threads(1)


def _batch(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> tuple[str, Student]:
    """(family key, a random-init student of it at 64 px)."""
    arch, kwargs = FAMILIES[request.param]
    torch.manual_seed(0)
    return request.param, build_student(arch, img_size=SIZE, **kwargs)


def test_every_family_gives_summaries_and_grid_tokens(family):
    name, student = family
    assert isinstance(student, FeatureMapStudent) and not student.is_vit and student.mask_token is None
    with torch.no_grad():
        out = student.eval()(_batch())
        timm_embedding = student.model(_batch())  # what plain timm returns: the pooled feature
    h, w = out.grid
    assert (h, w) == student.grid_for(SIZE, SIZE) == (SIZE // student.patch_size,) * 2
    assert out.summary.shape == (2, student.summary_dim)
    assert out.patch_tokens.shape == (2, h * w, student.embed_dim)
    torch.testing.assert_close(out.summary, timm_embedding)
    fmap = student.model.forward_features(_batch())
    tokens = fmap.flatten(1, 2) if student.nhwc else fmap.flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.patch_tokens, tokens)  # row-major read of the final feature map
    assert student.nhwc == (name == "swin")


def test_every_family_trains_on_a_feature_term_and_dino(family):
    """Two AdamW steps on a summary + patch feature term (teacher grid 4x4 resampled to the student's 2x2)
    and DINO against an EMA copy: every loss is finite and the feature distance falls."""
    _, student = family
    losses = {
        "t.cls": {"type": "cosine", "teacher": "t"},
        "t.patch": {"type": "mixed", "teacher": "t", "on": "patch"},
        "dino": {"type": "dino", "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "weight": 0.1},
    }
    loss = build_loss(losses, student.summary_dim, {"t": TEACHER}, patch_dim=student.embed_dim)
    model = DistillModel(copy.deepcopy(student).train(), loss, (0.5,) * 3, (0.25,) * 3)
    ema = copy.deepcopy(model).requires_grad_(False)
    crops = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    teacher = TeacherOutput(torch.randn(4, 48, generator=g), torch.randn(4, 16, 48, generator=g), (4, 4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    seen = []
    for step in range(3):
        total, parts = model({"global": crops}, {"t": teacher}, n_global=2, teacher_temp=0.04, ema=ema)
        seen.append({k: float(v) for k, v in parts.items()})
        if step < 2:
            opt.zero_grad()
            total.backward()
            opt.step()
    assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in seen)
    assert set(seen[0]) == {"t.cls", "t.patch", "dino"}
    assert seen[-1]["t.cls"] + seen[-1]["t.patch"] < seen[0]["t.cls"] + seen[0]["t.patch"]


def test_vit_students_are_unchanged():
    student = build_student("vit_tiny_patch16_224", img_size=SIZE, depth=1)
    assert isinstance(student, ViTStudent) and student.is_vit and student.family == "VisionTransformer"
    assert (student.summary_dim, student.embed_dim, student.patch_size) == (192, 192, 16)
    assert student.mask_token.shape == (1, 1, 192)


def test_widths_differ_when_the_head_widens_the_pooled_feature():
    """MobileNetV3's head (conv_head) widens the pooled 288-d feature to 1024: separate heads adapt each width;
    a shared head is refused with both widths named."""
    student = build_student("mobilenetv3_small_050", img_size=SIZE, device="meta")
    assert (student.embed_dim, student.summary_dim) == (288, 1024)
    losses = {"t.cls": {"type": "cosine", "teacher": "t"}, "t.patch": {"type": "cosine", "teacher": "t", "on": "patch"}}
    with torch.device("meta"):
        loss = build_loss(losses, student.summary_dim, {"t": TEACHER}, patch_dim=student.embed_dim)
        assert loss.heads.heads["t"]["summary"].proj.in_features == 1024
        assert loss.heads.heads["t"]["patch"].proj.in_features == 288
        with pytest.raises(MultiteachError, match=r"shared head needs equal student summary and patch widths"):
            build_loss(losses, 1024, {"t": TEACHER}, {"t": {"kind": "linear", "shared": True}}, patch_dim=288)


# ------------------------------------------------------------------------------------------ refused at config time
CNN = ["student.arch=convnext_atto", "student.kwargs={dims: [16, 32, 48, 64], depths: [1, 1, 1, 1]}"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["losses.ibot={type: ibot, out_dim: 64}"],
            r"losses\.ibot: iBOT needs a ViT student .*ConvNeXt.*Use a dino term on the pooled summary",
        ),
        (["data.masking={probability: 0.5, ratio: [0.1, 0.5]}"], r"data\.masking: iBOT block masks need a ViT"),
        (["student.init_from=multiteach-tiny"], r"student\.init_from: .*ConvNeXt.*Remove student\.init_from"),
        (["student.kwargs.reg_tokens=4"], r"student\.kwargs\.reg_tokens: a ViT setting.*register tokens"),
        (["student.kwargs.dimz=[8]"], r"unknown model kwarg 'dimz' for timm's ConvNeXt\. Did you mean: dims"),
        (["student.arch=ghostnet_050", "student.drop_path_rate=0.1"], r"GhostNet .* has no stochastic depth"),
        (["student.arch=poolformerv2_s12", "optim.layer_decay=0.75"], r"MetaFormer has no group_matcher"),
        (["train.distributed.strategy=fsdp"], r"auto_wrap=blocks: wraps each ViT block.*auto_wrap: none"),
        (["student.arch=convnext_atoo"], r"unknown timm model 'convnext_atoo'.*Did you mean: convnext_atto"),
        (
            ["student.arch=levit_128", "student.kwargs={}"],
            r"LevitDistilled returns .* not a spatial feature map.*convnext_atto",
        ),
        (
            ["student.arch=swin_tiny_patch4_window7_224", "student.kwargs={}", "student.img_size=224"],
            r"data\.global_crops\.size=112: student .*SwinTransformer.* cannot take 112x112",
        ),
    ],
)
def test_what_a_cnn_cannot_apply_is_refused_when_the_recipe_is_read(overrides, match):
    with pytest.raises(MultiteachError, match=match):
        load_recipe("distill_tiny_cnn", [*CNN, *overrides])


def test_settings_a_cnn_has_are_accepted():
    recipe = load_recipe("distill_tiny_cnn", [*CNN, "student.drop_path_rate=0.1", "optim.layer_decay=0.75"])
    assert recipe.student.drop_path_rate == 0.1 and recipe.optim.layer_decay == 0.75
    assert load_recipe("distill_tiny", ["losses.ibot={type: ibot, out_dim: 64}"]).losses["ibot"]  # ViTs unchanged


def test_layer_decay_follows_the_family_stages_and_init_from_refuses_a_cnn():
    student = build_student("convnext_atto", img_size=SIZE, dims=[16, 32, 48, 64], depths=[1, 1, 1, 1])
    loss = build_loss({"t.cls": {"type": "cosine", "teacher": "t"}}, student.summary_dim, {"t": TEACHER})
    groups = _param_groups(DistillModel(student, loss, (0.5,) * 3, (0.25,) * 3), 0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) >= 4 and scales[-1] == 1.0 and scales[0] < 0.1  # stem << stages << head
    with pytest.raises(MultiteachError, match=r"student\.init_from: copies a teacher's ViT layers.*ConvNeXt"):
        init_from_teacher(student, timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=0))


def test_grids_that_do_not_divide_are_logged_once(caplog):
    recipe = load_recipe("distill_tiny_cnn", ["teachers.multiteach-tiny.pretrained=false"])
    with caplog.at_level(logging.INFO, logger="multiteach.build"):
        build_components(recipe)
    lines = [r.getMessage() for r in caplog.records if "do not divide" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "(3, 3)" in lines[0] and "(7, 7)" in lines[0] and "ConvNeXt stride 32" in lines[0]


# ------------------------------------------------------------------------------------------ train, export, reload
@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> Path:
    """A 2-step run of the engine fixture with a tiny ConvNeXt student (no iBOT, no masks)."""
    root = tmp_path_factory.mktemp("cnn")
    overrides = [*CNN, "student.img_size=64", "losses.ibot=null", "data.masking=null"]
    return train(load_recipe(recipe_yaml(root, steps=2, checkpoint_every=2), overrides))


def test_cnn_export_reloads_in_plain_timm_and_reproduces_the_embedding(cnn_run, tmp_path):
    out = export_run(cnn_run, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "convnext_atto" and config["global_pool"] == "avg"
    assert config["model_args"]["dims"] == [16, 32, 48, 64] and "img_size" not in config["model_args"]
    assert config["multiteach"]["family"] == "ConvNeXt" and config["multiteach"]["num_prefix_tokens"] == 0
    card = (out / "README.md").read_text()
    assert "ConvNeXt (" in card and "pooled embedding (B, 64)" in card
    student = load_run_student(cnn_run).student
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = _batch(3, seed=5)
    with torch.no_grad():
        expected, got = student(x), model(x)
        tokens = model.forward_features(x).flatten(2).transpose(1, 2)
    diff = (got - expected.summary).abs().max().item()
    print(f"exported convnext_atto vs the run's student: max |embedding difference| = {diff:.3g}")
    assert got.shape == (3, 64) and diff < 1e-5
    torch.testing.assert_close(tokens, expected.patch_tokens, rtol=0, atol=1e-5)

    embedder = resolve_model(str(out))  # `multiteach eval EXPORT`: its own resize and normalisation
    x01 = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    mean, std = (torch.tensor(config["pretrained_cfg"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        torch.testing.assert_close(embedder(x01), model((x01 - mean) / std), rtol=0, atol=1e-5)
        assert embedder.patch_tokens(x01).shape == (2, 4, 64) and embedder.spec.patch_size == 32
