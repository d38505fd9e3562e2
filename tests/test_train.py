"""The training engine: multi-process equivalence, runs that survive kills, and bad input stopped early."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from multiteach.checkpoint import latest_checkpoint, save_checkpoint
from multiteach.config import load_recipe
from multiteach.errors import MultiteachError
from multiteach.train import train

from .engine_fixtures import ENV, REPO, cli, recipe_yaml, torchrun, write_tiles


def final_weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_run_directory_is_readable(tmp_path):
    run = train(load_recipe(recipe_yaml(tmp_path)))
    assert (run / "recipe.yaml").is_file() and (run / "data.json").is_file()
    assert "Loss = 1*uni.cls + 0.5*uni.patch + 1*dino + 1*ibot" in (run / "train.log").read_text()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert {"loss", "uni.cls", "uni.patch", "dino", "ibot", "lr", "img_per_s"} <= set(lines[0])
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003", "step_00000006"] or sorted(
        p.name for p in (run / "checkpoints").iterdir()
    ) == ["step_00000003", "step_00000006"]


def test_two_processes_equal_one_process(tmp_path):
    recipe = recipe_yaml(tmp_path)
    one = cli("train", str(recipe), f"output_dir={tmp_path}/one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli("train", str(recipe), f"output_dir={tmp_path}/two", launcher=torchrun(2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert max_diff(final_weights(tmp_path / "one", 6), final_weights(tmp_path / "two", 6)) < 1e-5
    sums = json.loads((tmp_path / "two" / "ranks.json").read_text())["checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # all ranks hold identical weights


def test_kill_9_then_rerun_resumes_and_matches(tmp_path):
    recipe = recipe_yaml(tmp_path, steps=40, checkpoint_every=5)
    ref = cli("train", str(recipe), f"output_dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "multiteach", "train", str(recipe), f"output_dir={run}"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(run) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(run)
    assert killed_at is not None and killed_at.name != "step_00000040", "the kill came too late to test resume"
    again = cli("train", str(recipe), f"output_dir={run}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    assert max_diff(final_weights(tmp_path / "ref", 40), final_weights(run, 40)) == 0.0


def test_sigterm_checkpoints_then_rerun_finishes(tmp_path):
    recipe = recipe_yaml(tmp_path, steps=400, checkpoint_every=200)
    run = tmp_path / "term"
    cmd = [sys.executable, "-m", "multiteach", "train", str(recipe), f"output_dir={run}"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and 0 < int(ckpt.name[5:]) < 400, err[-2000:]
    assert "stop requested" in err


def test_half_written_checkpoints_are_never_picked_up(tmp_path, monkeypatch):
    model, opt = torch.nn.Linear(2, 2), None
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model, None, opt, {"recipe_hash": "x"})
    # a kill during the write of step 2: torch.save dies after the weights were written
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, None, opt, {"recipe_hash": "x"})
    (tmp_path / "checkpoints" / "step_00000003").mkdir()  # a folder without state.json
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_nan_loss_names_the_term_and_keeps_the_last_good_checkpoint(tmp_path):
    from multiteach.losses import LOSSES, LossTerm

    if "nan_after" not in LOSSES:

        @LOSSES.register("nan_after")
        class NanAfter(LossTerm):  # a user-defined term, registered from outside the library
            allowed_keys = ("step",)

            def __init__(self, name, weight, step=3):
                super().__init__(name, weight)
                self.limit, self.calls = step, 0

            def forward(self, ctx):
                self.calls += 1
                value = ctx.student_global.summary.mean() * 0
                return value + (float("nan") if self.calls > self.limit else 0.0)

    recipe = load_recipe(
        recipe_yaml(tmp_path, steps=6, checkpoint_every=2), ["losses.boom={type: nan_after, step: 3, weight: 1.0}"]
    )
    with pytest.raises(MultiteachError, match=r"non-finite loss at step 3 \(term: boom\)"):
        train(recipe)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"


@pytest.mark.parametrize(
    "override, match",
    [
        (["optim.lrr=0.1"], r"optim\.lrr.*Did you mean: lr"),
        (["optim.batch_size=abc"], r"optim\.batch_size"),
        (["data.train=/no/such/folder"], r"data\.train: /no/such/folder does not exist"),
        (["optim.grad_accum=3"], r"batch_size"),
    ],
)
def test_bad_recipes_stop_before_training(tmp_path, override, match):
    path = recipe_yaml(tmp_path)
    with pytest.raises(MultiteachError, match=match):
        train(load_recipe(path, override))
    assert latest_checkpoint(tmp_path / "run") is None


def test_batch_not_divisible_across_processes(tmp_path):
    from multiteach.build import check_batch_split

    recipe = load_recipe(recipe_yaml(tmp_path, batch=6), ["optim.grad_accum=2"])
    assert check_batch_split(recipe, 1) == 3
    with pytest.raises(MultiteachError, match=r"batch_size=6 does not split across 2 process\(es\) x grad_accum=2"):
        check_batch_split(recipe, 2)


def test_empty_and_all_corrupt_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MultiteachError, match="No images found under"):
        train(load_recipe(recipe_yaml(tmp_path), [f"data.train={empty}"]))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"bad{i}.png").write_bytes(b"not a png at all")
    with pytest.raises(MultiteachError, match="corrupt|unreadable"):
        train(load_recipe(recipe_yaml(tmp_path), [f"data.train={corrupt}"]))


def test_some_corrupt_images_train_and_are_reported(tmp_path):
    tiles = write_tiles(tmp_path / "tiles")
    (tiles / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    run = train(load_recipe(recipe_yaml(tmp_path, steps=2, checkpoint_every=2)))
    report = json.loads((run / "data.json").read_text())
    assert report["tiles"] == 24 and [p.endswith("broken.png") for p in report["skipped"]] == [True]


def test_changed_recipe_in_same_run_dir_is_refused(tmp_path):
    train(load_recipe(recipe_yaml(tmp_path, steps=2, checkpoint_every=2)))
    with pytest.raises(MultiteachError, match="different recipe"):
        train(load_recipe(recipe_yaml(tmp_path, steps=2, checkpoint_every=2), ["optim.lr=0.5"]))


def test_layer_decay_bf16_grad_accum_and_no_masking(tmp_path):
    recipe = load_recipe(
        recipe_yaml(tmp_path, steps=2, checkpoint_every=2),
        [
            "optim.layer_decay=0.75",
            "train.precision=bf16",
            "optim.grad_accum=2",
            "data.masking=null",
            "losses.ibot.masked_only=false",
        ],
    )
    run = train(recipe)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
