"""Code from the Hub is opt-in: a Hibou recipe without `trust_remote_code: true` is refused with the reason, and
runs no repo code; with it, the stand-in loads through its own repo code (as the real Hibou does)."""

import json
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from multiteach.build import build_teachers
from multiteach.config import load_recipe
from multiteach.errors import MultiteachError
from multiteach.teachers import CATALOG
from multiteach.teachers.catalog_refs import HIBOU_MEAN, HIBOU_STD

from .teacher_helpers import images, normalise

# Stand-ins for the two Python files histai/hibou-b ships (config.json maps AutoConfig/AutoModel to them).
CONFIGURATION = """
from transformers import Dinov2WithRegistersConfig


class Dinov2Config(Dinov2WithRegistersConfig):
    model_type = "dinov2"
"""
MODELING = """
from transformers import Dinov2WithRegistersModel

from .configuration_dinov2 import Dinov2Config

RAN_FROM_REPO = True


class Dinov2ModelWithRegisters(Dinov2WithRegistersModel):
    config_class = Dinov2Config
"""


@pytest.fixture(scope="module")
def hibou_repo(tmp_path_factory):
    """A tiny Hibou-like repo folder: config.json with auto_map + the two code files + model.safetensors."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    folder = tmp_path_factory.mktemp("hibou_standin")
    kwargs = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 14}
    config = Dinov2WithRegistersConfig(image_size=224, num_register_tokens=4, use_swiglu_ffn=True, **kwargs)
    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(config).eval()
    config.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(
        model_type="dinov2",
        architectures=["Dinov2ModelWithRegisters"],
        auto_map={
            "AutoConfig": "configuration_dinov2.Dinov2Config",
            "AutoModel": "modeling_dinov2.Dinov2ModelWithRegisters",
        },
    )
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    (folder / "configuration_dinov2.py").write_text(CONFIGURATION)
    (folder / "modeling_dinov2.py").write_text(MODELING)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder, model


def write_recipe(tmp_path, weights) -> str:
    recipe = {
        "name": "hibou_opt_in",
        "student": {"arch": "vit_tiny_patch16_224", "img_size": 112},
        "teachers": {"hibou": {"source": "hibou-b", "weights": str(weights), "dtype": "float32"}},
        "heads": {"hibou": {"kind": "mlp"}},
        "losses": {"hibou.cls": {"type": "cosine", "teacher": "hibou"}},
    }
    path = tmp_path / "hibou.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _repo_modules():
    return [m for m in sys.modules if m.endswith("modeling_dinov2") and "transformers_modules" in m]


def test_catalog_marks_hibou_as_remote_code_and_pins_what_it_knows():
    assert CATALOG.get("hibou-b").remote_code and CATALOG.get("hibou-l").remote_code
    assert CATALOG.get("hibou-b").revision == "7fdc8cce365ebfd9e7e60ee6ee9a8d4d59388f3c"
    assert CATALOG.get("hibou-l").revision is None and CATALOG.get("hibou-l").unverified  # and says why
    assert "trust_remote_code" not in CATALOG.get("hibou-b").model_kwargs  # never switched on by the catalog


def test_hibou_recipe_without_opt_in_is_refused_with_the_reason(tmp_path, hibou_repo):
    folder, _ = hibou_repo
    recipe = load_recipe(write_recipe(tmp_path, folder))
    assert recipe.teachers["hibou"].trust_remote_code is False
    with pytest.raises(MultiteachError) as err:
        build_teachers(recipe, ["hibou"])
    message = str(err.value)
    assert message.startswith("teachers.hibou: teacher 'hibou-b'")
    assert "needs trust_remote_code" in message and "(configuration_dinov2.py, modeling_dinov2.py)" in message
    assert "`trust_remote_code: true`" in message and "teachers.<name>.trust_remote_code=true" in message
    assert not _repo_modules()  # nothing from the repo was imported


def test_hibou_recipe_with_opt_in_loads_through_the_repo_code(tmp_path, hibou_repo):
    folder, model = hibou_repo
    recipe = load_recipe(write_recipe(tmp_path, folder), ["teachers.hibou.trust_remote_code=true"])
    teacher = build_teachers(recipe, ["hibou"])["hibou"]
    loaded = teacher.backbone.model
    assert type(loaded).__name__ == "Dinov2ModelWithRegisters"
    assert sys.modules[type(loaded).__module__].RAN_FROM_REPO
    x = images()
    out = teacher(x)
    with torch.inference_mode():
        ref = model(pixel_values=normalise(x, HIBOU_MEAN, HIBOU_STD)).last_hidden_state
    assert out.grid == (16, 16)
    torch.testing.assert_close(out.summary, ref[:, 0])
    torch.testing.assert_close(out.patch_tokens, ref[:, 5:])


def test_check_refuses_remote_code_without_the_flag(hibou_repo, capsys):
    from multiteach.cli import main
    from multiteach.teachers import resolve_spec
    from multiteach.teachers.doctor import check_weights

    folder, _ = hibou_repo
    assert main(["teachers", "--check", "hibou-b", "--weights", str(folder)]) == 2
    assert "needs trust_remote_code" in capsys.readouterr().out
    main(["teachers", "--check", "hibou-b", "--weights", str(folder), "--trust-remote-code"])
    assert "needs trust_remote_code" not in capsys.readouterr().out  # (the tiny stand-in is not hibou-b-sized)
    tiny = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 14}
    spec = resolve_spec("hibou-b", model_kwargs={**tiny, "num_register_tokens": 4, "use_swiglu_ffn": True})
    assert check_weights(spec, folder, trust_remote_code=True).ok
