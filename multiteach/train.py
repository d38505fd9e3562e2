"""THE training loop, top to bottom. With its engine (:mod:`multiteach.engine`), the only code that touches Accelerate.

One command on one CPU, one GPU, many GPUs or many nodes:

    multiteach train RECIPE [key=value ...]                         # one process
    accelerate launch --multi_gpu --num_processes 2 -m multiteach train RECIPE
    torchrun --standalone --nproc_per_node 2 -m multiteach train RECIPE

(On CPU, ``accelerate launch --cpu --num_processes 2`` silently runs ONE process; the two forms above
really start two gloo processes.) Re-running the same command into the same run directory resumes from
its last complete checkpoint. ``train.distributed.strategy`` picks DDP (default), FSDP2 or DeepSpeed; the
last two need CUDA and are refused elsewhere (``examples/multinode/README.md``).

:func:`train` reads as set-up, the loop, the end. Its helpers: the run-directory checks and records
(:mod:`multiteach.run_setup`), the data, models and resumed state (:func:`_set_up`), Accelerate's wrapping
(:func:`_prepare`), the per-step hyper-parameters (:func:`_step_hparams`), the per-step record
(:class:`multiteach.step_log.StepLog`) and the checkpoint/stop handling (:func:`_checkpoint_or_stop`);
Accelerate's plugins, sharded optimiser state and checkpoint writing live in :mod:`multiteach.engine`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from multiteach.build import build_components, build_teachers, check_batch_split, data_loader, training_source
from multiteach.cache import open_cache, uses_cache
from multiteach.checkpoint import load_checkpoint
from multiteach.distributed import check_strategy
from multiteach.ema import EMA
from multiteach.engine import (
    check_ranks_agree,
    configure_engine,
    engine_plugins,
    fresh_accelerator_state,
    restore_sharded_optimizer,
    write_checkpoint,
)
from multiteach.errors import MultiteachError, RunInterrupted
from multiteach.hardware import resolve_precision
from multiteach.losses import active_teachers
from multiteach.losses.expert_heads import fit_missing_heads, terms_needing_heads
from multiteach.run_setup import recipe_hash, resume_from, start_run_dir
from multiteach.run_summary import render as render_summary
from multiteach.run_summary import stored_summary
from multiteach.schedules import cosine, linear_warmup
from multiteach.seeding import seed_everything
from multiteach.step_log import StepLog
from multiteach.teachers.doctor import preflight
from multiteach.teachers.loaded import write_teacher_record
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
    """Set each group's LR (``lr`` times its layer-decay ``lr_scale``) and weight decay (``wd``, or 0 for
    the no-decay groups)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
        g["weight_decay"] = wd if g["decay"] else 0.0


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
    """:func:`train` with its stop flag in place: set-up, the loop (step, log, checkpoint, stop), the end."""
    n_threads, threads_from = choose_threads(recipe.train.threads)
    torch.set_num_threads(n_threads)
    # fsdp/deepspeed where Accelerate cannot shard (no CUDA) are refused before anything is built.
    strategy = recipe.train.distributed.strategy
    check_strategy(recipe.train.distributed)
    acc = _accelerator(recipe)
    world, rank = acc.num_processes, acc.process_index
    micro = check_batch_split(recipe, world)
    run_dir = Path(recipe.output_dir)

    # --- 1. the run directory: refuse a different recipe, find where to resume ----------------------
    digest = recipe_hash(recipe)
    last = resume_from(run_dir, digest, resume)
    saved = json.loads((last / "state.json").read_text()) if last is not None else {}
    if last is not None and saved["step"] >= recipe.schedule.steps:
        return _already_finished(acc, recipe, run_dir, last, saved)

    # --- 2. data first (a bad folder fails before any model is built), models, optimiser, resumed state ---
    tiles, cache, checked, model, teachers, ema, optimizer, state = _set_up(acc, recipe, last)
    start = state["step"]
    file_log: logging.Handler | None = None
    if acc.is_main_process:
        file_log = start_run_dir(recipe, run_dir, model, teachers, cache, tiles, state, (n_threads, threads_from))
        if checked is not None:  # what each teacher really loaded, for the model card (teachers.json)
            write_teacher_record(run_dir, recipe, checked)

    # --- 3. Accelerate: wrap the trainable model; teachers and EMA are only moved ------------------
    model, optimizer = _prepare(acc, recipe, model, optimizer, teachers, ema, last, micro)
    unwrapped = acc.unwrap_model(model)
    replay = cache.replay if cache is not None else None
    batches = iter(data_loader(recipe, tiles, unwrapped.student, rank, world, start, cache=replay))
    if state["rng"] is not None:  # after the loader drew its seed, exactly as the uninterrupted run did
        torch.set_rng_state(state["rng"])
    if acc.is_main_process and recipe.train.trackers:
        acc.init_trackers(recipe.name, config={"recipe_hash": digest})

    # --- 4. the loop ----------------------------------------------------------------------------------
    steps, accum, n_global = recipe.schedule.steps, recipe.optim.grad_accum, recipe.data.global_crops.n
    tracker_log = acc.log if recipe.train.trackers else None
    book = StepLog(recipe, run_dir, unwrapped.loss, start, tiles.describe(), world, acc.is_main_process, tracker_log)
    book.resumed(state)  # a resumed run's summary starts at its step 1
    ema_momentum = recipe.schedule.ema_momentum

    def share_skipped() -> None:  # every rank's unreadable inputs into each rank's summary
        if world > 1:
            book.summary.add_skipped(gather_object(list(book.summary.skipped.items())))

    def save(at: int) -> None:  # a checkpoint of optimiser step ``at`` (and the cache rows computed so far)
        share_skipped()
        if cache is not None:
            cache.flush()
        batch = micro * world * accum
        write_checkpoint(acc, run_dir, at, unwrapped, ema, optimizer, digest, batch, strategy, book.summary.progress())

    step, micro_i, stopped_by = start, 0, 0
    try:
        for batch in batches:
            hp = _step_hparams(recipe, step, optimizer)
            batch = {k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            targets = _targets(batch, cache, teachers, acc.device)
            if micro_i == 0:
                book.check_targets(targets)
            with acc.accumulate(model):
                total, values = model(batch, targets, n_global, hp.teacher_temp, ema.module if ema else None)
                _stop_if_not_finite(acc, total, values, step, run_dir)
                acc.backward(total)
                if acc.sync_gradients and recipe.optim.clip_grad:
                    acc.clip_grad_norm_(model.parameters(), recipe.optim.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_i += 1
            book.add_micro_batch(batch, n_global)
            if micro_i % accum:
                continue
            step += 1  # one optimiser step completed
            if step == start + 1:
                book.check_standardizers(unwrapped.loss)
            if ema is not None:
                ema.update(unwrapped, cosine(step, steps, ema_momentum.start, ema_momentum.end))
            book.step(step, total, values, hp._asdict())
            stopped_by = _checkpoint_or_stop(acc, stop, recipe, step, save)
            if stopped_by:
                break
        share_skipped()
        if acc.is_main_process:
            book.finish(run_dir, step, stopped_by)
    finally:
        book.close()
        del batches  # shuts the DataLoader workers down now, not when a traceback lets go of this frame
        if cache is not None:  # rows computed after the last checkpoint are as good as any: keep them
            cache.flush()
            log.info("%s", cache.describe())
        if file_log is not None:
            logging.getLogger("multiteach").removeHandler(file_log)
            file_log.close()

    # --- 5. the end: every rank holds the same weights; a stopped run says where it stopped ----------
    check_ranks_agree(acc, unwrapped, run_dir)
    acc.wait_for_everyone()
    if world > 1:  # trackers only: a gloo group torn down while a peer exits can hang a rank at its very end
        for tracker in acc.trackers:
            tracker.finish()
    else:
        acc.end_training()
    if stopped_by and step < steps:
        raise RunInterrupted(stopped_by, step, steps, run_dir)
    return run_dir


def _accelerator(recipe: Any) -> Accelerator:
    """The run's Accelerator (precision, trackers, gradient accumulation, the strategy's plugins); this
    process logs at INFO when it is the main one, at WARNING otherwise."""
    # cpu=True on a machine without GPUs: Accelerate only forms a gloo process group (torchrun, accelerate
    # launch --multi_gpu) when told it runs on CPU; otherwise every process would train alone, silently.
    fresh_accelerator_state()
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_precision(recipe.train.precision),
        log_with=recipe.train.trackers or None,
        project_dir=recipe.output_dir,
        gradient_accumulation_steps=recipe.optim.grad_accum,
        **engine_plugins(recipe),
    )
    logging.basicConfig(
        level=logging.INFO if acc.is_main_process else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    # huggingface_hub prints through a handler of its own: passed on to the root handler too, each line came twice
    logging.getLogger("huggingface_hub").propagate = False
    return acc


def _already_finished(acc: Accelerator, recipe: Any, run_dir: Path, last: Path, state: dict[str, Any]) -> Path:
    """A re-run of a run that already reached ``schedule.steps``: say so and print its stored summary.

    Args:
        state: The last checkpoint's ``state.json``.

    Returns:
        The run directory (nothing is built or trained).
    """
    if acc.is_main_process:
        summary = stored_summary(run_dir, state, recipe.schedule.steps)
        log.info(
            "%s already finished (%d of %d steps, checkpoint %s); nothing to train. Its summary (summary.json):\n%s",
            run_dir,
            int(state["step"]),
            recipe.schedule.steps,
            last.name,
            render_summary(summary),
        )
    acc.wait_for_everyone()
    return run_dir


class _SetUp(NamedTuple):
    """What :func:`_set_up` builds, before Accelerate wraps anything."""

    tiles: Any  # the training source
    cache: Any  # the teacher-feature cache, or None (live teachers)
    checked: Any  # the weights doctor's findings per teacher, or None (with a cache)
    model: Any  # the trainable model: student, heads, loss
    teachers: Mapping[str, Any]
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    state: dict[str, Any]  # step, images, rng (the checkpoint's, or a fresh run's), fitted expert heads


def _set_up(acc: Accelerator, recipe: Any, last: Path | None) -> _SetUp:
    """Data first (a bad folder fails before any model is built), the teachers' weights check, the model, EMA
    and optimiser, the checkpoint ``last`` loaded into them (None: a fresh run), then the expert heads."""
    strategy = recipe.train.distributed.strategy
    # with slides the main process builds a missing tissue index first; the other processes then load it warm
    with acc.main_process_first() if recipe.data.slides is not None else contextlib.nullcontext():
        tiles = training_source(recipe)
    # a teacher-target cache (cache.dir) replaces the teachers: its key checked against the recipe; the teachers
    # are loaded only to fill rows it lacks (and, for a new folder, to record their specs and fit the PCA)
    cache = open_cache(recipe, rank=acc.process_index) if uses_cache(recipe) else None
    if cache is not None:
        cache.prime(tiles, acc.device)
    # the weights doctor reads file headers only: a wrong checkpoint fails in seconds
    checked = preflight(recipe, active_teachers(recipe.active_losses())) if cache is None else None
    seed_everything(recipe.seed)
    comps = build_components(recipe, cache=cache)
    model, teachers = comps.model, comps.teachers
    ema = EMA(model) if (model.needs_ema() or recipe.train.keep_ema) else None
    optimizer = torch.optim.AdamW(
        _param_groups(model, recipe.optim.weight_decay, recipe.optim.layer_decay),
        lr=recipe.optim.lr,
        betas=tuple(recipe.optim.betas),
    )
    state: dict[str, Any] = {"step": 0, "images": 0, "rng": None}
    if last is not None:  # a sharded optimiser loads its state after prepare (restore_sharded_optimizer)
        state = load_checkpoint(last, model, ema.module if ema else None, optimizer if strategy == "ddp" else None)
        log.info("resuming from %s (step %d)", last, state["step"])
    _expert_heads(recipe, model, teachers, cache, tiles, state, resumed=last is not None)
    return _SetUp(tiles, cache, checked, model, teachers, ema, optimizer, state)


def _expert_heads(
    recipe: Any, model: Any, teachers: Mapping[str, Any], cache: Any, tiles: Any, state: dict[str, Any], resumed: bool
) -> None:
    """Expert DINO/iBOT heads that are not public: fitted once, before training (their names go to
    ``state["fitted_expert_heads"]``); a resumed run has them from its checkpoint with the rest of the model."""
    if not resumed:
        needed = list(dict.fromkeys(t.teacher for t in terms_needing_heads(model.loss)))
        state["fitted_expert_heads"] = fit_missing_heads(
            model.loss,
            build_teachers(recipe, needed) if cache is not None and needed else teachers,
            lambda: data_loader(recipe, tiles, model.student, 0, 1, 0),
            recipe.seed,
        )
    else:
        for term in terms_needing_heads(model.loss):
            term.target_ready = True  # restored from the checkpoint with the rest of the model


def _prepare(
    acc: Accelerator,
    recipe: Any,
    model: Any,
    optimizer: torch.optim.Optimizer,
    teachers: Mapping[str, Any],
    ema: EMA | None,
    last: Path | None,
    micro: int,
) -> tuple[Any, torch.optim.Optimizer]:
    """Accelerate wraps the trainable model (compiled first with ``train.compile``) and its optimiser, whose
    sharded state (fsdp, deepspeed) is restored from ``last`` now; the teachers and the EMA are only moved.

    Returns:
        The wrapped model and optimiser.
    """
    strategy = recipe.train.distributed.strategy
    if recipe.train.compile:
        model = torch.compile(model)
    configure_engine(acc, model, micro)
    model, optimizer = acc.prepare(model, optimizer)
    if last is not None and strategy != "ddp":
        restore_sharded_optimizer(acc, model, optimizer, last, strategy)
    for t in teachers.values():
        t.to(acc.device)
    if ema is not None:
        ema.to(acc.device)
    return model, optimizer


class StepHParams(NamedTuple):
    """One step's scheduled hyper-parameters (the field names are metrics.jsonl keys)."""

    lr: float
    weight_decay: float
    teacher_temp: float


def _step_hparams(recipe: Any, step: int, optimizer: torch.optim.Optimizer) -> StepHParams:
    """Schedule ``step``'s LR (warm-up, cosine), weight decay (cosine) and DINO teacher temperature (warm-up),
    and set the first two on every parameter group of ``optimizer``."""
    o, sch = recipe.optim, recipe.schedule
    wd_end = o.weight_decay_end if o.weight_decay_end is not None else o.weight_decay
    hp = StepHParams(
        lr=cosine(step, sch.steps, o.lr, o.min_lr, o.warmup_steps),
        weight_decay=cosine(step, sch.steps, o.weight_decay, wd_end),
        teacher_temp=linear_warmup(step, sch.teacher_temp.start, sch.teacher_temp.end, sch.teacher_temp.warmup_steps),
    )
    _set_hparams(optimizer, hp.lr, hp.weight_decay)
    return hp


def _targets(batch: Mapping[str, Any], cache: Any, teachers: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The teachers' targets for the batch's global crops ``batch["global"]`` (n_global * B, 3, G, G): read
    through the target cache (stored rows read, the others computed and stored) or computed live."""
    if cache is not None:
        return cache(batch, device)
    with torch.no_grad():
        return {name: t(batch["global"]).as_target() for name, t in teachers.items()}


def _stop_if_not_finite(
    acc: Accelerator, total: torch.Tensor, values: Mapping[str, torch.Tensor], step: int, run_dir: Path
) -> None:
    """Stop every rank when any rank's loss ``total`` (shape ()) is not finite, naming the bad term(s).

    Raises:
        MultiteachError: the loss is NaN/inf on some rank (the last good checkpoint is kept).
    """
    bad = acc.reduce(torch.tensor([0.0 if torch.isfinite(total) else 1.0], device=acc.device), "sum")
    if bad.item() > 0:
        terms = ", ".join(n for n, v in values.items() if not torch.isfinite(v).all()) or "the weighted sum"
        raise MultiteachError(
            f"non-finite loss at step {step} (term: {terms}); stopped. The last good "
            f"checkpoint in {run_dir / 'checkpoints'} is kept; lower optim.lr or check the inputs"
        )


def _checkpoint_or_stop(
    acc: Accelerator, stop: StopRequest, recipe: Any, step: int, save: Callable[[int], None]
) -> int:
    """After optimiser step ``step``: agree on a stop across ranks, then ``save(step)`` when a checkpoint is
    due (``train.checkpoint_every``, the last step, or a stop).

    Returns:
        The agreed stop signal's number (0: carry on).
    """
    stopped_by = _agreed_stop(acc, stop)
    steps = recipe.schedule.steps
    if step % recipe.train.checkpoint_every == 0 or step == steps or stopped_by:
        save(step)
    if stopped_by:
        log.warning(
            "%sstop requested (%s): checkpoint written at step %d of %d; re-run the same command to resume",
            f"rank {acc.process_index}: " if acc.num_processes > 1 else "",
            signal.Signals(stopped_by).name,
            step,
            steps,
        )
    return stopped_by


def _agreed_stop(acc: Accelerator, stop: StopRequest) -> int:
    """The stop signal any rank received (0: none), the same on every rank, so all stop at one step."""
    mine = torch.tensor([float(stop.signum or 0)], device=acc.device)
    return int(acc.gather(mine).max().item())


def finish_process(num_processes: int, exit_code: int = 0) -> None:
    """End a multi-process run cleanly: flush, then leave with ``exit_code`` without the interpreter
    teardown that makes gloo abort in 10-25% of runs (the launcher would report a failure for a run that
    finished, or the wrong status for one that stopped on a signal)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if num_processes > 1:
        os._exit(exit_code)
