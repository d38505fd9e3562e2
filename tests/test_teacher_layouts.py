"""Loaders against their public reference code.

* per loader family, the reference builder (the model cards' / TRIDENT's ``timm.create_model`` calls,
  transformers classes with the Hub config, conch-fork's CoCa, open_clip's CLIP) writes exactly the keys and
  shapes the multiteach loader consumes;
* CONCH v1.5 and GPFM load from checkpoint layouts reproduced from their public loading code (TRIDENT's
  ``conchv1_5.py``; GPFM's ``models/dinov2`` and plismbench's ``hkust.py``).
"""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from multiteach.teachers import CATALOG, build_teacher, conch, conch_v15, resolve_spec, teacher_architecture
from multiteach.teachers.doctor import check_weights
from multiteach.teachers.timm_vit import prepare_state_dict

from .teacher_helpers import images, normalise, write_mahmood_repo


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --- timm: the public create_model calls, real sizes, on the meta device ----------------------------------

SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "global_pool": ""}
_HOPT = {"num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5}
# Source of each call: mahmoodlab/TRIDENT@a91fa8490e02:trident/patch_encoder_models/load.py, unless noted.
TIMM_REFERENCE = {
    "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0}),
    "uni2-h": (  # also mahmoodlab/UNI README
        "vit_giant_patch14_224",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            **SWIGLU,
            "reg_tokens": 8,
        },
    ),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", _HOPT),
    "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", _HOPT),
    # TRIDENT passes the layer classes; mlp_ratio comes from the Hub config (H0-mini paper, Table 4: MLP ratio 4
    # with SwiGLU = DINOv2 hidden 2048, i.e. timm's packed 5.33334).
    "h0-mini": ("vit_base_patch14_reg4_dinov2", {**SWIGLU, "mlp_ratio": 5.33334, "img_size": 224, "num_classes": 0}),
    "virchow": ("vit_huge_patch14_224", {**_VIRCHOW, **SWIGLU}),
    "virchow2": ("vit_huge_patch14_224", {**_VIRCHOW, "reg_tokens": 4, **SWIGLU}),
    "prov-gigapath": (  # TRIDENT's local-weights kwargs (the Hub config's model_args)
        "vit_giant_patch14_dinov2",
        {
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
    ),
    # kaiko-ai/towards_large_pathology_fms@bfcde171e200:hubconf.py
    "kaiko-vitb8": ("vit_base_patch8_224", {"img_size": 224, "num_classes": 0}),
    # plismbench hkust.py and TRIDENT's GPFM encoder
    "gpfm": ("vit_large_patch14_dinov2", {"img_size": 224, "patch_size": 14, "init_values": 1e-5, "num_classes": 0}),
}


def test_every_hub_timm_entry_has_a_reference_call():
    hub_timm = {n for n in CATALOG if CATALOG.get(n).loader == "timm" and CATALOG.get(n).hub_id}
    assert hub_timm == set(TIMM_REFERENCE)


@pytest.mark.parametrize("name", sorted(TIMM_REFERENCE))
def test_timm_reference_call_writes_the_keys_the_loader_consumes(name):
    arch, kwargs = TIMM_REFERENCE[name]
    with torch.device("meta"):
        reference = timm.create_model(arch, pretrained=False, dynamic_img_size=True, **kwargs)
    assert shapes(reference) == shapes(teacher_architecture(name))


# --- transformers: the classes the Hub configs name ------------------------------------------------------

# histai/hibou-b@5cc6343e7d77 config.json as quoted on the Hub (fields that shape the weights)
HIBOU_B_CONFIG = {
    "hidden_size": 768,
    "image_size": 224,
    "layerscale_value": 1.0,
    "mlp_ratio": 4,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "num_register_tokens": 4,
    "patch_size": 14,
    "qkv_bias": True,
    "use_swiglu_ffn": True,
}


def test_transformers_reference_classes_write_the_keys_the_loader_consumes():
    import transformers

    with torch.device("meta"):
        phikon = transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=False)  # TRIDENT's call
        hibou_b = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**HIBOU_B_CONFIG))
    assert shapes(phikon) == shapes(teacher_architecture("phikon"))
    assert shapes(hibou_b) == shapes(teacher_architecture("hibou-b"))
    # SwiGLU FFN, as the Hub config says (transformers 5 names it gate/up/down; 4.x checkpoints' weights_in/out are
    # converted by transformers at load, and by the doctor the same way)
    assert any(k.endswith("mlp.gate_proj.weight") for k in shapes(hibou_b))


# --- conch-fork: the full CoCa conch's own loader builds -------------------------------------------------


def test_conch_fork_coca_image_tower_is_what_the_loader_keeps():
    pytest.importorskip("conch")
    from importlib import resources

    from conch.open_clip_custom import coca_model

    cfg = json.loads(
        resources.files("conch.open_clip_custom").joinpath("model_configs", "conch_ViT-B-16.json").read_text()
    )
    cfg.pop("custom_text", None)
    with torch.device("meta"):
        coca = coca_model.CoCa(**cfg)  # what create_model_from_pretrained('conch_ViT-B-16', ...) builds
    full = shapes(coca)
    visual = {k[len("visual.") :]: s for k, s in full.items() if k.startswith("visual.")}
    assert visual == shapes(teacher_architecture("conch"))
    assert len(full) > len(visual)  # the checkpoint also holds the text side ...
    meta = {k: torch.empty(s, device="meta") for k, s in full.items()}
    kept, notes = conch.prepare_state_dict(resolve_spec("conch"), meta)
    assert set(kept) == set(visual) and "dropped" in notes[0]  # ... which the loader drops, and says so


# --- open_clip: a CLIP checkpoint folder ------------------------------------------------------------------


def test_open_clip_loader_consumes_the_checkpoints_visual_keys(tmp_path):
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    teacher = build_teacher(f"open_clip:local-dir:{folder}")
    written = {k[len("visual.") :] for k in model.state_dict() if k.startswith("visual.")}
    assert set(teacher.backbone.visual.state_dict()) == written


# --- CONCH v1.5: TRIDENT's CONCHVisionTower ---------------------------------------------------------------

# trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py: vit_large(init_values=1.0) trunk (PatchEmbed
# proj, Attention qkv/proj, LayerScale gamma, Mlp fc1/fc2, final norm; no fc_norm/head weights), an
# AttentionalPooler(d_model=768, context_dim=1024, n_head=8, n_queries=1) and ln_contrast = LayerNorm(768).
# The leaves of one ViT block, identical in TRIDENT's Block and in DINOv2's (GPFM's models/dinov2/layers):
# norm1, attn.qkv/proj, LayerScale gamma, norm2, Mlp fc1/fc2.
VIT_BLOCK = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ls1.gamma",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "ls2.gamma",
)
VIT_TOP = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias")
POOLER = (
    "query",
    "ln_k.weight",
    "ln_k.bias",
    "ln_q.weight",
    "ln_q.bias",
    "to_q.weight",
    "to_kv.weight",
    "to_out.weight",
)


def trident_conch15_keys(depth: int) -> set[str]:
    trunk = {*VIT_TOP, *(f"blocks.{i}.{leaf}" for i in range(depth) for leaf in VIT_BLOCK)}
    return (
        {f"trunk.{k}" for k in trunk}
        | {f"attn_pool_contrast.{k}" for k in POOLER}
        | {"ln_contrast.weight", "ln_contrast.bias"}
    )


def test_conch_v15_architecture_has_tridents_keys_and_shapes():
    model = teacher_architecture("conch-v1.5")
    got = shapes(model)
    assert set(got) == trident_conch15_keys(24)
    assert got["attn_pool_contrast.query"] == (1, 768)
    assert got["attn_pool_contrast.to_kv.weight"] == (2 * 768, 1024)
    assert got["trunk.blocks.23.ls2.gamma"] == (1024,)
    assert got["ln_contrast.weight"] == (768,)
    assert "proj_contrast" not in got  # CONCH v1's CoCa projection is not part of v1.5


TINY_V15 = {
    "img_size": 64,
    "init_values": 1.0,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 2,
    "pool_dim": 32,
    "pool_heads": 4,
    "pool_queries": 1,
}


def trident_pool(tokens: torch.Tensor, sd: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """TRIDENT's AttentionalPooler + ln_contrast, head by head from the raw tensors (an independent reference)."""
    p = "attn_pool_contrast."
    x = F.layer_norm(tokens, tokens.shape[-1:], sd[p + "ln_k.weight"], sd[p + "ln_k.bias"])
    q = F.layer_norm(sd[p + "query"], sd[p + "query"].shape[-1:], sd[p + "ln_q.weight"], sd[p + "ln_q.bias"])
    q = q @ sd[p + "to_q.weight"].T
    k, v = (x @ sd[p + "to_kv.weight"].T).chunk(2, dim=-1)
    dh = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        s = slice(h * dh, (h + 1) * dh)
        attn = ((q[:, s] * dh**-0.5) @ k[..., s].transpose(-2, -1)).softmax(-1)
        outs.append(attn @ v[..., s])
    pooled = (torch.cat(outs, -1) @ sd[p + "to_out.weight"].T)[:, 0]
    return F.layer_norm(pooled, pooled.shape[-1:], sd["ln_contrast.weight"], sd["ln_contrast.bias"])


def test_conch_v15_loads_a_trident_layout_checkpoint_from_the_hub_cache(hf_cache):
    spec = resolve_spec("conch-v1.5", model_kwargs=TINY_V15)
    torch.manual_seed(1)
    tower = conch_v15.architecture(spec, device="cpu").eval()
    state = {k: v.clone() for k, v in tower.state_dict().items()}
    assert set(state) == trident_conch15_keys(2)  # the file holds exactly TRIDENT's names
    write_mahmood_repo(hf_cache, "MahmoodLab/conchv1_5", "conchv1_5", "pytorch_model_vision.bin", state)
    teacher = build_teacher("conch-v1.5", model_kwargs=TINY_V15, input_size=64)
    x = images(size=64)
    out = teacher(x)
    with torch.inference_mode():
        tokens = tower.trunk.forward_features(normalise(x, spec.mean, spec.std))
        ref = trident_pool(tokens, state, heads=4)
    assert out.grid == (4, 4) and out.summary.shape == (2, 32)
    assert torch.equal(out.patch_tokens, tokens[:, 1:])
    torch.testing.assert_close(out.summary, ref, rtol=1e-5, atol=1e-5)


def test_conch_v15_resamples_the_position_grid_as_trident_does(tmp_path):
    from timm.layers import resample_abs_pos_embed

    small = resolve_spec("conch-v1.5", model_kwargs={**TINY_V15, "img_size": 32})  # a 2x2 grid in the file
    torch.manual_seed(2)
    state = conch_v15.architecture(small, device="cpu").state_dict()
    torch.save(state, tmp_path / "pytorch_model_vision.bin")
    teacher = build_teacher("conch-v1.5", model_kwargs=TINY_V15, weights=str(tmp_path), input_size=64)
    want = resample_abs_pos_embed(
        state["trunk.pos_embed"], new_size=[4, 4], num_prefix_tokens=1, interpolation="bilinear", antialias=False
    )
    assert torch.equal(teacher.backbone.tower.trunk.pos_embed, want)
    report = check_weights(resolve_spec("conch-v1.5", model_kwargs=TINY_V15), tmp_path)
    assert report.ok and any("resampled trunk.pos_embed from a 2x2 to a 4x4 grid" in n for n in report.notes)


# --- GPFM: the GitHub release (GPFM's and plismbench's loaders) and the Hub copy (TRIDENT's) -------------

TINY_GPFM = {"img_size": 56, "init_values": 1e-5, "embed_dim": 64, "depth": 4, "num_heads": 2}


def gpfm_release(timm_model: torch.nn.Module, block_chunks: int = 4) -> dict:
    """GPFM.pth as released on GitHub: ``{'teacher': {...}}`` holding the DINOv2 backbone under ``backbone.``
    (``DinoVisionTransformer(block_chunks=4)``: block i named ``blocks.<i // (depth/4)>.<i>.``, plus a
    ``mask_token``) and the DINO head beside it; GPFM's loader keeps the ``backbone`` keys, plismbench's
    unchunks the blocks and drops ``mask_token`` and ``dino_head``."""
    sd = timm_model.state_dict()
    depth, dim = len(timm_model.blocks), timm_model.embed_dim
    chunk = depth // block_chunks
    teacher = {f"backbone.{k}": sd[k] for k in VIT_TOP}
    for i in range(depth):
        for leaf in VIT_BLOCK:
            teacher[f"backbone.blocks.{i // chunk}.{i}.{leaf}"] = sd[f"blocks.{i}.{leaf}"]
    assert len(teacher) == len(sd)  # every timm tensor has its DINOv2 name
    teacher["backbone.mask_token"] = torch.zeros(1, dim)
    teacher["dino_head.mlp.0.weight"] = torch.randn(16, dim)
    teacher["dino_head.last_layer.weight"] = torch.randn(32, 16)
    return {"teacher": teacher}


@pytest.fixture(scope="module")
def gpfm_model():
    torch.manual_seed(3)
    return timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, **TINY_GPFM).eval()


@pytest.mark.parametrize("layout", ["github_release", "hub_timm_state_dict"])
def test_gpfm_loads_both_public_layouts(tmp_path, gpfm_model, layout):
    if layout == "github_release":
        ckpt = gpfm_release(gpfm_model)
    else:  # TRIDENT: torch.load(...)['state_dict'] into timm's vit_large_patch14_dinov2, strict
        ckpt = {"state_dict": {k: v.clone() for k, v in gpfm_model.state_dict().items()}}
    torch.save(ckpt, tmp_path / "GPFM.pth")
    teacher = build_teacher("gpfm", model_kwargs=TINY_GPFM, weights=str(tmp_path), input_size=56)
    x = images(size=56)
    with torch.inference_mode():
        ref = gpfm_model.forward_features(normalise(x, teacher.spec.mean, teacher.spec.std))
    out = teacher(x)
    assert out.grid == (4, 4)
    assert torch.equal(out.summary, ref[:, 0]) and torch.equal(out.patch_tokens, ref[:, 1:])
    report = check_weights(resolve_spec("gpfm", model_kwargs=TINY_GPFM), tmp_path / "GPFM.pth")
    assert report.ok, report.render()


def test_gpfm_release_conversion_says_what_it_did(gpfm_model):
    spec = resolve_spec("gpfm", model_kwargs=TINY_GPFM)
    sd, notes = prepare_state_dict(spec, gpfm_release(gpfm_model)["teacher"], gpfm_model)
    assert set(sd) == set(gpfm_model.state_dict())
    assert "dropped 2 other key(s) (dino_head" in notes[0]
    assert any("unchunked" in n for n in notes) and any("mask_token dropped" in n for n in notes)
