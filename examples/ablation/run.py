"""An ablation sweep over distillation terms: on/off, weight, summary vs patch, distance type.

    python examples/ablation/run.py [OUT]

Writes one run per combination plus summary.csv / summary.md (final value of every term) and loss_curves.png.
"""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import QUICK, standins, tiles  # noqa: E402


def main(out: Path) -> None:
    weights = standins(out)
    sets = [f"data.train={tiles(out)}", f"output_dir={out / 'run'}", "data.local_crops.n=2", *QUICK]
    sets += [f"teachers.{n}.weights={p}" for n, p in weights.items()]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "multiteach",
            "sweep",
            "demo",
            *sets,
            "--grid",
            "losses.tiny.patch.weight=0,0.5",  # patch term off / on
            "--grid",
            "losses.tiny.cls.type=cosine,smooth_l1",  # distance type of the summary term
            "--out",
            str(out / "sweep"),
        ],
        check=True,
    )
    print((out / "sweep" / "summary.md").read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example_ablation"))
