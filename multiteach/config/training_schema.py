"""The sections of how a run goes: ``optim:``, ``schedule:``, ``train:`` (with ``train.distributed``) and
``cache:`` (the teacher-feature cache).

Each section's ``_finish(at)`` checks ranges and relations once the converter (:mod:`.convert`) has
checked the types; ``at`` is the section's key path, for the messages. :mod:`.schema` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from multiteach.config.checks import _join, _non_negative, _positive, _probabilities, _require
from multiteach.errors import MultiteachError


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with cosine LR and weight-decay schedules.

    Attributes:
        lr: Peak learning rate (after warmup).
        min_lr: Final learning rate.
        warmup_steps: Linear LR warmup steps.
        weight_decay: Weight decay at the start.
        weight_decay_end: Weight decay at the end (cosine); constant when null.
        layer_decay: Layer-wise LR decay in (0, 1], or null for none.
        clip_grad: Gradient-norm clipping, or null for none.
        betas: AdamW betas.
        batch_size: Global images per optimiser step (across processes and accumulation).
        grad_accum: Micro-batches accumulated per step; must divide ``batch_size``.
    """

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.04
    weight_decay_end: float | None = None
    layer_decay: float | None = None
    clip_grad: float | None = 3.0
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 32
    grad_accum: int = 1

    def _finish(self, at: str) -> None:
        _positive(self, at, "lr", "batch_size", "clip_grad")
        _non_negative(self, at, "warmup_steps", "weight_decay", "weight_decay_end")
        _require(0 <= self.min_lr <= self.lr, f"{at}.min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        if self.layer_decay is not None:
            _require(0 < self.layer_decay <= 1, f"{at}.layer_decay", self.layer_decay, "must be in (0, 1] or null")
        _require(all(0 <= b < 1 for b in self.betas), f"{at}.betas", list(self.betas), "values must be in [0, 1)")
        _require(self.grad_accum >= 1, f"{at}.grad_accum", self.grad_accum, "must be >= 1")
        _require(
            self.batch_size % self.grad_accum == 0,
            f"{at}.batch_size",
            self.batch_size,
            f"must be divisible by optim.grad_accum={self.grad_accum}",
        )


@dataclass(kw_only=True)
class TeacherTempSchedule:
    """DINO/iBOT teacher temperature: linear from ``start`` to ``end`` over ``warmup_steps``, then constant."""

    start: float = 0.04
    end: float = 0.07
    warmup_steps: int = 0

    def _finish(self, at: str) -> None:
        _positive(self, at, "start", "end")
        _non_negative(self, at, "warmup_steps")


@dataclass(kw_only=True)
class EMAMomentumSchedule:
    """EMA-student momentum, cosine from ``start`` to ``end`` over the run."""

    start: float = 0.996
    end: float = 1.0

    def _finish(self, at: str) -> None:
        _probabilities(self, at, "start", "end")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Run length and the schedules that are not optimiser settings."""

    steps: int = 100
    teacher_temp: TeacherTempSchedule = field(default_factory=TeacherTempSchedule)
    ema_momentum: EMAMomentumSchedule = field(default_factory=EMAMomentumSchedule)

    def _finish(self, at: str) -> None:
        _positive(self, at, "steps")


@dataclass(kw_only=True)
class FSDPConfig:
    """FSDP settings (``train.distributed.strategy: fsdp``; Accelerate's FSDP2 plugin, CUDA only).

    Attributes:
        version: FSDP version; only 2 (``fully_shard``, DTensor parameters) is supported.
        reshard_after_forward: Free each block's gathered weights after its forward (ZeRO-3-like memory);
            false keeps them until the backward (ZeRO-2-like, less communication).
        cpu_offload: Keep sharded parameters, gradients and optimiser state in CPU memory.
        auto_wrap: ``blocks``: one FSDP unit per student transformer block (the timm block class), then
            the whole model; ``none``: the whole model is one unit.
    """

    version: Literal[2] = 2
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    auto_wrap: Literal["blocks", "none"] = "blocks"

    def _finish(self, at: str) -> None:
        """The types say it all (checked while building)."""


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """DeepSpeed settings (``train.distributed.strategy: deepspeed``; needs CUDA and the deepspeed package).

    Attributes:
        zero_stage: ZeRO stage 1 (optimiser state sharded) or 2 (+ gradients). Stage 3 shards the
            parameters too; use ``strategy: fsdp`` for that.
    """

    zero_stage: Literal[1, 2] = 2

    def _finish(self, at: str) -> None:
        """The types say it all (checked while building)."""


@dataclass(kw_only=True)
class DistributedConfig:
    """How the trainable model is spread over processes (the launcher decides how many there are).

    Attributes:
        strategy: ``ddp`` (replicated weights, all-reduced gradients; the only multi-process path on CPU),
            ``fsdp`` (sharded weights, gradients and optimiser state; CUDA only) or ``deepspeed`` (ZeRO;
            CUDA only, needs the deepspeed package).
        fsdp: FSDP settings (read when ``strategy`` is ``fsdp``).
        deepspeed: DeepSpeed settings (read when ``strategy`` is ``deepspeed``).
    """

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def _finish(self, at: str) -> None:
        """The types say it all (checked while building)."""


@dataclass(kw_only=True)
class TrainConfig:
    """Loop settings.

    Attributes:
        precision: Accelerate mixed precision (``no``, ``bf16``, ``fp16``); ``auto`` is ``bf16`` where bf16 is
            native (GPU, AVX512-BF16/AMX CPU) and ``no`` elsewhere.
        compile: ``torch.compile`` the student.
        log_every: Steps between metric lines.
        checkpoint_every: Steps between checkpoints.
        trackers: Accelerate trackers (``tensorboard``, ``wandb``, ...).
        keep_ema: Keep an EMA copy of the student and export it (off by default). A recipe with a
            DINO/iBOT ``target: ema`` term has an EMA anyway (it is the target), but exports it only with
            ``keep_ema: true`` (as ``pretrain_tiny``, ``h0mini``, ``g2l`` and ``gpfm`` do). The EMA follows
            ``schedule.ema_momentum`` (0.996 -> 1.0: it averages over ~250 steps and stops moving at the end),
            so it pays off over long runs; over a few hundred steps it lags the live weights far behind.
        num_processes_hint: Expected process count, for messages and batch checks only.
        health_check: What to do when a teacher's output is ~constant across images, a running standardiser
            has ~0 variance, or a term stays flat over its first logs (:mod:`multiteach.health`): ``warn``
            (default), ``error`` (stop; for CI-style runs) or ``off``.
        distributed: Data-parallel strategy (``ddp``, ``fsdp``, ``deepspeed``) and its settings. Not part
            of the recipe hash: a run may resume under another strategy.
        threads: Intra-op CPU threads per process; null: ``OMP_NUM_THREADS`` when set, else the CPUs this
            process may use divided by the processes on this machine (:mod:`multiteach.threads`).
    """

    precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 50
    trackers: list[str] = field(default_factory=list)
    keep_ema: bool = False
    num_processes_hint: int | None = None
    health_check: Literal["warn", "error", "off"] = "warn"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    threads: int | None = None

    def _finish(self, at: str) -> None:
        _positive(self, at, "log_every", "checkpoint_every", "num_processes_hint", "threads")
        if self.compile and self.distributed.strategy == "fsdp":
            raise MultiteachError(
                f"{_join(at, 'compile')}: torch.compile is not wired up for distributed.strategy=fsdp (Accelerate "
                "must compile after sharding, per block); set train.compile=false or use strategy ddp"
            )


@dataclass(kw_only=True)
class CacheConfig:
    """Teacher-target cache (see :mod:`multiteach.cache`).

    Attributes:
        dir: Cache folder. When set, training reads each batch's teacher targets from it, computes and stores the
            rows it lacks, and takes the global crops from each tile's replayed views; from tile folders, lists,
            coordinates, shards and slides (online patching) alike.
        views_per_tile: K, the augmented global views stored per tile (crop box, flip, colour jitter, blur drawn
            from the tile's identity). In epoch ``e``, global crop ``c`` of a tile is view ``(e * n_global + c) % K``.
        dtype: Stored precision of summary and patch tokens: ``float32`` (exact), ``bfloat16``, ``float16`` or
            ``int8`` (symmetric, one float16 scale per token).
        patch_pool: Average-pool the patch-token grid by ``k`` x ``k`` before storing (1 keeps it).
        patch_dims: Keep this many principal components of each teacher's patch tokens (a PCA fitted on view 0 of
            the first ``pca_tiles`` tiles when the folder is created); null keeps every dimension.
        pca_tiles: Tiles the PCA is fitted on.
        shard_tiles: Tile views per shard file (a writer flushes a shard when it holds this many, and at every
            checkpoint).
        max_gb: Stop storing new rows once the folder's shards hold this many GB (null: no cap); targets beyond
            the cap are computed and used, not stored.
    """

    dir: str | None = None
    views_per_tile: int = 4
    dtype: Literal["bfloat16", "bf16", "float16", "fp16", "float32", "fp32", "int8"] = "bfloat16"
    patch_pool: int = 1
    patch_dims: int | None = None
    pca_tiles: int = 64
    shard_tiles: int = 256
    max_gb: float | None = None

    def _finish(self, at: str) -> None:
        _positive(self, at, "views_per_tile", "patch_pool", "shard_tiles", "pca_tiles")
        _require(self.dir is None or bool(self.dir.strip()), f"{at}.dir", self.dir, "must be a non-empty path or null")
        _require(
            self.patch_dims is None or self.patch_dims >= 1, f"{at}.patch_dims", self.patch_dims, "must be >= 1 or null"
        )
        _require(self.max_gb is None or self.max_gb > 0, f"{at}.max_gb", self.max_gb, "must be > 0 or null")
