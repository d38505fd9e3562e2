"""The ``export`` and ``merge`` commands: a run's student as a timm export folder (and its Hub push), WiSE-FT merges."""

from __future__ import annotations

import argparse
import sys

from multiteach.cli.command import Command, Runner
from multiteach.errors import MultiteachError


def add_export(p: argparse.ArgumentParser) -> Runner:
    """``multiteach export``: its arguments; returns its runner."""
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
        from multiteach.publish.licence_notes import licence_notes
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


def add_merge(p: argparse.ArgumentParser) -> Runner:
    """``multiteach merge``: its arguments; returns its runner."""
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


EXPORT = Command(
    "export", "export a run's student as a timm model folder with heads, recipe and model card; push it", add_export
)
MERGE = Command(
    "merge",
    "interpolate two students of one architecture in weight space (WiSE-FT): (1 - alpha) * A + alpha * B, "
    "written as an export",
    add_merge,
)
