"""Tests for multiteach.data.wsi: opening slides, mpp, tissue masks, tile planning, streaming, export, CLI.

Real slides come from ../shared/data/wsi (see PROVENANCE.md there): CMU-1-Small-Region.svs (1 level,
0.499 µm/px) and TCGA-CR-7395-01A-01-TS1.svs (2 levels, JPEG 2000, no resolution metadata). A
synthetic 2-level pyramid TIFF with resolution tags gives exact level-choice and pixel checks.
"""

from __future__ import annotations

import csv
import logging
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multiteach.cli import main
from multiteach.data.tiling import CSV_COLUMNS, TileGrid, WSITileDataset, plan_tiles, read_tile, write_tiles
from multiteach.data.views.augment import to_tensor01
from multiteach.data.wsi import choose_level, open_slide, otsu_threshold, slide_mpp, tissue_mask
from multiteach.errors import MultiteachError

WSI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi"
CMU = "CMU-1-Small-Region.svs"
TCGA = "TCGA-CR-7395-01A-01-TS1.svs"
TCGA_MPP = 0.5  # the file records none; 0.5 µm/px (20x) is the assumption used throughout

# Tile counts observed with OpenSlide 4.0.1 (openslide-bin), Pillow's HSV/median/BOX resampling and
# the default thumb_size=1024, min_tissue=0.5, tile_size=224. They pin the planner: a change here
# means the mask, the grid or the level choice changed.
EXPECTED = {
    # (slide, target_mpp): (kept tiles, all tiles inside the slide, level, read_size)
    (CMU, 0.5): (42, 117, 0, 224),
    (TCGA, 0.5): (188, 285, 0, 224),
    (TCGA, 1.0): (46, 63, 1, 224),
}


@pytest.fixture(scope="module")
def openslide_mod():
    return pytest.importorskip("openslide", reason="needs openslide-python + openslide-bin (multiteach[wsi])")


def _real_slide(name: str) -> Path:
    path = WSI_DIR / name
    if not path.is_file():
        pytest.skip(f"needs the real slide {path} (../shared/data/wsi beside the repository)")
    return path


@pytest.fixture(scope="module")
def cmu(openslide_mod) -> Path:
    return _real_slide(CMU)


@pytest.fixture(scope="module")
def tcga(openslide_mod) -> Path:
    return _real_slide(TCGA)


@pytest.fixture(scope="module")
def grids(cmu: Path, tcga: Path) -> dict[tuple[str, float], tuple[TileGrid, TileGrid]]:
    """Kept and all (min_tissue=0) grids for every EXPECTED case, planned once."""
    out = {}
    for name, target in EXPECTED:
        path, mpp = (cmu, None) if name == CMU else (tcga, TCGA_MPP)
        out[(name, target)] = (
            plan_tiles(path, target_mpp=target, mpp=mpp),
            plan_tiles(path, target_mpp=target, mpp=mpp, min_tissue=0.0),
        )
    return out


def _fraction_by_slicing(mask: np.ndarray, scale: tuple[float, float], x: int, y: int, extent: float) -> float:
    """Tissue fraction of one tile, recomputed pixel by pixel: mask pixels whose centres lie in the tile."""
    h, w = mask.shape
    cols = [j for j in range(w) if x <= (j + 0.5) * scale[0] < x + extent]
    rows = [i for i in range(h) if y <= (i + 0.5) * scale[1] < y + extent]
    return float(mask[np.ix_(rows, cols)].mean())


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return to_tensor01(image)


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def test_otsu_threshold_splits_two_modes_and_handles_flat_input() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(20, 5, 5000), rng.normal(150, 10, 3000)]).clip(0, 255).astype(np.uint8)
    t = otsu_threshold(values)
    assert t is not None and 40 < t < 120  # middle of the empty gap, not its lower edge

    def within_class_variance(threshold: int) -> float:
        low, high = values[values <= threshold].astype(float), values[values > threshold].astype(float)
        return low.size * low.var() + high.size * high.var() if low.size and high.size else math.inf

    variances = [within_class_variance(k) for k in range(256)]
    assert variances[t] == pytest.approx(min(variances))  # Otsu: minimal within-class variance
    assert otsu_threshold(np.full((10, 10), 7, dtype=np.uint8)) is None


def test_choose_level_takes_the_coarsest_level_not_coarser_than_the_target() -> None:
    mpps = [0.25, 1.0, 4.0]
    assert choose_level(mpps, 0.25) == 0
    assert choose_level(mpps, 0.5) == 0  # level 1 (1.0) would be too coarse: read level 0, downsample
    assert choose_level(mpps, 1.0) == 1
    assert choose_level(mpps, 3.9) == 1
    assert choose_level(mpps, 16.0) == 2
    assert choose_level(mpps, 0.1) == 0  # nothing fine enough: finest level, upsampled
    assert choose_level([0.5, 1.00025], 1.0) == 1  # inexact pyramid downsample (2.0005) within 1%
    assert choose_level([0.5, 1.02], 1.0) == 0  # 2% coarser is not within tolerance


def test_missing_openslide_install_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    with pytest.raises(MultiteachError, match=r"pip install 'multiteach\[wsi\]'"):
        open_slide(slide)


# --------------------------------------------------------------------------------------------------
# Real slides
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(EXPECTED), ids=lambda c: f"{c[0].split('-')[0]}@{c[1]}")
def test_tile_counts_are_stable_and_match_the_tissue_mask(case, grids, cmu: Path, tcga: Path) -> None:
    name, target = case
    kept_n, all_n, level, read_size = EXPECTED[case]
    kept, everything = grids[case]
    assert (len(kept), len(everything), kept.level, kept.read_size) == (kept_n, all_n, level, read_size)
    assert kept.tile_size == 224 and kept.target_mpp == target
    path = cmu if name == CMU else tcga
    with open_slide(path) as slide:
        width0, height0 = slide.dimensions
        down = slide.level_downsamples[level]
        mpp0 = slide_mpp(slide, None if name == CMU else TCGA_MPP)
        mask, scale = tissue_mask(slide)
    assert kept.level_mpp == pytest.approx(mpp0 * down)
    extent = kept.read_size * down  # footprint in level-0 pixels
    # inside the slide, on the stride grid
    for grid in (kept, everything):
        x, y = grid.coords[:, 0], grid.coords[:, 1]
        assert (x >= 0).all() and (y >= 0).all()
        assert (x + extent <= width0 + 1e-6).all() and (y + extent <= height0 + 1e-6).all()
    stride = 224 * target / mpp0
    assert np.abs(kept.coords / stride - np.round(kept.coords / stride)).max() < 1e-2
    # kept = exactly the tiles of the full grid whose recomputed tissue fraction is >= 0.5
    kept_set = {tuple(c) for c in kept.coords.tolist()}
    assert kept_set <= {tuple(c) for c in everything.coords.tolist()}
    for x, y in everything.coords.tolist():
        frac = _fraction_by_slicing(mask, scale, x, y, extent)
        assert (frac >= 0.5) == ((x, y) in kept_set), (x, y, frac)


def test_kept_tiles_are_tissue_in_the_pixels(grids, cmu: Path) -> None:
    """Independent of the mask: kept tiles are far more saturated (stained) than rejected ones."""
    kept, everything = grids[(CMU, 0.5)]
    kept_set = {tuple(c) for c in kept.coords.tolist()}
    sat_kept, sat_rejected = [], []
    with open_slide(cmu) as slide:
        for i, (x, y) in enumerate(everything.coords.tolist()):
            sat = np.asarray(read_tile(slide, everything, i).convert("HSV"))[..., 1].mean()
            (sat_kept if (x, y) in kept_set else sat_rejected).append(sat)
    assert min(sat_kept) > 30 and np.median(sat_rejected) < 15
    assert np.mean(sat_kept) > 4 * np.mean(sat_rejected)


def test_mpp_metadata_and_overrides(cmu: Path, tcga: Path) -> None:
    with open_slide(cmu) as slide:
        assert slide_mpp(slide) == pytest.approx(0.499)
        assert slide_mpp(slide, 0.25) == 0.25
    with open_slide(tcga) as slide:
        assert slide.level_count == 2
        with pytest.raises(MultiteachError, match=r"TCGA-CR-7395.*no resolution.*--mpp"):
            slide_mpp(slide)
        assert slide_mpp(slide, TCGA_MPP) == TCGA_MPP
        with pytest.raises(MultiteachError, match="positive"):
            slide_mpp(slide, -1.0)


def test_slide_without_mpp_and_no_override_errors(tcga: Path) -> None:
    with pytest.raises(MultiteachError, match=r"TCGA-CR-7395-01A-01-TS1\.svs.*--mpp"):
        plan_tiles(tcga)


@pytest.mark.parametrize(
    ("target", "level", "read_size"),
    [(0.5, 0, 224), (0.75, 0, 336), (1.0, 1, 224), (2.0, 1, 448)],
)
def test_level_choice_on_the_two_level_slide(tcga: Path, target: float, level: int, read_size: int) -> None:
    grid = plan_tiles(tcga, target_mpp=target, mpp=TCGA_MPP, min_tissue=0.0, thumb_size=128)
    assert (grid.level, grid.read_size) == (level, read_size)
    assert grid.level_mpp == pytest.approx(TCGA_MPP * (1.0 if level == 0 else 2.0005055500659967))


# --------------------------------------------------------------------------------------------------
# Synthetic pyramid with resolution tags: exact level choice, exact pixels
# --------------------------------------------------------------------------------------------------

SYN_MPP = 0.25  # level 0; level 1 is exactly 2x coarser
SYN_SIZE = (2048, 1536)  # level-0 (width, height); tissue fills x < 1024


def _synthetic_level0() -> np.ndarray:
    w, h = SYN_SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 245, dtype=np.uint8)  # white glass
    tissue = xx < w // 2
    img[..., 0] = np.where(tissue, 150 + (xx // 4) % 80, 245)  # pink H&E-like, with texture
    img[..., 1] = np.where(tissue, 60 + (yy // 4) % 60, 245)
    img[..., 2] = np.where(tissue, 140 + ((xx + yy) // 8) % 60, 245)
    return img


@pytest.fixture(scope="module")
def pyramid(openslide_mod, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    tifffile = pytest.importorskip("tifffile")
    level0 = _synthetic_level0()
    level1 = level0.reshape(level0.shape[0] // 2, 2, level0.shape[1] // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    path = tmp_path_factory.mktemp("pyramid") / "synthetic.tif"
    with tifffile.TiffWriter(path) as tw:
        for k, img in enumerate((level0, level1)):
            res = 1e4 / (SYN_MPP * 2**k)  # pixels per centimetre
            tw.write(
                img,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
            )
    return path, level1


@pytest.mark.parametrize(
    ("target", "level", "read_size"),
    [(0.25, 0, 224), (0.4, 0, 358), (0.4975, 1, 223), (0.5, 1, 224), (0.505, 1, 226), (1.0, 1, 448), (0.2, 0, 179)],
)
def test_synthetic_pyramid_level_choice_is_exact(pyramid, target: float, level: int, read_size: int) -> None:
    path, _ = pyramid
    with open_slide(path) as slide:
        assert slide.level_downsamples == (1.0, 2.0)
        assert slide_mpp(slide) == pytest.approx(SYN_MPP)
    grid = plan_tiles(path, target_mpp=target, min_tissue=0.0, thumb_size=256)
    assert (grid.level, grid.read_size, grid.level_mpp) == (level, read_size, pytest.approx(SYN_MPP * 2**level))


def test_synthetic_pyramid_tiles_and_pixels(pyramid, caplog: pytest.LogCaptureFixture) -> None:
    path, level1 = pyramid
    grid = plan_tiles(path, target_mpp=0.5)  # level 1, stride 448 level-0 px, tissue in x < 1024
    # columns x = 0, 448 are all tissue; x = 896 has 128/448 tissue (< 0.5); x = 1344 none
    expected = {(x, y) for x in (0, 448) for y in (0, 448, 896)}
    assert {tuple(c) for c in grid.coords.tolist()} == expected
    with open_slide(path) as slide:
        for i, (x, y) in enumerate(grid.coords.tolist()):
            tile = np.asarray(read_tile(slide, grid, i))
            assert np.array_equal(tile, level1[y // 2 : y // 2 + 224, x // 2 : x // 2 + 224])
    with caplog.at_level(logging.WARNING, logger="multiteach.data"):
        plan_tiles(path, target_mpp=0.2, thumb_size=256)
    assert any("upsampled" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# Streaming dataset and export
# --------------------------------------------------------------------------------------------------


def test_dataset_streams_both_slides_and_survives_a_worker(grids, cmu: Path, tcga: Path) -> None:
    ds = WSITileDataset([cmu, tcga], _to_tensor, mpp_overrides={TCGA: TCGA_MPP})
    n_cmu, n_tcga = EXPECTED[(CMU, 0.5)][0], EXPECTED[(TCGA, 0.5)][0]
    assert len(ds) == n_cmu + n_tcga and ds.skipped == []
    first, last = ds[0], ds[len(ds) - 1]
    assert first.shape == last.shape == (3, 224, 224) and first.dtype == torch.float32
    grid, j = ds.locate(len(ds) - 1)
    assert Path(grid.slide).name == TCGA and j == n_tcga - 1
    with open_slide(tcga) as slide:
        assert torch.equal(last, to_tensor01(read_tile(slide, grids[(TCGA, 0.5)][0], j)))
    pickle.loads(pickle.dumps(ds))  # handles opened above are dropped, not pickled
    indices = [0, n_cmu - 1, n_cmu, len(ds) - 1]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices), batch_size=2, num_workers=1)
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 224, 224)] * 2
    assert torch.equal(batches[1][1], last)
    ds.close()


def test_dataset_skips_unreadable_slides_once(cmu: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    note = tmp_path / "notes.txt"
    note.write_text("not a slide")
    missing = tmp_path / "gone.svs"
    with caplog.at_level(logging.WARNING, logger="multiteach.data"):
        ds = WSITileDataset([cmu, note, missing], target_mpp=1.0, thumb_size=256)
    assert ds.skipped == [note, missing]
    assert "not a whole-slide image" in ds.skip_reasons[str(note)]
    assert sum("skipping slide" in r.getMessage() for r in caplog.records) == 2
    assert ds[0].size == (224, 224) and ds[0].mode == "RGB"
    with pytest.raises(MultiteachError, match=r"All 2 slide\(s\) are unreadable.*does not exist"):
        WSITileDataset([missing, note])
    with pytest.raises(MultiteachError, match=r"mpp_overrides.*CMU-1-Smal-Region.*Did you mean: CMU-1-Small-Region"):
        WSITileDataset([cmu], mpp_overrides={"CMU-1-Smal-Region.svs": 0.5})


def test_write_tiles_writes_files_and_coordinates(cmu: Path, tcga: Path, tmp_path: Path) -> None:
    note = tmp_path / "notes.txt"
    note.write_text("not a slide")
    lines: list[str] = []
    out = tmp_path / "tiles"
    result = write_tiles(
        [cmu, tcga, note],
        out,
        target_mpp=1.0,
        mpp_overrides={"TCGA-CR-7395-01A-01-TS1": TCGA_MPP},
        image_format="png",
        progress=lines.append,
    )
    assert result.counts == {str(cmu): 9, str(tcga): EXPECTED[(TCGA, 1.0)][0]} and result.total == 55
    assert list(result.skipped) == [str(note)]
    assert len(lines) == 2 and "coordinates.csv" in lines[0]
    for slide, csv_path in result.csv_paths.items():
        assert csv_path == out / Path(slide).stem / "coordinates.csv"
        with csv_path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == result.counts[slide]
        assert {"slide", "x", "y", "level", "target_mpp", "tile_size"} <= set(rows[0])
        files = sorted(p.name for p in csv_path.parent.glob("*.png"))
        assert files == sorted(r["file"] for r in rows)
        assert Image.open(csv_path.parent / files[0]).size == (224, 224)
        grid = TileGrid.from_csv(csv_path)
        assert Path(grid.slide) == Path(slide).absolute() and len(grid) == result.counts[slide]
        assert (grid.level, grid.target_mpp) == (0 if Path(slide).name == CMU else 1, 1.0)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left behind
    with pytest.raises(MultiteachError, match="Unknown tile format 'gif'"):
        write_tiles([cmu], out, image_format="gif")


def test_cli_tile(cmu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["tile", str(cmu), "--out", str(out), "--mpp-target", "1.0", "--min-tissue", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "CMU-1-Small-Region.svs: 9 tiles" in printed and str(out / CMU[:-4] / "coordinates.csv") in printed
    assert len(list((out / CMU[:-4]).glob("*.jpg"))) == 9
    assert main(["tile", str(tmp_path / "nope.svs"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_tile_reads_per_slide_mpp_from_a_csv_and_exits_1_when_some_slides_are_skipped(
    cmu: Path, tcga: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """TCGA's file records no µm/px: the CSV's mpp column gives it (paths relative to the CSV, as data.slides)."""
    (tmp_path / "slides").mkdir()
    for slide in (cmu, tcga):
        (tmp_path / "slides" / slide.name).symlink_to(slide)
    listing = tmp_path / "lists" / "slides.csv"
    listing.parent.mkdir()
    listing.write_text(f"path,mpp,weight\n../slides/{CMU},,1\n../slides/{TCGA},{TCGA_MPP},2\n../slides/gone.svs,,1\n")
    out = tmp_path / "tiles"
    assert main(["tile", str(listing), "--out", str(out), "--mpp-target", "1.0"]) == 1  # gone.svs: skipped
    captured = capsys.readouterr()
    assert "CMU-1-Small-Region.svs: 9 tiles" in captured.out
    assert f"TCGA-CR-7395-01A-01-TS1.svs: {EXPECTED[(TCGA, 1.0)][0]} tiles (level 1" in captured.out
    assert "1 slide(s) skipped" in captured.err and "gone.svs" in captured.err
    rows = list(csv.DictReader((out / TCGA[:-4] / "coordinates.csv").open(newline="")))
    assert float(rows[0]["level_mpp"]) == pytest.approx(2 * TCGA_MPP, rel=0.01)
    listing.write_text(f"path,mpp\n../slides/{TCGA},0\n")
    assert main(["tile", str(listing), "--out", str(out)]) == 2
    assert "line 2 (../slides/TCGA-CR-7395-01A-01-TS1.svs): mpp '0' is not allowed" in capsys.readouterr().err


def test_slides_hint_names_data_slides_and_multiteach_tile(tmp_path: Path) -> None:
    from multiteach.data.lists.slide_list import slides_hint

    (tmp_path / "tiles").mkdir()
    (tmp_path / "tiles" / "a.png").write_bytes(b"")
    assert slides_hint(tmp_path / "tiles") == ""
    (tmp_path / "wsi" / "case1").mkdir(parents=True)
    (tmp_path / "wsi" / "case1" / "s1.SVS").write_bytes(b"")
    hint = slides_hint(tmp_path / "wsi")
    assert "whole-slide images (e.g. s1.SVS)" in hint and f"data.slides.source={tmp_path / 'wsi'}" in hint
    assert f"`multiteach tile {tmp_path / 'wsi'}/*.SVS --out TILES`" in hint


# --------------------------------------------------------------------------------------------------
# TileGrid CSV and errors
# --------------------------------------------------------------------------------------------------


def test_tile_grid_csv_round_trip_and_errors(tmp_path: Path) -> None:
    grid = TileGrid("/data/s.svs", 1, 1.0005, 1.0, 224, 224, np.array([[0, 448], [896, 0]]))
    path = grid.to_csv(tmp_path / "grid.csv")
    back = TileGrid.from_csv(path)
    assert (back.slide, back.level, back.level_mpp, back.target_mpp, back.read_size, back.tile_size) == (
        "/data/s.svs",
        1,
        1.0005,
        1.0,
        224,
        224,
    )
    assert np.array_equal(back.coords, grid.coords) and back.coords.dtype == np.int64
    TileGrid("/data/s.svs", 0, 0.5, 0.5, 224, 224, np.zeros((0, 2))).to_csv(tmp_path / "empty.csv")
    with pytest.raises(MultiteachError, match="no tiles"):
        TileGrid.from_csv(tmp_path / "empty.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(c if c != "level" else "levle" for c in CSV_COLUMNS) + "\n")
    with pytest.raises(MultiteachError, match="lacks column.*level.*Did you mean: levle"):
        TileGrid.from_csv(bad)


def test_open_slide_errors(openslide_mod, tmp_path: Path) -> None:
    with pytest.raises(MultiteachError, match=r"'.*missing\.svs' does not exist"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(MultiteachError, match="is a folder"):
        open_slide(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(photo)
    plain_tiff = tmp_path / "strips.tif"  # untiled TIFF: not a slide for OpenSlide
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(plain_tiff)
    for path in (text, photo, plain_tiff):
        with pytest.raises(MultiteachError, match=r"not a whole-slide image.*TileDataset"):
            open_slide(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overlap": 1.0}, "overlap"),
        ({"min_tissue": 1.5}, "min_tissue"),
        ({"tile_size": 0}, "tile_size"),
        ({"target_mpp": -0.5}, "target_mpp"),
        ({"target_mpp": math.nan}, "target_mpp"),
    ],
)
def test_bad_plan_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(MultiteachError, match=message):
        plan_tiles("never-opened.svs", **kwargs)


def test_moved_names_still_import_from_their_old_home_with_a_warning():
    import multiteach.data.tiling
    import multiteach.data.wsi as wsi

    with pytest.warns(DeprecationWarning, match=r"multiteach.data.wsi.write_tiles moved to multiteach.data.tiling"):
        assert wsi.write_tiles is multiteach.data.tiling.write_tiles
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        wsi.nothing_here  # noqa: B018
