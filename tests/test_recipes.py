"""The published recipes: real-size graphs on the meta device, and 2 real training steps with tiny stand-ins."""

import json

import pytest
import torch

from multiteach.build import describe_graph
from multiteach.config import list_builtin, load_recipe
from multiteach.standins import TINY_CONCH, save_timm_folder, tiny_conch_state, tiny_hf_vit, tiny_timm
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD
from multiteach.teachers.catalog_refs import HOPTIMUS_MEAN, HOPTIMUS_STD
from multiteach.train import train

from .engine_fixtures import write_tiles


def test_builtin_recipes_are_listed():
    assert {"h0mini", "g2l", "gpfm", "demo"} <= set(list_builtin())


@pytest.mark.parametrize(
    "name, student, teachers",
    [
        ("h0mini", 85_739_520, {"h-optimus-0": 1_134_774_272}),
        ("g2l", 303_230_976, {"h-optimus-0": 1_134_774_272}),
        ("gpfm", 303_227_904, {"uni": 303_350_784, "phikon": 85_798_656, "conch": 90_392_832}),
    ],
)
def test_real_size_graph_on_meta(name, student, teachers, capsys):
    graph = describe_graph(load_recipe(name))
    print(json.dumps(graph))  # the printed parameter counts
    assert graph["student"]["params"] == student
    assert graph["teachers"] == teachers
    assert graph["loss_total"] > 0


def test_h0mini_heads_and_gpfm_terms():
    h0 = describe_graph(load_recipe("h0mini"))
    assert h0["loss"] == "Loss = 1*dino + 1*ibot"
    # DINO: student head (768->2048->2048->384, 131072 prototypes) + the frozen expert head (1536->...)
    proto = 384 * 131072 + 131072

    def head(d_in: int) -> int:  # MLP d_in->2048->2048->384 (with biases), then the prototypes
        return d_in * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 384 + 384 + proto

    assert h0["loss_terms"]["dino"] == head(768) + head(1536)
    gpfm = describe_graph(load_recipe("gpfm"))
    assert gpfm["loss"] == (
        "Loss = 1*uni.cls + 0.25*uni.patch + 0.5*phikon.cls + 0.125*phikon.patch + 1*conch.cls"
        " + 1*dino + 1*ibot + 0.1*koleo"
    )


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    write_tiles(root / "tiles", n=12)
    m, arch, args = tiny_timm("h-optimus-0")
    save_timm_folder(m, root / "hopt", arch, args, HOPTIMUS_MEAN, HOPTIMUS_STD)
    m, arch, args = tiny_timm("uni")
    save_timm_folder(m, root / "uni", arch, args, IMAGENET_MEAN, IMAGENET_STD)
    tiny_hf_vit("vit").save_pretrained(root / "phikon")
    (root / "conch").mkdir()
    torch.save(tiny_conch_state()[1], root / "conch" / "pytorch_model.bin")
    return root


def tiny(root, run, crops=56):
    return [
        f"data.train={root}/tiles",
        f"output_dir={root}/{run}",
        "optim.batch_size=4",
        "schedule.steps=2",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.precision=no",
        f"data.global_crops.size={crops}",
        f"data.local_crops.size={crops // 2}",
        "data.local_crops.n=2",
        "student.img_size=" + str(crops),
        "student.kwargs.depth=1",
        "student.kwargs.embed_dim=96",
        "student.kwargs.num_heads=2",
    ]


def small_heads(*terms):
    return [
        f"losses.{t}.{k}={v}" for t in terms for k, v in (("out_dim", 64), ("hidden_dim", 32), ("bottleneck_dim", 16))
    ]


def test_h0mini_two_steps_with_stand_ins(standins):
    recipe = load_recipe(
        "h0mini",
        tiny(standins, "h0")
        + small_heads("dino", "ibot")
        + [
            f"teachers.h-optimus-0.weights={standins}/hopt",
            "teachers.h-optimus-0.input_size=56",
            "teachers.h-optimus-0.dtype=float32",
            "losses.dino.fit_tiles=8",
            "losses.dino.fit_steps=3",
            "losses.ibot.fit_tiles=8",
            "losses.ibot.fit_steps=3",
        ],
    )
    run = train(recipe)
    assert json.loads((run / "expert_heads.json").read_text())["fitted"] == ["dino", "ibot"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_g2l_two_steps_with_stand_ins(standins):
    recipe = load_recipe(
        "g2l",
        tiny(standins, "g2l")
        + [
            f"teachers.h-optimus-0.weights={standins}/hopt",
            "teachers.h-optimus-0.input_size=56",
            "student.kwargs.reg_tokens=4",
        ],
    )
    run = train(recipe)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"hopt.cls", "hopt.patch"} <= set(last) and "hopt.cls_l1" not in last


def test_gpfm_two_steps_with_stand_ins(standins):
    conch_kwargs = json.dumps(TINY_CONCH).replace('"', "")
    recipe = load_recipe(
        "gpfm",
        tiny(standins, "gpfm", crops=56)
        + small_heads("dino", "ibot")
        + [
            f"teachers.uni.weights={standins}/uni",
            "teachers.uni.input_size=64",
            "teachers.uni.dtype=float32",
            f"teachers.phikon.weights={standins}/phikon",
            "teachers.phikon.input_size=64",
            f"teachers.conch.weights={standins}/conch",
            "teachers.conch.input_size=64",
            f"teachers.conch.model_kwargs={conch_kwargs}",
            "heads.uni.bottleneck=16",
        ],
    )
    run = train(recipe)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"uni.cls", "uni.patch", "phikon.cls", "phikon.patch", "conch.cls", "dino", "ibot", "koleo"} <= set(last)


def test_patch_grid_mismatch_without_resampling_is_refused(standins):
    from multiteach.errors import MultiteachError

    recipe = load_recipe(
        "gpfm",
        tiny(standins, "gpfm_bad")
        + small_heads("dino", "ibot")
        + [
            f"teachers.uni.weights={standins}/uni",
            "teachers.uni.input_size=48",
            "losses.uni.patch.resample=none",
            "losses.phikon.patch=null",
            "losses.phikon.cls=null",
            "losses.conch.cls=null",
        ],
    )
    with pytest.raises(
        MultiteachError, match=r"losses\.uni\.patch: student grid \(4, 4\).*teacher 'uni' grid \(3, 3\)"
    ):
        train(recipe)
