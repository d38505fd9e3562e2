"""The ``eval`` command: score run directories, exported students and teachers on labelled tiles."""

from __future__ import annotations

import argparse

from multiteach.cli.command import Command, Runner
from multiteach.errors import MultiteachError


def add_eval(p: argparse.ArgumentParser) -> Runner:
    """``multiteach eval``: its arguments; returns its runner."""
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


EVAL = Command(
    "eval", "score models (run dirs, exported students, teachers) on labelled tiles: kNN, probe, robustness", add_eval
)
