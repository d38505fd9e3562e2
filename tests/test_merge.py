"""``multiteach merge``: weight-space interpolation of two students (WiSE-FT) written as a normal export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from multiteach.cli import main
from multiteach.config import load_recipe
from multiteach.errors import MultiteachError
from multiteach.publish import MergeWarning, export_run, interpolate_state, load_heads, merge_students
from multiteach.train import train

from .engine_fixtures import recipe_yaml


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> tuple[Path, Path]:
    """Exports of two 2-step runs of one recipe, seeds 0 and 1 (the same architecture, different weights)."""
    root = tmp_path_factory.mktemp("merge")
    path = recipe_yaml(root, steps=2, checkpoint_every=2)
    out = []
    for seed in (0, 1):
        run = train(load_recipe(path, [f"seed={seed}", f"output_dir={root / f'run{seed}'}"]))
        out.append(export_run(run, root / f"export{seed}"))
    return out[0], out[1]


def _backbone(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe, -0.0 vs 0.0 told apart)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))
    )


def test_interpolate_state_endpoints_mean_and_integer_tensors():
    torch.manual_seed(0)
    a = {"w": torch.randn(5, 3), "b": torch.randn(3), "n": torch.tensor([1, 2])}
    b = {"w": torch.randn(5, 3), "b": torch.randn(3), "n": torch.tensor([7, 8])}
    assert all(_bits_equal(v, a[k]) for k, v in interpolate_state(a, b, 0.0).items())
    assert all(_bits_equal(v, b[k]) for k, v in interpolate_state(a, b, 1).items())
    half = interpolate_state(a, b, 0.5)
    assert _bits_equal(half["w"], (a["w"] + b["w"]) / 2) and _bits_equal(half["b"], (a["b"] + b["b"]) / 2)
    assert half["n"].tolist() == [1, 2]  # integers come from the nearer parent
    assert interpolate_state(a, b, 0.75)["n"].tolist() == [7, 8]
    assert torch.allclose(interpolate_state(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "half"])
def test_alpha_outside_the_unit_interval_is_refused(alpha):
    x = {"w": torch.zeros(2)}
    with pytest.raises(MultiteachError, match=r"alpha must be a number in \[0, 1\]"):
        interpolate_state(x, x, alpha)


def test_merge_endpoints_reproduce_the_parents_bit_for_bit(parents, tmp_path):
    for alpha, parent in ((0.0, parents[0]), (1.0, parents[1])):
        out = merge_students(parents[0], parents[1], alpha, tmp_path / f"m{alpha}")
        merged, original = _backbone(out), _backbone(parent)
        assert merged.keys() == original.keys()
        assert all(_bits_equal(merged[k], original[k]) for k in original)
        heads, original_heads = load_heads(out), load_heads(parent)
        assert heads.keys() == original_heads.keys() and len(heads) > 1
        assert all(_bits_equal(heads[k], original_heads[k]) for k in original_heads)
    assert not _bits_equal(*(_backbone(p)["blocks.0.attn.qkv.weight"] for p in parents))  # the parents differ


def test_cli_merge_at_half_is_the_mean_loads_in_plain_timm_and_names_both_parents(parents, tmp_path, capsys):
    out = tmp_path / "half"
    assert main(["merge", str(parents[0]), str(parents[1]), "--alpha", "0.5", "--out", str(out)]) == 0
    assert "merged (alpha 0.5)" in capsys.readouterr().out
    a, b, merged = _backbone(parents[0]), _backbone(parents[1]), _backbone(out)
    assert all(_bits_equal(merged[k], (a[k] + b[k]) / 2) for k in a)
    ha, hb, heads = load_heads(parents[0]), load_heads(parents[1]), load_heads(out)
    assert all(_bits_equal(heads[k], (ha[k] + hb[k]) / 2) for k in ha if ha[k].is_floating_point())
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()  # plain timm
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, merged[name]), name
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 192)
    config = json.loads((out / "config.json").read_text())
    assert config["multiteach"]["merge"]["alpha"] == 0.5 and config["multiteach"]["weights"] == "merged"
    assert [p["source"] for p in config["multiteach"]["merge"]["parents"]] == ["export0", "export1"]
    card = (out / "README.md").read_text()
    assert "# merge of tiny and tiny (alpha 0.5)" in card and "## Merged parents" in card
    assert "`export0`" in card and "`export1`" in card and "alpha = 0.5" in card
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "tiny"


def test_different_architectures_are_refused_naming_the_first_tensor(parents, tmp_path):
    deeper = tmp_path / "deeper"
    shutil.copytree(parents[1], deeper)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(deeper / "model.safetensors"))
    refused = r"different architectures: tensor 'blocks\.2\.[a-z.]+' \(192,?\) is in the second student only"
    with pytest.raises(MultiteachError, match=refused):
        merge_students(parents[0], deeper, 0.5, tmp_path / "no")
    assert not (tmp_path / "no").exists()
    wider = tmp_path / "wider"
    shutil.copytree(parents[1], wider)
    model = timm.create_model("vit_small_patch16_224", img_size=64, depth=2, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wider / "model.safetensors"))
    assert main(["merge", str(parents[0]), str(wider), "--alpha", "0.5", "--out", str(tmp_path / "no")]) == 2


def test_different_recipes_of_one_architecture_merge_with_a_warning_naming_the_differences(parents, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(parents[1], other)
    recipe = yaml.safe_load((other / "recipe.yaml").read_text())
    recipe["data"]["global_crops"]["size"] = 96
    recipe["teachers"]["virchow"] = dict(recipe["teachers"]["uni"])
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.warns(MergeWarning, match=r"differ in: .*data\.global_crops\.size: 64 vs 96.*teachers\.virchow"):
        out = merge_students(parents[0], other, 0.25, tmp_path / "warned")
    card = (out / "README.md").read_text()
    assert "`data.global_crops.size: 64 vs 96`" in card
    assert json.loads((out / "config.json").read_text())["multiteach"]["merge"]["differences"]


def test_bad_cli_input_names_the_allowed_range_and_what_a_parent_must_be(parents, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["merge", str(parents[0]), str(parents[1]), "--alpha", "1.5", "--out", out]) == 2
    assert "alpha must be a number in [0, 1]" in capsys.readouterr().err
    assert main(["merge", str(parents[0]), str(tmp_path), "--alpha", "0.5", "--out", out]) == 2
    assert "neither an export" in capsys.readouterr().err
