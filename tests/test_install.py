"""The install: torchvision shim (package import and third-party entry points) and the CLI."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import multiteach_tvshim
from multiteach.cli import main

SITE = Path(sysconfig.get_paths()["purelib"])
needs_install = pytest.mark.skipif(
    not (SITE / "multiteach_tvshim.pth").is_file(), reason="multiteach is not pip-installed in this interpreter"
)


def test_shim_declares_ops_once():
    import torchvision  # noqa: F401  (works only thanks to the shim on a CPU torch)

    assert torch.ops.torchvision.nms is not None
    assert multiteach_tvshim.apply() is False  # already declared: a second call must not redeclare


def test_shim_never_touches_a_cuda_build(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Library must not be created on a CUDA build")

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.library, "Library", boom)
    assert multiteach_tvshim.apply() is False


@needs_install
@pytest.mark.parametrize("code", ["import timm; print(timm.__version__)", "import open_clip, transformers"])
def test_third_party_imports_work_without_importing_multiteach(code):
    res = subprocess.run(
        [sys.executable, "-c", code + "; import sys; assert 'multiteach' not in sys.modules"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]


@needs_install
def test_accelerate_cli_starts():
    exe = Path(sys.executable).parent / "accelerate"
    exe = str(exe) if exe.exists() else shutil.which("accelerate")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_teachers_cli_json(capsys):
    assert main(["teachers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert len(rows) == 17  # 16 foundation models + multiteach-tiny (shipped)
    assert by_name["h-optimus-0"]["tokens@224"] == 261 and by_name["virchow2"]["dim"] == 2560
    assert abs(by_name["uni"]["params"] - 303.35e6) / 303.35e6 < 1e-3
    assert by_name["uni"]["gated"] is True and by_name["h-optimus-0"]["gated"] is False


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "multiteach", "teachers"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| h-optimus-0 | 1536 (cls) | 14 | 261 | 1134.77M |" in res.stdout


def test_cli_reports_user_errors_without_traceback(capsys, monkeypatch):
    from multiteach import cli
    from multiteach.cli.command import Command
    from multiteach.errors import MultiteachError

    def boom(_p):
        def run(_args):
            raise MultiteachError("bad thing named clearly")

        return run

    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, Command("_boom", "test", boom)))
    assert main(["_boom"]) == 2
    assert "multiteach _boom: error: bad thing named clearly" in capsys.readouterr().err
