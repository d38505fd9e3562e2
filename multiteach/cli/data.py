"""The ``data`` commands (check, list, shard, index, sample) and ``tile``: preparing tiles and slides at scale."""

from __future__ import annotations

import argparse
import sys

from multiteach.cli.command import Command, Runner
from multiteach.errors import MultiteachError


def add_tile(p: argparse.ArgumentParser) -> Runner:
    """``multiteach tile``: its arguments; returns its runner."""
    p.add_argument(
        "slides",
        nargs="+",
        metavar="SLIDE",
        help="slide files (.svs, .ndpi, .mrxs, tiled .tif, ...) and/or CSV slide lists (a 'path' column, relative to "
        "the CSV's folder, and an optional 'mpp' column: each slide's level-0 µm/px; as data.slides.source reads)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/<slide>/tiles + coordinates.csv")
    p.add_argument("--mpp-target", type=float, default=0.5, metavar="UM", help="tile µm/px (0.5 ≈ 20x; default 0.5)")
    p.add_argument("--tile-size", type=int, default=224, metavar="PX", help="tile side in pixels (default 224)")
    p.add_argument("--overlap", type=float, default=0.0, help="fraction of a tile shared by neighbours, [0, 1)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="lowest tissue fraction of a kept tile (default 0.5)")
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="UM",
        help="level-0 µm/px of every slide, overriding its metadata (a CSV slide list's mpp column wins)",
    )
    p.add_argument("--format", default="jpg", choices=["jpg", "png"], help="tile file format (default jpg)")

    def run(args: argparse.Namespace) -> int:
        from multiteach.data.tiling import expand_slide_lists, write_tiles

        slides, mpp_overrides = expand_slide_lists(args.slides)
        result = write_tiles(
            slides,
            args.out,
            target_mpp=args.mpp_target,
            tile_size=args.tile_size,
            overlap=args.overlap,
            min_tissue=args.min_tissue,
            mpp=args.mpp,
            mpp_overrides=mpp_overrides or None,
            image_format=args.format,
            progress=lambda line: print(line, flush=True),
        )
        print(f"{result.total} tiles from {len(result.counts)} slide(s) in {args.out}", flush=True)
        if result.skipped:  # each was logged (with its reason) as it happened
            names = ", ".join(result.skipped)
            print(f"multiteach tile: {len(result.skipped)} slide(s) skipped: {names}", file=sys.stderr)
            return 1
        return 0

    return run


def _data_index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", nargs="+", metavar="SLIDES", help="slide folders, .txt/.csv slide lists or slide files")
    p.add_argument("--index-dir", metavar="DIR", help="index folder (default $MULTITEACH_INDEX_DIR or ~/.cache/...)")
    p.add_argument("--processes", type=int, default=2, metavar="N", help="worker processes (default 2)")
    p.add_argument("--thumb-size", type=int, default=1024, metavar="PX", help="mask thumbnail side (default 1024)")
    p.add_argument("--min-saturation", type=int, default=15, metavar="S", help="saturation floor (default 15)")
    p.add_argument("--mpp", type=float, default=None, metavar="UM", help="level-0 µm/px of slides recording none")
    p.add_argument("--retry-failed", action="store_true", help="retry slides recorded as unreadable")


def _data_index(args: argparse.Namespace) -> int:
    """``multiteach data index``: build (or check) the tissue index; 1 when some slide is skipped."""
    from multiteach.data.index import IndexSettings, build_index, default_index_dir
    from multiteach.data.lists.slide_list import read_slide_list

    settings = IndexSettings(args.thumb_size, args.min_saturation, args.mpp)
    index = build_index(
        read_slide_list(args.slides),
        settings,
        args.index_dir or default_index_dir(),
        processes=args.processes,
        retry_failed=args.retry_failed,
    )
    source = args.slides[0] if len(args.slides) == 1 else f"[{','.join(args.slides)}]"
    print(
        f"{len(index)} slide(s) indexed in {index.index_dir} ({index.built} built, {index.reused} reused, "
        f"{index.seconds:.1f} s); train with data.slides.source={source} data.slides.index_dir={index.index_dir}"
    )
    for what, reason in index.skipped:
        print(f"multiteach data index: skipped {what}: {reason}", file=sys.stderr)
    return 1 if index.skipped else 0


def _data_sample(args: argparse.Namespace) -> int:
    """``multiteach data sample``: the first N tiles of a recipe's online-patching stream as a coordinate CSV."""
    from multiteach.config import load_recipe
    from multiteach.data.online import open_slide_source, sample_positions

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.data.slides is None:
        raise MultiteachError(f"{args.recipe}: data.slides is not set; `data sample` freezes an online-patching stream")
    if args.tiles < 1:
        raise MultiteachError(f"--tiles: needs at least 1, got {args.tiles}")
    out, slides = sample_positions(open_slide_source(recipe.data.slides, recipe.seed), args.tiles, args.out)
    print(
        f"{args.tiles} tile position(s) from {slides} slide(s) -> {out}; train or build a teacher-feature cache with "
        f"data.train={out} (and data.slides=null)"
    )
    return 0


def add_data(p: argparse.ArgumentParser) -> Runner:
    """``multiteach data ACTION``: the actions and their arguments; returns the runner that dispatches them."""
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="read and decode every tile of data.train-style sources, in parallel")
    check.add_argument("sources", nargs="+", metavar="SOURCE", help="tile folders/lists, coordinate or shard folders")
    check.add_argument("--processes", type=int, default=2, metavar="N", help="worker processes (default 2)")
    check.add_argument("--out-good", metavar="LIST", help="write the readable tiles of folders/lists as a text list")
    check.add_argument("--slide-dir", metavar="DIR", help="slides that TRIDENT/CLAM coordinate files name")
    listing = actions.add_parser("list", help="walk tile folders once and save every image path as a text list")
    listing.add_argument("folders", nargs="+", metavar="FOLDER")
    listing.add_argument("--out", required=True, metavar="LIST", help="the text list to write (one path per line)")
    shard = actions.add_parser("shard", help="pack tiles into WebDataset tar shards (needs multiteach[shards])")
    shard.add_argument("sources", nargs="+", metavar="SOURCE", help="tile folders or list files")
    shard.add_argument("--out", required=True, metavar="DIR", help="folder for shard-000000.tar, ...")
    shard.add_argument("--tiles-per-shard", type=int, default=10_000, metavar="N", help="default 10000")
    for action in (check, listing, shard):
        action.add_argument("--extensions", default="jpg,jpeg,png,tif,tiff", help="image extensions in folders")
    _data_index_args(actions.add_parser("index", help="build the tissue index of slides for data.slides, in parallel"))
    sample = actions.add_parser("sample", help="freeze positions of a recipe's data.slides stream as a coordinate CSV")
    sample.add_argument("recipe", help="a recipe with data.slides (built-in name or YAML path)")
    sample.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. seed=1")
    sample.add_argument("--tiles", type=int, required=True, metavar="N", help="samples to freeze (stream positions)")
    sample.add_argument("--out", required=True, metavar="CSV", help="the coordinate CSV to write")

    def run(args: argparse.Namespace) -> int:
        if args.action == "index":
            return _data_index(args)
        if args.action == "sample":
            return _data_sample(args)
        from multiteach.data.sources import open_tile_source, write_text_list

        extensions = [e.strip() for e in args.extensions.split(",") if e.strip()]
        if args.action == "list":
            source = open_tile_source(args.folders, extensions)
            out = write_text_list(source.paths, args.out)
            print(f"{len(source)} tile path(s) -> {out}; train with data.train={out}")
            return 0
        if args.action == "shard":
            from multiteach.data.sources.shards import write_shards

            source = open_tile_source(args.sources, extensions)
            shards = write_shards(source.paths, args.out, args.tiles_per_shard)
            print(f"{len(source)} tile(s) -> {len(shards)} shard(s) in {args.out}; train with data.train={args.out}")
            return 0
        from multiteach.data.check import check_source, good_list

        source = open_tile_source(args.sources, extensions, args.slide_dir)
        report = check_source(source, processes=args.processes)
        print(report.render())
        if args.out_good:
            print(f"readable tiles -> {good_list(source, report, args.out_good)}")
        return 1 if report.bad else 0

    return run


TILE = Command(
    "tile",
    "cut whole-slide images into tissue tiles at a target resolution (needs multiteach[wsi]); exit status 0 when "
    "every slide was tiled, 1 when some were skipped (listed), 2 when none could be",
    add_tile,
)
DATA = Command(
    "data", "your data at scale: check every tile, save a folder as a list, pack shards, index slides", add_data
)
