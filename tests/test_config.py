"""Recipes: layering, dotted overrides, schema errors, round-trip, atomic save, copy-out, and the CLI."""

import os
from pathlib import Path

import pytest
import yaml

from multiteach import config
from multiteach.cli import main
from multiteach.config import Recipe, copy_builtin, list_builtin, load_recipe, save_resolved
from multiteach.errors import MultiteachError

BASE_OPTIM = "optim: {lr: 1.0e-3, batch_size: 64, weight_decay: 0.1}\n"
BASE_MODELS = """\
defaults: [optim.yaml]
optim: {lr: 2.0e-3, batch_size: 128}
student: {arch: vit_small_patch16_224}
teachers: {uni: {}, conch: {dtype: float32}}
losses:
  uni.cls: {type: cosine, teacher: uni, on: summary, weight: 1.0}
  uni.patch: {type: mixed, teacher: uni, on: patch, weight: 0.25}
  conch.cls: {type: cosine, teacher: conch, weight: 1.0}
"""
DEMO = """\
# a built-in recipe
defaults: [_base/models]
optim: {lr: 3e-3}
losses:
  conch.cls: null
train: {precision: no}
"""


@pytest.fixture
def recipes(tmp_path, monkeypatch):
    """A built-in recipes folder: demo.yaml on _base/models.yaml on _base/optim.yaml."""
    root = tmp_path / "builtin"
    (root / "_base").mkdir(parents=True)
    (root / "_base" / "optim.yaml").write_text(BASE_OPTIM)
    (root / "_base" / "models.yaml").write_text(BASE_MODELS)
    (root / "demo.yaml").write_text(DEMO)
    monkeypatch.setattr(config.load, "RECIPES_DIR", root)  # the module that reads it
    return root


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_layering_order_base_then_recipe_then_overrides(recipes):
    recipe = load_recipe("demo")
    assert recipe.name == "demo" and recipe.output_dir == "runs/demo"
    assert recipe.optim.lr == 3e-3  # recipe over both fragments
    assert recipe.optim.batch_size == 128  # later fragment over the one it names
    assert recipe.optim.weight_decay == 0.1  # deepest fragment survives where nobody overrides it
    assert recipe.optim.min_lr == 1e-6  # schema default
    assert "conch.cls" not in recipe.losses  # a null in the recipe removes the base's term
    assert load_recipe("demo", ["optim.lr=4e-3", "optim.lr=5e-3"]).optim.lr == 5e-3  # overrides last, in order


def test_user_recipe_finds_fragments_beside_it_then_builtin(recipes, tmp_path):
    write(tmp_path / "mine" / "_base" / "optim.yaml", "optim: {lr: 7.0e-3}\n")
    mine = write(tmp_path / "mine" / "run.yaml", "defaults: [_base/models, _base/optim.yaml]\nseed: 3\n")
    recipe = load_recipe(mine)
    assert recipe.name == "run" and recipe.seed == 3
    assert recipe.optim.lr == 7e-3  # the fragment beside the recipe, last in the list
    assert recipe.optim.weight_decay == 0.1  # the built-in models fragment and the built-in optim it names


def test_defaults_cycle_and_missing_fragment(tmp_path):
    write(tmp_path / "a.yaml", "defaults: [b]\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(MultiteachError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(MultiteachError, match="defaults entry 'nope' not found"):
        load_recipe(write(tmp_path / "c.yaml", "defaults: [nope]\n"))


def test_dotted_overrides_reach_dotted_term_names(recipes):
    recipe = load_recipe("demo", ["losses.uni.cls.weight=0", "losses.uni.patch.resample=bilinear"])
    assert recipe.losses["uni.cls"]["weight"] == 0
    assert recipe.losses["uni.patch"] == {
        "type": "mixed",
        "teacher": "uni",
        "on": "patch",
        "weight": 0.25,
        "resample": "bilinear",
    }
    assert list(recipe.active_losses()) == ["uni.patch"]


def test_null_removes_and_flow_mapping_adds_a_term(recipes):
    recipe = load_recipe("demo", ["losses.uni.patch=null", "losses.new.term={type: koleo, weight: 0.2}"])
    assert list(recipe.losses) == ["uni.cls", "new.term"]
    assert recipe.losses["new.term"] == {"type": "koleo", "weight": 0.2}
    added = load_recipe("demo", ["teachers.phikon={}", "heads.phikon={kind: mlp}"])
    assert added.teachers["phikon"].source == "phikon" and added.heads == {"phikon": {"kind": "mlp"}}


def test_override_values_are_yaml_typed(recipes):
    recipe = load_recipe(
        "demo",
        [
            "optim.lr=5e-4",
            "optim.betas=[0.8, 0.95]",
            "optim.clip_grad=null",
            "train.compile=true",
            "train.precision=bf16",
            "data.train=/data/tiles",
            "student.kwargs.reg_tokens=4",
            "data.masking.probability=0.3",
        ],
    )
    assert recipe.optim.lr == 5e-4 and isinstance(recipe.optim.lr, float)
    assert recipe.optim.betas == (0.8, 0.95) and recipe.optim.clip_grad is None
    assert recipe.train.compile is True and recipe.train.precision == "bf16"
    assert recipe.data.train == "/data/tiles" and recipe.student.kwargs == {"reg_tokens": 4}
    assert recipe.data.masking == config.MaskingConfig(probability=0.3)  # a null section is created on demand
    assert load_recipe("demo").train.precision == "no"  # YAML 1.2 scalars: `no` is a string, not False
    assert load_recipe("demo").losses["uni.cls"]["on"] == "summary"  # and `on:` is not True


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lrr=0.1"], ["optim.lrr", "Did you mean: lr?"]),
        (["losses.uni.clss.weight=0"], ["losses.uni.clss.weight", "Did you mean: uni.cls"]),
        (["losses.uni.clss=null"], ["losses.uni.clss", "Did you mean: uni.cls"]),
        (["optim.lr="], ["empty value", "optim.lr=null"]),
        (["optim.batch_size=abc"], ["optim.batch_size: expected an integer, got 'abc'"]),
        (["seed=true"], ["seed: expected an integer, got True"]),
        (["optim.betas=[0.9]"], ["optim.betas: expected a list of 2 numbers, got [0.9]"]),
        (["optim.lr=-1"], ["optim.lr: must be positive"]),
        (["optim.grad_accum=0"], ["optim.grad_accum: must be >= 1, got 0"]),
        (["optim.grad_accum=3"], ["optim.batch_size: must be divisible by optim.grad_accum=3, got 128"]),
        (["data.augment.blur_prob=1.5"], ["data.augment.blur_prob: must be in [0, 1], got 1.5"]),
        (["data.global_crops.scale=[0.5, 0.2]"], ["data.global_crops.scale", "0 < low <= high <= 1", "[0.5, 0.2]"]),
        (["schedule.steps=0"], ["schedule.steps: must be positive, got 0"]),
        (["train.precision=fp8"], ["train.precision: 'fp8' is not allowed", "no, bf16, fp16", "Did you mean: fp16?"]),
        (["teachers.uni.dtype=float16"], ["teachers.uni.dtype", "float32, bfloat16"]),
        (["teachers.uni.source=unii"], ["teachers.uni.source: unknown teacher 'unii'", "Did you mean: uni"]),
        (["student.arch=vit_smal_patch16_224"], ["student.arch", "Did you mean: vit_small_patch16_224"]),
        (["losses.uni.cls.teacher=phikon"], ["losses.uni.cls.teacher: teacher 'phikon' is not configured"]),
        (["teachers.uni=null"], ["losses.uni.cls.teacher: teacher 'uni' is not configured", "Configured: conch"]),
        (["heads.unii={kind: mlp}"], ["heads.unii: teacher 'unii' is not configured", "Did you mean: uni?"]),
        (
            ["losses.uni.cls.type=cosin"],
            ["losses.uni.cls.type: unknown loss term type 'cosin'", "Did you mean: cosine"],
        ),
        (["losses.uni.cls.wieght=1"], ["losses.uni.cls.wieght: unknown key for type 'cosine'", "Did you mean: weight"]),
        (["losses.uni.cls.weight=-1"], ["losses.uni.cls.weight: expected a number >= 0", "got -1"]),
    ],
)
def test_errors_name_the_path_the_value_and_the_fix(recipes, overrides, expected):
    with pytest.raises(MultiteachError) as err:
        load_recipe("demo", overrides)
    for text in expected:
        assert text in str(err.value)


def test_schema_errors_in_files(tmp_path):
    student = "student: {arch: vit_small_patch16_224}\n"
    cases = {
        "optim: {lrr: 1.0}\n" + student: ["optim.lrr: unknown key. Did you mean: lr?", "Allowed: lr, min_lr"],
        "seed: 0\n": ["student.arch: required key is missing", "vit_small_patch16_224"],
        "data: [a]\n" + student: ["data: expected a mapping"],
        "losses: {x: {weight: 1}}\n" + student: ["losses.x: missing 'type'", "Known types:"],
    }
    for i, (text, expected) in enumerate(cases.items()):
        with pytest.raises(MultiteachError) as err:
            load_recipe(write(tmp_path / f"r{i}.yaml", text))
        assert all(e in str(err.value) for e in expected), str(err.value)


def test_switched_off_term_may_name_an_absent_teacher(recipes):
    recipe = load_recipe("demo", ["losses.uni.cls.teacher=phikon", "losses.uni.cls.weight=0"])
    assert "uni.cls" in recipe.losses and "uni.cls" not in recipe.active_losses()


def test_check_trainable(recipes):
    with pytest.raises(MultiteachError, match="data.train: required for training"):
        load_recipe("demo").check_trainable()
    load_recipe("demo", ["data.train=[a, b]"]).check_trainable()
    with pytest.raises(MultiteachError, match="no active term"):
        load_recipe("demo", ["data.train=a", "losses={}"]).check_trainable()


def test_resolved_recipe_round_trips(recipes, tmp_path):
    slides = f"data.slides={{source: {tmp_path}, target_mpp: [0.25, 1.0], proportions: [3, 1]}}"
    recipe = load_recipe("demo", [slides, "losses.uni.patch.resample=bilinear"])
    text = recipe.to_yaml()
    again = load_recipe(write(tmp_path / "elsewhere.yaml", text))
    assert again.to_dict() == recipe.to_dict() and again == recipe
    assert recipe.data.slides.target_mpp == [0.25, 1.0] and recipe.data.slides.shares == [0.75, 0.25]
    assert yaml.safe_load(text) == recipe.to_dict()  # plain YAML 1.1 readers see the same (quoted 'no', 'on')
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_save_resolved_is_atomic(recipes, tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "demo"
    path = save_resolved(load_recipe("demo"), run_dir)
    assert path == run_dir / "recipe.yaml" and load_recipe(path).to_dict() == load_recipe("demo").to_dict()
    before = path.read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_resolved(load_recipe("demo", ["seed=7"]), run_dir)
    assert path.read_text() == before and os.listdir(run_dir) == ["recipe.yaml"]  # no temp file left


def test_copy_builtin_copies_fragments_and_refuses_to_overwrite(recipes, tmp_path):
    assert list_builtin() == ["demo"]
    dest = tmp_path / "out" / "demo.yaml"
    written = copy_builtin("demo", dest)
    assert set(written) == {dest, dest.parent / "_base" / "models.yaml", dest.parent / "_base" / "optim.yaml"}
    assert dest.read_text() == DEMO  # copied as is, comments kept
    (recipes / "_base" / "optim.yaml").write_text("optim: {lr: 9.0e-3}\n")  # the copy must not follow the package
    assert load_recipe(dest).optim.weight_decay == 0.1
    with pytest.raises(MultiteachError, match="already exist"):
        copy_builtin("demo", dest)
    assert set(copy_builtin("demo", dest.parent, overwrite=True)) == {dest, dest.parent / "_base" / "optim.yaml"}
    with pytest.raises(MultiteachError, match="Did you mean: demo"):
        copy_builtin("dem", tmp_path / "x.yaml")


def test_unknown_recipe_suggests_builtin(recipes):
    with pytest.raises(MultiteachError, match="no built-in recipe of that name. Did you mean: demo"):
        load_recipe("demoo")


def test_cli_config(recipes, tmp_path, capsys):
    assert main(["config", "demo", "optim.lr=1e-3", "data.train=tiles"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    # a relative path on the command line is made absolute against the current folder
    assert printed["optim"]["lr"] == 1e-3 and printed["data"]["train"] == str(Path.cwd() / "tiles")
    assert printed["name"] == "demo"
    assert main(["config", "demo", "--validate-only"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "OK: demo is valid",
        "  data.train: not set (training needs it, e.g. data.train=/data/tiles, or data.slides.source=SLIDES)",
    ]
    assert main(["config", "demo", "optim.lrr=1"]) == 2
    assert "multiteach config: error: override 'optim.lrr=1'" in capsys.readouterr().err
    assert main(["config", "demo", "--copy-to", str(tmp_path / "c.yaml")]) == 0
    assert (tmp_path / "c.yaml").read_text() == DEMO and "wrote" in capsys.readouterr().out
    assert main(["config", "demo", "--copy-to", str(tmp_path / "c.yaml")]) == 2
    assert "already exist" in capsys.readouterr().err


PATHS_RECIPE = """\
name: paths
data: {train: tiles}
student: {arch: vit_tiny_patch16_224}
teachers: {uni: {weights: ../weights/uni}}
losses:
  uni.cls: {type: cosine, teacher: uni}
"""


@pytest.fixture
def two_folders(tmp_path, monkeypatch):
    """project/recipe.yaml naming relative paths, and another current folder with its own tiles/."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for folder in (project / "tiles", tmp_path / "weights" / "uni", elsewhere / "tiles"):
        folder.mkdir(parents=True)
    (project / "recipe.yaml").write_text(PATHS_RECIPE)
    monkeypatch.chdir(elsewhere)
    return project, elsewhere


def test_relative_paths_in_a_recipe_file_resolve_against_its_folder(two_folders):
    project, elsewhere = two_folders
    recipe = load_recipe(project / "recipe.yaml")
    assert recipe.data.train == str(project / "tiles")  # not elsewhere/tiles, the current folder's
    assert recipe.teachers["uni"].weights == str(project.parent / "weights" / "uni")
    assert config.path_rule(recipe, "data.train") == (
        f"'tiles' in {project / 'recipe.yaml'}, relative to its folder {project}"
    )
    lines = config.check_paths(recipe)
    assert lines[0].startswith(f"data.train: {project / 'tiles'} (folder, exists; 'tiles' in ")
    assert lines[1].startswith(f"teachers.uni.weights: {project.parent / 'weights' / 'uni'} (folder, exists")


def test_relative_paths_on_the_command_line_resolve_against_the_current_folder(two_folders):
    project, elsewhere = two_folders
    recipe = load_recipe(project / "recipe.yaml", ["data.train=[tiles, /abs/list.txt]"])
    assert recipe.data.train == [str(elsewhere / "tiles"), "/abs/list.txt"]
    assert config.path_rule(recipe, "data.train[0]") == (
        f"'tiles' from the command line (data.train=[tiles, /abs/list.txt]), relative to the current folder {elsewhere}"
    )
    assert config.path_rule(recipe, "teachers.uni.weights").endswith(f"relative to its folder {project}")
    with pytest.raises(MultiteachError) as err:  # the second entry does not exist
        config.check_paths(recipe)
    assert str(err.value) == (
        "data.train[1]: /abs/list.txt does not exist (absolute, from the command line "
        "(data.train=[tiles, /abs/list.txt])); expected a tile folder or a list file there"
    )


def test_validate_only_checks_data_and_weights_paths_without_building(two_folders, capsys, monkeypatch):
    import timm

    project, elsewhere = two_folders
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("--validate-only built a model"))
    recipe = str(project / "recipe.yaml")
    assert main(["config", recipe, "--validate-only"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "OK: paths is valid" and out[1].startswith(f"  data.train: {project / 'tiles'} (folder, exists")
    (project / "recipe.yaml").write_text(PATHS_RECIPE.replace("train: tiles", "train: tilez"))
    assert main(["config", recipe, "--validate-only"]) == 2
    assert capsys.readouterr().err == (
        f"multiteach config: error: data.train: {project / 'tilez'} does not exist ('tilez' in {recipe}, relative "
        f"to its folder {project}); expected a tile folder or a list file there\n"
    )
    assert main(["config", recipe, "data.train=tiles", "teachers.uni.weights=w", "--validate-only"]) == 2
    assert f"teachers.uni.weights: {elsewhere / 'w'} does not exist ('w' from the command line" in (
        capsys.readouterr().err
    )


def test_a_retired_key_names_what_replaced_it(recipes, tmp_path):
    with pytest.raises(MultiteachError, match=r"'data.wsi'\. It was replaced by data.slides"):
        load_recipe("demo", ["data.wsi={mpp: 0.5}"])
    text = DEMO + "data: {wsi: {mpp: 0.5}}\n"
    with pytest.raises(MultiteachError, match=r"data.wsi: unknown key\. It was replaced by data.slides"):
        load_recipe(write(tmp_path / "old.yaml", text))
