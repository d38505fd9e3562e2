"""The ``cache`` command: fill a teacher-target cache ahead of a sweep, or say what a cache folder holds."""

from __future__ import annotations

import argparse
import os

from multiteach.cli.command import Command, Runner
from multiteach.errors import MultiteachError


def add_cache(p: argparse.ArgumentParser) -> Runner:
    """``multiteach cache``: its arguments; returns its runner."""
    p.add_argument(
        "recipe", help="a recipe YAML file or the name of a built-in recipe; or `info` followed by a cache folder"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. cache.views_per_tile=8 (with info: DIR)",
    )
    p.add_argument("--out", metavar="DIR", help="cache folder (default: cache.dir of the recipe)")
    p.add_argument("--rank", type=int, default=None, help="this writer's rank (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of writers (default: $WORLD_SIZE or 1)")
    p.add_argument("--json", action="store_true", help="with info: print the full record as JSON")

    def run(args: argparse.Namespace) -> int:
        if args.recipe == "info":
            import json

            from multiteach.cache import cache_info, render_info

            if len(args.overrides) != 1:
                raise MultiteachError("cache info takes one cache folder: multiteach cache info DIR")
            info = cache_info(args.overrides[0])
            print(json.dumps(info, indent=1, default=str) if args.json else render_info(info))
            return 0
        import torch

        from multiteach.cache import cache_info, cache_settings, render_info, write_cache
        from multiteach.config import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        out = args.out or cache_settings(recipe).dir
        if out is None:
            raise MultiteachError("no cache folder: pass --out DIR or set cache.dir in the recipe")
        rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
        world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        write_cache(recipe, out, rank, world, device=device, progress=lambda line: print(line, flush=True))
        print(render_info(cache_info(out)))
        return 0

    return run


CACHE = Command(
    "cache",
    "fill a teacher-target cache with the targets a recipe's run reads (`cache info DIR`: what a cache holds)",
    add_cache,
)
