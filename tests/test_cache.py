"""The teacher-feature cache: exact targets, training from it, stale caches refused, resumable and
rank-split writing."""

import json
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

import multiteach.build
import multiteach.cache.key
import multiteach.train
from multiteach.build import build_teachers, multicrop_transform, training_source
from multiteach.cache import (
    FeatureCache,
    cache_key,
    cache_view_params,
    merge_index,
    open_cache,
    pool_patch_tokens,
    write_cache,
)
from multiteach.cli import main
from multiteach.config import load_recipe
from multiteach.data.loader import SeededMultiCrop, cached_view
from multiteach.data.views.multicrop import apply_view, collate_multicrop
from multiteach.errors import MultiteachError
from multiteach.standins import save_timm_folder, tiny_timm
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD
from multiteach.train import train

from .engine_fixtures import recipe_yaml, write_tiles

PLAIN = ["data.augment.hed=null", "data.augment.color_jitter=null"]  # faster views where replay is not the point


def cached_recipe(root, cache="", steps=2):
    """The tiny engine recipe on 12 tiles with a ``cache:`` section (folder ``root/cache``, shards of 5 tiles)."""
    write_tiles(root / "tiles", n=12)
    return recipe_yaml(root, steps=steps, extra=f"cache: {{dir: {root}/cache, shard_tiles: 5{cache}}}")


def live(teacher, tiles, cache, keys):
    """The teacher run now on the cached views ``keys`` (rebuilt from their recorded parameters)."""
    return teacher(torch.stack([apply_view(tiles[i], cache.view_params(i, v)) for i, v in keys]))


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cached_targets_equal_the_live_teacher(tmp_path):
    recipe = load_recipe(cached_recipe(tmp_path, ", n_views: 3, dtype: float32"))
    cache = open_cache(write_cache(recipe), recipe)
    tiles, transform = training_source(recipe), multicrop_transform(recipe)
    teacher = build_teachers(recipe, ["uni"])["uni"]
    assert (cache.n_tiles, cache.n_views, cache.grids["uni"], cache.dtype) == (12, 3, (4, 4), "float32")
    for i in range(cache.n_tiles):
        keys = [(i, v) for v in range(3)]
        ref = live(teacher, tiles, cache, keys)
        got = cache.get_batch("uni", keys)
        assert torch.equal(got.summary, ref.summary) and torch.equal(got.patch_tokens, ref.patch_tokens)
        image = tiles[i]  # the views are the seeded ones, whoever wrote them
        assert cache.view_params(i, 2) == cache_view_params(transform, 0, i, 2, image.height, image.width)
    one = cache.get("uni", 5, 1)
    assert one.summary.shape == (64,) and one.patch_tokens.shape == (16, 64) and one.grid == (4, 4)

    # bf16 storage with 2x2 patch pooling: the live outputs (pooled) cast to bf16, bit for bit
    recipe = load_recipe(cached_recipe(tmp_path, ", n_views: 2, patch_pool: 2"), [f"cache.dir={tmp_path}/bf16"])
    cache = open_cache(write_cache(recipe), recipe)
    assert cache.grids["uni"] == (2, 2) and cache.dtype == "bfloat16"
    keys = [(i, v) for i in range(cache.n_tiles) for v in range(2)]
    ref = live(teacher, tiles, cache, keys)
    pooled, grid = pool_patch_tokens(ref.patch_tokens, ref.grid, 2)
    got = cache.get_batch("uni", keys)
    assert grid == (2, 2) and got.patch_tokens.shape == (24, 4, 64) and got.summary.dtype == torch.float32
    assert torch.equal(got.summary, ref.summary.to(torch.bfloat16).float())
    assert torch.equal(got.patch_tokens, pooled.to(torch.bfloat16).float())


def test_loader_takes_global_crops_from_the_cache(tmp_path):
    recipe = load_recipe(cached_recipe(tmp_path, ", n_views: 3"))
    cache = open_cache(write_cache(recipe), recipe)
    tiles, transform = training_source(recipe), multicrop_transform(recipe)
    masking = {"probability": 0.5, "ratio": [0.1, 0.5]}
    plain = SeededMultiCrop(tiles, transform, 0, (4, 4), masking)
    cached = SeededMultiCrop(tiles, transform, 0, (4, 4), masking, cache=cache)
    for index, epoch in [(7, 0), (7, 1), (11, 4)]:
        a, b = plain[index, epoch], cached[index, epoch]
        views = [cached_view(epoch, c, 2, 3) for c in range(2)]  # (epoch * n_global + c) % n_views
        assert [k.tolist() for k in b["cache_keys"]] == [[index, v] for v in views]
        for c, v in enumerate(views):
            assert torch.equal(b["global"][c], apply_view(tiles[index], cache.view_params(index, v)))
        assert all(torch.equal(x, y) for x, y in zip(a["local"], b["local"]))  # fresh, as without a cache
        assert torch.equal(a["masks"], b["masks"])
    assert cached_view(1, 0, 2, 3) == 2 and cached_view(1, 1, 2, 3) == 0

    clone = pickle.loads(pickle.dumps(cached))  # as into a spawned DataLoader worker: no open handle travels
    assert clone.cache._handles == {} and torch.equal(clone[7, 1]["global"][0], cached[7, 1]["global"][0])
    loader = DataLoader(cached, batch_sampler=[[(7, 1), (3, 0)]], collate_fn=collate_multicrop, num_workers=1)
    batch = next(iter(loader))  # crop-major, like the global crops
    assert batch["cache_keys"].tolist() == [[7, 2], [3, 0], [7, 0], [3, 1]]
    assert batch["global"].shape == (4, 3, 64, 64)


def test_training_from_the_cache_matches_the_live_teacher(tmp_path, monkeypatch):
    path = cached_recipe(tmp_path, ", n_views: 2", steps=1)
    recipe = load_recipe(path, [*PLAIN, "train.log_every=1", f"output_dir={tmp_path}/cached"])
    write_cache(recipe)

    def no_teachers(*args, **kwargs):
        raise AssertionError("a run from the cache must not load teachers")

    with monkeypatch.context() as m:
        m.setattr(multiteach.build, "build_teachers", no_teachers)
        m.setattr(multiteach.cache.key, "build_teachers", no_teachers)  # open_cache hashes random-init teachers
        m.setattr(multiteach.train, "build_teachers", no_teachers)
        cached_run = train(recipe)

    # the same run, with the targets computed live by the teacher on the very same (cached) views
    teacher, tiles = build_teachers(recipe, ["uni"])["uni"], training_source(recipe)
    calls = []

    def live_targets(self, keys, device=None):
        calls.append(len(keys))
        return {"uni": live(teacher, tiles, self, keys.tolist()).as_target()}

    monkeypatch.setattr(FeatureCache, "targets", live_targets)
    live_run = train(load_recipe(path, [*PLAIN, "train.log_every=1", f"output_dir={tmp_path}/live"]))
    assert calls == [16]  # 8 tiles x 2 global crops
    first = [json.loads((run / "metrics.jsonl").read_text().splitlines()[0]) for run in (cached_run, live_run)]
    assert first[0]["step"] == first[1]["step"] == 1
    for term in ("loss", "uni.cls", "uni.patch"):  # bf16 targets: within bf16 rounding of the live loss
        assert first[0][term] == pytest.approx(first[1][term], rel=2**-8, abs=1e-4), term
    assert first[0]["dino"] == first[1]["dino"] and first[0]["ibot"] == first[1]["ibot"]  # no teacher in these


def test_stale_cache_is_refused(tmp_path):
    path = cached_recipe(tmp_path, ", n_views: 2")
    recipe = load_recipe(path, PLAIN)
    write_cache(recipe)
    open_cache(tmp_path / "cache", recipe)  # fits
    cases = {
        "teachers.uni.input_size=32": "teacher 'uni' preprocessing changed: input_size 64 -> 32",
        "cache.n_views=3": "view spec changed: n_views 2 -> 3",
        "data.global_crops.size=48": "global_size 64 -> 48",
        "data.augment.flip_rot=false": "flip_rot True -> False",
        "cache.dtype=float16": "storage changed: dtype 'bfloat16' -> 'float16'",
    }
    for override, reason in cases.items():
        with pytest.raises(MultiteachError, match="not used") as err:
            open_cache(tmp_path / "cache", load_recipe(path, [*PLAIN, override]))
        assert reason in str(err.value) and "multiteach cache" in str(err.value), str(err.value)
    with pytest.raises(MultiteachError, match="n_views 2 -> 3"):  # the writer will not mix two builds
        write_cache(load_recipe(path, [*PLAIN, "cache.n_views=3"]))

    model, arch, args = tiny_timm("uni", seed=1)  # new weights, same architecture and file size
    save_timm_folder(model, tmp_path / "uni", arch, args, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(MultiteachError, match="teacher 'uni' weights changed: files.model.safetensors"):
        open_cache(tmp_path / "cache", recipe)
    with pytest.raises(MultiteachError, match="weights changed"):
        train(recipe)
    write_cache(recipe, overwrite=True)
    assert open_cache(tmp_path / "cache", recipe).n_views == 2


def test_random_init_teacher_is_keyed_by_its_state_dict(tmp_path):
    tiny = "{embed_dim: 64, depth: 2, num_heads: 2}"
    recipe = load_recipe(
        cached_recipe(tmp_path),
        [f"teachers.uni={{source: vit_large_patch16_224, pretrained: false, input_size: 64, model_kwargs: {tiny}}}"],
    )
    tiles = training_source(recipe).paths
    torch.manual_seed(0)
    teachers = build_teachers(recipe, ["uni"])
    key = cache_key(recipe, tiles, teachers)
    assert len(key["teachers"]["uni"]["weights"]["state_dict"]) == 64
    multiteach.cache.key._STATE_DICT_HASHES.clear()
    assert cache_key(recipe, tiles) == key  # rebuilt with the recipe seed when not given
    torch.manual_seed(1)
    assert cache_key(recipe, tiles, build_teachers(recipe, ["uni"])) != key


def test_interrupted_write_resumes_to_the_same_bytes(tmp_path):
    recipe = load_recipe(cached_recipe(tmp_path, ", n_views: 2"), PLAIN)
    whole = write_cache(recipe, tmp_path / "whole")
    assert len(list(whole.glob("shard_*"))) == 3  # 12 tiles in shards of 5

    def crash(path):
        raise KeyboardInterrupt("killed after the first shard")

    with pytest.raises(KeyboardInterrupt):
        write_cache(recipe, tmp_path / "resumed", on_shard=crash)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["shard_r0_00000.safetensors"]
    with pytest.raises(MultiteachError, match="incomplete"):
        FeatureCache(tmp_path / "resumed")
    written = []
    write_cache(recipe, tmp_path / "resumed", on_shard=written.append)
    assert [p.name for p in written] == ["shard_r0_00001.safetensors", "shard_r0_00002.safetensors"]  # first kept
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(whole)


def test_two_ranks_and_merge_equal_one_writer(tmp_path):
    recipe = load_recipe(cached_recipe(tmp_path, ", n_views: 2"), PLAIN)
    one = FeatureCache(write_cache(recipe, tmp_path / "one"))
    split = tmp_path / "two"
    write_cache(recipe, split, rank=0, world_size=2)
    assert not (split / "index.json").exists()
    with pytest.raises(MultiteachError, match=r"6 of 12 tiles are not cached yet \(writer rank\(s\) \[1\] of 2"):
        merge_index(split)
    write_cache(recipe, split, rank=1, world_size=2)  # the last writer merges
    assert sorted(p.name for p in split.glob("shard_*")) == [
        f"shard_r{r}_0000{n}.safetensors" for r in (0, 1) for n in (0, 1)
    ]
    merge_index(split)
    two = FeatureCache(split)
    assert two.key == one.key and two.tile_paths == one.tile_paths and two.grids == one.grids
    for i in range(12):
        for v in range(2):
            assert two.view_params(i, v) == one.view_params(i, v)
            a, b = one.get("uni", i, v), two.get("uni", i, v)
            assert torch.equal(a.summary, b.summary) and torch.equal(a.patch_tokens, b.patch_tokens)


def test_cache_command(tmp_path, capsys):
    path = str(cached_recipe(tmp_path, ", n_views: 2"))
    assert main(["cache", path, *PLAIN, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "shard 3/3" in out and "12 tiles x 2 views of uni (bfloat16" in out and "per 1,000 tiles" in out
    assert main(["cache", path, *PLAIN, "cache.n_views=3", "--out", str(tmp_path / "c")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["cache", path, *PLAIN, "--out", str(tmp_path / "c"), "--merge"]) == 0
