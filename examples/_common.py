"""Shared set-up of the examples: tiles from the slide shipped with multiteach, and local teacher stand-ins.

Real teacher weights need a Hugging Face login; the examples write tiny random stand-ins of the real families
instead (the loading code is the real one). With access, drop the ``weights=`` overrides. The demo recipe's
other teacher, ``multiteach-tiny``, ships inside the package.
"""

from __future__ import annotations

from pathlib import Path

from multiteach.data.tiling import write_tiles
from multiteach.demo import slide_path
from multiteach.standins import write_standin_teachers


def tiles(out: Path) -> Path:
    """Tissue tiles (224 px at 0.5 µm/px) of the embedded CMU-1-Small-Region slide."""
    if not (out / "tiles").is_dir():
        write_tiles([slide_path()], out / "tiles", target_mpp=0.5, tile_size=224, min_tissue=0.5)
    return out / "tiles"


def standins(out: Path, names: tuple[str, ...] = ("h-optimus-0",)) -> dict[str, Path]:
    """Tiny stand-ins for catalog teachers, as folders a recipe's ``weights:`` points at."""
    return write_standin_teachers(out / "standins", names)


QUICK = [
    "schedule.steps=2",
    "optim.batch_size=4",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "data.global_crops.size=64",
    "data.local_crops.size=32",
    "student.img_size=64",
]
