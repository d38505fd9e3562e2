"""Compose a recipe of catalog teachers plus a custom one, check it, train it.

python examples/compose_teachers/run.py [OUT]
"""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import QUICK, standins, tiles  # noqa: E402

from multiteach.standins import save_timm_folder, tiny_timm  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(out: Path) -> None:
    weights = standins(out, ("h-optimus-0", "uni"))  # the recipe's two catalog teachers
    model, arch, args = tiny_timm("uni", seed=7)  # "your own" teacher: any timm model saved in hub layout
    save_timm_folder(model, out / "my_teacher", arch, args, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    sets = [
        f"data.train={tiles(out)}",
        f"output_dir={out / 'run'}",
        f"teachers.mine.source=local-dir:{out / 'my_teacher'}",
    ]
    sets += [f"teachers.{n}.weights={p}" for n, p in weights.items()]
    recipe = str(HERE / "recipe.yaml")
    cli = [sys.executable, "-m", "multiteach"]
    subprocess.run([*cli, "config", recipe, *sets, "--validate-only"], check=True)  # check before training
    subprocess.run([*cli, "train", recipe, *sets, *QUICK], check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example_compose"))
