"""The teacher-target cache: exact targets, replayed views, runs that fill and read it (tiles and slides), exact
resume and 1 = N processes with it on, compression, refused keys, damaged shards, concurrent writers."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

import multiteach.build
import multiteach.cache.targets
from multiteach.build import build_student_from, build_teachers, data_loader, multicrop_transform, training_source
from multiteach.cache import (
    TargetStore,
    cache_info,
    cache_key,
    cosine_fidelity,
    open_cache,
    pool_patch_tokens,
    tile_identity,
    write_cache,
)
from multiteach.cache.store import DAMAGED, SHARDS
from multiteach.cli import main
from multiteach.config import load_recipe
from multiteach.data.loader import SeededMultiCrop, cached_view
from multiteach.data.views.multicrop import apply_view, collate_multicrop
from multiteach.errors import MultiteachError
from multiteach.standins import save_timm_folder, tiny_timm
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD
from multiteach.train import train

from .engine_fixtures import ENV, REPO, cli, recipe_yaml, torchrun, write_tiles
from .test_slides_training import slide_overrides, slides  # noqa: F401 - the module fixture
from .test_train import final_weights, max_diff

PLAIN = ["data.augment.hed=null", "data.augment.color_jitter=null"]  # faster views where replay is not the point


def cached_recipe(root, cache="", steps=2, **kw):
    """The tiny engine recipe on 12 tiles with a ``cache:`` section (folder ``root/cache``, shards of 5 rows)."""
    write_tiles(root / "tiles", n=12)
    return recipe_yaml(root, steps=steps, extra=f"cache: {{dir: {root}/cache, shard_tiles: 5{cache}}}", **kw)


def run_batches(recipe, cache, n=None):
    """The training loader's batches (rank 0 of 1) with the cache's replayed views."""
    loader = data_loader(recipe, training_source(recipe), build_student_from(recipe), 0, 1, 0, cache=cache.replay)
    return [b for _, b in zip(range(n or recipe.schedule.steps), loader)]


def shard_files(folder):
    return sorted((folder / SHARDS).glob("*.safetensors"))


def test_cached_targets_equal_the_live_teacher_and_a_second_read(tmp_path):
    recipe = load_recipe(cached_recipe(tmp_path, ", views_per_tile: 3, dtype: float32"))
    cache = open_cache(recipe)
    teacher = build_teachers(recipe, ["uni"])["uni"]
    for batch in run_batches(recipe, cache):
        computed = cache(batch, "cpu")["uni"]
        ref = teacher(batch["global"])
        assert torch.equal(computed.summary, ref.summary) and torch.equal(computed.patch_tokens, ref.patch_tokens)
        cache.flush()
        again = cache(batch, "cpu")["uni"]  # now read back from the shard just written
        assert torch.equal(again.summary, ref.summary) and torch.equal(again.patch_tokens, ref.patch_tokens)
    # 2 x 16 crops, each met twice; step 2's epoch-1 tiles replay 2 views stored in step 1
    assert (cache.computed_rows, cache.read_rows) == (30, 34) and cache.grids["uni"] == (4, 4)

    # bf16 storage with 2x2 patch pooling: the live outputs (pooled) cast to bf16, bit for bit, hit or miss
    recipe = load_recipe(cached_recipe(tmp_path, ", views_per_tile: 2, patch_pool: 2"), [f"cache.dir={tmp_path}/b"])
    cache = open_cache(recipe)
    batch = run_batches(recipe, cache, 1)[0]
    ref = teacher(batch["global"])
    pooled, grid = pool_patch_tokens(ref.patch_tokens, ref.grid, 2)
    for _ in range(2):
        got = cache(batch, "cpu")["uni"]
        assert grid == (2, 2) == got.grid and got.patch_tokens.shape == (16, 4, 64)
        assert torch.equal(got.summary, ref.summary.to(torch.bfloat16).float())
        assert torch.equal(got.patch_tokens, pooled.to(torch.bfloat16).float())
        cache.flush()
    assert (cache.computed_rows, cache.read_rows) == (16, 16)


def test_views_are_replayed_from_the_tile_identity(tmp_path):
    recipe = load_recipe(cached_recipe(tmp_path, ", views_per_tile: 3"))
    cache = open_cache(recipe)
    tiles, transform = training_source(recipe), multicrop_transform(recipe)
    masking = {"probability": 0.5, "ratio": [0.1, 0.5]}
    plain = SeededMultiCrop(tiles, transform, 0, (4, 4), masking)
    cached = SeededMultiCrop(tiles, transform, 0, (4, 4), masking, cache=cache.replay)
    keys = {}
    for index, epoch in [(7, 0), (7, 1), (7, 3), (11, 4)]:
        a, b = plain[index, epoch], cached[index, epoch]
        tile = tiles.read(index, epoch)
        tile_id = tile_identity(tile.provenance, tile.image.size)
        views = [cached_view(epoch, c, 2, 3) for c in range(2)]  # (epoch * n_global + c) % K
        assert [row[1] for row in b["cache_rows"]] == views and b["cache_rows"][0][0] == tile.provenance
        for c, v in enumerate(views):
            params = cache.replay.view_params(tile_id, v, tile.image.height, tile.image.width)
            assert torch.equal(b["global"][c], apply_view(tile.image, params))  # the student trains on the replay
            keys.setdefault((index, v), b["cache_keys"][c].tolist())
            assert keys[index, v] == b["cache_keys"][c].tolist()  # the same view of a tile: the same row, any epoch
        assert all(torch.equal(x, y) for x, y in zip(a["local"], b["local"]))  # fresh, as without a cache
        assert torch.equal(a["masks"], b["masks"])
    assert len({tuple(k) for k in keys.values()}) == len(keys) == 5  # K = 3 views of tile 7, 2 of tile 11
    crops = {tuple(cached[7, e]["global"][c].flatten()[:64].tolist()) for e in range(3) for c in range(2)}
    assert len(crops) == 3  # six global crops over three epochs replay exactly the K = 3 stored views

    clone = pickle.loads(pickle.dumps(cached))  # as into a spawned DataLoader worker
    assert torch.equal(clone[7, 1]["global"][0], cached[7, 1]["global"][0])
    loader = DataLoader(cached, batch_sampler=[[(7, 1), (3, 0)]], collate_fn=collate_multicrop, num_workers=1)
    batch = next(iter(loader))  # crop-major, like the global crops
    assert batch["cache_keys"].shape == (4, 16) and [r[1] for r in batch["cache_rows"]] == [2, 0, 0, 1]
    path = tiles.read(7, 0).provenance  # an edited tile file is a new tile: new keys
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    multiteach.cache.store._file_stat.cache_clear()
    assert cached[7, 0]["cache_keys"][0].tolist() != keys[7, 0]


def test_a_second_run_reads_every_target_and_loads_no_teacher(tmp_path, monkeypatch):
    path = cached_recipe(tmp_path, ", views_per_tile: 2", steps=2)
    first = train(load_recipe(path, [*PLAIN, "train.log_every=1", f"output_dir={tmp_path}/a"]))
    assert "4 of 32 target rows read, 28 computed" in (first / "train.log").read_text()  # epoch 1 replays K=2

    def no_teachers(*args, **kwargs):
        raise AssertionError("a run that finds every row in the cache must not load teachers")

    for module in (multiteach.build, multiteach.cache.targets, multiteach.cache.key):
        monkeypatch.setattr(module, "build_teachers", no_teachers)
    # a sweep's next run: another weight for a term, the same teachers, data and views
    sweep_run = [*PLAIN, "train.log_every=1", "losses.dino.weight=0.5", f"output_dir={tmp_path}/b"]
    second = train(load_recipe(path, sweep_run))
    assert "32 of 32 target rows read, 0 computed" in (second / "train.log").read_text()
    monkeypatch.undo()
    live = train(load_recipe(path, [*PLAIN, "train.log_every=1", "cache=null", f"output_dir={tmp_path}/live"]))
    metrics = [json.loads((r / "metrics.jsonl").read_text().splitlines()[0]) for r in (first, second, live)]
    assert metrics[0]["uni.cls"] == metrics[1]["uni.cls"]  # read targets = the computed ones, exactly
    # against live teachers (on their own, unreplayed views): the same loss scale, not the same crops
    assert metrics[0]["uni.cls"] == pytest.approx(metrics[2]["uni.cls"], rel=0.2)


def test_resume_with_the_cache_on_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    path = cached_recipe(tmp_path, "", steps=4, checkpoint_every=2)
    ref = train(load_recipe(path, [*PLAIN, f"output_dir={tmp_path}/ref", f"cache.dir={tmp_path}/c_ref"]))
    calls = []
    real = multiteach.cache.targets.CachedTargets.__call__

    def crash_at_step_3(self, batch, device):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed in step 3")
        return real(self, batch, device)

    recipe = load_recipe(path, [*PLAIN, f"output_dir={tmp_path}/run", f"cache.dir={tmp_path}/c_run"])
    with monkeypatch.context() as m:
        m.setattr(multiteach.cache.targets.CachedTargets, "__call__", crash_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train(recipe)
    assert len(TargetStore(tmp_path / "c_run", None, readonly=True)) > 0  # steps 1-2 were stored
    run = train(recipe)
    assert max_diff(final_weights(ref, 4), final_weights(run, 4)) == 0.0


def test_two_processes_with_the_cache_train_as_one(tmp_path):
    path = cached_recipe(tmp_path, ", views_per_tile: 2, dtype: float32", steps=2, checkpoint_every=2)
    over = [*PLAIN, "data.num_workers=0"]
    two = cli("train", str(path), *over, f"output_dir={tmp_path}/two", f"cache.dir={tmp_path}/c2", launcher=torchrun(2))
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(load_recipe(path, [*over, f"output_dir={tmp_path}/one", f"cache.dir={tmp_path}/c1"]))
    assert max_diff(final_weights(tmp_path / "two", 2), final_weights(one, 2)) < 1e-5
    writers = {p.name.rsplit("-", 1)[0][-2:] for p in shard_files(tmp_path / "c2")}
    assert writers == {"r0", "r1"}  # each rank stored its half of every batch
    a, b = (TargetStore(tmp_path / c, None, readonly=True) for c in ("c1", "c2"))
    assert len(a) == len(b) == 24 and sorted(a._index_keys.tolist()) == sorted(b._index_keys.tolist())


def test_training_from_slides_fills_the_cache_and_a_second_run_recomputes_nothing(tmp_path, slides, monkeypatch):  # noqa: F811
    path = recipe_yaml(tmp_path, steps=2, checkpoint_every=2, batch=8)
    over = [*slide_overrides(tmp_path, slides), f"cache={{dir: {tmp_path}/cache, views_per_tile: 2}}", *PLAIN]
    first = train(load_recipe(path, [*over, f"output_dir={tmp_path}/a"]))
    assert "0 of 32 target rows read, 32 computed" in (first / "train.log").read_text()
    with safe_open(str(shard_files(tmp_path / "cache")[0]), framework="np") as f:
        rows = json.loads(f.metadata()["multiteach_rows"])
    assert all(str(r[0]).startswith(str(slides)) and r[0].count("@") == 2 for r in rows)  # slide@x,y@mpp
    monkeypatch.setattr(multiteach.cache.targets, "build_teachers", lambda *a, **k: pytest.fail("teachers loaded"))
    monkeypatch.setattr(multiteach.build, "build_teachers", lambda *a, **k: pytest.fail("teachers loaded"))
    second = train(load_recipe(path, [*over, f"output_dir={tmp_path}/b", "losses.dino.weight=0.5"]))
    assert "32 of 32 target rows read, 0 computed" in (second / "train.log").read_text()
    info = cache_info(tmp_path / "cache")
    assert info["rows"] == 32 and info["tiles"] == 16 and info["teachers"] == ["uni"] and not info["damaged"]


def test_compressed_storage_int8_and_pca(tmp_path):
    recipe = load_recipe(cached_recipe(tmp_path, ", views_per_tile: 2, dtype: int8, patch_dims: 8, pca_tiles: 12"))
    cache = open_cache(recipe)
    cache.prime(training_source(recipe), "cpu")
    assert (tmp_path / "cache" / "pca.safetensors").is_file() and cache.store.pca["uni"].k == 8
    teacher = build_teachers(recipe, ["uni"])["uni"]
    batch = run_batches(recipe, cache, 1)[0]
    computed = cache(batch, "cpu")["uni"]
    cache.flush()
    read = cache(batch, "cpu")["uni"]
    assert torch.equal(computed.summary, read.summary) and torch.equal(computed.patch_tokens, read.patch_tokens)
    ref = teacher(batch["global"])
    assert computed.patch_tokens.shape == ref.patch_tokens.shape  # the PCA is undone on read
    assert cosine_fidelity(computed.summary, ref.summary) > 0.999  # int8 summary
    assert 0.5 < cosine_fidelity(computed.patch_tokens, ref.patch_tokens) < 0.9999  # 8 of 64 dims kept
    reader = TargetStore(tmp_path / "cache", None, readonly=True)  # decodes by the folder's own key
    assert (reader.dtype, reader.patch_dims) == ("int8", 8)
    again = reader.read(reader.lookup(batch["cache_keys"]), ["uni"])["uni"]
    assert torch.equal(again.summary, computed.summary) and torch.equal(again.patch_tokens, computed.patch_tokens)
    info = cache_info(tmp_path / "cache")
    assert info["storage"] == {"dtype": "int8", "patch_pool": 1, "patch_dims": 8}
    per_row = 64 + 2 + 16 * (8 + 2) + 16  # int8 summary + scale, 16 tokens x (8 dims + scale), the row key
    assert info["bytes_per_row"]["uni"] == pytest.approx(per_row - 16, abs=1)  # teacher tensors only


def test_a_cache_for_other_targets_is_refused_naming_the_key(tmp_path):
    path = cached_recipe(tmp_path, ", views_per_tile: 2")
    recipe = load_recipe(path, PLAIN)
    write_cache(recipe)
    open_cache(recipe)  # fits
    cases = {
        "teachers.uni.input_size=32": "teachers.uni.preprocessing.input_size 64 -> 32",
        "cache.views_per_tile=3": "views.views_per_tile 2 -> 3",
        "data.global_crops.size=48": "views.global_size 64 -> 48",
        "data.augment.flip_rot=false": "views.flip_rot True -> False",
        "cache.dtype=int8": "storage.dtype 'bfloat16' -> 'int8'",
        "cache.patch_dims=8": "storage.patch_dims None -> 8",
    }
    for override, reason in cases.items():
        with pytest.raises(MultiteachError, match="built for other targets") as err:
            open_cache(load_recipe(path, [*PLAIN, override]))
        assert reason in str(err.value) and "cache.dir" in str(err.value), str(err.value)
    model, arch, args = tiny_timm("uni", seed=1)  # new weights, same architecture and file size
    save_timm_folder(model, tmp_path / "uni2", arch, args, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(MultiteachError, match=r"teachers\.uni\.weights"):
        train(load_recipe(path, [*PLAIN, f"teachers.uni.weights={tmp_path}/uni2"]))
    with pytest.raises(MultiteachError, match="does not store teacher 'phikon'"):
        open_cache(load_recipe(path, [*PLAIN, f"teachers.phikon={{weights: {tmp_path}/uni2, input_size: 64}}",
                                      "losses.p={type: cosine, teacher: phikon, weight: 1}"]))  # fmt: skip
    with pytest.raises(MultiteachError, match="renamed cache.views_per_tile"):
        load_recipe(path, ["cache.n_views=2"])


def test_a_truncated_shard_is_skipped_listed_and_refilled(tmp_path, capsys):
    recipe = load_recipe(cached_recipe(tmp_path, ", views_per_tile: 2, dtype: float32"), PLAIN)
    folder = write_cache(recipe)
    total = len(TargetStore(folder, None, readonly=True))  # 12 tiles x 2 views
    whole = {p.name: p for p in shard_files(folder)}
    victim = sorted(whole)[1]
    kept = set()
    for name in whole:  # rows stored in the other shards survive
        if name != victim:
            with safe_open(str(whole[name]), framework="np") as f:
                kept.update(bytes(k) for k in f.get_tensor("keys"))
    data = (folder / SHARDS / victim).read_bytes()
    (folder / SHARDS / victim).write_bytes(data[: len(data) // 2])
    info = cache_info(folder)  # read-only: listed, not moved
    assert [name for name, _ in info["damaged"]] == [victim] and (folder / SHARDS / victim).exists()
    assert main(["cache", "info", str(folder)]) == 0 and f"damaged (skipped, refilled on use): {victim}" in (
        capsys.readouterr().out
    )
    cache = open_cache(recipe)  # a writer moves it aside; its rows are missing until refilled
    assert (folder / DAMAGED / victim).exists() and len(cache.store) == len(kept) < total
    write_cache(recipe)
    assert len(TargetStore(folder, None, readonly=True)) == total == 24 and not cache_info(folder)["damaged"]
    teacher = build_teachers(recipe, ["uni"])["uni"]
    cache = open_cache(recipe)
    for batch in run_batches(recipe, cache):
        assert torch.equal(cache(batch, "cpu")["uni"].summary, teacher(batch["global"]).summary)
    assert cache.computed_rows == 0


def test_an_abandoned_temporary_shard_is_removed(tmp_path):
    recipe = load_recipe(cached_recipe(tmp_path, ", views_per_tile: 2"), PLAIN)
    folder = write_cache(recipe)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = os.uname().nodename
    temp = folder / SHARDS / f".{host}_{int(dead.stdout)}_abcdef_r0-00003.safetensors.x1y2.tmp"
    temp.write_bytes(b"half a shard")
    alive = folder / SHARDS / f".{host}_{os.getpid()}_abcdef_r0-00000.safetensors.x1y2.tmp"
    alive.write_bytes(b"being written")
    open_cache(recipe)
    assert not temp.exists() and alive.exists()  # a live writer's file is left alone


def test_two_writers_at_once_lose_nothing(tmp_path):
    path = cached_recipe(tmp_path, ", views_per_tile: 2, dtype: float32", steps=3)
    code = (
        "import sys; from multiteach.config import load_recipe; from multiteach.cache import write_cache; "
        f"write_cache(load_recipe({str(path)!r}, {PLAIN!r}))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], env=ENV, cwd=REPO, stderr=subprocess.PIPE) for _ in "ab"]
    errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    folder = tmp_path / "cache"
    assert not list((folder / SHARDS).glob(".*.tmp")) and not (folder / DAMAGED).exists()
    info = cache_info(folder)
    assert info["rows"] == 24 and not info["damaged"]  # 3 steps x 8 draws of 12 tiles, each tile's K = 2 views
    recipe = load_recipe(path, PLAIN)
    teacher, cache = build_teachers(recipe, ["uni"])["uni"], open_cache(recipe)
    for batch in run_batches(recipe, cache):
        got = cache(batch, "cpu")["uni"]
        assert torch.equal(got.summary, teacher(batch["global"]).summary)
    assert cache.computed_rows == 0


def test_a_capped_cache_stops_storing_and_training_goes_on(tmp_path, caplog):
    recipe = load_recipe(cached_recipe(tmp_path, ", views_per_tile: 2, max_gb: 0.00001"), PLAIN)  # 10 kB
    folder = write_cache(recipe)
    stored = shard_files(folder)
    assert 1 <= len(stored) < 3 and "new targets are computed, not stored" in caplog.text
    run = train(load_recipe(tmp_path / "recipe.yaml", [*PLAIN, f"output_dir={tmp_path}/capped"]))
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert shard_files(folder) == stored


def test_random_init_teacher_is_keyed_by_its_state_dict(tmp_path):
    tiny = "{embed_dim: 64, depth: 2, num_heads: 2}"
    recipe = load_recipe(
        cached_recipe(tmp_path),
        [f"teachers.uni={{source: vit_large_patch16_224, pretrained: false, input_size: 64, model_kwargs: {tiny}}}"],
    )
    torch.manual_seed(0)
    teachers = build_teachers(recipe, ["uni"])
    key = cache_key(recipe, ["uni"], teachers)
    assert len(key["teachers"]["uni"]["weights"]["state_dict"]) == 64
    multiteach.cache.key._STATE_DICT_HASHES.clear()
    assert cache_key(recipe, ["uni"]) == key  # rebuilt with the recipe seed when not given
    torch.manual_seed(1)
    assert cache_key(recipe, ["uni"], build_teachers(recipe, ["uni"])) != key


def test_cache_command_fills_and_reports(tmp_path, capsys):
    path = str(cached_recipe(tmp_path, ", views_per_tile: 2"))
    assert main(["cache", path, *PLAIN, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "rank 0: step 2/2" in out and "rows: 24 tile views of 12 tiles (2 views per tile)" in out
    assert "teacher uni:" in out and "KiB per tile" in out
    assert main(["cache", path, *PLAIN, "cache.dtype=int8", "--out", str(tmp_path / "c")]) == 2
    assert "storage.dtype 'bfloat16' -> 'int8'" in capsys.readouterr().err
    assert main(["cache", "info", str(tmp_path / "c"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 24
    assert main(["cache", "info", str(tmp_path / "nothing")]) == 2
    assert "is not a feature cache" in capsys.readouterr().err
