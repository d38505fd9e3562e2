"""``multiteach demo``: the whole path on a fresh CPU machine in a few minutes.

1. tile the real H&E slide shipped with multiteach (CMU-1-Small-Region, CC0; see assets/ATTRIBUTION.md);
2. build two tiny teacher stand-ins of real families (H-optimus-0-like ViT/14 + registers + SwiGLU, UNI-like
   ViT/16) in the real on-disk formats, because real teacher weights cannot be downloaded everywhere —
   they are random, so the student learns to imitate random features: the demo shows the machinery,
   not a useful model;
3. distil a ViT-Ti student with the built-in ``demo`` recipe through the real loaders and engine;
4. export it as safetensors + timm config + model card, and evaluate it against its teachers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from multiteach.config import load_recipe
from multiteach.standins import write_standin_teachers

log = logging.getLogger("multiteach.demo")
SLIDE = "CMU-1-Small-Region.svs"
STANDIN_FAMILIES = ("h-optimus-0", "uni")


def slide_path() -> Path:
    """The embedded demo slide."""
    return Path(__file__).resolve().parent / "assets" / SLIDE


def labelled_tiles(slide_file: Path, out: Path, per_class: int = 40) -> Path:
    """A small labelled set cut from the same slide: ``tissue`` (>= 50% tissue) vs ``background`` (<= 5%).

    An easy but real task, so the demo can run the kNN/linear-probe evaluation without outside data.
    """
    from multiteach.data.wsi import open_slide, plan_tiles, read_tile, tissue_mask

    slide = open_slide(slide_file)
    grid = plan_tiles(slide, target_mpp=0.5, tile_size=224, overlap=0.5, min_tissue=0.0)
    mask, (sx, sy) = tissue_mask(slide)
    span = grid.read_size * slide.level_downsamples[grid.level]
    counts = {"tissue": 0, "background": 0}
    for i, (x, y) in enumerate(grid.coords):
        window = mask[int(y / sy) : int((y + span) / sy) + 1, int(x / sx) : int((x + span) / sx) + 1]
        frac = float(window.mean()) if window.size else 0.0
        label = "tissue" if frac >= 0.5 else "background" if frac <= 0.05 else None
        if label is None or counts[label] >= per_class:
            continue
        (out / label).mkdir(parents=True, exist_ok=True)
        read_tile(slide, grid, i).save(out / label / f"{label}_{x}_{y}.png")
        counts[label] += 1
    log.info("labelled demo tiles: %s", counts)
    return out


def run_demo(out: str | Path = "runs/demo", overrides: list[str] = ()) -> dict[str, Any]:
    """Run the demo end to end; return the paths of everything it wrote.

    Args:
        out: Folder for tiles, stand-ins, the run, the export and the evaluation.
        overrides: Extra recipe overrides (e.g. ``schedule.steps=20`` for a quicker look).
    """
    from multiteach.data.wsi import write_tiles
    from multiteach.eval.run import evaluate
    from multiteach.export import export_run
    from multiteach.train import train

    out = Path(out)
    tiles = write_tiles([slide_path()], out / "tiles", target_mpp=0.5, tile_size=224, overlap=0.5, min_tissue=0.5)
    log.info("tiled %s: %d tiles", SLIDE, tiles.total)
    standins = write_standin_teachers(out / "standins", STANDIN_FAMILIES)
    sets = [f"data.train={out / 'tiles'}", f"output_dir={out / 'run'}"]
    sets += [f"teachers.{name}.weights={path}" for name, path in standins.items()]
    recipe = load_recipe("demo", [*sets, *overrides])
    run_dir = train(recipe)
    export_dir = export_run(run_dir, out / "export", overwrite=True)
    labelled = labelled_tiles(slide_path(), out / "labelled")
    results = evaluate(
        [str(run_dir), *standins],
        labelled,
        robustness_images=out / "tiles",
        out_dir=out / "eval",
        max_images=32,
        weights={name: str(path) for name, path in standins.items()},
    )
    return {"tiles": out / "tiles", "run": run_dir, "export": export_dir, "eval": out / "eval", "results": results}
