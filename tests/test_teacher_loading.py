"""Every loader family runs its real loading code offline on tiny weights of the same family."""

import time

import pytest
import torch
from safetensors.torch import save_file

from multiteach.cli import main
from multiteach.errors import MultiteachError
from multiteach.standins import (
    TINY_CONCH,
    save_timm_folder,
    timm_to_cache,
    tiny_conch_state,
    tiny_hf_vit,
    tiny_timm,
    write_cache_repo,
)
from multiteach.teachers import build_teacher
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD
from multiteach.teachers.catalog_refs import HIBOU_MEAN, HIBOU_STD, HOPTIMUS_MEAN, HOPTIMUS_STD

from .engine_fixtures import recipe_yaml
from .teacher_helpers import images, normalise, write_mahmood_repo


def test_timm_hub_cache_catalog_entry_bit_exact(hf_cache):
    model, arch, args = tiny_timm("h-optimus-0", seed=1)
    timm_to_cache(model, hf_cache, "bioptimus/H-optimus-0", arch, args, HOPTIMUS_MEAN, HOPTIMUS_STD)
    teacher = build_teacher("h-optimus-0")
    x = images()
    out = teacher(x)
    with torch.inference_mode():
        ref = model.forward_features(normalise(x, HOPTIMUS_MEAN, HOPTIMUS_STD))
    assert out.grid == (16, 16)
    assert torch.equal(out.summary, ref[:, 0])
    assert torch.equal(out.patch_tokens, ref[:, 5:])  # CLS + 4 registers removed
    assert all(not p.requires_grad for p in teacher.parameters())


def test_timm_hf_hub_generic_source(hf_cache):
    model, arch, args = tiny_timm("uni", seed=2)
    timm_to_cache(model, hf_cache, "someorg/tiny-uni", arch, args, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 224)
    teacher = build_teacher("hf-hub:someorg/tiny-uni")
    assert teacher.input_size == 224 and teacher.spec.mean == (0.5, 0.5, 0.5)  # from the repo's pretrained_cfg
    x = images(size=224)
    with torch.inference_mode():
        ref = model.forward_features(normalise(x, (0.5,) * 3, (0.25,) * 3))
    out = teacher(x)
    assert torch.equal(out.summary, ref[:, 0]) and torch.equal(out.patch_tokens, ref[:, 1:])


def test_timm_local_dir_and_weights_override(tmp_path):
    model, arch, args = tiny_timm("virchow2", seed=3)
    save_timm_folder(model, tmp_path / "v2", arch, args, IMAGENET_MEAN, IMAGENET_STD)
    x = images()
    with torch.inference_mode():
        ref = model.forward_features(normalise(x, IMAGENET_MEAN, IMAGENET_STD))
    # the catalog entry pointed at a local folder keeps Virchow2's CLS||mean rule
    teacher = build_teacher("virchow2", weights=str(tmp_path / "v2"))
    out = teacher(x)
    assert torch.equal(out.summary, torch.cat([ref[:, 0], ref[:, 5:].mean(1)], -1))
    assert out.summary.shape[-1] == 2 * 96
    generic = build_teacher(
        f"local-dir:{tmp_path / 'v2'}", model_kwargs={"mlp_layer": "swiglu_packed", "act_layer": "silu"}
    )
    assert torch.equal(generic(x).patch_tokens, ref[:, 5:])


def test_transformers_hub_cache_and_folder(hf_cache, tmp_path):
    vit = tiny_hf_vit("vit", seed=4)
    write_cache_repo(
        hf_cache,
        "owkin/phikon",
        {
            "config.json": lambda p: vit.config.to_json_file(p),
            "model.safetensors": lambda p: save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(p)),
        },
    )
    x = images()
    out = build_teacher("phikon")(x)
    with torch.inference_mode():
        ref = vit(pixel_values=normalise(x, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state
    assert torch.equal(out.summary, ref[:, 0]) and torch.equal(out.patch_tokens, ref[:, 1:])

    hibou = tiny_hf_vit("dinov2_reg", seed=5)
    hibou.save_pretrained(tmp_path / "hibou")
    out = build_teacher("hibou-b", weights=str(tmp_path / "hibou"))(x)
    with torch.inference_mode():
        ref = hibou(pixel_values=normalise(x, HIBOU_MEAN, HIBOU_STD)).last_hidden_state
    assert out.grid == (16, 16)
    assert torch.equal(out.summary, ref[:, 0]) and torch.equal(out.patch_tokens, ref[:, 5:])


def test_conch_hub_cache_bit_exact(hf_cache):
    visual, state = tiny_conch_state(seed=6)
    write_mahmood_repo(hf_cache, "MahmoodLab/CONCH", "conch_ViT-B-16", "pytorch_model.bin", state)
    teacher = build_teacher("conch", model_kwargs=TINY_CONCH, input_size=64)
    x = images(size=64)
    out = teacher(x)
    from multiteach.teachers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    xn = normalise(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    visual.requires_grad_(False)  # frozen like a teacher: MultiheadAttention then takes the same fast path
    with torch.inference_mode():
        ref_tokens = visual.trunk.forward_features(xn)
        ref_pooled = visual.forward_no_head(xn)  # == encode_image(proj_contrast=False, normalize=False)
    assert torch.equal(out.summary, ref_pooled)
    assert torch.equal(out.patch_tokens, ref_tokens[:, 1:])
    assert out.summary.shape == (2, 32) and out.grid == (4, 4)


def test_open_clip_local_dir(tmp_path):
    import json

    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(7)
    model = open_clip.CLIP(**cfg).eval()
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    teacher = build_teacher(f"open_clip:local-dir:{folder}")
    x = images(size=64)
    out = teacher(x)
    with torch.inference_mode():
        ref = model.encode_image(normalise(x, (0.5,) * 3, (0.5,) * 3))
    assert teacher.input_size == 64 and teacher.spec.mean == (0.5, 0.5, 0.5)
    assert torch.equal(out.summary, ref)
    assert out.patch_tokens.shape == (2, 16, 64)


# --- bad input: clear errors, nothing half-loaded ------------------------------------------------


def test_unknown_teacher_suggests_close_matches():
    with pytest.raises(MultiteachError, match=r"unknown teacher 'uni2h'.*Did you mean: uni2-h"):
        build_teacher("uni2h")


def test_gated_uncached_repo_offline_is_explained():
    with pytest.raises(MultiteachError) as err:
        build_teacher("virchow")
    msg = str(err.value)
    assert "paige-ai/Virchow" in msg and "gated" in msg and "hf auth login" in msg and "weights:" in msg


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """A Hub endpoint nothing listens on, HF_HUB_OFFLINE unset, an empty cache, and no reachability decided yet."""
    from huggingface_hub import constants

    from multiteach.teachers import weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test (the check sets it to 1)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "_hub_offline_reason", None)
    return constants


def test_an_unreachable_hub_fails_the_first_catalog_teacher_at_once_and_once(unreachable_hub, monkeypatch):
    from multiteach.teachers import weights

    start = time.perf_counter()
    with pytest.raises(MultiteachError) as err:
        build_teacher("uni")  # MahmoodLab/UNI, gated, not cached
    assert time.perf_counter() - start < 5  # one 2 s connection check, no retries (they took ~22 s)
    assert "no connection to http://127.0.0.1:9 within 2 s" in str(err.value) and "gated" in str(err.value)
    assert unreachable_hub.HF_HUB_OFFLINE is True  # the rest of the process runs offline
    checks = []
    monkeypatch.setattr(weights, "hub_answers", lambda *a, **k: checks.append(a) or True)
    with pytest.raises(MultiteachError, match="no connection to http://127.0.0.1:9"):
        build_teacher("virchow")
    assert checks == []  # decided once per process


def test_hf_hub_offline_is_used_as_set_and_the_hub_never_probed(unreachable_hub, monkeypatch):
    from multiteach.teachers import weights

    monkeypatch.setattr(unreachable_hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(weights, "hub_answers", lambda *a, **k: pytest.fail("probed the Hub under HF_HUB_OFFLINE"))
    with pytest.raises(MultiteachError, match=r"cannot be reached \(HF_HUB_OFFLINE is set\)"):
        build_teacher("uni")


def test_cli_with_an_unreachable_hub_prints_one_message_and_no_retries(unreachable_hub, tmp_path, capfd):
    recipe = recipe_yaml(tmp_path, steps=2, checkpoint_every=2)
    start = time.perf_counter()
    assert main(["train", str(recipe), "teachers.uni.weights=null"]) == 2  # the weights doctor's preflight
    assert time.perf_counter() - start < 10  # data set-up and the preflight included; the Hub part is the check
    err = capfd.readouterr().err
    assert err.count("is not in the local Hugging Face cache") == 1, err
    assert "no connection to http://127.0.0.1:9 within 2 s" in err and "Retrying" not in err


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(2, 1, 32, 32), r"\(B, 3, H, W\)"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "float RGB in \\[0, 1\\].*255"),
        (torch.rand(2, 3, 32, 32) * 255, "values in \\[0, 1\\]"),
        (torch.rand(3, 32, 32), r"\(B, 3, H, W\)"),
    ],
)
def test_bad_image_batches(bad, match, tmp_path):
    model, arch, args = tiny_timm("uni")
    save_timm_folder(model, tmp_path, arch, args, IMAGENET_MEAN, IMAGENET_STD)
    teacher = build_teacher(f"local-dir:{tmp_path}")
    with pytest.raises(MultiteachError, match=match):
        teacher(bad)


def test_weights_with_wrong_shapes_are_refused(tmp_path):
    model, _, _ = tiny_timm("uni")  # 64-d tiny weights ...
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MultiteachError, match=r"do not fit.*shape mismatch.*cls_token expects \(1, 1, 1024\)"):
        build_teacher("uni", weights=str(tmp_path / "model.safetensors"))  # ... for the real ViT-L/16


def test_missing_weights_path():
    with pytest.raises(MultiteachError, match="does not exist"):
        build_teacher("uni", weights="/no/such/file.safetensors")


# --- behaviour of the frozen wrapper ---------------------------------------------------------------


def test_teacher_stays_frozen_in_eval_and_supports_bf16(tmp_path):
    model, arch, args = tiny_timm("uni")
    save_timm_folder(model, tmp_path, arch, args, IMAGENET_MEAN, IMAGENET_STD)
    teacher = build_teacher(f"local-dir:{tmp_path}", input_size=112)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = images(size=160)  # any input size: resized to 112 inside
    out = teacher(x)
    assert out.grid == (7, 7) and out.summary.is_inference()
    bf16 = build_teacher(f"local-dir:{tmp_path}", input_size=112, dtype="bf16")
    out16 = bf16(x)
    assert out16.summary.dtype == torch.float32  # outputs always float32
    cos = torch.nn.functional.cosine_similarity(out.summary, out16.summary).min()
    assert cos > 0.98
    with pytest.raises(MultiteachError, match="dtype 'fp8'"):
        build_teacher(f"local-dir:{tmp_path}", dtype="fp8")
