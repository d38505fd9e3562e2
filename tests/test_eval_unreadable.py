"""``multiteach eval`` on folders holding unreadable images: skipped, counted and listed, or refused with --strict."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from multiteach.cli import main
from multiteach.errors import MultiteachError
from multiteach.eval import evaluate

from .engine_fixtures import write_tiles

MODEL = "vit_tiny_patch16_224"  # random init (--random-init): only the bookkeeping is under test
OPTIONS = {"pretrained": False, "k": 5, "n_splits": 3, "probe_c": 1.0, "max_images": 8, "robustness_size": 64}


def bad_images(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Write the unreadable files a tile folder really ends up with: a truncated JPEG (a copy cut short),
    a text file named .jpg, an empty file."""
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 80, 120)).save(buf, format="JPEG")
    contents = {
        "truncated": buf.getvalue()[: len(buf.getvalue()) // 2],
        "text": b"tile list, not an image\n",
        "empty": b"",
    }
    paths = []
    for name in names:
        paths.append(folder / f"{name}.jpg")
        paths[-1].write_bytes(contents[name])
    return paths


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A clean labelled folder, the same with three unreadable files added, and robustness images with one."""
    root = tmp_path_factory.mktemp("unreadable")
    for c, name in enumerate(("alpha", "beta")):
        write_tiles(root / "clean" / name, n=10, size=48, seed=10 + c)
    shutil.copytree(root / "clean", root / "dirty")
    write_tiles(root / "robust", n=6, size=48, seed=3)
    return {"clean": root / "clean", "dirty": root / "dirty", "robust": root / "robust"}


def test_unreadable_images_are_skipped_listed_and_the_rest_scored(folders, tmp_path):
    bad = bad_images(folders["dirty"] / "alpha", ("truncated",)) + bad_images(
        folders["dirty"] / "beta", ("text", "empty")
    )
    bad_rob = bad_images(folders["robust"], ("truncated",))
    result = evaluate(
        [MODEL], folders["dirty"], robustness_images=folders["robust"], out_dir=tmp_path / "out", **OPTIONS
    )
    p = result["protocol"]
    assert p["n_skipped"] == 4 and p["n_train"] == 20
    assert sorted(s["path"] for s in p["skipped"]["data"]) == sorted(map(str, bad))
    assert [s["path"] for s in p["skipped"]["robustness"]] == [str(bad_rob[0])] and p["robustness"]["n_images"] == 6
    assert all(s["reason"] for where in p["skipped"].values() for s in where)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["protocol"]
    assert saved["skipped"] == p["skipped"]
    report = (tmp_path / "out" / "results.md").read_text()
    assert "skipped 4 unreadable image(s)" in report and all(f"`{path}`" in report for path in [*bad, *bad_rob])
    # the metrics are those of the folder without the bad files
    clean = evaluate([MODEL], folders["clean"], out_dir=tmp_path / "clean", **OPTIONS)
    scores = {k: v for k, v in result["metrics"][MODEL].items() if not k.startswith("robust_")}
    assert scores == clean["metrics"][MODEL] and "robust_cosine" in result["metrics"][MODEL]
    bad_rob[0].unlink()


def test_strict_refuses_naming_every_unreadable_image(folders, tmp_path, capsys):
    bad = bad_images(folders["robust"], ("text", "empty"))
    with pytest.raises(MultiteachError, match=r"2 unreadable image\(s\) \(strict") as err:
        evaluate(
            [MODEL], folders["clean"], robustness_images=folders["robust"], strict=True, out_dir=tmp_path, **OPTIONS
        )
    assert all(str(path) in str(err.value) for path in bad) and not (tmp_path / "results.json").exists()
    argv = ["eval", MODEL, "--random-init", "--data", str(folders["clean"]), "--robustness", str(folders["robust"])]
    assert main([*argv, "--strict", "--out", str(tmp_path)]) == 2
    assert "multiteach eval: error: 2 unreadable image(s)" in capsys.readouterr().err
    for path in bad:
        path.unlink()
