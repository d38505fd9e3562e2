"""The recipe's sections as dataclasses: what each key means, its type and default, and its checks.

Each section's ``_finish(at)`` checks ranges and relations once the converter (:mod:`.convert`) has
checked the types; ``at`` is the section's key path, for the messages. The top level is
:class:`~multiteach.config.recipe.Recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import timm

from multiteach.config.checks import (
    _join,
    _non_negative,
    _positive,
    _probabilities,
    _require,
    robust_views_settings,
)
from multiteach.errors import MultiteachError, did_you_mean
from multiteach.teachers import resolve_spec
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD, Embedding


def _hint(text: str) -> dict[str, str]:
    """Field metadata: what to write for a required key (shown when it is missing)."""
    return {"hint": text}


@dataclass(kw_only=True)
class GlobalCrops:
    """Global (teacher-sized) crops: ``n`` per tile, ``size`` pixels, area ``scale`` range."""

    n: int = 2
    size: int = 224
    scale: tuple[float, float] = (0.32, 1.0)

    def _finish(self, at: str) -> None:
        _check_crops(self, at, min_n=1)


@dataclass(kw_only=True)
class LocalCrops:
    """Local (small) crops for the student only: ``n`` per tile (0 = none), ``size``, area ``scale``."""

    n: int = 0
    size: int = 98
    scale: tuple[float, float] = (0.05, 0.32)

    def _finish(self, at: str) -> None:
        _check_crops(self, at, min_n=0)


@dataclass(kw_only=True)
class AugmentConfig:
    """Photometric and geometric augmentation; ``null`` switches ``hed``/``color_jitter`` off.

    Attributes:
        hed: HED jitter ``[alpha, beta]`` (stain scale, shift).
        flip_rot: Random rot90 + flip.
        color_jitter: ``[brightness, contrast, saturation, hue]``.
        color_jitter_prob: Probability of applying the colour jitter.
        blur_prob: Probability of a Gaussian blur.
    """

    hed: tuple[float, float] | None = (0.05, 0.01)
    flip_rot: bool = True
    color_jitter: tuple[float, float, float, float] | None = (0.1, 0.1, 0.1, 0.02)
    color_jitter_prob: float = 0.8
    blur_prob: float = 0.1

    def _finish(self, at: str) -> None:
        for name in ("hed", "color_jitter"):
            values = getattr(self, name)
            _require(values is None or min(values) >= 0, f"{at}.{name}", values, "values must be >= 0")
        if self.color_jitter is not None:
            _require(self.color_jitter[3] <= 0.5, f"{at}.color_jitter", self.color_jitter, "hue must be <= 0.5")
        _probabilities(self, at, "color_jitter_prob", "blur_prob")


@dataclass(kw_only=True)
class MaskingConfig:
    """iBOT block masking of the student's global crops: per-image ``probability``, masked ``ratio`` range."""

    probability: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)

    def _finish(self, at: str) -> None:
        _probabilities(self, at, "probability")
        lo, hi = self.ratio
        _require(0 <= lo <= hi <= 1, f"{at}.ratio", list(self.ratio), "expected [low, high] with 0 <= low <= high <= 1")


@dataclass(kw_only=True)
class SlidesConfig:
    """Online patching: training tiles drawn at random tissue positions straight from whole-slide images.

    Attributes:
        source: A folder of slides, a text list (one slide per line) or a CSV with a ``path`` column and
            optional ``mpp`` (level-0 µm/px, for slides whose metadata has none) and ``weight`` (sampling weight).
            A list of these is joined.
        target_mpp: Resolutions of the tiles in µm/px (Midnight: ``[0.25, 0.5, 1.0, 2.0]``).
        proportions: Share of tiles at each ``target_mpp`` (default: equal); normalised to sum 1.
        tile_size: Side of the tiles in pixels (before the multi-crop views).
        min_tissue: Lowest tissue fraction of a tile's footprint on the slide's tissue mask, in [0, 1].
        hsv_filter: Also keep only tiles whose pixels pass Virchow's HSV tissue rule (see
            :mod:`multiteach.data.sources.slides`).
        open_per_worker: Slides each DataLoader worker keeps open (least recently used closed first).
        tiles_per_visit: Consecutive samples drawn from one slide before the next slide is chosen.
        mpp: Level-0 µm/px for slides whose metadata records none (a CSV ``mpp`` column wins); null: such a
            slide is an error.
        samples_per_epoch: Length of one epoch of the endless stream (it only reseeds the draws).
        index_dir: Folder of the per-slide tissue index shared by runs (default: the user's cache folder,
            ``$MULTITEACH_INDEX_DIR`` or ``~/.cache/multiteach/tissue-index``).
        thumb_size: Longer side of the tissue-mask thumbnail in pixels.
        min_saturation: Floor of the Otsu threshold on the 0-255 saturation of the thumbnail.
        index_workers: Processes that build missing tissue-index entries.
    """

    source: str | list[str] = field(metadata=_hint("a slide folder, list file or CSV, e.g. data.slides.source=slides/"))
    target_mpp: list[float] = field(default_factory=lambda: [0.5])
    proportions: list[float] | None = None
    tile_size: int = 224
    min_tissue: float = 0.4
    hsv_filter: bool = False
    open_per_worker: int = 16
    tiles_per_visit: int = 8
    mpp: float | None = None
    samples_per_epoch: int = 1_048_576
    index_dir: str | None = None
    thumb_size: int = 1024
    min_saturation: int = 15
    index_workers: int = 2

    def _finish(self, at: str) -> None:
        sources = [self.source] if isinstance(self.source, str) else list(self.source)
        _require(bool(sources) and all(sources), f"{at}.source", self.source, "needs at least one non-empty path")
        _require(
            bool(self.target_mpp) and min(self.target_mpp) > 0,
            f"{at}.target_mpp",
            self.target_mpp,
            "must be a non-empty list of positive µm/px values",
        )
        if self.proportions is not None:
            _require(
                len(self.proportions) == len(self.target_mpp),
                f"{at}.proportions",
                self.proportions,
                f"needs one share per target_mpp ({len(self.target_mpp)})",
            )
            _require(
                min(self.proportions) >= 0 and sum(self.proportions) > 0,
                f"{at}.proportions",
                self.proportions,
                "shares must be >= 0 and not all 0",
            )
        _positive(self, at, "tile_size", "open_per_worker", "tiles_per_visit", "mpp", "samples_per_epoch")
        _positive(self, at, "thumb_size", "index_workers")
        _probabilities(self, at, "min_tissue")
        _require(0 <= self.min_saturation <= 255, f"{at}.min_saturation", self.min_saturation, "must be in [0, 255]")

    @property
    def shares(self) -> list[float]:
        """``proportions`` normalised to sum 1 (equal shares when unset)."""
        raw = self.proportions or [1.0] * len(self.target_mpp)
        total = float(sum(raw))
        return [float(x) / total for x in raw]


@dataclass(kw_only=True)
class DataConfig:
    """Where tiles come from and how views are made.

    Attributes:
        train: Tile folder(s), list file(s) (TXT/CSV/Parquet), TRIDENT/CLAM coordinate folders or WebDataset
            shard folders; required for training unless ``slides`` is set, may come from an override.
        extensions: Image file extensions picked up in folders.
        num_workers: DataLoader workers.
        global_crops: Global crop settings.
        local_crops: Local crop settings.
        augment: Augmentation settings.
        masking: iBOT masking, or null for none.
        slides: Online patching from whole-slide images (:class:`SlidesConfig`), or null; replaces ``train``.
        slide_dir: Folder of the slides that TRIDENT/CLAM coordinate files in ``train`` name (matched by name).
        robust_views: Stain/scanner-robust distillation, or null: the student's global views are perturbed
            copies of the clean views its teachers see (same crop, pixel-aligned). ``p`` (probability each
            configured perturbation applies to a view, default 0.5; or a mapping name -> probability, e.g.
            ``{hed: 0.8, blur: 0.2}``, unnamed kinds 0.5) and perturbation name -> ``[low, high]``
            (``hed``, ``gamma``, ``gain``, ``blur``, ``jpeg``; see :mod:`multiteach.data.perturb`); ``{}``
            uses the default ranges.
    """

    train: str | list[str] | None = None
    extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "tif", "tiff"])
    num_workers: int = 0
    global_crops: GlobalCrops = field(default_factory=GlobalCrops)
    local_crops: LocalCrops = field(default_factory=LocalCrops)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    masking: MaskingConfig | None = None
    slides: SlidesConfig | None = None
    slide_dir: str | None = None
    robust_views: dict[str, Any] | None = None

    def _finish(self, at: str) -> None:
        paths = [self.train] if isinstance(self.train, str) else self.train or []
        _require(all(paths), f"{at}.train", self.train, "paths must be non-empty")
        _require(all(self.extensions), f"{at}.extensions", self.extensions, "extensions must be non-empty")
        _require(self.num_workers >= 0, f"{at}.num_workers", self.num_workers, "must be >= 0")
        if self.slides is not None:
            _require(
                not paths, f"{at}.train", self.train, "give either data.train (tiles) or data.slides (slides), not both"
            )
        if self.robust_views is not None:
            self.robust_views = robust_views_settings(self.robust_views, f"{at}.robust_views")


@dataclass(kw_only=True)
class StudentConfig:
    """The timm student: a ViT, or any family with a spatial feature map (ConvNeXt, EfficientNet, ResNet, ...).

    Attributes:
        arch: timm model name (``vit_small_patch16_224``, ``convnext_atto``, ...).
        img_size: Size a ViT's positional embedding is built for (a feature-map student's layout is read at it,
            and families that take ``img_size``, Swin or MaxViT, are built for it).
        drop_path_rate: Stochastic depth of the last block (families without it refuse a non-zero rate).
        pretrained: Start from timm's pretrained weights.
        kwargs: Further timm kwargs of the family (``mlp_layer: swiglu_packed``, ``reg_tokens: 4`` for a ViT;
            ``dims``/``depths`` for ConvNeXt, ...).
        mean: Input normalisation mean (RGB).
        std: Input normalisation std (RGB).
        init_from: A teacher of this recipe (a timm ViT of the ViT student's width and patch size) whose patch
            embedding, tokens, final norm and a spread of blocks initialise the student, as DistilBERT
            initialises its student from every other teacher layer.
        init_blocks: Which teacher blocks, one per student block (default: spread evenly, first and last
            included).
    """

    arch: str = field(metadata=_hint("a timm model name, e.g. student.arch=vit_small_patch16_224 or convnext_atto"))
    img_size: int = 224
    drop_path_rate: float = 0.0
    pretrained: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    init_from: str | None = None
    init_blocks: list[int] | None = None

    def _finish(self, at: str) -> None:
        if ":" not in self.arch and not timm.is_model(self.arch):
            raise MultiteachError(
                f"{at}.arch: unknown timm model {self.arch!r}.{did_you_mean(self.arch, timm.list_models())} "
                "Use a timm model name (a ViT, timm.list_models('vit*'), or a family with a feature map such as "
                "convnext_atto) or an hf-hub:/local-dir: source."
            )
        _positive(self, at, "img_size")
        _require(0 <= self.drop_path_rate < 1, f"{at}.drop_path_rate", self.drop_path_rate, "must be in [0, 1)")
        _require(min(self.std) > 0, f"{at}.std", list(self.std), "values must be positive")
        if self.init_blocks is not None:
            _require(
                bool(self.init_blocks) and min(self.init_blocks) >= 0,
                f"{at}.init_blocks",
                self.init_blocks,
                "must be a non-empty list of teacher block indices >= 0",
            )
            _require(self.init_from is not None, f"{at}.init_blocks", self.init_blocks, "needs student.init_from")


@dataclass(kw_only=True)
class TeacherConfig:
    """One teacher, keyed by the name loss terms and heads use.

    Attributes:
        source: Catalog key or generic source (``hf-hub:``, ``local-dir:``, ...); defaults to the key.
        weights: Local weights file/folder used instead of the Hub.
        input_size: Square size the teacher resizes its input to (default: its native size).
        dtype: Weights/compute dtype; ``auto`` is bfloat16 where bf16 is native (GPU, AVX512-BF16/AMX CPU),
            float32 elsewhere (emulated bf16 is 10-20x slower).
        model_kwargs: Architecture kwargs replacing the catalog's.
        pretrained: False gives random weights (tests, benchmarks).
        embedding: How the tile embedding is formed (``cls``, ``cls+mean``, ``pooled``); catalog default when null.
        trust_remote_code: Allow this teacher's loader to run model code shipped in its Hub repo (Hibou). Off by
            default: such a teacher is refused with the reason until the recipe opts in for it.
    """

    source: str
    weights: str | None = None
    input_size: int | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = True
    embedding: str | None = None
    trust_remote_code: bool = False

    def _finish(self, at: str) -> None:
        try:
            resolve_spec(self.source)
        except MultiteachError as exc:
            raise MultiteachError(f"{at}.source: {exc}") from None
        _positive(self, at, "input_size")
        allowed = get_args(Embedding)
        if self.embedding is not None and self.embedding not in allowed:
            raise MultiteachError(
                f"{at}.embedding: {self.embedding!r} is not allowed; use one of {', '.join(allowed)} or null."
                f"{did_you_mean(self.embedding, allowed)}"
            )


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
    """Teacher-feature cache (``multiteach cache``; see :mod:`multiteach.cache`).

    Attributes:
        dir: Cache folder. When set, training reads the teacher targets from it instead of running the
            teachers, and takes its global crops from the cached views.
        n_views: Fixed global-crop views cached per tile. In epoch ``e``, global crop ``c`` of a tile is
            cached view ``(e * n_global + c) % n_views``.
        dtype: Stored precision of the features (``float32`` keeps them bit-exact).
        patch_pool: Average-pool the patch-token grid by ``k`` x ``k`` before storing (1 keeps it).
        shard_tiles: Tiles per safetensors shard.
        batch_size: Crops per teacher forward pass while writing.
    """

    dir: str | None = None
    n_views: int = 4
    dtype: Literal["bfloat16", "bf16", "float16", "fp16", "float32", "fp32"] = "bfloat16"
    patch_pool: int = 1
    shard_tiles: int = 256
    batch_size: int = 64

    def _finish(self, at: str) -> None:
        _positive(self, at, "n_views", "patch_pool", "shard_tiles", "batch_size")
        _require(self.dir is None or bool(self.dir.strip()), f"{at}.dir", self.dir, "must be a non-empty path or null")


def _check_crops(crops: GlobalCrops | LocalCrops, at: str, min_n: int) -> None:
    """Crop count, size and an ordered area-scale range within (0, 1]."""
    _require(crops.n >= min_n, f"{at}.n", crops.n, f"must be >= {min_n}")
    _positive(crops, at, "size")
    lo, hi = crops.scale
    _require(0 < lo <= hi <= 1, f"{at}.scale", list(crops.scale), "expected [low, high] with 0 < low <= high <= 1")
