"""End-to-end evaluation (``multiteach eval``): model resolution, embedding, kNN/probe, robustness, fidelity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer, ErrorbarContainer
from safetensors.torch import save_file

from multiteach.build import build_components, build_teachers
from multiteach.checkpoint import latest_checkpoint, load_checkpoint
from multiteach.cli import main
from multiteach.config import load_recipe
from multiteach.errors import MultiteachError
from multiteach.eval import evaluate, report, resolve_model, teacher_fidelity
from multiteach.eval.embed import embed_folder, load_images
from multiteach.eval.fidelity import projection_loss
from multiteach.eval.run import load_labelled
from multiteach.losses import LossContext
from multiteach.losses.feature import resample_grid
from multiteach.runs import load_run_student
from multiteach.standins import timm_config
from multiteach.students import build_student
from multiteach.teachers import build_teacher
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD
from multiteach.train import train

from .engine_fixtures import recipe_yaml, write_tiles

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TCGA = SHARED_DATA / "labeled" / "tcga_luad_lusc_uni"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained run (6 steps, ViT-Ti/2-block student, UNI-family stand-in) and a labelled folder.

    The labelled folder has two classes of 20 smooth colour-field tiles in 5 groups each, listed in a
    labels.csv with a ``group`` column, so the CV path is group-aware.
    """
    root = tmp_path_factory.mktemp("tiny")
    run_dir = train(load_recipe(recipe_yaml(root)))
    data = root / "labelled"
    lines = ["file,label,group"]
    for c, name in enumerate(("alpha", "beta")):
        write_tiles(data / name, n=20, size=48, seed=10 + c)
        lines += [f"{name}/tile_{i:03d}.png,{name},{name}_g{i % 5}" for i in range(20)]
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "run": Path(run_dir), "uni": root / "uni", "data": data, "tiles": root / "tiles"}


@pytest.fixture()
def tcga() -> Path:
    if not TCGA.is_dir():
        pytest.skip(f"needs the real H&E tiles in {TCGA} (../shared/data beside the repository)")
    return TCGA


# --------------------------------------------------------------------------- real data, random ViT-S
def test_random_vit_tiny_on_tcga_is_reproducible(tcga, tmp_path):
    """kNN + probe for a random-init ViT-Ti/16 at 224 px on the 190 TCGA tiles: same numbers twice.

    Its speed (goal: under a minute on 2 CPU cores) is measured by benchmarks/eval_speed.py, not here.
    """
    first = evaluate(["vit_tiny_patch16_224"], tcga, pretrained=False, seed=0, out_dir=tmp_path / "a")
    second = evaluate(["vit_tiny_patch16_224"], tcga, pretrained=False, seed=0, out_dir=tmp_path / "b")
    assert first["metrics"] == second["metrics"]
    assert first["probe"] == second["probe"]

    p = first["protocol"]
    assert (p["mode"], p["n_train"], p["n_test"], p["classes"]) == ("train/test", 130, 60, ["LUAD", "LUSC"])
    assert p["groups"] == "labels.csv:group" and p["groups_shared_by_train_and_test"] == 0  # slide-disjoint
    row = first["metrics"]["vit_tiny_patch16_224"]
    assert set(row) == {"knn_bacc", "knn_f1", "linear_bacc", "linear_f1"}
    assert all(0.0 <= v <= 1.0 for v in row.values())
    info = first["models"]["vit_tiny_patch16_224"]
    assert (info["kind"], info["input_size"], info["dim"], info["pretrained"]) == ("teacher", 224, 192, False)
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    assert on_disk["metrics"] == first["metrics"]
    assert "| vit_tiny_patch16_224 |" in (tmp_path / "a" / "results.md").read_text()
    assert not (tmp_path / "a" / "comparison.png").exists()  # one model: no chart


# --------------------------------------------------------------------------- trained run vs its teacher
def test_run_dir_and_teacher_standin_end_to_end(tiny, tmp_path, monkeypatch):
    """A run directory and its teacher stand-in side by side: files, CV with groups, robustness, fidelity."""
    figures = []

    def keep(*args, **kwargs):
        figures.append(draw(*args, **kwargs))
        return figures[-1]

    draw = report.comparison_figure
    monkeypatch.setattr(report, "comparison_figure", keep)
    out = tmp_path / "out"
    result = evaluate(
        [str(tiny["run"]), "uni"],
        tiny["data"],
        weights={"uni": str(tiny["uni"])},
        robustness_images=tiny["tiles"],
        max_images=8,
        batch_size=16,
        probe_c=1.0,  # the C search is covered on TCGA above; a fixed C keeps this test short
        out_dir=out,
    )
    for name in ("results.json", "results.md", "comparison.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(result["files"]) == ["chart", "json", "markdown"]

    p = result["protocol"]
    assert (p["mode"], p["n_splits"], p["groups"]) == ("cv", 5, "labels.csv:group")
    assert p["robustness"]["n_images"] == 8 and p["robustness"]["ks"] == [1, 3, 5, 10]
    assert set(result["models"]) == {"run", "uni"}
    assert result["models"]["run"]["kind"] == "run" and result["models"]["run"]["input_size"] == 64
    assert result["models"]["run"]["weights"] == "ema"
    assert result["models"]["uni"]["kind"] == "teacher"

    for model in ("run", "uni"):
        row = result["metrics"][model]
        for key in ("knn_bacc", "knn_f1", "linear_bacc", "linear_f1"):
            assert 0.0 <= row[key]["mean"] <= 1.0 and row[key]["std"] >= 0.0
        assert -1.0 <= row["robust_cosine"] <= 1.0 and 0.0 <= row["robust_top1"] <= 1.0
        assert len(result["robustness"][model]) == 8
        # RI with the perturbations as sites, on labelled images: in [0, 1], from croma
        assert 0.0 <= row["robust_ri"] <= 1.0 and row["robust_ri"] == result["robustness_index"][model]["ri"]

    fid = result["fidelity"]
    assert set(fid) == {"run"}  # teachers have no heads to measure
    assert set(fid["run"]) == {"uni"} and set(fid["run"]["uni"]) == FIDELITY_KEYS
    for value in fid["run"]["uni"].values():
        assert -1.0 <= value <= 1.0
    # the table shows the centred measures, which a constant teacher cannot pass
    assert result["metrics"]["run"]["fidelity_uni_summary"] == fid["run"]["uni"]["summary_centred_cosine"]
    assert result["metrics"]["run"]["fidelity_uni_cka"] == fid["run"]["uni"]["summary_cka"]
    md = (out / "results.md").read_text()
    assert "fidelity_uni_patch" in md and "| uni |" in md and "Matched cosine per perturbation" in md

    # comparison.png: a panel per metric family, the run highlighted, whiskers only on the CV scores
    (fig,) = figures
    assert fig.get_suptitle() == "multiteach eval on labelled: 5-fold CV (40 images)\nrun (student) vs uni"
    knn, robust, fidelity = fig.axes
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == ["kNN", "robustness", "fidelity"]
    bars = {ax: [p for c in ax.containers if isinstance(c, BarContainer) for p in c.patches] for ax in fig.axes}
    whiskers = {ax: [c for c in ax.containers if isinstance(c, ErrorbarContainer)] for ax in fig.axes}
    assert len(bars[knn]) == len(whiskers[knn]) == 8  # 4 CV scores x 2 models
    assert len(bars[robust]) == 12 and whiskers[robust] == []  # cosine + 4 top-k + RI, single values
    assert len(bars[fidelity]) == 3 and whiskers[fidelity] == []  # the run's 3 measures; uni has none
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run (student)", "uni"]


FIDELITY_KEYS = {
    "summary_cosine",
    "summary_centred_cosine",
    "summary_cka",
    "summary_teacher_spread",
    "patch_cosine",
    "patch_centred_cosine",
    "patch_teacher_spread",
}


def test_fidelity_matches_the_training_loss(tiny):
    """summary_cosine equals 1 - the run's own cosine term on the same batch; patch the head's cosine."""
    recipe = load_recipe(tiny["run"] / "recipe.yaml")
    comps = build_components(recipe)
    load_checkpoint(latest_checkpoint(tiny["run"]), comps.model, None, None)
    model = comps.model.eval()
    x = load_images(sorted(tiny["tiles"].glob("*.png"))[:6], size=64)
    with torch.inference_mode():
        s_out = model.embed(x)
        t_out = comps.teachers["uni"](x)
        ctx = LossContext(student_global=s_out, teachers={"uni": t_out}, heads=model.loss.heads)
        term_value = float(model.loss.term("uni.cls")(ctx))
        patch = model.loss.heads("uni", "patch", s_out.patch_tokens)
        patch_cos = float(torch.nn.functional.cosine_similarity(patch, t_out.patch_tokens, dim=-1).mean())
    fid = teacher_fidelity(tiny["run"], x, use_ema=False, teachers=comps.teachers)
    assert fid["uni"]["summary_cosine"] == pytest.approx(1.0 - term_value, abs=1e-5)
    assert fid["uni"]["patch_cosine"] == pytest.approx(patch_cos, abs=1e-5)
    ema = teacher_fidelity(tiny["run"], sorted(tiny["tiles"].glob("*.png"))[:6])  # EMA heads, teacher from recipe
    assert set(ema["uni"]) == FIDELITY_KEYS

    # A teacher at 96 px has a 6 x 6 grid; as in training (resample_to: student) it is resampled to 4 x 4.
    big = build_teacher("uni", weights=str(tiny["uni"]), input_size=96)
    with torch.inference_mode():
        t_big = big(x)
        resampled = resample_grid(t_big.patch_tokens, t_big.grid, s_out.grid, mode="bicubic")
        expected = torch.nn.functional.cosine_similarity(patch, resampled, dim=-1).mean()
    fid_big = teacher_fidelity(tiny["run"], x, use_ema=False, teachers={"uni": big})
    assert t_big.grid == (6, 6) and fid_big["uni"]["patch_cosine"] == pytest.approx(float(expected), abs=1e-5)


def test_fidelity_maps_standardised_heads_back(tmp_path):
    """A head trained on standardised targets is compared after the term's standardiser ``inverse``."""
    path = recipe_yaml(tmp_path, steps=3, checkpoint_every=3)
    run_dir = train(load_recipe(path, ["losses.uni.cls.standardize=running"]))
    run = load_run_student(run_dir, use_ema=False)
    teachers = build_teachers(run.recipe, ["uni"])
    loss = projection_loss(run, teachers)
    standardizer = loss.term("uni.cls").standardizer
    assert int(standardizer.count) > 0  # restored from the checkpoint, not the identity it starts as
    assert torch.equal(standardizer.mean, run.state["loss.terms.uni__cls.standardizer.mean"])

    x = load_images(sorted((tmp_path / "tiles").glob("*.png"))[:4], size=64)
    fid = teacher_fidelity(run, x, teachers=teachers)
    with torch.inference_mode():
        s = run.student(
            (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        )
        projected = standardizer.inverse(loss.heads("uni", "summary", s.summary))
        expected = torch.nn.functional.cosine_similarity(projected, teachers["uni"](x).summary, dim=-1).mean()
    assert fid["uni"]["summary_cosine"] == pytest.approx(float(expected), abs=1e-5)


def test_three_model_kinds_embed_consistently(tiny, tmp_path):
    """A run, a timm folder exported from it, and a teacher name + weights: each with its own preprocessing."""
    run_emb = resolve_model(str(tiny["run"]), use_ema=False)
    student = run_emb.run.student
    export = tmp_path / "export"
    export.mkdir()
    recipe = run_emb.run.recipe
    cfg = timm_config(
        student.arch,
        {k: v for k, v in student.model_kwargs.items() if k != "num_classes"},
        student.embed_dim,
        tuple(recipe.student.mean),
        tuple(recipe.student.std),
        recipe.student.img_size,
    )
    cfg["multiteach"] = {"layer_kwargs": {}}
    (export / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(tiny["run"] / "recipe.yaml", export / "recipe.yaml")  # exports carry it; no checkpoints/
    save_file({k: v.contiguous() for k, v in student.model.state_dict().items()}, str(export / "model.safetensors"))
    export_emb = resolve_model(str(export))
    assert (export_emb.kind, export_emb.input_size, export_emb.dim) == ("export", 64, student.embed_dim)

    paths = sorted(tiny["tiles"].glob("*.png"))[:5]
    a = embed_folder(run_emb, paths, batch_size=2)
    b = embed_folder(export_emb, paths, batch_size=4)
    assert a.dtype == np.float32 and a.shape == (5, student.embed_dim)
    np.testing.assert_allclose(a, b, atol=1e-5)
    x = load_images(paths, size=80)
    assert run_emb.patch_tokens(x).shape == (5, 16, student.embed_dim)  # 64 px / 16 = 4 x 4 grid

    # SwiGLU students: the layer classes JSON cannot hold come from the config's multiteach section.
    swiglu = build_student("vit_small_patch16_224", img_size=32, depth=1, mlp_layer="swiglu_packed", act_layer="silu")
    folder2 = tmp_path / "swiglu"
    folder2.mkdir()
    cfg = timm_config(swiglu.arch, swiglu.model_kwargs, swiglu.embed_dim, (0.5,) * 3, (0.25,) * 3, 32)
    cfg["multiteach"] = {"layer_kwargs": {"mlp_layer": "swiglu_packed", "act_layer": "silu"}}
    (folder2 / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in swiglu.model.state_dict().items()}, str(folder2 / "model.safetensors"))
    loaded = resolve_model(str(folder2))
    img = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = swiglu.eval()((img - 0.5) / 0.25).summary
    torch.testing.assert_close(loaded(img), expected, atol=1e-5, rtol=1e-5)

    named = resolve_model("uni", weights=str(tiny["uni"]))
    folder = resolve_model(str(tiny["uni"]))  # the stand-in is itself a timm folder
    assert (named.kind, folder.kind) == ("teacher", "export")
    np.testing.assert_allclose(embed_folder(named, paths), embed_folder(folder, paths), atol=1e-5)


def test_cli_prints_the_table(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["eval", str(tiny["run"]), "--data", str(tiny["data"]), "--out", str(out), "--k", "5"]
    code = main([*args, "--live", "--probe-c", "1", "--no-fidelity"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| model | knn_bacc |" in printed and "| run |" in printed
    assert str(out / "results.json") in printed
    result = json.loads((out / "results.json").read_text())
    assert result["protocol"]["knn"]["k"] == 5 and result["protocol"]["linear_probe"].endswith("C=1")
    assert result["models"]["run"]["weights"] == "live" and result["fidelity"] == {}
    assert main([*args, "--probe-c", "zero"]) == 2
    assert "--probe-c: expected 'auto' or a positive number" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input
def test_labelled_folder_with_one_class(tiny, tmp_path):
    one = tmp_path / "one"
    write_tiles(one / "only", n=6, size=32)
    with pytest.raises(MultiteachError, match="at least 2 class sub-folders"):
        evaluate([str(tiny["run"])], one, out_dir=tmp_path / "o")
    split = tmp_path / "split"
    write_tiles(split / "train" / "a", n=4, size=32)
    write_tiles(split / "train" / "b", n=4, size=32)
    write_tiles(split / "test" / "c", n=2, size=32)
    write_tiles(split / "test" / "a", n=2, size=32)
    with pytest.raises(MultiteachError, match="class\\(es\\) c"):
        load_labelled(split)


def test_folders_with_no_images(tiny, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(MultiteachError, match="No images found"):
        evaluate([str(tiny["run"])], tiny["data"], robustness_images=empty, out_dir=tmp_path / "o")
    with pytest.raises(MultiteachError, match="No images found"):
        evaluate([str(tiny["run"])], empty, out_dir=tmp_path / "o")
    with pytest.raises(MultiteachError, match="does not exist"):
        evaluate([str(tiny["run"])], tmp_path / "missing", out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_model_that_is_not_a_catalog_name_or_a_path(tiny, tmp_path, capsys):
    with pytest.raises(MultiteachError) as err:
        resolve_model("unii")
    msg = str(err.value)
    assert "'unii'" in msg and "Did you mean: uni" in msg
    for kind in ("run directory", "exported student folder", "catalog name", "timm model name", "hf-hub:"):
        assert kind in msg

    with pytest.raises(MultiteachError, match="no folder"):
        resolve_model(str(tmp_path / "nowhere" / "run"))
    with pytest.raises(MultiteachError, match="is a file"):
        resolve_model(str(tiny["uni"] / "model.safetensors"))
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    (not_a_model / "x.txt").write_text("")
    with pytest.raises(MultiteachError, match="neither a run directory .* nor an exported student"):
        resolve_model(str(not_a_model))

    code = main(["eval", "definitely-not-a-model", "--data", str(tiny["data"]), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "is not a run directory, an exported student or a teacher name" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_options_that_do_not_fit(tiny, tmp_path):
    with pytest.raises(MultiteachError, match="weights= applies to teacher names only"):
        resolve_model(str(tiny["run"]), weights="/x")
    with pytest.raises(MultiteachError, match="MODEL=PATH"):
        evaluate(["uni", "vit_small_patch16_224"], tiny["data"], weights="/x", out_dir=tmp_path / "o")
    with pytest.raises(MultiteachError, match="not one of the teacher models"):
        evaluate([str(tiny["run"])], tiny["data"], weights={"conch": "/x"}, out_dir=tmp_path / "o")
    with pytest.raises(MultiteachError, match="groups='patient'"):
        evaluate([str(tiny["run"])], tiny["data"], groups="patient", out_dir=tmp_path / "o")
