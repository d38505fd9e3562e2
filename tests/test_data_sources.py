"""Training sources at scale: compact path tables, list files, no decode at start, TRIDENT/CLAM coordinates,
WebDataset shards, ``multiteach data`` actions, and what a run reports about skipped inputs."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from multiteach.config import load_recipe
from multiteach.data.lists.images import find_images
from multiteach.data.loader import GlobalBatchSampler
from multiteach.data.sources import PathTable, open_tile_source, read_list, walk_folder, write_text_list
from multiteach.data.sources.coords import write_coord_csv
from multiteach.data.sources.tiles import TileListSource
from multiteach.errors import MultiteachError
from multiteach.train import train

from .engine_fixtures import cli, recipe_yaml, write_tiles


def _nested(root, n=30):
    """Tiles in awkwardly named nested folders (``a``, ``a.b``, ``a-c`` sort differently as folders and names)."""
    flat = write_tiles(root / "_flat", n=n, size=48)
    for i, src in enumerate(sorted(flat.iterdir())):
        d = root / "tiles" / ("a", "a.b", "a-c")[i % 3] / f"x{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(src, d / f"t{i}.PNG")
    os.link(src, root / "tiles" / "a.png")
    return root / "tiles"


def test_walk_matches_sorted_relative_paths_and_holds_no_object_per_tile(tmp_path):
    folder = _nested(tmp_path)
    table = walk_folder(folder, ["png"])
    assert list(table) == [str(p) for p in find_images(folder, ["png"])]
    assert isinstance(table.blob, np.ndarray) and table.starts.dtype == np.int64
    assert table.nbytes < 60 * len(table)  # relative paths + two offsets, not a Path object per tile
    restored = pickle.loads(pickle.dumps(table))
    assert list(restored) == list(table)


def test_text_csv_and_parquet_lists_read_the_same_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = _nested(tmp_path)
    table = walk_folder(folder, ["png"])
    relative = [os.path.relpath(p, tmp_path) for p in table]
    (tmp_path / "l.txt").write_text("# tiles\n\n" + "".join(f"  {p} \r\n" for p in relative))
    (tmp_path / "l.csv").write_text("label,Path\n" + "".join(f"0,{p}\n" for p in relative))
    pq.write_table(pa.table({"file": relative}), tmp_path / "l.parquet")
    expected = [str(tmp_path.resolve() / p) for p in relative]
    for name in ("l.txt", "l.csv", "l.parquet"):
        assert list(read_list(tmp_path / name)) == expected, name
    write_text_list(table, tmp_path / "saved.txt")
    assert list(read_list(tmp_path / "saved.txt")) == list(table)
    (tmp_path / "bad.csv").write_text("name\nx.png\n")
    with pytest.raises(MultiteachError, match="'path' or 'file' column; it has: name"):
        read_list(tmp_path / "bad.csv")


def test_a_list_with_missing_entries_keeps_the_rest_and_names_them(tmp_path, caplog):
    tiles = sorted(write_tiles(tmp_path / "t", n=6, size=48).iterdir())
    missing = [tmp_path / f"gone_{i}.png" for i in range(3)]
    (tmp_path / "l.txt").write_text("\n".join(map(str, [*tiles, *missing])))
    source = TileListSource.from_sources([tmp_path / "l.txt"])
    assert len(source) == 6 and source.missing == [str(m) for m in missing]
    assert [s["what"] for s in source.describe()["skipped"]] == [str(m) for m in missing]
    assert "3 entries missing" in caplog.text
    (tmp_path / "none.txt").write_text("\n".join(map(str, missing)))
    with pytest.raises(MultiteachError, match="None of the 3 entries checked"):
        TileListSource.from_sources([tmp_path / "none.txt"])


def test_nothing_is_decoded_at_start_and_a_bad_tile_is_replaced_when_read(tmp_path):
    folder = write_tiles(tmp_path / "t", n=4, size=48)
    bad = folder / "tile_001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: found only when read
    source = open_tile_source([folder], ["png"])
    assert len(source) == 4  # kept: the start-up does not open files
    tile = source.read(1, 0)
    assert tile.provenance.endswith("tile_002.png") and tile.skipped[0][0] == str(bad)
    assert tile.skipped[0][1].startswith("UnidentifiedImageError")  # the reason travels with the tile
    assert np.array_equal(np.asarray(tile.image), np.asarray(source.read(2, 0).image))


def test_a_slide_folder_given_as_tiles_points_to_data_slides(tmp_path, shared_data):
    data = shared_data
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.svs").symlink_to(data / "wsi" / "CMU-1-Small-Region.svs")
    with pytest.raises(MultiteachError, match=r"data.slides.source=.*multiteach tile"):
        open_tile_source([tmp_path / "s"], ["jpg", "png"])


def test_unshuffled_sampler_walks_positions_in_order_for_every_split(tmp_path):
    one = list(GlobalBatchSampler(100, 32, 4, shuffle=False))
    two = [list(GlobalBatchSampler(100, 32, 4, rank=r, world_size=2, shuffle=False)) for r in (0, 1)]
    assert one[3] == [(p % 100, p // 100) for p in range(96, 128)]
    assert [k for step in zip(*two) for half in step for k in half] == [k for b in one for k in b]


def test_a_bad_tile_met_in_training_is_counted_and_listed_in_the_summary(tmp_path):
    recipe_path = recipe_yaml(tmp_path, steps=3, checkpoint_every=3, batch=8)
    bad = tmp_path / "tiles" / "tile_005.png"
    bad.write_bytes(b"not an image")
    listing = tmp_path / "tiles.txt"
    paths = sorted(str(p) for p in (tmp_path / "tiles").iterdir())
    listing.write_text("\n".join([*paths, str(tmp_path / "gone.png")]))
    run = train(load_recipe(recipe_path, [f"data.train={listing}", "schedule.steps=3", "data.num_workers=0"]))
    summary = json.loads((run / "summary.json").read_text())
    listed = {s["what"] for s in summary["skipped"]}
    assert str(tmp_path / "gone.png") in listed  # found at start
    assert str(bad) in listed  # met while reading: 3 steps x 8 tiles cover all 24
    assert summary["skipped_tiles"] == len(listed) == 2
    data = json.loads((run / "data.json").read_text())
    assert data["kind"] == "tiles" and data["tiles"] == len(paths)


def _trident_h5(path, coords, **attrs):
    import h5py

    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for k, v in attrs.items():
            ds.attrs[k] = v


def test_trident_and_clam_coordinate_files_read_their_slides_and_train(tmp_path, shared_data):
    data = shared_data
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "CMU-1-Small-Region.svs").symlink_to(data / "wsi" / "CMU-1-Small-Region.svs")
    coords = tmp_path / "patches"
    coords.mkdir()
    xy = [[0, 0], [448, 448], [896, 1344], [1344, 1792]]
    _trident_h5(
        coords / "CMU-1-Small-Region_patches.h5",
        xy,
        patch_size=224,
        patch_size_level0=448,
        level0_magnification=20,
        target_magnification=10,
        overlap=0,
        name="CMU-1-Small-Region",
    )
    _trident_h5(coords / "CMU-1-Small-Region.h5", xy[:2], patch_size=256, patch_level=0)  # CLAM legacy layout
    _trident_h5(coords / "orphan_patches.h5", xy, patch_size=224, patch_size_level0=448, name="orphan")
    source = open_tile_source([coords], ["jpg"], slides)
    assert len(source) == 6 and [w for w, _ in source.skipped_at_start] == [str(coords / "orphan_patches.h5")]
    tiles = [source.read(i, 0) for i in range(len(source))]
    trident = [t for t in tiles if t.provenance.endswith("@1")]  # target 10x: 1 µm/px, keyed as such
    clam = [t for t in tiles if t.provenance.endswith("@256px")]  # CLAM records no magnification
    assert len(trident) == 4 and {t.image.size for t in trident} == {(224, 224)}  # 448 level-0 px -> 224
    from openslide import OpenSlide

    with OpenSlide(str(slides / "CMU-1-Small-Region.svs")) as s:
        region = s.read_region((448, 448), 0, (256, 256)).convert("RGB")
    assert len(clam) == 2 and clam[1].provenance.endswith("@448,448@256px")
    assert np.array_equal(np.asarray(clam[1].image), np.asarray(region))
    with pytest.raises(MultiteachError, match="data.slide_dir"):
        open_tile_source([coords], ["jpg"], None)
    recipe = recipe_yaml(tmp_path, steps=2, checkpoint_every=2, batch=4)
    run = train(load_recipe(recipe, [f"data.train={coords}", f"data.slide_dir={slides}", "data.num_workers=0"]))
    assert json.loads((run / "data.json").read_text())["kind"] == "coords"
    broken = slides / "broken.svs"  # a slide that fails when read: its tile is replaced by the next slide's
    broken.write_bytes(b"II*\x00" + b"\0" * 4096)
    cmu = str(slides / "CMU-1-Small-Region.svs")
    listing = write_coord_csv(
        [(str(broken), 0, 0, 448.0, 224, 1.0), (cmu, 448, 448, 448.0, 224, 1.0)], tmp_path / "c.csv"
    )
    frozen = open_tile_source([listing], ["jpg"])
    tile = frozen.read(0, 0)
    assert tile.provenance == f"{cmu}@448,448@1" and [w for w, _ in tile.skipped] == [str(broken)]


def test_webdataset_shards_round_trip_and_train(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITEACH_INDEX_DIR", str(tmp_path / "index"))
    tiles = write_tiles(tmp_path / "t", n=12, size=48)
    result = cli("data", "shard", str(tiles), "--out", str(tmp_path / "shards"), "--tiles-per-shard", "5")
    assert result.returncode == 0, result.stderr
    source = open_tile_source([tmp_path / "shards"], ["png"])
    assert len(source) == 12 and len(list((tmp_path / "shards").glob("*.tar"))) == 3
    originals = sorted(tiles.iterdir())
    for i in (0, 7, 11):
        assert np.array_equal(np.asarray(source.read(i, 0).image), np.asarray(Image.open(originals[i]).convert("RGB")))
    assert not list((tmp_path / "shards").glob("*.npz"))  # offsets live in the index folder, not beside the data
    assert len(list((tmp_path / "index" / "shards").glob("*.npz"))) == 3
    shard, offset = source.shards[int(source.shard_of[7])], int(source.offsets[7])
    with open(shard, "r+b") as f:  # a damaged member: replaced by the next one and reported with it
        f.seek(offset)
        f.write(b"\0" * 64)
    tile = source.read(7, 0)
    assert np.array_equal(np.asarray(tile.image), np.asarray(Image.open(originals[8]).convert("RGB")))
    assert [w for w, _ in tile.skipped] == [f"{shard}@{offset}"] and source.read(7, 0).skipped == ()


def test_data_check_lists_bad_tiles_and_writes_the_good_ones(tmp_path):
    tiles = write_tiles(tmp_path / "t", n=5, size=48)
    (tiles / "tile_002.png").write_bytes(b"garbage")
    result = cli("data", "check", str(tiles), "--out-good", str(tmp_path / "good.txt"), "--processes", "2")
    assert result.returncode == 1 and "5 tile(s)" in result.stdout and "tile_002.png" in result.stdout
    assert [os.path.basename(p) for p in read_list(tmp_path / "good.txt")] == [f"tile_00{i}.png" for i in (0, 1, 3, 4)]
    listed = cli("data", "list", str(tiles), "--out", str(tmp_path / "all.txt"))
    assert listed.returncode == 0 and len(read_list(tmp_path / "all.txt")) == 5


def test_path_table_concat_and_select(tmp_path):
    a = PathTable.from_paths(["x/1.png", "x/2.png"], prefix="/a/")
    b = PathTable.from_paths(["3.png"], prefix="/b/")
    both = PathTable.concat([a, b])
    assert list(both) == ["/a/x/1.png", "/a/x/2.png", "/b/3.png"]
    assert list(both.select(np.array([True, False, True]))) == ["/a/x/1.png", "/b/3.png"]
    with pytest.raises(IndexError):
        both[3]


def test_huge_corpora_get_a_computed_permutation_that_is_a_bijection(monkeypatch):
    from multiteach.data import loader

    for n in (1, 2, 9, 1000, 4097):
        assert sorted(loader.feistel_permute(i, n, 7) for i in range(n)) == list(range(n))
    assert [loader.feistel_permute(i, 1000, 1) for i in range(20)] != [
        loader.feistel_permute(i, 1000, 2) for i in range(20)
    ]
    monkeypatch.setattr(loader, "MAX_STORED_PERMUTATION", 50)  # as if 100 tiles were 10^8
    one = [k for batch in GlobalBatchSampler(100, 20, 10, seed=3) for k in batch]
    two = [list(GlobalBatchSampler(100, 20, 10, rank=r, world_size=2, seed=3)) for r in (0, 1)]
    assert sorted(i for i, e in one if e == 0) == list(range(100)) and one != [(p % 100, p // 100) for p in range(200)]
    assert [k for step in zip(*two) for half in step for k in half] == one
