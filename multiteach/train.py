"""THE training loop, top to bottom. The only module that touches Accelerate.

One command on one CPU, one GPU, many GPUs or many nodes:

    multiteach train RECIPE [key=value ...]                         # one process
    accelerate launch --multi_gpu --num_processes 2 -m multiteach train RECIPE
    torchrun --standalone --nproc_per_node 2 -m multiteach train RECIPE

(On CPU, ``accelerate launch --cpu --num_processes 2`` silently runs ONE process; the two forms above
really start two gloo processes.) Re-running the same command into the same run directory resumes from
its last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from multiteach.build import build_components, check_batch_split, data_loader, tile_dataset
from multiteach.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from multiteach.ema import EMA
from multiteach.errors import MultiteachError
from multiteach.losses.expert_heads import fit_missing_heads, terms_needing_heads
from multiteach.schedules import cosine, linear_warmup

log = logging.getLogger("multiteach.train")


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then checkpoints and exits)."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


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


def train(recipe: Any, resume: bool | None = None) -> Path:
    """Distil a student as the recipe says; return the run directory.

    Args:
        recipe: A validated :class:`multiteach.config.Recipe`.
        resume: True requires a checkpoint to resume from; False refuses to reuse a run directory that
            has checkpoints; None (default) resumes when the directory holds a run of the same recipe.
    """
    # cpu=True on a machine without GPUs: Accelerate only forms a gloo process group (torchrun, accelerate
    # launch --multi_gpu) when told it runs on CPU; otherwise every process would train alone, silently.
    _fresh_accelerator_state()
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=recipe.train.precision,
        log_with=recipe.train.trackers or None,
        project_dir=recipe.output_dir,
        gradient_accumulation_steps=recipe.optim.grad_accum,
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
    set_seed(recipe.seed)
    comps = build_components(recipe)
    model, teachers = comps.model, comps.teachers
    ema = EMA(model) if (model.needs_ema() or recipe.train.keep_ema) else None
    optimizer = torch.optim.AdamW(
        _param_groups(model, recipe.optim.weight_decay, recipe.optim.layer_decay),
        lr=recipe.optim.lr,
        betas=tuple(recipe.optim.betas),
    )
    state: dict[str, Any] = {"step": 0, "images": 0, "rng": None}
    if last is not None:
        state = load_checkpoint(last, model, ema.module if ema else None, optimizer)
        log.info("resuming from %s (step %d)", last, state["step"])
    start = state["step"]
    if last is None:  # expert DINO/iBOT heads that are not public are fitted once, before training
        fitted = fit_missing_heads(
            model.loss, teachers, lambda: data_loader(recipe, tiles, model.student, 0, 1, 0), recipe.seed
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
            ", ".join(teachers) or "none",
        )
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
    model, optimizer = acc.prepare(model, optimizer)
    for t in teachers.values():
        t.to(acc.device)
    if ema is not None:
        ema.to(acc.device)
    unwrapped = acc.unwrap_model(model)
    batches = iter(data_loader(recipe, tiles, unwrapped.student, rank, world, start))
    if state["rng"] is not None:  # after the loader drew its seed, exactly as the uninterrupted run did
        torch.set_rng_state(state["rng"])
    if acc.is_main_process and recipe.train.trackers:
        acc.init_trackers(recipe.name, config={"recipe_hash": digest})

    # --- 4. the loop ----------------------------------------------------------------------------------
    steps, accum, n_global = recipe.schedule.steps, recipe.optim.grad_accum, recipe.data.global_crops.n
    o, sch = recipe.optim, recipe.schedule
    stop = _StopRequest()
    metrics_file = run_dir / "metrics.jsonl"
    bar = tqdm(total=steps, initial=start, disable=not acc.is_main_process, desc=recipe.name, unit="step")
    step, micro_i, window_t, window_imgs = start, 0, time.perf_counter(), 0
    try:
        for batch in batches:
            lr = cosine(step, steps, o.lr, o.min_lr, o.warmup_steps)
            wd = cosine(
                step, steps, o.weight_decay, o.weight_decay_end if o.weight_decay_end is not None else o.weight_decay
            )
            temp = linear_warmup(step, sch.teacher_temp.start, sch.teacher_temp.end, sch.teacher_temp.warmup_steps)
            _set_hparams(optimizer, lr, wd)
            batch = {k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with torch.no_grad():
                targets = {name: t(batch["global"]).as_target() for name, t in teachers.items()}
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
            if micro_i % accum:
                continue
            # one optimiser step completed
            step += 1
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
                }
                record = {k: (float(v) if isinstance(v, float) else v) for k, v in record.items()}
                if acc.is_main_process:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                if recipe.train.trackers:
                    acc.log(record, step=step)
                window_t, window_imgs = time.perf_counter(), 0
            stop_now = acc.reduce(torch.tensor([1.0 if stop.requested else 0.0], device=acc.device), "sum").item() > 0
            if step % recipe.train.checkpoint_every == 0 or step == steps or stop_now:
                _checkpoint(acc, run_dir, step, unwrapped, ema, optimizer, digest, micro * world * accum)
            if stop_now:
                log.warning("stop requested: checkpoint written at step %d; re-run the same command to resume", step)
                break
    finally:
        bar.close()
        stop.restore()
        if file_log is not None:
            logging.getLogger("multiteach").removeHandler(file_log)
            file_log.close()
    _check_ranks_agree(acc, unwrapped, run_dir)
    acc.wait_for_everyone()
    acc.end_training()
    return run_dir


def _check_ranks_agree(acc: Accelerator, model: torch.nn.Module, run_dir: Path) -> None:
    """All processes must end with identical weights; record each rank's checksum in ``ranks.json``."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        mine = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()])
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
) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_checkpoint(
            run_dir,
            step,
            model,
            ema.module if ema else None,
            optimizer,
            {"recipe_hash": digest, "images": step * batch},
        )
    acc.wait_for_everyone()


def finish_process(num_processes: int) -> None:
    """End a multi-process run cleanly: flush, then leave without the interpreter teardown that makes
    gloo abort in 10-25% of runs (the launcher would report a failure for a run that finished)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if num_processes > 1:
        os._exit(0)
