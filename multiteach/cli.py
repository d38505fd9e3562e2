"""The ``multiteach`` command line: one sub-command per job.

``multiteach teachers`` lists the teacher catalog, ``config`` resolves/validates a recipe, ``train`` distils
a student, ``tile`` cuts slides into tiles.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from multiteach.errors import MultiteachError, RunInterrupted

# Each command's runner imports the modules it needs itself: most of them pull in timm, transformers or
# sklearn (seconds), and `multiteach --help` or a mistyped argument should not wait for those.

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str):
    """Register a sub-command: the decorated function adds its arguments and returns the runner."""

    def wrap(add_args: Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]):
        COMMANDS[name] = (help_text, add_args, None)  # type: ignore[assignment]
        return add_args

    return wrap


@command("teachers", "list the teacher catalog (name, dims, tokens, params, preprocessing, licence); check weights")
def _teachers(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--check",
        metavar="NAME",
        help="check a local checkpoint against teacher NAME before training (needs --weights); exit 0 only when it "
        "will load exactly, 2 otherwise",
    )
    p.add_argument("--weights", metavar="PATH", help="with --check: the weights file or folder (a recipe's `weights:`)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="with --check: allow a teacher whose loading runs code from its Hub repo (Hibou)",
    )

    def run(args: argparse.Namespace) -> int:
        if args.check or args.weights:
            if not (args.check and args.weights):
                raise MultiteachError("--check NAME and --weights PATH go together")
            from multiteach.teachers.doctor import check_weights

            report = check_weights(args.check, args.weights, trust_remote_code=args.trust_remote_code or None)
            print(report.render())
            return report.exit_code
        from multiteach.teachers.describe import render

        print(render(as_json=args.json))
        return 0

    return run


@command(
    "tile",
    "cut whole-slide images into tissue tiles at a target resolution (needs multiteach[wsi]); exit status 0 when "
    "every slide was tiled, 1 when some were skipped (listed), 2 when none could be",
)
def _tile(p: argparse.ArgumentParser):
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
        from multiteach.data.wsi import expand_slide_lists, write_tiles

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


@command("config", "print a recipe resolved (defaults + key=value overrides), validate it, or copy a built-in out")
def _config(p: argparse.ArgumentParser):
    p.add_argument("recipe", help="a recipe YAML file or the name of a built-in recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-4")
    p.add_argument(
        "--validate-only",
        action="store_true",
        help="only check the recipe and that its data and weights paths exist (nothing is built); print OK",
    )
    p.add_argument("--copy-to", metavar="PATH", help="copy the built-in recipe (and its _base fragments) to PATH")
    p.add_argument("--overwrite", action="store_true", help="with --copy-to: replace existing files")
    p.add_argument(
        "--graph",
        action="store_true",
        help="build the full model graph on the meta device and print parameter counts; per teacher, whether "
        "the architecture of its weights folder (config.json) or the catalog's was counted",
    )

    def run(args: argparse.Namespace) -> int:
        from multiteach.config import check_paths, copy_builtin, load_recipe

        if args.copy_to:
            if args.overrides:
                raise MultiteachError("--copy-to copies the built-in recipe as is; edit the copy instead of overriding")
            written = copy_builtin(args.recipe, args.copy_to, overwrite=args.overwrite)
            print("\n".join(f"wrote {path}" for path in written))
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        if args.graph:
            import json

            from multiteach.build import describe_graph

            print(json.dumps(describe_graph(recipe), indent=2))
        elif args.validate_only:
            lines = check_paths(recipe)  # raises (exit 2) naming the absolute path of the first missing one
            print("\n".join([f"OK: {recipe.name} is valid", *(f"  {line}" for line in lines)]))
        else:
            print(recipe.to_yaml(), end="")
        return 0

    return run


@command("train", "distil a student as a recipe says (resumes a run directory's last checkpoint)")
def _train(p: argparse.ArgumentParser):
    p.add_argument("recipe", help="a recipe YAML file or the name of a built-in recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. losses.uni.cls.weight=0")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", default=None, help="require a checkpoint to resume from")
    group.add_argument("--no-resume", dest="resume", action="store_false", help="refuse to reuse a run directory")

    def run(args: argparse.Namespace) -> int:
        from multiteach.config import check_paths, load_recipe
        from multiteach.train import finish_process, train

        recipe = load_recipe(args.recipe, args.overrides)
        recipe.check_trainable()
        check_paths(recipe)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            run_dir = train(recipe, resume=args.resume)
        except RunInterrupted as stop:  # every rank leaves with 128 + signal: 130 (SIGINT), 143 (SIGTERM)
            print(f"multiteach train: {stop}", file=sys.stderr)
            finish_process(world, stop.exit_code)
            return stop.exit_code
        print(f"run directory: {run_dir}")
        finish_process(world)
        return 0

    return run


@command("cache", "run the teachers once on fixed views of every tile and store their features for training")
def _cache(p: argparse.ArgumentParser):
    p.add_argument("recipe", help="a recipe YAML file or the name of a built-in recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. cache.n_views=8")
    p.add_argument("--out", metavar="DIR", help="cache folder (default: cache.dir of the recipe)")
    p.add_argument("--rank", type=int, default=None, help="this writer's rank (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of writers (default: $WORLD_SIZE or 1)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="crops per teacher forward pass")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built for another recipe/key")
    p.add_argument("--merge", action="store_true", help="only (re)build index.json from the shards present")

    def run(args: argparse.Namespace) -> int:
        import torch

        from multiteach.cache import FeatureCache, cache_settings, merge_index, write_cache
        from multiteach.config import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        out = args.out or cache_settings(recipe).dir
        if out is None:
            raise MultiteachError("no cache folder: pass --out DIR or set cache.dir in the recipe")
        if args.merge:
            print(f"wrote {merge_index(out)}")
            return 0
        rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
        world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        write_cache(
            recipe,
            out,
            rank,
            world,
            args.batch_size,
            overwrite=args.overwrite,
            device=device,
            progress=lambda line: print(line, flush=True),
        )
        try:
            cache = FeatureCache(out)
        except MultiteachError:
            print(f"rank {rank}: done; index.json is written once every rank has finished (or with --merge)")
            return 0
        size = cache.nbytes()
        print(
            f"cache {out}: {cache.n_tiles} tiles x {cache.n_views} views of {', '.join(cache.names)} "
            f"({cache.dtype}, {size / 2**20:.1f} MiB, {size / cache.n_tiles * 1000 / 2**30:.2f} GiB per 1,000 tiles)"
        )
        return 0

    return run


@command("sweep", "train every combination of --grid values, one run each, and summarise them")
def _sweep(p: argparse.ArgumentParser):
    p.add_argument("recipe", help="a recipe YAML file or the name of a built-in recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every run")
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="key=v1,v2",
        help="an axis of the sweep, e.g. losses.uni.patch.weight=0,0.25,0.5 (repeatable)",
    )
    p.add_argument("--out", metavar="DIR", help="sweep folder (default: <output_dir>_sweep)")

    def run(args: argparse.Namespace) -> int:
        from multiteach.sweep import SweepInterrupted, run_sweep

        try:
            root = run_sweep(args.recipe, args.grid, args.overrides, args.out)
        except SweepInterrupted as stop:  # the summary marks the runs that are not complete
            print((stop.root / "summary.md").read_text(), end="", flush=True)
            print(
                f"multiteach sweep: {stop}; the summary marks the unfinished runs, and re-running the same "
                "sweep resumes them",
                file=sys.stderr,
            )
            return stop.exit_code
        print((root / "summary.md").read_text(), end="")
        print(f"runs, summary.csv/.md and loss_curves.png in {root}")
        return 0

    return run


@command("export", "export a run's student as a timm model folder with heads, recipe and model card; push it")
def _export(p: argparse.ArgumentParser):
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `multiteach train`")
    p.add_argument("--out", required=True, metavar="DIR", help="export folder (must not exist or be empty)")
    p.add_argument(
        "--live",
        action="store_true",
        help="export the live weights even when the recipe kept an EMA (train.keep_ema); the live weights are the "
        "default otherwise",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--push", metavar="ORG/NAME", help="upload the export to this Hugging Face model repo")
    p.add_argument("--public", action="store_true", help="with --push: create the repo public (default private)")
    p.add_argument("--dry-run", action="store_true", help="with --push: list what would be uploaded, contact nothing")
    p.add_argument(
        "--speed",
        action="store_true",
        help="measure params, batch-1 CPU/GPU latency (ms per tile) and throughput of the student and each teacher "
        "(printed, and in the card)",
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="export a run that stopped before schedule.steps (the card's title then says incomplete)",
    )
    p.add_argument(
        "--keep-paths",
        action="store_true",
        help="keep the local data/weights paths in the exported recipe.yaml (default: <local>/ + the file name)",
    )
    p.add_argument(
        "--licence-note",
        action="append",
        metavar="[TEACHER=]TEXT",
        help="the licence of a teacher whose licence multiteach does not know (other weights than the catalog "
        "model's, a non-catalog source), printed in the card; without TEACHER= it applies to every such teacher "
        "(repeatable)",
    )

    def run(args: argparse.Namespace) -> int:
        from multiteach.publish import check_repo_id, export_run, format_files, push_to_hub, run_speed, speed_lines
        from multiteach.runs import require_complete

        if (args.dry_run or args.public) and not args.push:
            raise MultiteachError("--dry-run and --public go with --push ORG/NAME")
        if args.push:
            check_repo_id(args.push)
        require_complete(args.run_dir, args.allow_incomplete)  # before --speed spends minutes on it
        speed = run_speed(args.run_dir, use_ema=not args.live, progress=print) if args.speed else None
        if speed is not None:  # params, batch-1 latency and throughput of the student and each teacher
            print("\n".join(speed_lines(speed)))
        out = export_run(
            args.run_dir,
            args.out,
            use_ema=not args.live,
            overwrite=args.overwrite,
            speed=speed,
            repo_id=args.push,
            allow_incomplete=args.allow_incomplete,
            keep_paths=args.keep_paths,
            licence_notes=licence_notes(args.run_dir, args.licence_note or []),
        )
        print(f"exported to {out}")
        if args.push:
            result = push_to_hub(out, args.push, private=not args.public, dry_run=args.dry_run)
            visibility = "private" if result["private"] else "public"
            head = "would upload" if args.dry_run else "uploaded"
            print(f"{head} to {args.push} ({visibility} model repo; an existing repo keeps its visibility):")
            print(format_files(result["files"]))
        return 0

    return run


def licence_notes(run_dir: str, notes: list[str]) -> dict[str, str]:
    """``--licence-note`` values as teacher name -> text: ``NAME=TEXT`` for a teacher of the run's recipe, a
    plain ``TEXT`` for every teacher of it (a name that is not one of its teachers is part of the text)."""
    if not notes:
        return {}
    from multiteach.config import load_recipe

    names = list(load_recipe(f"{run_dir}/recipe.yaml").teachers)
    out: dict[str, str] = {}
    for note in notes:
        name, sep, text = note.partition("=")
        if sep and name.strip() in names:
            if not text.strip():
                raise MultiteachError(f"--licence-note {note!r}: the text after {name.strip()}= is empty")
            out[name.strip()] = text.strip()
        else:
            out.update({n: note.strip() for n in names if n not in out})
    return out


@command("eval", "score models (run dirs, exported students, teachers) on labelled tiles: kNN, probe, robustness")
def _eval(p: argparse.ArgumentParser):
    p.add_argument("models", nargs="+", metavar="MODEL", help="run directory, exported student folder or teacher name")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled folder: <class>/ or train/ + test/ of them")
    p.add_argument("--robustness", metavar="DIR", help="images for the perturbation robustness metrics")
    p.add_argument(
        "--perturbations",
        default="standard",
        choices=("standard", "heldout"),
        help="robustness suite: standard, or heldout (severities beyond the robust-view training ranges)",
    )
    p.add_argument("--out", default="eval-results", metavar="DIR", help="output folder (default eval-results)")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    p.add_argument(
        "--weights",
        action="append",
        metavar="[MODEL=]PATH",
        help="local weights of a teacher model (MODEL=PATH when several teachers are named; repeatable)",
    )
    p.add_argument("--random-init", action="store_true", help="teacher models get random weights (a baseline)")
    p.add_argument(
        "--live",
        action="store_true",
        help="run directories: the live weights even when the recipe kept an EMA (train.keep_ema)",
    )
    p.add_argument("--probe-c", default="auto", help="linear-probe C: auto (inner CV, default) or a number")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--max-images", type=int, default=64, metavar="N", help="images for robustness/fidelity (64)")
    p.add_argument("--seed", type=int, default=0, help="seed of folds, subsets and random init (default 0)")
    p.add_argument("--no-groups", action="store_true", help="ignore slide/patient groups from labels.csv")
    p.add_argument("--no-fidelity", action="store_true", help="skip teacher fidelity of run directories")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--strict", action="store_true", help="fail on unreadable images instead of skipping and listing them"
    )

    def probe_c(text: str) -> float | str:
        """``--probe-c``: ``auto`` or a positive number."""
        if text == "auto":
            return text
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise MultiteachError(f"--probe-c: expected 'auto' or a positive number, got {text!r}")
        return value

    def run(args: argparse.Namespace) -> int:
        from multiteach.eval.run import evaluate

        weights: dict[str, str] | str | None = None
        for item in args.weights or []:
            model, sep, path = item.partition("=")
            if sep and model in args.models:
                if not isinstance(weights, dict):
                    if weights is not None:
                        raise MultiteachError("--weights: use MODEL=PATH for every teacher when naming several")
                    weights = {}
                weights[model] = path
            elif weights is None:
                weights = item
            else:
                raise MultiteachError("--weights: use MODEL=PATH for every teacher when naming several")
        result = evaluate(
            args.models,
            args.data,
            robustness_images=args.robustness,
            perturbations=args.perturbations,
            groups=None if args.no_groups else "auto",
            k=args.k,
            seed=args.seed,
            out_dir=args.out,
            weights=weights,
            pretrained=not args.random_init,
            use_ema=not args.live,
            batch_size=args.batch_size,
            max_images=args.max_images,
            probe_c=probe_c(args.probe_c),
            with_fidelity=not args.no_fidelity,
            device=args.device,
            strict=args.strict,
            progress=lambda line: print(line, flush=True),
        )
        print()
        print(result["markdown"], end="")
        print(f"\nresults: {', '.join(result['files'].values())}")
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
    from multiteach.data.sources.slide_list import read_slide_list

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
    from multiteach.data.sources.slides import open_slide_source, sample_positions

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


@command("data", "your data at scale: check every tile, save a folder as a list, pack shards, index slides")
def _data(p: argparse.ArgumentParser):
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


@command(
    "merge",
    "interpolate two students of one architecture in weight space (WiSE-FT): (1 - alpha) * A + alpha * B, "
    "written as an export",
)
def _merge(p: argparse.ArgumentParser):
    p.add_argument("a", metavar="A", help="first student: a run directory or an export folder (alpha 0)")
    p.add_argument("b", metavar="B", help="second student, same architecture (alpha 1)")
    p.add_argument("--alpha", type=float, required=True, help="weight of B, in [0, 1]")
    p.add_argument("--out", required=True, metavar="DIR", help="export folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--live", action="store_true", help="for run parents: the live weights even when an EMA was kept")

    def run(args: argparse.Namespace) -> int:
        import warnings

        from multiteach.publish.merge import MergeWarning, merge_students

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MergeWarning)
            out = merge_students(args.a, args.b, args.alpha, args.out, overwrite=args.overwrite, use_ema=not args.live)
        for w in caught:
            print(f"multiteach merge: warning: {w.message}", file=sys.stderr)
        print(f"merged (alpha {args.alpha:g}) to {out}")
        return 0

    return run


@command("demo", "the whole path on CPU in minutes: tile a real slide, distil, export, check knowledge moved")
def _demo(p: argparse.ArgumentParser):
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where everything goes (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. schedule.steps=20")

    def run(args: argparse.Namespace) -> int:
        from multiteach.demo import run_demo

        paths = run_demo(args.out, args.overrides)
        print(paths["results"]["markdown"])
        for key in ("tiles", "run", "export", "knowledge"):
            print(f"{key:>7}: {paths[key]}")
        print(f"  model card: {paths['export'] / 'README.md'}")
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="multiteach", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_run=add_args(p))
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may also follow the options (``sweep R --grid a=1,2 b=3``).

    argparse fills a ``nargs="*"`` positional with the words before the first option only; the ``key=value``
    words it leaves over are appended to ``overrides`` of the commands that take them. Anything else left over
    is refused as argparse would.
    """
    args, extra = parser.parse_known_args(argv)
    overrides = [w for w in extra if "=" in w and not w.startswith("-")]
    if overrides and isinstance(getattr(args, "overrides", None), list):
        args.overrides += overrides
        extra = [w for w in extra if w not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``multiteach`` console script and ``python -m multiteach``."""
    args = parse_args(build_parser(), argv)
    try:
        return int(args._run(args) or 0)
    except MultiteachError as exc:
        print(f"multiteach {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        print(f"multiteach {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C before a run installed its own handler (loading, building)
        print(f"multiteach {args.command}: interrupted (SIGINT)", file=sys.stderr)
        return 130  # 128 + SIGINT, as for a run that stopped on it


if __name__ == "__main__":
    sys.exit(main())
