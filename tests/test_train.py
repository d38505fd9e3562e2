"""The training engine: multi-process equivalence, runs that survive kills, and bad input stopped early."""

import json
import logging
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from multiteach.checkpoint import latest_checkpoint, save_checkpoint
from multiteach.cli import main
from multiteach.config import load_recipe
from multiteach.errors import MultiteachError
from multiteach.runs import load_run_student
from multiteach.train import train

from .engine_fixtures import ENV, REPO, cli, interrupt, recipe_yaml, torchrun, write_tiles


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


def test_a_run_exports_its_live_weights_unless_it_keeps_an_ema_on_purpose(tmp_path):
    """The DINO/iBOT target is an EMA, but only ``train.keep_ema: true`` makes it the exported student."""
    run = train(load_recipe(recipe_yaml(tmp_path, steps=2, checkpoint_every=2), ["train.keep_ema=false"]))
    ckpt = latest_checkpoint(run)
    assert (ckpt / "ema.safetensors").is_file()  # the DINO target is checkpointed for resuming
    live = load_run_student(run)
    assert live.weights == "live"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(v, saved[f"student.{k}"]) for k, v in live.student.state_dict().items())
    no_dino = ["train.keep_ema=false", "losses.dino=null", "losses.ibot=null", "data.masking=null"]
    run = train(load_recipe(recipe_yaml(tmp_path / "plain", steps=2, checkpoint_every=2), no_dino))
    assert not (latest_checkpoint(run) / "ema.safetensors").exists()  # no EMA kept at all by default
    assert load_recipe("distill_tiny").train.keep_ema is False and load_recipe("h0mini").train.keep_ema is True


def test_two_processes_equal_one_process(tmp_path):
    recipe = recipe_yaml(tmp_path)
    broken = tmp_path / "tiles" / "broken.png"  # read by one rank only; both runs replace it the same way
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    one = cli("train", str(recipe), f"output_dir={tmp_path}/one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli("train", str(recipe), f"output_dir={tmp_path}/two", launcher=torchrun(2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert max_diff(final_weights(tmp_path / "one", 6), final_weights(tmp_path / "two", 6)) < 1e-5
    sums = json.loads((tmp_path / "two" / "ranks.json").read_text())["checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # all ranks hold identical weights
    for run in ("one", "two"):  # 6 steps x 8 tiles read every one of the 25: the main process lists every rank's
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert [s["what"] for s in summary["skipped"]] == [str(broken)] and summary["skipped_tiles"] == 1


def test_kill_9_then_rerun_resumes_and_matches(tmp_path):
    recipe = recipe_yaml(tmp_path, steps=20, checkpoint_every=5)
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
    assert killed_at is not None and killed_at.name != "step_00000020", "the kill came too late to test resume"
    again = cli("train", str(recipe), f"output_dir={run}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    assert max_diff(final_weights(tmp_path / "ref", 20), final_weights(run, 20)) == 0.0
    # the summary covers the whole run: metrics.jsonl holds each logged step once, the first values are step 2's
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 21, 2))
    summary = json.loads((run / "summary.json").read_text())
    ref_first = json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["resumed_at"] == [int(killed_at.name.removeprefix("step_"))]
    assert summary["terms"]["loss"]["first"] == ref_first["loss"] and summary["steps_done"] == 20


SIGNAL_STEPS = 16  # checkpoint_every too: the only checkpoint before the end is the stop checkpoint
WORKERS = ["data.num_workers=1"]  # SLURM / kill -- -PGID signal the DataLoader workers as well


def stop_checkpoint(run, sig: signal.Signals, err: str) -> int:
    """The step of the one checkpoint an interrupted run wrote, checked against what it logged."""
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(steps) == 1, steps
    step = int(steps[0].removeprefix("step_"))
    assert 0 < step < SIGNAL_STEPS
    assert f"stop requested ({sig.name}): checkpoint written at step {step} of {SIGNAL_STEPS}" in err, err[-3000:]
    return step


@pytest.fixture(scope="module")
def signal_recipe(tmp_path_factory):
    """The recipe the signal tests interrupt and its uninterrupted 1-process run (exit status 0)."""
    root = tmp_path_factory.mktemp("signals")
    recipe = recipe_yaml(root, steps=SIGNAL_STEPS, checkpoint_every=SIGNAL_STEPS)
    ref = cli("train", str(recipe), f"output_dir={root}/ref", *WORKERS)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return recipe, root / "ref"


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_the_process_group_checkpoints_the_step_and_resumes_bit_identically(
    signal_recipe, tmp_path, sig, status, capsys
):
    recipe, ref = signal_recipe
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "multiteach", "train", str(recipe), f"output_dir={run}", *WORKERS]
    assert interrupt(cmd, run, sig, tmp_path / "err.txt") == status
    err = (tmp_path / "err.txt").read_text()
    assert "DataLoader worker" not in err
    step = stop_checkpoint(run, sig, err)
    assert f"stopped by {sig.name} at step {step} of {SIGNAL_STEPS}" in err and f"(exit status {status})" in err
    if sig == signal.SIGTERM:  # an unfinished run is not exported by mistake (`train && export`)
        assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 2
        assert f"is incomplete: its last checkpoint is at step {step} of {SIGNAL_STEPS}" in capsys.readouterr().err
        assert main(["export", str(run), "--out", str(tmp_path / "x"), "--allow-incomplete"]) == 0
        title = (tmp_path / "x" / "README.md").read_text().split("\n# ", 1)[1].splitlines()[0]
        assert title == f"tiny (incomplete: {step} of {SIGNAL_STEPS} steps)"
    again = cli("train", str(recipe), f"output_dir={run}", *WORKERS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {step})" in again.stderr and "resuming from" in again.stderr
    assert max_diff(final_weights(ref, SIGNAL_STEPS), final_weights(run, SIGNAL_STEPS)) == 0.0


@pytest.fixture(scope="module")
def torchrun_reference(signal_recipe):
    """The uninterrupted 2-process run of the signal recipe."""
    recipe, ref = signal_recipe
    two = ref.parent / "ref2"
    done = cli("train", str(recipe), f"output_dir={two}", *WORKERS, launcher=torchrun(2))
    assert done.returncode == 0, done.stderr[-3000:]
    return two


@pytest.mark.parametrize(
    "sig, status, every_process",
    [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)],
    ids=["SIGTERM-to-every-process-as-SLURM", "SIGINT-to-torchrun-as-Ctrl-C"],
)
def test_torchrun_ranks_stop_at_one_step_and_resume_bit_identically(
    signal_recipe, torchrun_reference, tmp_path, sig, status, every_process
):
    recipe, _ = signal_recipe
    run = tmp_path / "run"
    cmd = [*torchrun(2), "-m", "multiteach", "train", str(recipe), f"output_dir={run}", *WORKERS]
    # torchrun itself exits 1 when it was signalled (its SignalException); each rank exits 128 + signal
    assert interrupt(cmd, run, sig, tmp_path / "err.txt", every_process) != 0
    err = (tmp_path / "err.txt").read_text()
    assert "DataLoader worker" not in err
    step = stop_checkpoint(run, sig, f"{err}".replace("rank 1: ", "").replace("rank 0: ", ""))
    for rank in (0, 1):
        assert f"rank {rank}: stop requested ({sig.name}): checkpoint written at step {step} of" in err
    assert err.count(f"stopped by {sig.name} at step {step} of {SIGNAL_STEPS}") == 2  # both ranks, one step
    assert err.count(f"(exit status {status})") == 2
    again = cli("train", str(recipe), f"output_dir={run}", *WORKERS, launcher=torchrun(2))
    assert again.returncode == 0, again.stderr[-3000:]
    assert max_diff(final_weights(torchrun_reference, SIGNAL_STEPS), final_weights(run, SIGNAL_STEPS)) == 0.0


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


def test_some_corrupt_images_train_and_are_reported(tmp_path, caplog):
    tiles = write_tiles(tmp_path / "tiles")
    (tiles / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with caplog.at_level(logging.INFO, logger="multiteach"):  # 4 steps x 8: the first epoch reads all 25
        run = train(load_recipe(recipe_yaml(tmp_path, steps=4, checkpoint_every=4)))
    assert json.loads((run / "data.json").read_text())["tiles"] == 25  # listed, not decoded, at start
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_tiles"] == 1 and summary["skipped"][0]["what"] == str(tiles / "broken.png")
    assert "skipped unreadable inputs: 1" in caplog.text and "broken.png" in caplog.text


def test_a_resumed_run_is_summarised_from_its_step_1_and_a_finished_one_says_so(tmp_path, caplog):
    recipe = load_recipe(recipe_yaml(tmp_path, steps=4, checkpoint_every=3))  # a metrics line every 2 steps
    run = train(recipe)
    whole = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    saved = json.loads((run / "checkpoints" / "step_00000003" / "state.json").read_text())["run_summary"]
    assert saved["wall_s"] > 0 and saved["resumed_at"] == []
    # as after a kill -9 between the step-4 metrics line and its checkpoint: the resumed run redoes step 4
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "summary.json").unlink()
    caplog.set_level(logging.INFO, logger="multiteach")
    train(recipe)
    summary = json.loads((run / "summary.json").read_text())
    again = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [2, 4]  # each step once: the line past the checkpoint was dropped
    assert summary["terms"]["loss"]["first"] == whole[0]["loss"]  # the run's first logged value, not the resume's
    assert summary["terms"]["uni.cls"]["first"] == whole[0]["uni.cls"]
    assert summary["terms"]["loss"]["last"] == pytest.approx(whole[-1]["loss"], rel=1e-5)
    assert summary["steps_done"] == 4 and summary["resumed_at"] == [3] and summary["steps_this_process"] == 1
    assert summary["wall_s"] >= round(saved["wall_s"], 1)  # the time before the resume is counted
    assert "run finished: 4 of 4 steps in " in caplog.text and "resumed at step 3; " in caplog.text
    caplog.clear()
    train(recipe)  # finished: nothing trains, the stored summary is printed again
    assert "already finished (4 of 4 steps" in caplog.text and "resumed at step 3; " in caplog.text
    assert (run / "metrics.jsonl").read_text().count("\n") == 2
    assert json.loads((run / "summary.json").read_text()) == summary


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
