"""Training from slides (online patching): exact resume, any process split, bad slides in the summary, and the
frozen sample a teacher-feature cache can use. Synthetic pyramidal TIFFs, so no shared data is needed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from multiteach.build import build_components, data_loader, training_source
from multiteach.cli import main
from multiteach.config import load_recipe
from multiteach.data.sources import open_tile_source
from multiteach.train import train

from .engine_fixtures import cli, recipe_yaml, torchrun
from .test_online_patching import THUMB, write_pyramid
from .test_train import final_weights, max_diff


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("openslide", reason="needs openslide-python + openslide-bin (multiteach[wsi])")
    root = tmp_path_factory.mktemp("slides")
    write_pyramid(tifffile, root / "a.tif", "half")
    write_pyramid(tifffile, root / "b.tif", "square")
    return root


def slide_overrides(tmp_path: Path, slides: Path, *extra: str) -> list[str]:
    settings = (
        f"{{source: {slides}, target_mpp: [0.5, 1.0], tile_size: 64, thumb_size: {THUMB}, "
        f"index_dir: {tmp_path / 'index'}, tiles_per_visit: 4, samples_per_epoch: 1000}}"
    )
    return ["data.train=null", f"data.slides={settings}", "data.num_workers=0", *extra]


def slide_recipe(tmp_path: Path, slides: Path, *extra: str, steps: int = 4, batch: int = 32):
    path = recipe_yaml(tmp_path, steps=steps, checkpoint_every=steps, batch=batch)
    return load_recipe(path, slide_overrides(tmp_path, slides, *extra))


def batches(recipe, rank: int, world: int, start: int, n: int) -> list[dict]:
    comps = build_components(recipe)
    loader = data_loader(recipe, training_source(recipe), comps.model.student, rank, world, start)
    return [b for _, b in zip(range(n), loader)]


def by_image(batch: dict, key: str, n_crops: int) -> torch.Tensor:
    """Crop-major (n_crops * B, ...) -> (B, n_crops, ...): image-major, so halves of a batch can be joined."""
    x = batch[key]
    return x.reshape(n_crops, x.shape[0] // n_crops, *x.shape[1:]).transpose(0, 1)


def test_resumed_and_split_runs_read_the_same_tiles_from_slides(tmp_path, slides):
    recipe = slide_recipe(tmp_path, slides)
    whole = batches(recipe, 0, 1, 0, 3)
    resumed = batches(recipe, 0, 1, 2, 1)  # a run stopped after step 2 and resumed
    assert torch.equal(resumed[0]["global"], whole[2]["global"]) and torch.equal(resumed[0]["local"], whole[2]["local"])
    halves = [batches(recipe, r, 2, 0, 3) for r in (0, 1)]  # 2 processes x 16 = 1 x 32
    for step in range(3):
        for key, n in (("global", 2), ("local", 2), ("masks", 2)):
            joined = torch.cat([by_image(halves[r][step], key, n) for r in (0, 1)])
            assert torch.equal(joined, by_image(whole[step], key, n)), (step, key)
    assert not torch.equal(whole[0]["global"], whole[1]["global"])  # the stream moves on


def test_training_from_slides_lists_a_corrupt_slide_and_runs_with_workers(tmp_path, slides):
    folder = tmp_path / "with_bad"
    folder.mkdir()
    for s in slides.iterdir():
        (folder / s.name).symlink_to(s)
    (folder / "corrupt.svs").write_bytes(b"II*\x00 not really a slide" * 100)
    path = recipe_yaml(tmp_path, steps=2, checkpoint_every=2, batch=8)
    extra = slide_overrides(tmp_path, folder, "data.num_workers=2", "data.slides.open_per_worker=1")
    assert main(["train", str(path), *extra]) == 0  # the command line, as a user runs it
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["skipped_tiles"] == 1
    assert summary["skipped"][0]["what"] == str(folder / "corrupt.svs")
    data = json.loads((run / "data.json").read_text())
    assert data["kind"] == "slides" and data["slides"] == 2 and data["target_mpp"] == [0.5, 1.0]
    assert sorted(p.name for p in folder.iterdir()) == ["a.tif", "b.tif", "corrupt.svs"]  # nothing written there


def test_a_frozen_sample_of_the_stream_is_a_cacheable_coordinate_list(tmp_path, slides, capsys):
    recipe = slide_recipe(tmp_path, slides)
    out = tmp_path / "coords.csv"
    args = ["data", "sample", str(tmp_path / "recipe.yaml"), "data.train=null", f"data.slides.source={slides}",
            "data.slides.target_mpp=[0.5,1.0]", "data.slides.tile_size=64", f"data.slides.thumb_size={THUMB}",
            f"data.slides.index_dir={tmp_path / 'index'}", "data.slides.tiles_per_visit=4", "--tiles", "200",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0 and "200 tile position(s) from 2 slide(s)" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    stream = training_source(recipe)
    draws = [stream.draw(i, 0) for i in range(200)]
    assert [(r["slide"], int(r["x"]), int(r["y"]), float(r["target_mpp"])) for r in rows] == [
        (d.slide, d.x, d.y, d.target_mpp) for d in draws
    ]
    frozen = open_tile_source([out], ["png"])
    keys = frozen.paths
    assert len(keys) == 200 and keys[0] == f"{draws[0].slide}@{draws[0].x},{draws[0].y}@{draws[0].target_mpp:g}"
    same = [abs(frozen.read(i, 0).image.size[0] - 64) for i in (0, 199)]
    assert same == [0, 0]
    no_slides = ["data", "sample", str(tmp_path / "recipe.yaml"), "--tiles", "4", "--out", str(tmp_path / "x.csv")]
    assert main(no_slides) == 2 and "data.slides is not set" in capsys.readouterr().err
    cache = tmp_path / "cache"  # the frozen sample feeds a teacher-feature cache, and training reads from it
    frozen_run = [str(tmp_path / "recipe.yaml"), f"data.train={out}", "data.augment.hed=null",
                  f"cache={{dir: {cache}, shard_tiles: 100, views_per_tile: 1}}", "schedule.steps=2",
                  "data.num_workers=0"]  # fmt: skip
    assert main(["cache", *frozen_run]) == 0
    assert "rows: 64 tile views of 64 tiles (1 views per tile)" in capsys.readouterr().out  # 2 steps x 32 tiles
    run = train(load_recipe(frozen_run[0], frozen_run[1:]))
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_two_processes_train_from_slides_as_one_and_share_one_index(tmp_path, slides):
    path = recipe_yaml(tmp_path, steps=4, checkpoint_every=4, batch=8)
    over = slide_overrides(tmp_path, slides, "data.num_workers=1")
    two = cli("train", str(path), *over, f"output_dir={tmp_path}/two", launcher=torchrun(2))
    assert two.returncode == 0, two.stderr[-3000:]
    one = cli("train", str(path), *over, f"output_dir={tmp_path}/one")
    assert one.returncode == 0, one.stderr[-3000:]
    assert max_diff(final_weights(tmp_path / "one", 4), final_weights(tmp_path / "two", 4)) < 1e-5
    index = [json.loads((tmp_path / r / "data.json").read_text())["index"] for r in ("two", "one")]
    assert (index[0]["built"], index[1]["built"], index[1]["reused"]) == (2, 0, 2)
    assert two.stderr.count("tissue index:   0%") == 1  # one process built it; the other loaded it warm (no bar)
