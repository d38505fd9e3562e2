"""A lab's corpus: start-up time, memory and read speed of the three ways in, at growing sizes, in one run.

Corpora are made of links to ``../shared/data`` (hard links for tiles, in nested folders of 1,000 and as a list
file; symbolic links for slides), never copies. Measured per size, each `multiteach train` a fresh process run
alone (``distill_tiny``, batch 32, 2 DataLoader workers, 3 steps):

- tiles 10^4 / 10^5 / 10^6 (folder and list): seconds from command start to the first optimiser step, peak RSS
  of the main process and of each worker;
- slides 10 / 100 / 1,000: tissue-index build time cold (2 processes), then time to the first step and peak RSS
  with the index warm;
- tiles/s of one worker: online patching vs bare OpenSlide ``read_region`` of the same tiles (the limit), and vs
  decoding pre-extracted JPEG tiles.

Usage: ``python benchmarks/data_scale.py [--tiles 10000,100000,1000000] [--slides 10,100,1000] [--work DIR]``.
The last line gives the five figures at the largest sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TILES = SHARED / "unlabeled_tiles_224" / "tiles"
SLIDES = [SHARED / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs", SHARED / "wsi" / "CMU-1-Small-Region.svs"]
PER_FOLDER = 1000
SLIDE_MPP = ["data.slides.mpp=0.5"]  # the TCGA slide records no µm/px (the CMU one records 0.499, which wins)
TRAIN = [
    "distill_tiny",
    "schedule.steps=3",
    "train.log_every=1",
    "train.checkpoint_every=1000",
    "data.num_workers=2",
    "optim.batch_size=32",
]


def tile_corpus(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` hard links to the shared tiles in ``root/tiles/dNNNN/`` (1,000 per folder) and a list file of them."""
    sources = sorted(TILES.glob("*.jpg"))
    folder, listing = root / "tiles", root / "tiles.txt"
    if listing.is_file() and sum(1 for _ in listing.open()) == n:
        return folder, listing
    shutil.rmtree(folder, ignore_errors=True)
    lines = []
    for i in range(n):
        d = folder / f"d{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0:
            d.mkdir(parents=True)
        target = d / f"t{i:08d}.jpg"
        os.link(sources[i % len(sources)], target)
        lines.append(str(target))
    listing.write_text("\n".join(lines) + "\n")
    return folder, listing


def slide_corpus(root: Path, n: int) -> Path:
    """``n`` symbolic links in ``root/slides_<n>/`` to the shared slides (alternating).

    The tissue index keys a slide by its real path (a slide linked twice is indexed once), so each symbolic link
    points to a hard link of its own in ``root/slide_store/``: every slide then has its own identity, as ``n``
    distinct slides would, and still no byte is copied.
    """
    folder, store = root / f"slides_{n}", root / "slide_store"
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    store.mkdir(exist_ok=True)
    for i in range(n):
        src = SLIDES[i % len(SLIDES)]
        linked = store / f"s{i:05d}{src.suffix}"
        if not linked.exists():
            os.link(src, linked)
        (folder / linked.name).symlink_to(linked)
    return folder


def time_to_first_step(overrides: list[str], run_dir: Path, env: dict[str, str]) -> dict[str, float]:
    """Run ``multiteach train`` and watch it: seconds until its first step is logged, peak RSS per process (MB)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "multiteach", "train", *TRAIN, *overrides, f"output_dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    main = psutil.Process(proc.pid)
    peaks: dict[int, float] = {}
    first = None
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        try:
            for p in [main, *main.children(recursive=True)]:
                rss = p.memory_info().rss / 2**20
                peaks[p.pid] = max(peaks.get(p.pid, 0.0), rss)
        except psutil.Error:
            pass
        if first is None and metrics.is_file() and metrics.stat().st_size > 0:
            first = time.perf_counter() - t0
        time.sleep(0.02)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}):\n{err[-3000:]}")
    workers = sorted(v for k, v in peaks.items() if k != proc.pid)
    return {
        "first_step_s": first if first is not None else float("nan"),
        "rss_main_mb": peaks.get(proc.pid, float("nan")),
        "rss_workers_mb": workers,
        "total_s": time.perf_counter() - t0,
    }


def _fmt_workers(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values) or "-"


def bench_tiles(work: Path, sizes: list[int], env: dict[str, str]) -> dict[int, dict[str, dict]]:
    print(f"== tiles (hard links in nested folders of {PER_FOLDER}, and as a list file)")
    print(f"{'tiles':>9} {'source':>7} {'make s':>7} {'1st step s':>10} {'RSS main MB':>12} {'workers MB':>12}")
    out: dict[int, dict[str, dict]] = {}
    for n in sizes:
        t0 = time.perf_counter()
        folder, listing = tile_corpus(work / f"tiles_{n}", n)
        made = time.perf_counter() - t0
        out[n] = {}
        for kind, path in (("folder", folder), ("list", listing)):
            r = time_to_first_step([f"data.train={path}"], work / "run", env)
            out[n][kind] = r
            print(
                f"{n:>9} {kind:>7} {made:>7.1f} {r['first_step_s']:>10.1f} {r['rss_main_mb']:>12.0f} "
                f"{_fmt_workers(r['rss_workers_mb']):>12}",
                flush=True,
            )
            made = 0.0
    return out


def bench_slides(work: Path, sizes: list[int], env: dict[str, str]) -> dict[int, dict]:
    from multiteach.config import load_recipe
    from multiteach.data.index import build_index
    from multiteach.data.lists.slide_list import read_slide_list

    print("== slides (symbolic links, each to its own hard link of one of the 2 shared slides; online patching)")
    head = f"{'slides':>7} {'index cold s':>12} {'/slide ms':>9} {'1st step warm s':>15}"
    print(f"{head} {'RSS main MB':>12} {'workers MB':>12}")
    out: dict[int, dict] = {}
    for n in sizes:
        folder = slide_corpus(work, n)
        index_dir = work / f"index_{n}"  # cold: an empty index folder per size
        shutil.rmtree(index_dir, ignore_errors=True)
        overrides = [f"data.slides.source={folder}", f"data.slides.index_dir={index_dir}", *SLIDE_MPP]
        settings = load_recipe("distill_tiny", overrides).data.slides
        t0 = time.perf_counter()
        build_index(read_slide_list(settings.source), settings, index_dir, processes=2, progress=False)
        cold = time.perf_counter() - t0
        r = time_to_first_step(overrides, work / "run", env)
        out[n] = {"index_cold_s": cold, **r}
        print(
            f"{n:>7} {cold:>12.1f} {1000 * cold / n:>9.0f} {r['first_step_s']:>15.1f} {r['rss_main_mb']:>12.0f} "
            f"{_fmt_workers(r['rss_workers_mb']):>12}",
            flush=True,
        )
    return out


def bench_read_speed(work: Path, n_tiles: int = 400) -> dict[str, float]:
    """Tiles/s of one process (1 thread): online patching vs bare read_region of the same tiles vs JPEG decode."""
    import torch

    from multiteach.config import load_recipe
    from multiteach.data.lists.images import load_rgb
    from multiteach.data.online import open_slide_source
    from multiteach.data.wsi.slide import open_slide

    torch.set_num_threads(1)
    folder = slide_corpus(work, 10)
    overrides = [f"data.slides.source={folder}", f"data.slides.index_dir={work / 'index'}", *SLIDE_MPP]
    recipe = load_recipe("distill_tiny", overrides)
    source = open_slide_source(recipe.data.slides, recipe.seed, progress=False)
    source.read(0, 0)  # the first visit opens its slide: part of the measured loop below too
    t0 = time.perf_counter()
    tiles = [source.read(i, 0) for i in range(n_tiles)]
    patching = n_tiles / (time.perf_counter() - t0)
    # the same regions, read bare: one handle per slide opened beforehand, read_region + RGB conversion
    handles = {}
    regions = []
    for t in tiles:
        slide, xy, _ = t.provenance.rsplit("@", 2)
        x, y = (int(v) for v in xy.split(","))
        handles.setdefault(slide, open_slide(slide))
        regions.append((slide, x, y))
    size = recipe.data.slides.tile_size
    t0 = time.perf_counter()
    for slide, x, y in regions:
        handles[slide].read_region((x, y), 0, (size, size)).convert("RGB")
    bare = n_tiles / (time.perf_counter() - t0)
    jpgs = sorted(TILES.glob("*.jpg"))[:n_tiles]
    t0 = time.perf_counter()
    for p in jpgs:
        load_rgb(p)
    jpeg = len(jpgs) / (time.perf_counter() - t0)
    print("== tiles/s of one process, 1 thread (224 px at 0.5 µm/px; level-0 reads on these slides)")
    print(f"online patching {patching:.0f}/s | bare read_region {bare:.0f}/s | pre-extracted JPEG decode {jpeg:.0f}/s")
    print(f"online patching / bare reads {patching / bare:.2f}x; online patching / JPEG tiles {patching / jpeg:.2f}x")
    return {"patching": patching, "bare": bare, "jpeg": jpeg}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", default="10000,100000,1000000")
    ap.add_argument("--slides", default="10,100,1000")
    ap.add_argument("--work", default=None, help="folder for the corpora (default: a temporary folder, removed)")
    args = ap.parse_args()
    if not TILES.is_dir() or not all(s.is_file() for s in SLIDES):
        raise SystemExit(f"needs the shared data beside the repository ({SHARED})")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="multiteach-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MULTITEACH_INDEX_DIR": str(work / "index")}
    print(f"machine: {os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; corpora in {work}")
    tiles = [int(x) for x in args.tiles.split(",") if x]
    slides = [int(x) for x in args.slides.split(",") if x]
    t = bench_tiles(work, tiles, env) if tiles else {}
    s = bench_slides(work, slides, env) if slides else {}
    speed = bench_read_speed(work)
    (work / "data_scale.json").write_text(json.dumps({"tiles": t, "slides": s, "speed": speed}, indent=2, default=str))
    parts = []
    if t:
        big, small = max(t), min(t)
        worst = max(t[big].values(), key=lambda r: r["first_step_s"])
        extra = max(t[big][k]["rss_main_mb"] - t[small][k]["rss_main_mb"] for k in t[big])
        parts.append(f"{big:,} tiles: first step {worst['first_step_s']:.1f} s, RSS +{extra:.0f} MB vs {small:,}")
    if s:
        big, small = max(s), min(s)
        parts.append(
            f"{big:,} slides warm: first step {s[big]['first_step_s']:.1f} s, "
            f"RSS +{s[big]['rss_main_mb'] - s[small]['rss_main_mb']:.0f} MB vs {small:,}"
        )
    parts.append(f"online patching {speed['patching'] / speed['bare']:.2f}x bare reads")
    print("summary: " + "; ".join(parts))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
