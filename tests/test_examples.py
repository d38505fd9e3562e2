"""Every example runs (CPU, tiny stand-ins) and produces what its README promises."""

import subprocess
import sys
from pathlib import Path

import pytest

from .engine_fixtures import ENV, REPO

pytest.importorskip("openslide")  # the examples tile the slide shipped with multiteach


def run_example(name: str, out: Path) -> str:
    res = subprocess.run(
        [sys.executable, str(REPO / "examples" / name), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_python_api_example():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import python_api

        assert python_api.main(steps=2) > 0
    finally:
        sys.path.remove(str(REPO / "examples"))


def test_compose_teachers_example(tmp_path):
    out = run_example("compose_teachers/run.py", tmp_path)
    assert "OK: compose_teachers is valid" in out
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()
    assert "mine.cls" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_ablation_example(tmp_path):
    out = run_example("ablation/run.py", tmp_path)
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(runs) == 4 and (tmp_path / "sweep" / "loss_curves.png").is_file()
    assert out.count("tiny.patch.weight=") >= 4


def test_publish_example(tmp_path):
    out = run_example("publish/run.py", tmp_path)
    assert "embedding: (2, 192)" in out
    card = (tmp_path / "student" / "README.md").read_text()
    # multiteach-tiny is credited with its licence and card; the H-optimus-0 stand-in as random weights, never as
    # H-optimus-0 (its page, its licence), with the licence note the example states for it
    assert "| multiteach-tiny | [multiteach-tiny](teacher-card-multiteach-tiny.md) | Apache-2.0 | no | no |" in card
    assert "multiteach-tiny" in (tmp_path / "student" / "teacher-card-multiteach-tiny.md").read_text()  # exported
    assert "tiny random stand-in of h-optimus-0 written by multiteach" in card and "bioptimus" not in card
    assert "Licence, as stated by the exporter: none to inherit" in card
    assert "non-commercial use only" not in card.lower()
    assert "my-org/my-student" in out and "model.safetensors" in out
