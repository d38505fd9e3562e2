"""The ``multiteach`` command line: one sub-command per job.

``multiteach teachers`` lists the teacher catalog, ``config`` resolves/validates a recipe, ``train`` distils
a student, ``tile`` cuts slides into tiles.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from multiteach.errors import MultiteachError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str):
    """Register a sub-command: the decorated function adds its arguments and returns the runner."""

    def wrap(add_args: Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]):
        COMMANDS[name] = (help_text, add_args, None)  # type: ignore[assignment]
        return add_args

    return wrap


@command("teachers", "list the teacher catalog (name, dims, tokens, params, preprocessing, licence)")
def _teachers(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true", help="machine-readable output")

    def run(args: argparse.Namespace) -> int:
        from multiteach.teachers.describe import render

        print(render(as_json=args.json))
        return 0

    return run


@command("tile", "cut whole-slide images into tissue tiles at a target resolution (needs multiteach[wsi])")
def _tile(p: argparse.ArgumentParser):
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (.svs, .ndpi, .mrxs, tiled .tif, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/<slide>/tiles + coordinates.csv")
    p.add_argument("--mpp-target", type=float, default=0.5, metavar="UM", help="tile µm/px (0.5 ≈ 20x; default 0.5)")
    p.add_argument("--tile-size", type=int, default=224, metavar="PX", help="tile side in pixels (default 224)")
    p.add_argument("--overlap", type=float, default=0.0, help="fraction of a tile shared by neighbours, [0, 1)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="lowest tissue fraction of a kept tile (default 0.5)")
    p.add_argument("--mpp", type=float, default=None, metavar="UM", help="level-0 µm/px overriding slide metadata")
    p.add_argument("--format", default="jpg", choices=["jpg", "png"], help="tile file format (default jpg)")

    def run(args: argparse.Namespace) -> int:
        from multiteach.data.wsi import write_tiles

        result = write_tiles(
            args.slides,
            args.out,
            target_mpp=args.mpp_target,
            tile_size=args.tile_size,
            overlap=args.overlap,
            min_tissue=args.min_tissue,
            mpp=args.mpp,
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
    p.add_argument("--validate-only", action="store_true", help="only check the recipe and print OK")
    p.add_argument("--copy-to", metavar="PATH", help="copy the built-in recipe (and its _base fragments) to PATH")
    p.add_argument("--overwrite", action="store_true", help="with --copy-to: replace existing files")
    p.add_argument(
        "--graph", action="store_true", help="build the full model graph on the meta device and print parameter counts"
    )

    def run(args: argparse.Namespace) -> int:
        from multiteach.config import copy_builtin, load_recipe

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
            print(f"OK: {recipe.name} is valid")
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
        from multiteach.config import load_recipe
        from multiteach.train import finish_process, train

        recipe = load_recipe(args.recipe, args.overrides)
        recipe.check_trainable()
        run_dir = train(recipe, resume=args.resume)
        print(f"run directory: {run_dir}")
        finish_process(int(os.environ.get("WORLD_SIZE", "1")))
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
        from multiteach.sweep import run_sweep

        root = run_sweep(args.recipe, args.grid, args.overrides, args.out)
        print((root / "summary.md").read_text(), end="")
        print(f"runs, summary.csv/.md and loss_curves.png in {root}")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``multiteach`` console script and ``python -m multiteach``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MultiteachError as exc:
        print(f"multiteach {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
