"""Tests for online patching: slide lists, the tissue index and ``SlideSource``.

Most tests use small synthetic pyramidal TIFFs (written with tifffile, read by OpenSlide as generic-tiff), so they
run without shared data; the last ones use the real slides in ../shared/data/wsi when present.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from multiteach.cli import main
from multiteach.config import load_recipe
from multiteach.config.schema import SlidesConfig
from multiteach.data.index import IndexSettings, build_index, default_index_dir, load_mask
from multiteach.data.lists.slide_list import SLIDE_EXTENSIONS, read_slide_list
from multiteach.data.online import HSV_MIN_FRACTION, SlideSource, hsv_tissue_fraction
from multiteach.data.sources.base import TileSource
from multiteach.errors import MultiteachError
from tests.conftest import SHARED_DATA

WSI_DIR = SHARED_DATA / "wsi"
SIZE = 1024  # level-0 side of the synthetic slides, 0.5 µm/px; levels 1 and 2 are 2x and 4x coarser
SYN_MPP = 0.5
THUMB = 128  # small masks keep the index fast


@pytest.fixture(scope="module")
def tifffile():
    pytest.importorskip("openslide", reason="needs openslide-python + openslide-bin (multiteach[wsi])")
    return pytest.importorskip("tifffile")


def _level0(kind: str) -> np.ndarray:
    """An H&E-like pink textured tissue region on white glass: the left half ("half") or a centred square."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    tissue = xx < SIZE // 2 if kind == "half" else (abs(xx - SIZE / 2) < SIZE / 4) & (abs(yy - SIZE / 2) < SIZE / 4)
    img = np.full((SIZE, SIZE, 3), 245, dtype=np.uint8)
    img[..., 0] = np.where(tissue, 150 + (xx // 4) % 80, 245)
    img[..., 1] = np.where(tissue, 60 + (yy // 4) % 60, 245)
    img[..., 2] = np.where(tissue, 140 + ((xx + yy) // 8) % 60, 245)
    return img


def write_pyramid(tifffile, path: Path, kind: str = "half", mpp: float | None = SYN_MPP) -> Path:
    """A 3-level tiled pyramid TIFF (downsamples 1, 2, 4); resolution tags only when ``mpp`` is given."""
    img = _level0(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            extra = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2**k)  # pixels per centimetre
                extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(img, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1 if k else 0, **extra)
            img = img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    return path


@pytest.fixture(scope="module")
def corpus(tifffile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two synthetic slides (a.tif: tissue on the left half, b.tif: a centred square)."""
    root = tmp_path_factory.mktemp("corpus")
    write_pyramid(tifffile, root / "a.tif", "half")
    write_pyramid(tifffile, root / "sub" / "b.tif", "square")
    return root


def slides_config(source, **kw) -> SlidesConfig:
    kw.setdefault("thumb_size", THUMB)
    kw.setdefault("target_mpp", [0.5, 1.0, 2.0])
    return SlidesConfig(source=source, **kw)


def make_source(source, index_dir: Path, seed: int = 0, **kw) -> SlideSource:
    cfg = slides_config(source, **kw)
    index = build_index(read_slide_list(cfg.source), cfg, index_dir, processes=1, progress=False)
    return SlideSource(cfg, seed, index)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------------------------------
# Slide lists
# --------------------------------------------------------------------------------------------------


def test_slide_lists_folders_txt_and_csv(corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = corpus / "a.tif", corpus / "sub" / "b.tif"
    (corpus / ".hidden.svs").write_bytes(b"x")  # hidden: ignored
    try:
        table = read_slide_list(corpus)
    finally:
        (corpus / ".hidden.svs").unlink()
    assert table.paths == [str(a), str(b)] and np.isnan(table.mpp).all() and table.weight.tolist() == [1.0, 1.0]
    listing = tmp_path / "lists" / "slides.txt"
    listing.parent.mkdir()
    listing.write_text(f"# training slides\n{os.path.relpath(a, listing.parent)}\n\n{b}\n{tmp_path}/gone.svs\n")
    with caplog.at_level(logging.WARNING, logger="multiteach.data"):
        table = read_slide_list(listing)
    assert table.paths == [str(a), str(b)]
    assert table.missing == [(f"{tmp_path}/gone.svs", "does not exist")]
    assert any("1 of 3 listed slide(s)" in r.getMessage() and "gone.svs" in r.getMessage() for r in caplog.records)
    csv = tmp_path / "slides.csv"
    csv.write_text(f"Path,mpp,weight\n{a},0.25,3\n{b},,0\n{a},,\n")
    table = read_slide_list([csv])
    assert table.paths == [str(a), str(b)]  # a named twice: kept once
    assert table.mpp[0] == 0.25 and np.isnan(table.mpp[1]) and table.weight.tolist() == [3.0, 0.0]
    assert read_slide_list(str(a)).paths == [str(a)]


def test_slide_list_errors(corpus: Path, tmp_path: Path) -> None:
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    (tiles / "t0.jpg").write_bytes(b"jpeg")
    with pytest.raises(
        MultiteachError, match=r"no slides in folder .*tiles.*\.ndpi, \.scn, \.svs.*1 JPEG/PNG.*data\.train"
    ):
        read_slide_list(tiles)
    with pytest.raises(MultiteachError, match=r"data\.slides\.source: .*nope\.txt does not exist"):
        read_slide_list(tmp_path / "nope.txt")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"paths,weight\n{corpus / 'a.tif'},1\n")
    with pytest.raises(MultiteachError, match=r"needs a 'path' column.*it has: paths, weight.*Did you mean: paths"):
        read_slide_list(bad)
    bad.write_text(f"path,weight\n{corpus / 'a.tif'},1\n{corpus / 'sub' / 'b.tif'},-2\n")
    with pytest.raises(MultiteachError, match=r"bad\.csv line 3 .*b\.tif.*weight '-2' is not allowed.*>= 0"):
        read_slide_list(bad)
    bad.write_text(f"path,mpp\n{corpus / 'a.tif'},nan\n")
    with pytest.raises(MultiteachError, match=r"line 2 .*mpp 'nan' is not allowed.*> 0"):
        read_slide_list(bad)
    gone = tmp_path / "gone.txt"
    gone.write_text("x.svs\ny.svs\n")
    with pytest.raises(
        MultiteachError, match=r"none of the 2 listed slide\(s\) exists; first: .*x\.svs does not exist"
    ):
        read_slide_list(gone)
    with pytest.raises(MultiteachError, match=r"is not a slide folder.*Did you mean: svs"):
        (tmp_path / "a.sv").write_bytes(b"x")
        read_slide_list(tmp_path / "a.sv")
    assert "svs" in SLIDE_EXTENSIONS and "dcm" in SLIDE_EXTENSIONS


# --------------------------------------------------------------------------------------------------
# The tissue index
# --------------------------------------------------------------------------------------------------


def test_default_index_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MULTITEACH_INDEX_DIR", str(tmp_path / "ix"))
    assert default_index_dir() == tmp_path / "ix"
    monkeypatch.delenv("MULTITEACH_INDEX_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_index_dir() == tmp_path / "cache" / "multiteach" / "tissue-index"


def test_index_is_built_once_and_rebuilt_only_for_what_changed(tifffile, tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    for name in ("a", "b", "c"):
        write_pyramid(tifffile, folder / f"{name}.tif", "half" if name != "b" else "square")
    before = files_under(folder)
    table, index_dir = read_slide_list(folder), tmp_path / "index"
    cold = build_index(table, IndexSettings(thumb_size=THUMB), index_dir, processes=2, progress=False)  # a pool
    assert (cold.built, cold.reused, len(cold), cold.skipped) == (3, 0, 3, [])
    warm = build_index(read_slide_list(folder), IndexSettings(thumb_size=THUMB), index_dir, progress=False)
    assert (warm.built, warm.reused) == (0, 3) and warm.seconds < 1.0
    assert warm.slides == cold.slides and np.array_equal(warm.tissue_px, cold.tissue_px)
    assert np.array_equal(load_mask(warm.entries[0]), load_mask(cold.entries[0]))
    # the mask is the tissue: a.tif is tissue on its left half
    mask = load_mask(warm.entries[0])
    assert mask[:, : mask.shape[1] // 2 - 2].mean() > 0.95 and mask[:, mask.shape[1] // 2 + 2 :].mean() < 0.05
    assert warm.mpp.tolist() == [SYN_MPP] * 3 and warm.levels(0)[0].tolist() == [1.0, 2.0, 4.0]
    other = build_index(table, IndexSettings(thumb_size=THUMB, min_saturation=30), index_dir, progress=False)
    assert other.built == 3  # another mask setting: new entries
    st = os.stat(folder / "b.tif")
    os.utime(folder / "b.tif", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    touched = build_index(read_slide_list(folder), IndexSettings(thumb_size=THUMB), index_dir, progress=False)
    assert (touched.built, touched.reused) == (1, 2)
    again = build_index(read_slide_list(folder), IndexSettings(thumb_size=THUMB, mpp=0.3), index_dir, progress=False)
    assert again.built == 0  # the mpp fallback never rebuilds a mask (and metadata wins over it here)
    assert again.mpp.tolist() == [SYN_MPP] * 3
    assert files_under(folder) == before  # nothing written beside the slides
    assert len(list((index_dir / "entries").rglob("*.npz"))) == 7


def test_unreadable_slides_are_skipped_and_listed(tifffile, tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    good = write_pyramid(tifffile, folder / "good.tif")
    (folder / "garbage.svs").write_bytes(os.urandom(4096))
    (folder / "truncated.tif").write_bytes(good.read_bytes()[:5000])
    index = build_index(read_slide_list(folder), IndexSettings(thumb_size=THUMB), tmp_path / "ix", progress=False)
    assert index.slides == [str(good)]
    skipped = dict(index.skipped)
    assert set(skipped) == {str(folder / "garbage.svs"), str(folder / "truncated.tif")}
    assert all(r.startswith("unreadable: ") for r in skipped.values())
    assert "not a whole-slide image OpenSlide can read" in skipped[str(folder / "garbage.svs")]
    warm = build_index(read_slide_list(folder), IndexSettings(thumb_size=THUMB), tmp_path / "ix", progress=False)
    assert warm.built == 0 and dict(warm.skipped) == skipped  # failures are remembered, not retried
    retried = build_index(
        read_slide_list(folder), IndexSettings(thumb_size=THUMB), tmp_path / "ix", progress=False, retry_failed=True
    )
    assert retried.built == 2
    (folder / "good.tif").unlink()
    with pytest.raises(
        MultiteachError, match=r"None of the 2 slide\(s\) .* is usable; first: .*garbage\.svs: unreadable"
    ):
        build_index(read_slide_list(folder), IndexSettings(thumb_size=THUMB), tmp_path / "ix", progress=False)


def test_slide_without_mpp_needs_a_setting_or_a_csv_value(tifffile, tmp_path: Path) -> None:
    plain = write_pyramid(tifffile, tmp_path / "plain.tif", mpp=None)
    tagged = write_pyramid(tifffile, tmp_path / "tagged.tif")
    settings, ix = IndexSettings(thumb_size=THUMB), tmp_path / "ix"
    index = build_index(read_slide_list([str(plain), str(tagged)]), settings, ix, progress=False)
    assert index.slides == [str(tagged)]
    ((what, reason),) = index.skipped
    assert (
        what == str(plain) and "records no µm/px" in reason and "data.slides.mpp" in reason and "mpp column" in reason
    )
    with pytest.raises(MultiteachError, match=r"plain\.tif: records no µm/px.*data\.slides\.mpp"):
        build_index(read_slide_list(plain), settings, ix, progress=False)
    fallback = build_index(read_slide_list(plain), IndexSettings(thumb_size=THUMB, mpp=0.25), ix, progress=False)
    assert fallback.mpp.tolist() == [0.25] and fallback.built == 0
    csv = tmp_path / "slides.csv"
    csv.write_text(f"path,mpp\n{plain},0.3\n{tagged},0.2\n")
    by_csv = build_index(read_slide_list(csv), settings, ix, progress=False)
    assert by_csv.mpp.tolist() == [0.3, 0.2]  # a CSV value wins over the metadata too


# --------------------------------------------------------------------------------------------------
# SlideSource
# --------------------------------------------------------------------------------------------------


def test_read_is_a_pure_function_of_seed_epoch_and_index(corpus: Path, tmp_path: Path) -> None:
    src = make_source(corpus, tmp_path / "ix", tiles_per_visit=2, samples_per_epoch=5)
    assert isinstance(src, TileSource) and src.shuffle is False and len(src) == 6
    twin = make_source(corpus, tmp_path / "ix", tiles_per_visit=2, samples_per_epoch=5)
    indices = [0, 1, 2, 5, 4]
    first = [src.read(i, 0) for i in indices]
    copied = pickle.loads(pickle.dumps(src))  # open handles are not pickled
    for other in (twin, copied):
        again = [other.read(i, 0) for i in reversed(indices)][::-1]
        assert [t.provenance for t in again] == [t.provenance for t in first]
        assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(again, first))
    tile = first[0]
    assert tile.image.size == (224, 224) and tile.image.mode == "RGB" and tile.skipped == ()
    slide, xy, mpp = tile.provenance.rsplit("@", 2)
    assert Path(slide).parent in (corpus, corpus / "sub") and float(mpp) in (0.5, 1.0, 2.0)
    assert [int(v) for v in xy.split(",")] == [src.draw(0, 0).x, src.draw(0, 0).y]
    epoch1 = [src.read(i, 1).provenance for i in indices]
    assert epoch1 != [t.provenance for t in first]
    other_seed = make_source(corpus, tmp_path / "ix", seed=1, tiles_per_visit=2)
    assert [other_seed.read(i, 0).provenance for i in indices] != [t.provenance for t in first]
    visits = [src.visit(v, 0) for v in range(3)]
    assert [src.draw(2 * v + 1, 0)[1:3] for v in range(3)] == [(s, src.targets[t]) for t, s in visits]


def test_tiles_are_tissue_and_pixels_match_the_slide(corpus: Path, tmp_path: Path) -> None:
    from multiteach.data.wsi.slide import open_slide

    src = make_source(corpus, tmp_path / "ix", target_mpp=[0.5, 1.0], min_tissue=0.9)
    for i in range(12):
        d = src.draw(i, 0)
        extent = 224 if d.target_mpp == 0.5 else 448  # footprint in level-0 pixels
        assert d.tissue >= 0.9 and 0 <= d.x <= SIZE - extent and 0 <= d.y <= SIZE - extent
        tile = np.asarray(src.read(i, 0).image)
        with open_slide(d.slide) as slide:
            region = slide.read_region((d.x, d.y), d.level, (d.read_size, d.read_size)).convert("RGB")
        assert d.read_size == 224 and d.level == (0 if d.target_mpp == 0.5 else 1)
        assert np.array_equal(tile, np.asarray(region))  # read size equals tile size: no resampling
        assert hsv_tissue_fraction(src.read(i, 0).image) > 0.8  # pink tissue, not glass


def test_magnification_and_slide_proportions(corpus: Path, tmp_path: Path) -> None:
    csv = tmp_path / "slides.csv"
    csv.write_text(f"path,weight\n{corpus / 'a.tif'},1\n{corpus / 'sub' / 'b.tif'},3\n")
    src = make_source(csv, tmp_path / "ix", target_mpp=[0.5, 1.0, 2.0], proportions=[1, 2, 5])
    n = 4000
    draws = np.array([src.visit(v, 0) for v in range(n)])
    shares = np.bincount(draws[:, 0], minlength=3) / n
    assert shares == pytest.approx([1 / 8, 2 / 8, 5 / 8], abs=0.03)
    # slides: weight x tissue area (a: half the slide, b: a quarter) -> a : b = 1 * 0.5 : 3 * 0.25 = 2 : 3
    area = src.index.tissue_um2
    expected_b = 3 * area[1] / (area[0] + 3 * area[1])
    assert np.mean(draws[:, 1] == 1) == pytest.approx(expected_b, abs=0.03) and 0.55 < expected_b < 0.65
    csv.write_text(f"path,weight\n{corpus / 'a.tif'},0\n{corpus / 'sub' / 'b.tif'},1\n")
    only_b = make_source(csv, tmp_path / "ix")
    assert {only_b.visit(v, 0)[1] for v in range(200)} == {1}  # weight 0: never drawn
    assert only_b.describe()["slides"] == 1


def test_targets_a_slide_cannot_serve(corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="multiteach.data"):
        src = make_source(corpus, tmp_path / "ix", target_mpp=[0.25, 0.5], proportions=[3, 1])
    assert src.shares.tolist() == [0.0, 1.0]
    ((target, why),) = src.unserved
    assert target == 0.25 and "finer than its level 0 (0.5 µm/px): tiles would be upsampled 2.00x" in why
    assert any("target_mpp 0.25 dropped" in r.getMessage() for r in caplog.records)
    assert {src.read(i, 0).provenance.rsplit("@", 1)[1] for i in range(8)} == {"0.5"}
    with pytest.raises(
        MultiteachError, match=r"no slide of .* can serve target_mpp \[0\.25, 8\.0\].*a\.tif: no target"
    ):
        make_source(corpus, tmp_path / "ix", target_mpp=[0.25, 8.0])
    small = make_source(corpus, tmp_path / "ix", target_mpp=[0.5, 4.0])  # 4.0: footprint 1792 px > 1024
    description = small.describe()
    assert (
        description["shares"] == [1.0, 0.0]
        and "smaller than one 224-px tile" in description["unserved_targets"][0]["reason"]
    )
    assert description["kind"] == "slides" and description["slides"] == 2 and description["skipped"] == []


def test_a_slide_that_fails_while_reading_is_replaced(tifffile, tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    good = write_pyramid(tifffile, folder / "good.tif")
    bad = write_pyramid(tifffile, folder / "bad.tif")
    cfg = dict(target_mpp=[0.5], tiles_per_visit=1)
    src = make_source(folder, tmp_path / "ix", **cfg)
    st = os.stat(bad)
    with tifffile.TiffFile(bad) as tf:  # corrupt every tile's compressed data, keep size and mtime
        spans = [(o, c) for page in tf.pages for o, c in zip(page.dataoffsets, page.databytecounts)]
    with open(bad, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset)
            fh.write(b"\xff" * count)
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    twin = make_source(folder, tmp_path / "ix", **cfg)
    assert twin.index.built == 0 and twin.index.slides == [str(bad), str(good)]  # the index still sees it
    visits = [src.visit(v, 0)[1] for v in range(10)]
    assert 0 in visits and 1 in visits
    tiles = [src.read(i, 0) for i in range(10)]
    assert all(t.provenance.startswith(str(good)) for t in tiles)
    for t, s in zip(tiles, visits):
        assert [w for w, _ in t.skipped] == ([str(bad)] if s == 0 else [])
    assert "OpenSlideError" in dict(tiles[visits.index(0)].skipped)[str(bad)]
    reversed_reads = [twin.read(i, 0) for i in reversed(range(10))][::-1]  # failure found at another index
    assert [t.provenance for t in reversed_reads] == [t.provenance for t in tiles]


def test_pool_never_exceeds_open_per_worker(tifffile, tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    for k in range(4):
        write_pyramid(tifffile, folder / f"s{k}.tif", "half" if k % 2 else "square")
    src = make_source(folder, tmp_path / "ix", target_mpp=[1.0], open_per_worker=2, tiles_per_visit=1)
    seen = set()
    for i in range(24):
        seen.add(src.read(i, 0).provenance.split("@")[0])
        assert len(src.pool) <= 2
    assert len(seen) == 4 and src.pool.opened > 4  # slides were closed and reopened
    copy = pickle.loads(pickle.dumps(src))
    assert len(copy.pool) == 0
    src.close()
    assert len(src.pool) == 0


def test_hsv_filter_keeps_tissue_tiles(corpus: Path, tmp_path: Path) -> None:
    kw = dict(target_mpp=[0.5], min_tissue=0.0, tiles_per_visit=1)
    plain = make_source(corpus, tmp_path / "ix", **kw)
    hsv = make_source(corpus, tmp_path / "ix", hsv_filter=True, **kw)
    fractions = [hsv_tissue_fraction(plain.read(i, 0).image) for i in range(40)]
    filtered = [hsv_tissue_fraction(hsv.read(i, 0).image) for i in range(40)]
    assert min(fractions) < HSV_MIN_FRACTION  # without the rule some tiles straddle glass
    assert np.mean(np.array(filtered) > HSV_MIN_FRACTION) >= 0.95 and np.mean(filtered) > np.mean(fractions)


def test_hsv_rule_matches_virchow_ranges() -> None:
    from PIL import Image

    def fraction(rgb: tuple[int, int, int]) -> float:
        return hsv_tissue_fraction(Image.new("RGB", (4, 4), rgb))

    assert fraction((190, 90, 170)) == 1.0  # eosin pink: hue 312 degrees
    assert fraction((90, 60, 160)) == 1.0  # haematoxylin purple: hue 258 degrees
    assert fraction((245, 245, 245)) == 0.0  # glass: no saturation
    assert fraction((80, 40, 70)) == 0.0  # too dark: value 80 < 103
    assert fraction((200, 120, 60)) == 0.0  # orange: hue 26 degrees, outside 180-360


def test_midnight_fragment_and_cli(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults: [distill_tiny, _base/midnight_mpp]\nname: midnight_try\n")
    slides = load_recipe(recipe, [f"data.slides.source={corpus}"]).data.slides
    assert slides.target_mpp == [0.25, 0.5, 1.0, 2.0] and slides.shares == [0.25] * 4
    assert (slides.min_tissue, slides.hsv_filter) == (0.4, True)
    with pytest.raises(MultiteachError, match=r"data\.slides\.source: required"):
        load_recipe(recipe)
    ix = tmp_path / "ix"
    args = ["data", "index", str(corpus), "--index-dir", str(ix), "--thumb-size", str(THUMB), "--processes", "1"]
    assert main(args) == 0
    assert "2 slide(s) indexed" in capsys.readouterr().out
    t0 = time.perf_counter()
    assert main(args) == 0 and time.perf_counter() - t0 < 2.0
    assert "(0 built, 2 reused" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Real slides
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_slides(tifffile) -> Path:
    if not (WSI_DIR / "TCGA-CR-7395-01A-01-TS1.svs").is_file():
        pytest.skip(f"needs the real slides in {WSI_DIR} (../shared/data/wsi beside the repository)")
    return WSI_DIR


def test_real_slides(real_slides: Path, tmp_path: Path) -> None:
    cmu, tcga = str(real_slides / "CMU-1-Small-Region.svs"), str(real_slides / "TCGA-CR-7395-01A-01-TS1.svs")
    (tmp_path / "truncated.svs").write_bytes(Path(tcga).read_bytes()[:1_000_000])
    src = make_source([str(real_slides), str(tmp_path / "truncated.svs")], tmp_path / "ix", mpp=0.5)
    assert src.index.slides == [cmu, tcga] and src.index.mpp.tolist() == [0.499, 0.5]  # TCGA records none
    assert [w for w, _ in src.skipped] == [str(tmp_path / "truncated.svs")]
    slide_of_visit = [src.visit(v, 0)[1] for v in range(50)]
    visits = [slide_of_visit.index(0), slide_of_visit.index(1), 2, 3]  # one visit of each slide, and more
    tiles = [src.read(v * src.tiles_per_visit, 0) for v in visits]
    assert [t.provenance.split("@")[0] for t in tiles[:2]] == [cmu, tcga]
    assert all(t.image.size == (224, 224) for t in tiles)
    assert np.mean([hsv_tissue_fraction(t.image) for t in tiles]) > 0.5
    fine = make_source(str(real_slides), tmp_path / "ix", mpp=0.5, target_mpp=[0.25, 0.5])
    assert fine.shares.tolist() == [0.0, 1.0] and fine.index.built == 0
