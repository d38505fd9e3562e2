"""The ``cache`` command: run the teachers once on fixed views of every tile and store their features."""

from __future__ import annotations

import argparse
import os

from multiteach.cli.command import Command, Runner
from multiteach.errors import MultiteachError


def add_cache(p: argparse.ArgumentParser) -> Runner:
    """``multiteach cache``: its arguments; returns its runner."""
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


CACHE = Command(
    "cache", "run the teachers once on fixed views of every tile and store their features for training", add_cache
)
