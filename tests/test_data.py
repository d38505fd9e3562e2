"""Tests for multiteach.data: discovery, fault tolerance, augmentations, multi-crop, masking."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multiteach.data import (
    HEDJitter,
    MaskingGenerator,
    MultiCropCollator,
    MultiCropTransform,
    RandomRot90Flip,
    TileDataset,
    ViewParams,
    apply_view,
    collate_multicrop,
    dihedral,
    find_images,
    hed_jitter,
    hed_to_rgb,
    labelled_folder,
    read_path_list,
    rgb_to_hed,
    sample_ibot_masks,
    to_tensor01,
)
from multiteach.errors import MultiteachError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_image(path: Path, size: int = 40, seed: int = 0) -> Path:
    """Write a small pinkish noisy RGB tile (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = np.array([200, 120, 170], dtype=np.float64)
    arr = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _write_truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _write_garbage_png(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return path


# --------------------------------------------------------------------------- discovery
def test_find_images_nested_sorted_and_filtered(tmp_path: Path) -> None:
    for rel in ["b/z.png", "a/deep/er/y.JPG", "a/x.tif", "top.jpeg"]:
        _write_image(tmp_path / rel)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _write_image(tmp_path / "a" / ".hidden.png")
    _write_image(tmp_path / ".cache" / "w.png")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/deep/er/y.JPG", "a/x.tif", "b/z.png", "top.jpeg"]
    assert [p.name for p in find_images(tmp_path, extensions=(".png",))] == ["z.png"]


def test_find_images_missing_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(MultiteachError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(MultiteachError, match=r"No images found under .*empty.*jpeg, jpg, png, tif, tiff"):
        find_images(tmp_path / "empty")


def test_read_path_list_csv_and_txt(tmp_path: Path) -> None:
    a = _write_image(tmp_path / "imgs" / "a.png")
    b = _write_image(tmp_path / "elsewhere" / "b.jpg")
    (tmp_path / "list.csv").write_text(f"slide,path\ns1,imgs/a.png\ns2,{b}\n")
    assert read_path_list(tmp_path / "list.csv") == [a, b]
    (tmp_path / "list.txt").write_text(f"# tiles\nimgs/a.png\n\n{b}\n")
    assert read_path_list(tmp_path / "list.txt") == [a, b]
    (tmp_path / "bad.csv").write_text("paths,label\nimgs/a.png,1\n")
    with pytest.raises(MultiteachError, match="'path' or 'file' column.*paths, label.*Did you mean: paths"):
        read_path_list(tmp_path / "bad.csv")
    with pytest.raises(MultiteachError, match="does not exist"):
        read_path_list(tmp_path / "missing.txt")
    ds = TileDataset.from_list(tmp_path / "list.csv")
    assert len(ds) == 2 and ds[1].mode == "RGB"


# --------------------------------------------------------------------------- fault tolerance
def _mixed_folder(tmp_path: Path) -> Path:
    root = tmp_path / "mixed"
    _write_image(root / "a.png", seed=1)
    _write_truncated_jpeg(root / "b.jpg")
    _write_garbage_png(root / "c.png")
    _write_image(root / "d.jpg", seed=2)
    _write_image(root / "e.tif", seed=3)
    return root


def test_corrupt_files_skipped_counted_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _mixed_folder(tmp_path)
    ds = TileDataset.from_folder(root, to_tensor01)
    assert len(ds) == 5
    with caplog.at_level(logging.WARNING, logger="multiteach.data"):
        for _ in range(2):
            items = [ds[i] for i in range(len(ds))]
    assert [p.name for p in ds.skipped] == ["b.jpg", "c.png"]
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 2
    # b and c fall through to the next valid image, d.
    assert torch.equal(items[1], items[3]) and torch.equal(items[2], items[3])
    assert all(t.shape == (3, 40, 40) for t in items)

    scanned = TileDataset.from_folder(root, scan=True)
    assert [p.name for p in scanned.paths] == ["a.png", "d.jpg", "e.tif"]
    assert len(scanned.skipped) == 2


def test_all_corrupt_folder_raises(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    _write_truncated_jpeg(root / "x.jpg")
    _write_garbage_png(root / "y.png")
    with pytest.raises(MultiteachError, match=r"All 2 image\(s\) from .*broken.* unreadable"):
        TileDataset.from_folder(root, scan=True)
    ds = TileDataset.from_folder(root)
    with pytest.raises(MultiteachError, match="unreadable"):
        ds[0]


def test_labelled_folder(tmp_path: Path) -> None:
    _write_image(tmp_path / "LUSC" / "1.png")
    _write_image(tmp_path / "LUAD" / "sub" / "1.png")
    _write_image(tmp_path / "LUAD" / "2.png")
    (tmp_path / "empty_class").mkdir()
    paths, labels, names = labelled_folder(tmp_path)
    assert names == ["LUAD", "LUSC"] and labels == [0, 0, 1]
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["LUAD/2.png", "LUAD/sub/1.png", "LUSC/1.png"]
    ds = TileDataset.from_folder(tmp_path, labelled=True)
    assert ds.class_names == names and ds[2][1] == 1

    one = tmp_path / "one"
    _write_image(one / "TUM" / "a.png")
    with pytest.raises(MultiteachError, match=r"at least 2 class sub-folders.*found 1 \(TUM\)"):
        labelled_folder(one)


# --------------------------------------------------------------------------- augmentations
def test_hed_round_trip_and_reference_maths() -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).clamp_min(1e-3)
    assert torch.allclose(hed_jitter(x, torch.ones(3), torch.zeros(3)), x, atol=1e-5)
    assert torch.allclose(hed_to_rgb(rgb_to_hed(x)), x, atol=1e-5)
    # skimage.color.rgb2hed maths (before its clip at 0), in numpy float64.
    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    px = x[0].permute(1, 2, 0).double().numpy()
    ref = (np.log(np.maximum(px, 1e-6)) / np.log(1e-6)) @ np.linalg.inv(rgb_from_hed)
    assert np.allclose(rgb_to_hed(x[0]).permute(1, 2, 0).numpy(), ref, atol=1e-5)
    y = HEDJitter(alpha=0.2, beta=0.05, generator=torch.Generator().manual_seed(1))(x[0])
    assert y.shape == x[0].shape and y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x[0], atol=1e-3)


def test_dihedral_group_has_eight_distinct_elements() -> None:
    x = torch.arange(3 * 5 * 5, dtype=torch.float32).reshape(3, 5, 5)
    outs = [dihedral(x, k) for k in range(8)]
    assert torch.equal(outs[0], x)
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    g = torch.Generator().manual_seed(0)
    seen = {tuple(RandomRot90Flip(generator=g)(x / 100).flatten().tolist()) for _ in range(60)}
    assert len(seen) == 8
    with pytest.raises(MultiteachError):
        dihedral(x, 8)


# --------------------------------------------------------------------------- multi-crop
def test_multicrop_shapes_ranges_and_replay(tmp_path: Path) -> None:
    img = Image.open(_write_image(tmp_path / "t.png", size=64))
    t = MultiCropTransform(global_size=32, local_size=16, n_global=2, n_local=3, blur_prob=0.5, return_params=True)
    out = t(img)
    assert [v.shape for v in out["global"]] == [(3, 32, 32)] * 2
    assert [v.shape for v in out["local"]] == [(3, 16, 16)] * 3
    views = out["global"] + out["local"]
    assert all(v.dtype == torch.float32 and v.min() >= 0 and v.max() <= 1 for v in views)
    assert all(torch.equal(apply_view(img, p), v) for p, v in zip(out["params"], views))
    restored = [ViewParams.from_dict(json.loads(json.dumps(p.to_dict()))) for p in out["params"]]
    assert restored == out["params"]
    assert all(torch.equal(apply_view(img, p), v) for p, v in zip(restored, views))
    no_local = MultiCropTransform(global_size=32, n_local=0)(img)
    assert no_local["local"] == [] and collate_multicrop([no_local])["local"] is None
    with pytest.raises(MultiteachError, match="local_scale"):
        MultiCropTransform(local_scale=(0.0, 0.3))


def test_multicrop_deterministic_under_seed(tmp_path: Path) -> None:
    img = Image.open(_write_image(tmp_path / "t.jpg", size=64))
    t = MultiCropTransform(global_size=24, local_size=12, n_local=2, blur_prob=0.5)

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        o = t(img)
        return o["global"] + o["local"]

    assert all(torch.equal(a, b) for a, b in zip(run(3), run(3)))
    assert not all(torch.equal(a, b) for a, b in zip(run(3), run(4)))
    tg = MultiCropTransform(global_size=24, local_size=12, n_local=2, generator=torch.Generator().manual_seed(5))
    first = tg(img)["global"][0]
    tg.generator.manual_seed(5)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(tg(img)["global"][0], first)

    root = tmp_path / "folder"
    for i in range(4):
        _write_image(root / f"{i}.png", size=48, seed=i)
    ds = TileDataset.from_folder(root, t)

    def loader_batch(workers: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        dl = torch.utils.data.DataLoader(
            ds,
            batch_size=2,
            shuffle=True,
            collate_fn=collate_multicrop,
            num_workers=workers,
            generator=torch.Generator().manual_seed(9),
        )
        return next(iter(dl))["local"]

    # In-process loading draws from the global RNG, so torch.manual_seed fixes it ...
    assert torch.equal(loader_batch(0, 1), loader_batch(0, 1))
    # ... while a worker is seeded from the loader's generator alone.
    assert torch.equal(loader_batch(1, 1), loader_batch(1, 2))


def test_collate_is_crop_major() -> None:
    def sample(b: int) -> tuple[dict, int]:
        glob = [torch.full((3, 4, 4), 10.0 * b + c) for c in range(2)]
        loc = [torch.full((3, 2, 2), 10.0 * b + c) for c in range(3)]
        masks = torch.tensor([[b, 0], [b, 1]], dtype=torch.bool)
        return {"global": glob, "local": loc, "masks": masks}, b

    out = collate_multicrop([sample(b) for b in range(4)])
    assert out["global"].shape == (8, 3, 4, 4) and out["local"].shape == (12, 3, 2, 2)
    assert out["global"][:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31]
    assert out["local"][:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31, 2, 12, 22, 32]
    assert out["masks"].shape == (8, 2) and out["masks"][:, 1].tolist() == [False] * 4 + [True] * 4
    assert out["labels"].tolist() == [0, 1, 2, 3]
    with_masks = MultiCropCollator(grid=4, generator=torch.Generator().manual_seed(0))([sample(b)[0] for b in range(4)])
    assert with_masks["masks"].shape == (8, 16) and with_masks["masks"].dtype == torch.bool


# --------------------------------------------------------------------------- masking
def test_masking_generator_bounds() -> None:
    gen = MaskingGenerator((14, 14), min_num_patches=4, max_aspect=3)
    g = torch.Generator().manual_seed(0)
    counts = [int(gen(target, g).sum()) for target in (0, 20, 50, 98) for _ in range(5)]
    targets = [t for t in (0, 20, 50, 98) for _ in range(5)]
    assert all(c <= t for c, t in zip(counts, targets))
    assert all(c >= 0.7 * t for c, t in zip(counts, targets))
    assert gen(10, torch.Generator().manual_seed(1)).shape == (14, 14)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_sample_ibot_masks_ratio_and_probability(p: float) -> None:
    b, grid, (lo, hi) = 20, (16, 16), (0.1, 0.5)
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(7)
    masked_rows, ratios = 0, []
    for _ in range(10):
        m = sample_ibot_masks(b, grid, mask_probability=p, ratio_min_max=(lo, hi), generator=g)
        assert m.shape == (b, n) and m.dtype == torch.bool
        r = m.float().mean(1)
        masked_rows += int((r > 0).sum())
        ratios += r[r > 0].tolist()
    assert masked_rows == 10 * math.floor(b * p)  # exactly int(B * p) masked per batch
    assert all(x <= hi + 1e-9 for x in ratios)
    if ratios:
        assert min(ratios) >= 0.5 * lo and abs(sum(ratios) / len(ratios) - (lo + hi) / 2) < 0.06
    again = sample_ibot_masks(b, grid, p, (lo, hi), generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, sample_ibot_masks(b, grid, p, (lo, hi), generator=torch.Generator().manual_seed(1)))


# --------------------------------------------------------------------------- real tiles
def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"real H&E tiles not found at {path} (../shared/data beside the repo)")
    return path


def test_real_tiles_dataloader_multicrop() -> None:
    root = _shared("unlabeled_tiles_224/tiles")
    paths = find_images(root)
    assert len(paths) > 100
    ds = TileDataset(paths[:: max(1, len(paths) // 8)][:8], MultiCropTransform(n_local=4), scan=True, source=root)
    dl = torch.utils.data.DataLoader(
        ds, batch_size=4, shuffle=True, collate_fn=MultiCropCollator(grid=224 // 16), num_workers=0
    )
    batch = next(iter(dl))
    assert batch["global"].shape == (8, 3, 224, 224) and batch["local"].shape == (16, 3, 98, 98)
    assert batch["masks"].shape == (8, 14 * 14)
    assert float(batch["global"].min()) >= 0.0 and float(batch["global"].max()) <= 1.0
    assert 0.2 < float(batch["global"].mean()) < 0.95  # H&E, not blank or black
    assert ds.skipped == []


def test_real_labelled_tif_folder() -> None:
    root = _shared("labeled/nct_crc_he_100k_smoke")
    ds = TileDataset.from_folder(root, to_tensor01, labelled=True)
    assert len(ds.class_names or []) >= 2 and "TUM" in (ds.class_names or [])
    x, y = ds[0]
    assert (
        x.shape == (3, 224, 224) and isinstance(y, int) and os.fspath(ds.paths[0]).lower().endswith((".tif", ".tiff"))
    )
