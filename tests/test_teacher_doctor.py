"""The weights doctor (`multiteach teachers --check NAME --weights PATH`): exit 0 only when the teacher will load
exactly, 2 otherwise, with a message that names the teacher, the file, the offending keys and the likely cause.

Real-size checkpoints are written as sparse safetensors files (a real header, zero data that takes no disk
space): the doctor reads headers only, so it checks the true catalog architecture at no cost.
"""

import json
import logging
import shutil
import struct
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file

from multiteach.cli import main
from multiteach.errors import MultiteachError
from multiteach.standins import save_timm_folder, tiny_hf_vit, tiny_timm
from multiteach.teachers import build_teacher, resolve_spec, teacher_architecture
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD
from multiteach.teachers.doctor import check_weights, preflight

ST_BYTES = {"F32": 4, "BF16": 2}


def meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def sparse_safetensors(path, shapes, dtype="F32", cut=0):
    """A safetensors file with a real header and all-zero data, written sparse; ``cut`` bytes short."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = ST_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset - cut)
    return path


@pytest.fixture(scope="module")
def uni_shapes():
    return meta_shapes(teacher_architecture("uni"))


def run_check(capsys, *args):
    code = main(["teachers", "--check", *args])
    return code, capsys.readouterr().out


# --- the CLI cases of issue 14 ------------------------------------------------------------------------------


def test_check_correct_checkpoint_exits_0(tmp_path, capsys, uni_shapes):
    path = sparse_safetensors(tmp_path / "model.safetensors", uni_shapes)
    code, out = run_check(capsys, "uni", "--weights", str(tmp_path))
    assert code == 0, out
    assert f"OK: teacher 'uni', weights {path} will load exactly" in out
    assert "all 342 tensors present" in out and "dtype float32" in out and "303.35M parameters" in out


def test_check_module_prefix_exits_2_and_says_how_to_strip_it(tmp_path, capsys, uni_shapes):
    path = sparse_safetensors(tmp_path / "ddp.safetensors", {f"module.{k}": s for k, s in uni_shapes.items()})
    code, out = run_check(capsys, "uni", "--weights", str(path))
    assert code == 2
    assert f"FAIL: teacher 'uni', weights {path}" in out
    assert "342 missing key(s), by prefix: blocks.* (336 keys)" in out
    assert "e.g. module.cls_token, module.pos_embed, module.patch_embed.proj.weight, … (+339 more)" in out
    assert "likely cause: the keys carry a 'module.' prefix" in out and "removeprefix('module.')" in out


def test_check_text_tower_exits_2_for_a_vision_only_entry(tmp_path, capsys):
    v15 = meta_shapes(teacher_architecture("conch-v1.5"))
    text = {"text.token_embedding.weight": (32007, 768), "text.ln_final.weight": (768,), "logit_scale": ()}
    path = sparse_safetensors(tmp_path / "coca.safetensors", {**v15, **text})
    code, out = run_check(capsys, "conch-v1.5", "--weights", str(path))
    assert code == 2
    assert "teacher 'conch-v1.5'" in out and "3 unexpected key(s)" in out
    assert "likely cause: the file holds a text tower (3 keys" in out and "vision-only file" in out


def test_check_full_coca_is_fine_for_conch_v1(tmp_path, capsys):
    pytest.importorskip("conch")
    from importlib import resources

    from conch.open_clip_custom import coca_model

    cfg = json.loads(
        resources.files("conch.open_clip_custom").joinpath("model_configs", "conch_ViT-B-16.json").read_text()
    )
    cfg.pop("custom_text", None)
    with torch.device("meta"):
        coca = coca_model.CoCa(**cfg)
    sparse_safetensors(tmp_path / "model.safetensors", meta_shapes(coca))  # CONCH's Hub file is the full CoCa
    code, out = run_check(capsys, "conch", "--weights", str(tmp_path / "model.safetensors"))
    assert code == 0, out
    assert "dropped" in out and "text side" in out


def test_check_wrong_variant_exits_2(tmp_path, capsys):
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224", num_classes=0)
    path = sparse_safetensors(tmp_path / "vitb.safetensors", meta_shapes(vit_b))
    code, out = run_check(capsys, "uni", "--weights", str(path))
    assert code == 2
    assert "shape mismatch in 150 tensor(s): cls_token expects (1, 1, 1024) but file has (1, 1, 768)" in out
    assert "wrong model variant: the file looks like a ViT-B/16 (width 768, 12 blocks" in out
    assert "expects a ViT-L/16 (width 1024, 24 blocks" in out


def test_check_truncated_file_exits_2(tmp_path, capsys, uni_shapes):
    path = sparse_safetensors(tmp_path / "model.safetensors", uni_shapes, cut=10**8)
    code, out = run_check(capsys, "uni", "--weights", str(path))
    assert code == 2
    assert f"teacher 'uni', weights {path}" in out
    assert "the file is truncated: 1.11 GB on disk but its header describes 1.21 GB" in out
    assert "download it again" in out


def test_check_config_json_of_another_model_exits_2(tmp_path, capsys):
    model, arch, args = tiny_timm("uni")
    save_timm_folder(model, tmp_path, "vit_base_patch16_224", args, IMAGENET_MEAN, IMAGENET_STD)
    code, out = run_check(capsys, "uni", "--weights", str(tmp_path))
    assert code == 2
    assert (
        "config.json names architecture 'vit_base_patch16_224' but the catalog entry is 'vit_large_patch16_224'" in out
    )


def test_check_needs_both_options(capsys):
    assert main(["teachers", "--check", "uni"]) == 2
    assert "--check NAME and --weights PATH go together" in capsys.readouterr().err


# --- the doctor agrees with the loader: OK exactly when the teacher loads ----------------------------------

TINY_UNI = {"img_size": 224, "init_values": 1e-5, "embed_dim": 64, "depth": 2, "num_heads": 2}


def _tiny_uni_state():
    model, _, _ = tiny_timm("uni", seed=0)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


CASES = {
    "correct": lambda sd: sd,
    "module_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "teacher_backbone_prefix": lambda sd: {f"teacher.backbone.{k}": v for k, v in sd.items()},
    "text_tower": lambda sd: {**{f"visual.trunk.{k}": v for k, v in sd.items()}, "text.proj": torch.zeros(4, 4)},
    "missing_block": lambda sd: {k: v for k, v in sd.items() if not k.startswith("blocks.1.")},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_doctor_ok_exactly_when_the_loader_loads(tmp_path, case):
    path = tmp_path / "model.safetensors"
    save_file(CASES[case](_tiny_uni_state()), str(path))
    spec = resolve_spec("uni", model_kwargs=TINY_UNI)
    report = check_weights(spec, path)
    try:
        build_teacher("uni", model_kwargs=TINY_UNI, weights=str(path))
        loaded = True
    except MultiteachError as exc:
        loaded = False
        message = str(exc)
        # the loader's own error names the teacher, the file and the grouped keys
        assert "teacher 'uni'" in message and str(path) in message and "key(s), by prefix" in message
    assert report.ok == loaded == (case == "correct"), report.render()
    if case.endswith("prefix"):
        prefix = "module." if case == "module_prefix" else "teacher.backbone."
        assert any(f"carry a {prefix!r} prefix" in p for p in report.problems)
    if case == "text_tower":
        assert any("text tower" in p for p in report.problems)
        assert any("'visual.trunk.' prefix" in p for p in report.problems)


def test_truncated_pickle_is_reported_not_raised(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(_tiny_uni_state(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = check_weights("uni", path, model_kwargs=TINY_UNI)
    assert report.exit_code == 2 and "download it again" in report.problems[0]
    with pytest.raises(MultiteachError, match=r"cannot read weights .*pytorch_model.bin.*download the file again"):
        build_teacher("uni", model_kwargs=TINY_UNI, weights=str(path))


def test_transformers_checkpoint_under_4x_names_is_converted_like_transformers_does(tmp_path):
    """A DINOv2-with-registers checkpoint saved by transformers 4.x (Hibou's era): attention.attention.query,
    SwiGLU weights_in/weights_out. transformers 5 renames these at load; the doctor applies the same mapping."""
    model = tiny_hf_vit("dinov2_reg", seed=0)
    names_4x = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
    }
    legacy = {}
    for k, v in model.state_dict().items():
        for new, old in names_4x.items():
            k = k.replace(new, old)
        legacy[k] = v.contiguous()
    model.config.to_json_file(tmp_path / "config.json")
    save_file(legacy, str(tmp_path / "model.safetensors"))
    kwargs = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    spec = resolve_spec("hibou-b", model_kwargs={**kwargs, "patch_size": 14, "num_register_tokens": 4})
    report = check_weights(spec, tmp_path, trust_remote_code=True)
    assert report.ok, report.render()
    assert any("renamed by transformers' own checkpoint conversion" in n for n in report.notes)


# --- at training start ----------------------------------------------------------------------------------------


def _recipe(**teachers):
    defaults = {"weights": None, "pretrained": True, "model_kwargs": {}, "embedding": None, "trust_remote_code": False}
    return SimpleNamespace(teachers={n: SimpleNamespace(**{**defaults, **cfg}) for n, cfg in teachers.items()})


def test_preflight_reports_a_multiteach_stand_in_as_expected_and_another_model_as_a_warning(tmp_path, caplog):
    from multiteach.standins import write_standin_teachers
    from multiteach.teachers.loaded import describe_teacher

    standin = write_standin_teachers(tmp_path / "standins", ("h-optimus-0",))["h-optimus-0"]
    other = tmp_path / "other"
    shutil.copytree(standin, other)
    config = json.loads((other / "config.json").read_text())
    del config["multiteach_standin"]  # the same 2-block folder, as a user's own model
    (other / "config.json").write_text(json.dumps(config))
    recipe = _recipe(
        a={"source": "h-optimus-0", "weights": str(standin)}, b={"source": "h-optimus-0", "weights": str(other)}
    )
    caplog.set_level(logging.INFO, logger="multiteach")
    reports = preflight(recipe, ["a", "b"])
    assert [r.recipe_name for r in reports] == ["a", "b"]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(
        "teacher 'b': config.json describes a ViT-?/14 (width 96, 2 blocks"
    )
    assert any("stand-in of h-optimus-0 written by multiteach (expected" in r.getMessage() for r in caplog.records)
    a, b = (describe_teacher(r.recipe_name, recipe.teachers[r.recipe_name], r) for r in reports)
    assert not a["catalog_model"] and a["standin"] == "h-optimus-0" and "tiny random stand-in" in a["why"]
    assert not b["catalog_model"] and b["standin"] is None and "the folder holds another model" in b["why"]
    assert b["file"] == "model.safetensors" and len(b["sha256"]) == 64
    assert b["architecture"].startswith("vit_giant_patch14_reg4_dinov2 (ViT-?/14 (width 96, 2 blocks, patch 14))")


def test_preflight_stops_before_training_with_every_bad_teacher(tmp_path):
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    state = _tiny_uni_state()
    save_file(state, str(good))
    save_file({f"module.{k}": v for k, v in state.items()}, str(bad))
    recipe = _recipe(
        a={"source": "uni", "weights": str(good), "model_kwargs": TINY_UNI},
        b={"source": "uni", "weights": str(bad), "model_kwargs": TINY_UNI},
        c={"source": "uni", "pretrained": False},
    )
    assert [r.teacher for r in preflight(recipe, ["a", "c"])] == ["a (uni)"]
    with pytest.raises(MultiteachError) as err:
        preflight(recipe, ["a", "b", "c"])
    message = str(err.value)
    assert "FAIL: teacher 'b (uni)'" in message and str(bad) in message and "'module.' prefix" in message
    assert "teacher 'a (uni)'" not in message
