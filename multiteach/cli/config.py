"""The ``config`` command: print a recipe resolved, validate it, count its graph, or copy a built-in out."""

from __future__ import annotations

import argparse

from multiteach.cli.command import Command, Runner
from multiteach.errors import MultiteachError


def add_config(p: argparse.ArgumentParser) -> Runner:
    """``multiteach config``: its arguments; returns its runner."""
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


CONFIG = Command(
    "config",
    "print a recipe resolved (defaults + key=value overrides), validate it, or copy a built-in out",
    add_config,
)
