"""Sharded training: refused where Accelerate cannot shard, and the FSDP2 path checked with torch on CPU.

Accelerate runs FSDP only on CUDA (on CPU it silently falls back to DDP), so the sharded checkpoint
path is checked here with torch's own ``fully_shard`` over gloo (``tests/fsdp_worker.py`` under torchrun):
the FSDP-trained checkpoint must match a single-process run, be in the same format, resume with
``multiteach train`` and load with ``load_run_student``.
"""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from multiteach.build import build_components
from multiteach.checkpoint import latest_checkpoint, save_weights, shared_names
from multiteach.config import load_recipe
from multiteach.distributed import block_class_names, check_strategy
from multiteach.errors import MultiteachError
from multiteach.runs import load_run_student

from .engine_fixtures import ENV, REPO, cli, recipe_yaml, torchrun

WORKER = str(Path(__file__).with_name("fsdp_worker.py"))


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, Accelerate can shard: nothing to refuse")
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharding_on_cpu_is_refused_before_anything_is_built(tmp_path, monkeypatch, strategy):
    import multiteach.train as engine

    def must_not_run(*args, **kwargs):
        raise AssertionError("built something before refusing")

    for name in ("training_source", "build_components", "Accelerator"):
        monkeypatch.setattr(engine, name, must_not_run)
    recipe = load_recipe(recipe_yaml(tmp_path), [f"train.distributed.strategy={strategy}"])
    with pytest.raises(MultiteachError) as err:
        engine.train(recipe)
    message = str(err.value)
    assert f"strategy={strategy}" in message and "Accelerate does not shard on CPU" in message
    assert "strategy ddp" in message and "torchrun --standalone --nproc_per_node 2" in message
    assert "tests/test_fsdp.py" in message  # where the sharded path is checked on CPU
    assert not (tmp_path / "run").exists()


def test_strategy_checks():
    ddp = load_recipe("demo").train.distributed
    check_strategy(ddp, cuda_available=False, environ={})  # ddp: fine on CPU
    # `accelerate launch --config_file accelerate_fsdp.yaml` on CPU: refused, whatever the recipe says
    with pytest.raises(MultiteachError, match=r"launcher asked for fsdp .*Accelerate does not shard on CPU"):
        check_strategy(ddp, cuda_available=False, environ={"ACCELERATE_USE_FSDP": "true"})
    if importlib.util.find_spec("deepspeed") is None:
        deepspeed = load_recipe("demo", ["train.distributed.strategy=deepspeed"]).train.distributed
        with pytest.raises(MultiteachError, match="deepspeed package is not installed"):
            check_strategy(deepspeed, cuda_available=True, environ={})
    fsdp = load_recipe("demo", ["train.distributed.strategy=fsdp"]).train.distributed
    check_strategy(fsdp, cuda_available=True, environ={"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(MultiteachError, match=r"launcher asked for fsdp .*strategy=ddp; the recipe decides"):
        check_strategy(
            load_recipe("demo").train.distributed, cuda_available=True, environ={"ACCELERATE_USE_FSDP": "true"}
        )
    with pytest.raises(MultiteachError, match="train.compile: torch.compile is not wired up"):
        load_recipe("demo", ["train.distributed.strategy=fsdp", "train.compile=true"])
    with pytest.raises(MultiteachError, match=r"zero_stage: 3 is not allowed; use one of 1, 2"):
        load_recipe("demo", ["train.distributed.deepspeed.zero_stage=3"])


def test_state_dict_weights_file_equals_save_model(tmp_path):
    recipe = load_recipe(recipe_yaml(tmp_path))
    model = build_components(recipe).model
    groups = shared_names(model)
    assert any("loss.terms.dino.head" in g[0] and "loss.terms.ibot.head" in g[1] for g in groups)  # shared head
    save_weights(model, tmp_path / "module.safetensors")
    # a gathered state dict keeps a shared tensor under one name (torch keeps the first it meets)
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("loss.terms.dino.head")}
    save_weights(sd, tmp_path / "dict.safetensors", groups)
    assert _metadata(tmp_path / "module.safetensors") == _metadata(tmp_path / "dict.safetensors")
    a, b = load_file(str(tmp_path / "module.safetensors")), load_file(str(tmp_path / "dict.safetensors"))
    assert _max_diff(a, b) == 0.0


def test_fsdp2_checkpoint_matches_ddp_resumes_and_exports(tmp_path):
    recipe = recipe_yaml(tmp_path, steps=6, checkpoint_every=3)
    ref, fsdp, fsdp_resumed = tmp_path / "ref", tmp_path / "fsdp", tmp_path / "fsdp_resumed"
    one = cli("train", str(recipe), f"output_dir={ref}")  # the DDP engine, one process
    assert one.returncode == 0, one.stderr[-3000:]

    # FSDP2 over 2 gloo ranks: steps 1-3 -> checkpoint; then a sharded resume of it, steps 4-6
    work = subprocess.run(
        [*torchrun(2), WORKER, str(recipe), str(fsdp), "3", str(fsdp_resumed)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=REPO,
    )
    assert work.returncode == 0 and '"fsdp_worker": "ok"' in work.stdout, work.stderr[-3000:]

    # the gathered checkpoint is the DDP one: same weights, EMA, optimiser state, file format
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(_ckpt(ref, 3) / name)), load_file(str(_ckpt(fsdp, 3) / name))
        assert _max_diff(a, b) < 1e-5, name
        assert _metadata(_ckpt(ref, 3) / name) == _metadata(_ckpt(fsdp, 3) / name)  # shared DINO/iBOT head
    opt_ref = torch.load(_ckpt(ref, 3) / "optimizer.pt", weights_only=True)["optimizer"]
    opt_fsdp = torch.load(_ckpt(fsdp, 3) / "optimizer.pt", weights_only=True)["optimizer"]
    assert opt_ref["param_groups"] == opt_fsdp["param_groups"] and opt_ref["state"].keys() == opt_fsdp["state"].keys()
    assert max(_max_diff(opt_ref["state"][i], opt_fsdp["state"][i]) for i in opt_ref["state"]) < 1e-5
    saved = json.loads((_ckpt(fsdp, 3) / "state.json").read_text())
    assert saved["recipe_hash"] == json.loads((_ckpt(ref, 3) / "state.json").read_text())["recipe_hash"]

    # (b) load_run_student reads it like a DDP run's
    student = load_run_student(fsdp)
    assert student.checkpoint.name == "step_00000003" and student.weights == "ema"
    ref_ema = {k[8:]: v for k, v in load_file(str(_ckpt(ref, 3) / "ema.safetensors")).items() if k[:8] == "student."}
    assert _max_diff(ref_ema, student.student.state_dict()) < 1e-5

    # the sharded resume (the FSDP engine's order: full weights, shard, full optimiser state) ends where DDP does
    final = load_file(str(_ckpt(ref, 6) / "model.safetensors"))
    assert _max_diff(final, load_file(str(_ckpt(fsdp_resumed, 6) / "model.safetensors"))) < 1e-5

    # (a) `multiteach train` with the same recipe resumes the FSDP checkpoint and finishes like the DDP run
    again = cli("train", str(recipe), f"output_dir={fsdp}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and "step_00000003" in again.stderr
    assert latest_checkpoint(fsdp).name == "step_00000006"
    assert _max_diff(final, load_file(str(_ckpt(fsdp, 6) / "model.safetensors"))) < 1e-5


def test_engine_plugin_wraps_each_student_block(tmp_path):
    from multiteach.engine import engine_plugins

    recipe = load_recipe(
        recipe_yaml(tmp_path), ["train.distributed.strategy=fsdp", "train.distributed.fsdp.reshard_after_forward=false"]
    )
    plugin = engine_plugins(recipe)["fsdp_plugin"]  # built only, not given to an Accelerator (no CUDA here)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert block_class_names(build_components(recipe).model) == ["Block"]
    assert engine_plugins(load_recipe(recipe_yaml(tmp_path))) == {}  # ddp: Accelerate takes it from the launcher


def test_multinode_examples_are_valid():
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    from multiteach.config import Recipe, compose, deep_merge, find_recipe

    examples = REPO / "examples" / "multinode"
    config = load_config_from_file(str(examples / "accelerate_fsdp.yaml"))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    assert (config.num_machines, config.num_processes) == (2, 16)
    assert subprocess.run(["bash", "-n", str(examples / "slurm.sh")]).returncode == 0
    snippet = (examples / "README.md").read_text().split("```yaml\n")[1].split("```")[0]
    recipe = Recipe.from_dict(deep_merge(compose(find_recipe("demo")), yaml.safe_load(snippet)), name="demo")
    assert recipe.train.distributed.strategy == "fsdp" and recipe.train.distributed.fsdp.auto_wrap == "blocks"
