"""THE training loop, top to bottom. The only module that touches Accelerate.

One command on one CPU, one GPU, many GPUs or many nodes:

    multiteach train RECIPE [key=value ...]                         # one process
    accelerate launch --multi_gpu --num_processes 2 -m multiteach train RECIPE
    torchrun --standalone --nproc_per_node 2 -m multiteach train RECIPE

(On CPU, ``accelerate launch --cpu --num_processes 2`` silently runs ONE process; the two forms above
really start two gloo processes.) Re-running the same command into the same run directory resumes from
its last complete checkpoint. ``train.distributed.strategy`` picks DDP (default), FSDP2 or DeepSpeed; the
last two need CUDA and are refused elsewhere (``examples/multinode/README.md``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from multiteach.build import build_components, build_teachers, check_batch_split, data_loader, tile_dataset
from multiteach.cache import open_cache, uses_cache
from multiteach.checkpoint import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
    shared_names,
)
from multiteach.curves import write_run_curves
from multiteach.data.perturb import StrengthLog
from multiteach.distributed import (
    block_class_names,
    check_strategy,
    full_optimizer_state_dict,
    full_tensor,
    load_full_optimizer_state_dict,
)
from multiteach.ema import EMA
from multiteach.errors import MultiteachError, RunInterrupted
from multiteach.hardware import resolve_precision
from multiteach.health import FlatTermWatch, check_standardizers, check_teacher_outputs
from multiteach.losses import active_teachers
from multiteach.losses.expert_heads import fit_missing_heads, terms_needing_heads
from multiteach.run_summary import RunSummary
from multiteach.run_summary import render as render_summary
from multiteach.schedules import cosine, linear_warmup
from multiteach.teachers.doctor import preflight
from multiteach.threads import choose_threads

log = logging.getLogger("multiteach.train")


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then checkpoints and stops).

    The first signal is kept (its number sets the exit status, 128 + signal); later ones change nothing,
    so a launcher that forwards the signal again (torchrun does) cannot turn a graceful stop into a crash.
    Handlers are installed only in the main thread, the only one Python delivers signals to.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            # os.write, not print: the signal may interrupt a print to stderr (re-entrant buffered write)
            os.write(
                2,
                f"multiteach: {signal.Signals(signum).name} received (pid {os.getpid()}): finishing the current "
                "step, then a checkpoint and stop\n".encode(),
            )

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def recipe_hash(recipe: Any) -> str:
    """Hash of the parts of a recipe that define the maths of a run (not logging/checkpoint cadence)."""
    d = recipe.to_dict()
    d.pop("train", None)
    d.pop("output_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms/biases/tokens; optional layer-wise LR decay over the student's blocks."""
    from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

    timm_model = model.student.model
    skip = {f"{n}" for n in getattr(timm_model, "no_weight_decay", lambda: set())()}
    if layer_decay:
        student = param_groups_layer_decay(timm_model, weight_decay, skip, layer_decay=layer_decay)
    else:
        student = param_groups_weight_decay(timm_model, weight_decay, skip)
    rest = [p for n, p in model.named_parameters() if not n.startswith("student.model.") and p.requires_grad]
    decay = [p for p in rest if p.ndim > 1]
    no_decay = [p for p in rest if p.ndim <= 1]
    groups = [*student, {"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        g.setdefault("lr_scale", 1.0)
        g["decay"] = g.get("weight_decay", 0.0) > 0
    return [g for g in groups if g["params"]]


def _set_hparams(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
        g["weight_decay"] = wd if g["decay"] else 0.0


def _first_bad_term(values: dict[str, torch.Tensor]) -> str:
    bad = [n for n, v in values.items() if not torch.isfinite(v).all()]
    return ", ".join(bad) if bad else "the weighted sum"


def train(recipe: Any, resume: bool | None = None, stop: StopRequest | None = None) -> Path:
    """Distil a student as the recipe says; return the run directory of the finished run.

    Args:
        recipe: A validated :class:`multiteach.config.Recipe`.
        resume: True requires a checkpoint to resume from; False refuses to reuse a run directory that
            has checkpoints; None (default) resumes when the directory holds a run of the same recipe.
        stop: Records SIGTERM/SIGINT; default: handlers installed for this call only (a sweep passes one
            that spans all its runs).

    Raises:
        RunInterrupted: after SIGTERM/SIGINT (to any rank): every rank finished the step it was on and a
            checkpoint of that step was written; re-running resumes there.
    """
    own = stop is None
    stop = StopRequest() if stop is None else stop
    threads = torch.get_num_threads()
    try:
        return _train(recipe, resume, stop)
    finally:
        torch.set_num_threads(threads)  # train.threads applies to the run, not to the caller's process
        if own:
            stop.restore()


def _train(recipe: Any, resume: bool | None, stop: StopRequest) -> Path:
    """:func:`train` with its stop flag in place."""
    n_threads, threads_from = choose_threads(recipe.train.threads)
    torch.set_num_threads(n_threads)
    # fsdp/deepspeed where Accelerate cannot shard (no CUDA) are refused before anything is built.
    strategy = recipe.train.distributed.strategy
    check_strategy(recipe.train.distributed)
    # cpu=True on a machine without GPUs: Accelerate only forms a gloo process group (torchrun, accelerate
    # launch --multi_gpu) when told it runs on CPU; otherwise every process would train alone, silently.
    _fresh_accelerator_state()
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_precision(recipe.train.precision),
        log_with=recipe.train.trackers or None,
        project_dir=recipe.output_dir,
        gradient_accumulation_steps=recipe.optim.grad_accum,
        **_engine_plugins(recipe),
    )
    world, rank = acc.num_processes, acc.process_index
    micro = check_batch_split(recipe, world)
    run_dir = Path(recipe.output_dir)
    logging.basicConfig(
        level=logging.INFO if acc.is_main_process else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )

    # --- 1. the run directory: refuse a different recipe, find where to resume ----------------------
    digest = recipe_hash(recipe)
    last = latest_checkpoint(run_dir)
    if last is not None:
        saved = json.loads((last / "state.json").read_text())
        if saved.get("recipe_hash") != digest:
            raise MultiteachError(
                f"{run_dir} holds a run of a different recipe (checkpoint {last.name}); choose another "
                "output_dir, or delete the old checkpoints to start over"
            )
        if resume is False:
            raise MultiteachError(f"{run_dir} already has checkpoints; pass --resume or use a new output_dir")
    elif resume:
        raise MultiteachError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")

    # --- 2. data first: a bad folder fails before any model is built --------------------------------
    tiles = tile_dataset(recipe)
    # a teacher-feature cache (cache.dir) replaces the teachers: checked against the recipe, never loaded
    cache = open_cache(recipe.cache.dir, recipe, tile_paths=tiles.paths) if uses_cache(recipe) else None
    if cache is None:  # the weights doctor reads file headers only: a wrong checkpoint fails in seconds
        preflight(recipe, active_teachers(recipe.active_losses()))
    set_seed(recipe.seed)
    comps = build_components(recipe, cache=cache)
    model, teachers = comps.model, comps.teachers
    ema = EMA(model) if (model.needs_ema() or recipe.train.keep_ema) else None
    optimizer = torch.optim.AdamW(
        _param_groups(model, recipe.optim.weight_decay, recipe.optim.layer_decay),
        lr=recipe.optim.lr,
        betas=tuple(recipe.optim.betas),
    )
    state: dict[str, Any] = {"step": 0, "images": 0, "rng": None}
    if last is not None:  # a sharded optimiser loads its state after prepare (_restore_sharded_optimizer)
        state = load_checkpoint(last, model, ema.module if ema else None, optimizer if strategy == "ddp" else None)
        log.info("resuming from %s (step %d)", last, state["step"])
    start = state["step"]
    if last is None:  # expert DINO/iBOT heads that are not public are fitted once, before training
        needed = list(dict.fromkeys(t.teacher for t in terms_needing_heads(model.loss)))
        fitted = fit_missing_heads(
            model.loss,
            build_teachers(recipe, needed) if cache is not None and needed else teachers,
            lambda: data_loader(recipe, tiles, model.student, 0, 1, 0),
            recipe.seed,
        )
        state["fitted_expert_heads"] = fitted
    else:
        for term in terms_needing_heads(model.loss):
            term.target_ready = True  # restored from the checkpoint with the rest of the model
    file_log: logging.Handler | None = None
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_log = _log_to_file(run_dir / "train.log")
        if state.get("fitted_expert_heads"):
            (run_dir / "expert_heads.json").write_text(json.dumps({"fitted": state["fitted_expert_heads"]}))
            log.warning("fitted expert heads (not the teacher's own): %s", ", ".join(state["fitted_expert_heads"]))
        from multiteach.config import save_resolved

        save_resolved(recipe, run_dir)
        log.info(
            "%s | student %s (%.2fM params) | teachers: %s",
            model.loss,
            recipe.student.arch,
            sum(p.numel() for p in model.student.parameters()) / 1e6,
            ", ".join(teachers) or (f"{', '.join(cache.names)} (cached in {cache.dir})" if cache else "none"),
        )
        log.info("intra-op threads per process: %d (%s)", n_threads, threads_from)
        (run_dir / "data.json").write_text(
            json.dumps(
                {"tiles": len(tiles), "source": tiles.source, "skipped": [str(p) for p in tiles.skipped]}, indent=2
            )
        )
        if tiles.skipped:
            log.warning("skipped %d unreadable image(s) in %s (listed in data.json)", len(tiles.skipped), tiles.source)

    # --- 3. Accelerate: wrap the trainable model; teachers and EMA are only moved ------------------
    if recipe.train.compile:
        model = torch.compile(model)
    _configure_engine(acc, model, micro)
    model, optimizer = acc.prepare(model, optimizer)
    if last is not None and strategy != "ddp":
        _restore_sharded_optimizer(acc, model, optimizer, last, strategy)
    for t in teachers.values():
        t.to(acc.device)
    if ema is not None:
        ema.to(acc.device)
    unwrapped = acc.unwrap_model(model)
    batches = iter(data_loader(recipe, tiles, unwrapped.student, rank, world, start, cache=cache))
    if state["rng"] is not None:  # after the loader drew its seed, exactly as the uninterrupted run did
        torch.set_rng_state(state["rng"])
    if acc.is_main_process and recipe.train.trackers:
        acc.init_trackers(recipe.name, config={"recipe_hash": digest})

    # --- 4. the loop ----------------------------------------------------------------------------------
    steps, accum, n_global = recipe.schedule.steps, recipe.optim.grad_accum, recipe.data.global_crops.n
    o, sch = recipe.optim, recipe.schedule
    stopped_by = 0
    metrics_file = run_dir / "metrics.jsonl"
    bar = tqdm(total=steps, initial=start, disable=not acc.is_main_process, desc=recipe.name, unit="step")
    step, micro_i, window_t, window_imgs = start, 0, time.perf_counter(), 0
    # dead teachers / standardisers / flat terms: warned about by the main process (every rank raises in
    # "error" mode so that no rank waits for a peer that stopped)
    health = recipe.train.health_check if acc.is_main_process or recipe.train.health_check == "error" else "off"
    flat_terms = FlatTermWatch(mode=health)
    strengths = StrengthLog()  # robust views: perturbation strengths per log window
    summary = RunSummary(steps, start, len(tiles.skipped))
    try:
        for batch in batches:
            lr = cosine(step, steps, o.lr, o.min_lr, o.warmup_steps)
            wd = cosine(
                step, steps, o.weight_decay, o.weight_decay_end if o.weight_decay_end is not None else o.weight_decay
            )
            temp = linear_warmup(step, sch.teacher_temp.start, sch.teacher_temp.end, sch.teacher_temp.warmup_steps)
            _set_hparams(optimizer, lr, wd)
            batch = {k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            if cache is not None:  # read per batch: the cached views of this batch's global crops
                targets = cache.targets(batch["cache_keys"], acc.device)
            else:
                with torch.no_grad():
                    targets = {name: t(batch["global"]).as_target() for name, t in teachers.items()}
            if micro_i == 0:
                summary.warnings += check_teacher_outputs(targets, health)
            with acc.accumulate(model):
                total, values = model(batch, targets, n_global, temp, ema.module if ema else None)
                bad = acc.reduce(torch.tensor([0.0 if torch.isfinite(total) else 1.0], device=acc.device), "sum")
                if bad.item() > 0:
                    raise MultiteachError(
                        f"non-finite loss at step {step} (term: {_first_bad_term(values)}); stopped. The last good "
                        f"checkpoint in {run_dir / 'checkpoints'} is kept; lower optim.lr or check the inputs"
                    )
                acc.backward(total)
                if acc.sync_gradients and o.clip_grad:
                    acc.clip_grad_norm_(model.parameters(), o.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_i += 1
            window_imgs += batch["global"].shape[0] // n_global
            strengths.add(batch.get("robust"))
            if micro_i % accum:
                continue
            # one optimiser step completed
            step += 1
            if step == start + 1:
                summary.warnings += check_standardizers(unwrapped.loss, health)
            if ema is not None:
                ema.update(unwrapped, cosine(step, steps, sch.ema_momentum.start, sch.ema_momentum.end))
            bar.update(1)
            if step % recipe.train.log_every == 0 or step == steps:
                elapsed = time.perf_counter() - window_t
                imgs = window_imgs * world
                record = {
                    "step": step,
                    "loss": total.item(),
                    **{k: v.item() for k, v in values.items()},
                    "lr": lr,
                    "weight_decay": wd,
                    "teacher_temp": temp,
                    "img_per_s": imgs / max(elapsed, 1e-9),
                    **strengths.flush(),
                }
                record = {k: (float(v) if isinstance(v, float) else v) for k, v in record.items()}
                if acc.is_main_process:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(_largest_terms(unwrapped.loss, record), img_s=f"{record['img_per_s']:.1f}")
                summary.warnings += flat_terms.update({k: record[k] for k in values}, step)
                summary.record({"loss": record["loss"], **{k: record[k] for k in values}}, imgs)
                if recipe.train.trackers:
                    acc.log(record, step=step)
                window_t, window_imgs = time.perf_counter(), 0
            stopped_by = _agreed_stop(acc, stop)
            if step % recipe.train.checkpoint_every == 0 or step == steps or stopped_by:
                _checkpoint(acc, run_dir, step, unwrapped, ema, optimizer, digest, micro * world * accum, strategy)
            if stopped_by:
                log.warning(
                    "%sstop requested (%s): checkpoint written at step %d of %d; re-run the same command to resume",
                    f"rank {rank}: " if world > 1 else "",
                    signal.Signals(stopped_by).name,
                    step,
                    steps,
                )
                break
        if acc.is_main_process:
            done = summary.finish(run_dir, step, signal.Signals(stopped_by).name if stopped_by else None)
            log.info("summary (also in summary.json):\n%s", render_summary(done))
            write_run_curves(run_dir)
    finally:
        bar.close()
        del batches  # shuts the DataLoader workers down now, not when a traceback lets go of this frame
        if file_log is not None:
            logging.getLogger("multiteach").removeHandler(file_log)
            file_log.close()
    _check_ranks_agree(acc, unwrapped, run_dir)
    acc.wait_for_everyone()
    acc.end_training()
    if stopped_by and step < steps:
        raise RunInterrupted(stopped_by, step, steps, run_dir)
    return run_dir


def _largest_terms(loss: Any, record: dict[str, Any], n: int = 3) -> dict[str, str]:
    """Progress-bar postfix: the total and the ``n`` terms with the largest weighted values."""
    weighted = {k: abs(loss.term(k).weight * record[k]) for k in loss.names if k in record}
    top = sorted(weighted, key=weighted.get, reverse=True)[:n]
    return {"loss": f"{record['loss']:.4f}", **{k: f"{record[k]:.4f}" for k in top}}


def _agreed_stop(acc: Accelerator, stop: StopRequest) -> int:
    """The stop signal any rank received (0: none), the same on every rank, so all stop at one step."""
    mine = torch.tensor([float(stop.signum or 0)], device=acc.device)
    return int(acc.gather(mine).max().item())


def _check_ranks_agree(acc: Accelerator, model: torch.nn.Module, run_dir: Path) -> None:
    """All processes must end with identical weights; record each rank's checksum in ``ranks.json``.

    Parameter by parameter (FSDP shards are gathered one at a time), never a flat copy of the model."""
    mine, offset = torch.zeros(2, dtype=torch.float64), 0
    with torch.no_grad():
        for p in model.parameters():
            flat = full_tensor(p.detach()).double().flatten().cpu()
            index = torch.arange(offset + 1, offset + flat.numel() + 1, dtype=torch.float64)
            mine += torch.stack([flat.sum(), (flat * index).sum()])
            offset += flat.numel()
    sums = acc.gather(mine.to(acc.device).unsqueeze(0)).cpu()
    if acc.is_main_process:
        (run_dir / "ranks.json").write_text(json.dumps({"checksums": sums.tolist()}))
    if not torch.equal(sums, sums[:1].expand_as(sums)):
        raise MultiteachError(f"processes ended with different weights: checksums {sums.tolist()}")


def _log_to_file(path: Path) -> logging.Handler:
    """Also write this run's log lines to ``run_dir/train.log`` (appending across resumes)."""
    root = logging.getLogger("multiteach")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def _fresh_accelerator_state() -> None:
    """Let one Python process run several single-process trainings (tests, sweeps) with different settings:
    Accelerate keeps a process-wide singleton state that otherwise refuses a new mixed-precision mode."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def _checkpoint(
    acc: Accelerator,
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    digest: str,
    batch: int,
    strategy: str = "ddp",
) -> None:
    """Write a checkpoint in the single-process format whatever the strategy: FSDP gathers the full
    weights and optimiser state (every rank takes part, rank 0 writes); DeepSpeed adds its per-rank
    engine state (``engine/``, from ``Accelerator.save_state``) beside the full weights."""
    acc.wait_for_everyone()
    weights: Any = model
    optim_state: Any = optimizer
    move_in: dict[str, Path] = {}
    if strategy == "fsdp":
        weights = acc.get_state_dict(model)
        optim_state = full_optimizer_state_dict(model, optimizer.optimizer)
    elif strategy == "deepspeed":
        weights, optim_state = acc.get_state_dict(model), None
        move_in["engine"] = Path(run_dir) / CHECKPOINTS / f".engine-step_{step:08d}"
        acc.save_state(str(move_in["engine"]))
        acc.wait_for_everyone()
    if acc.is_main_process:
        save_checkpoint(
            run_dir,
            step,
            weights,
            ema.module if ema else None,
            optim_state,
            {"recipe_hash": digest, "images": step * batch, "strategy": strategy, "processes": acc.num_processes},
            shared=shared_names(model),
            move_in=move_in,
        )
    acc.wait_for_everyone()


def _engine_plugins(recipe: Any) -> dict[str, Any]:
    """Accelerate plugins for ``train.distributed`` (none for ddp: Accelerate takes DDP from the launcher)."""
    cfg = recipe.train.distributed
    if cfg.strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        return {
            "fsdp_plugin": FullyShardedDataParallelPlugin(
                fsdp_version=cfg.fsdp.version,
                reshard_after_forward=cfg.fsdp.reshard_after_forward,
                cpu_offload=cfg.fsdp.cpu_offload,
                # the block class names are only known once the student is built (_configure_engine)
                auto_wrap_policy="transformer_based_wrap" if cfg.fsdp.auto_wrap == "blocks" else "no_wrap",
                state_dict_type="FULL_STATE_DICT",
            )
        }
    if cfg.strategy == "deepspeed":
        from accelerate import DeepSpeedPlugin

        return {
            "deepspeed_plugin": DeepSpeedPlugin(
                zero_stage=cfg.deepspeed.zero_stage,
                gradient_accumulation_steps=recipe.optim.grad_accum,
                gradient_clipping=recipe.optim.clip_grad or 0.0,
            )
        }
    return {}


def _configure_engine(acc: Accelerator, model: torch.nn.Module, micro: int) -> None:
    """Settings only known once the model is built: FSDP wraps each student block (its timm class);
    DeepSpeed needs the per-process micro-batch (no data loader goes through ``prepare``)."""
    fsdp = getattr(acc.state, "fsdp_plugin", None)
    if acc.is_fsdp2 and fsdp is not None and fsdp.auto_wrap_policy is not None:
        fsdp.transformer_cls_names_to_wrap = block_class_names(getattr(model, "_orig_mod", model))
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None:
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = micro


def _restore_sharded_optimizer(
    acc: Accelerator, model: torch.nn.Module, optimizer: Any, last: Path, strategy: str
) -> None:
    """Resume the optimiser of a sharded run after ``prepare``: FSDP loads the full state (any strategy's
    checkpoint) and keeps its shard; DeepSpeed reloads its own per-rank engine state."""
    if strategy == "fsdp":
        saved = load_optimizer_state(last)
        if saved is not None:
            load_full_optimizer_state_dict(model, optimizer.optimizer, saved)
            return
    elif (last / "engine").is_dir():
        acc.load_state(str(last / "engine"))
        return
    log.warning("%s holds no optimiser state %s can load: AdamW moments restart from zero", last.name, strategy)


def finish_process(num_processes: int, exit_code: int = 0) -> None:
    """End a multi-process run cleanly: flush, then leave with ``exit_code`` without the interpreter
    teardown that makes gloo abort in 10-25% of runs (the launcher would report a failure for a run that
    finished, or the wrong status for one that stopped on a signal)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if num_processes > 1:
        os._exit(exit_code)
