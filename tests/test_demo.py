"""`multiteach demo` trains from the shipped slide patched online (``data.slides``), not from tiles it cut."""

from __future__ import annotations

import json

import pytest
import yaml

from multiteach.demo import SLIDES, run_demo, slide_path

pytest.importorskip("openslide")  # the demo reads the slide shipped with multiteach

QUICK = [
    "schedule.steps=2",
    "optim.batch_size=4",
    "optim.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "data.num_workers=0",
]


def test_demo_trains_from_the_slide_online_and_checks_knowledge_on_held_out_tiles(tmp_path, monkeypatch):
    user_cache = tmp_path / "user-cache"
    monkeypatch.setenv("MULTITEACH_INDEX_DIR", str(user_cache))  # where an index without index_dir would go
    out = tmp_path / "demo"
    paths = run_demo(out, QUICK)

    recipe = yaml.safe_load((paths["run"] / "recipe.yaml").read_text())
    assert recipe["data"]["train"] is None
    slides = recipe["data"]["slides"]
    assert slides["source"] == str(slide_path()) and slides["index_dir"] == str((out / "tissue-index").resolve())
    assert {k: slides[k] for k in SLIDES} == SLIDES == {"target_mpp": [0.5], "tile_size": 224, "min_tissue": 0.5}
    data = json.loads((paths["run"] / "data.json").read_text())
    assert data["kind"] == "slides" and data["slides"] == 1 and not data["skipped"] and not data["unserved_targets"]
    assert data["index"]["built"] == 1 and paths["index"] == out / "tissue-index"
    assert list((out / "tissue-index").rglob("*.npz")) and not user_cache.exists()  # nothing in the user's cache
    assert json.loads((paths["run"] / "summary.json").read_text())["steps_done"] == 2

    assert not (out / "tiles").exists()  # no training tiles on disk; the held-out tiles only
    assert paths["held_out"] == out / "held_out" and len(list((out / "held_out").rglob("*.jpg"))) == 51
    assert (paths["export"] / "model.safetensors").is_file() and (paths["knowledge"] / "knowledge.md").is_file()
    knowledge = paths["results"]["knowledge"]
    assert set(knowledge) == {"student", "random twin"}
    assert "on 51 held-out tiles" in paths["results"]["markdown"]
    assert set(paths["results"]["seconds"]) == {"held-out tiles", "stand-ins", "train", "export", "knowledge check"}
