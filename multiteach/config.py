"""The recipe: the single source of truth of a run, from YAML layers to a checked, typed :class:`Recipe`.

A recipe is a YAML file (or the name of a built-in one in ``multiteach/recipes/``). Layers, lowest
priority first, are deep-merged (mappings merge key by key; anything else is replaced):

1. the files named in ``defaults: [_base/data.yaml, ...]``, in order (paths relative to the recipe file,
   else names under the built-in recipes folder; a fragment may name its own defaults);
2. the recipe file itself;
3. command-line overrides ``dotted.key=value``, values parsed as YAML (``0.25``, ``[1, 2]``, ``null``,
   ``{type: koleo}``). Loss term names contain dots, so each level of the key is matched greedily
   against the longest existing key (``losses.uni.cls.weight=0`` -> ``losses`` / ``uni.cls`` / ``weight``).

In the name-keyed mappings whose entries are mappings (``teachers``, ``heads``, ``losses``) a ``null``
entry removes that entry: this is how a recipe (or ``losses.uni.patch=null``) switches off what a base
configured. The merged mapping is then checked against the dataclass schema below before anything heavy
is built: every error names the full key path, the bad value and what is allowed, with close matches.

Local paths (``data.train``, ``teachers.*.weights``, ``teachers.*.source: local-dir:...``, ``cache.dir``,
``losses.*.target_heads``) are made absolute while loading: a relative path written in a recipe file (or a
``defaults:`` fragment) against that file's folder, one given on the command line against the current
folder. ``output_dir`` stays relative to the current folder. :func:`check_paths` checks that they exist and
every "does not exist" error names the absolute path and the rule that produced it (:func:`path_rule`).

YAML is read with 1.2-style scalars: ``5e-4`` is a float, and only ``true``/``false`` are booleans,
so ``precision: no`` and a loss term's ``on: patch`` key stay strings.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import shutil
import types
from collections.abc import Collection, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import timm
import yaml

from multiteach.atomic import atomic_write_text
from multiteach.data.perturb import DEFAULT_RANGES, check_ranges
from multiteach.errors import MultiteachError, did_you_mean, missing_path
from multiteach.losses import LOSSES
from multiteach.losses.base import term_class
from multiteach.teachers import resolve_spec
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD, Embedding

__all__ = [
    "RECIPES_DIR",
    "AugmentConfig",
    "CacheConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "DistributedConfig",
    "EMAMomentumSchedule",
    "FSDPConfig",
    "GlobalCrops",
    "LocalCrops",
    "MaskingConfig",
    "OptimConfig",
    "Recipe",
    "ScheduleConfig",
    "StudentConfig",
    "TeacherConfig",
    "TeacherTempSchedule",
    "TrainConfig",
    "apply_override",
    "check_paths",
    "compose",
    "copy_builtin",
    "deep_merge",
    "find_recipe",
    "list_builtin",
    "load_recipe",
    "path_rule",
    "save_resolved",
]

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
"""Built-in recipes (package data); ``_base/`` holds the fragments they name in ``defaults:``."""

T = TypeVar("T")

# --------------------------------------------------------------------------------------------- YAML

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (only true/false) and floats (``5e-4``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Safe dumper that also quotes strings a YAML 1.2 reader would take for floats (``'5e-4'``)."""


_Dumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def _read_yaml(path: Path) -> dict[str, Any]:
    """Parse a recipe file into a mapping (an empty file gives ``{}``)."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise MultiteachError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MultiteachError(f"{path}: a recipe must be a mapping of sections (name, data, ...), got {data!r}")
    return data


# ------------------------------------------------------------------------------------------ schema


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


WSI_DEFAULTS: dict[str, Any] = {"mpp": 0.5, "tile_size": 224}


@dataclass(kw_only=True)
class DataConfig:
    """Where tiles come from and how views are made.

    Attributes:
        train: Tile folder(s) or list file(s); required for training, may come from an override.
        extensions: Image file extensions picked up in folders.
        num_workers: DataLoader workers.
        global_crops: Global crop settings.
        local_crops: Local crop settings.
        augment: Augmentation settings.
        masking: iBOT masking, or null for none.
        wsi: Whole-slide tiling (``mpp``, ``tile_size`` and further keys checked by the WSI reader), or null.
        robust_views: Stain/scanner-robust distillation, or null: the student's global views are perturbed
            copies of the clean views its teachers see (same crop, pixel-aligned). ``p`` (probability each
            configured perturbation applies to a view, default 0.5) and perturbation name -> ``[low, high]``
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
    wsi: dict[str, Any] | None = None
    robust_views: dict[str, Any] | None = None

    def _finish(self, at: str) -> None:
        paths = [self.train] if isinstance(self.train, str) else self.train or []
        _require(all(paths), f"{at}.train", self.train, "paths must be non-empty")
        _require(all(self.extensions), f"{at}.extensions", self.extensions, "extensions must be non-empty")
        _require(self.num_workers >= 0, f"{at}.num_workers", self.num_workers, "must be >= 0")
        if self.wsi is not None:
            self.wsi = {**WSI_DEFAULTS, **self.wsi}
            for key, kind in (("mpp", float), ("tile_size", int)):
                value = _convert(kind, self.wsi[key], f"{at}.wsi.{key}")
                _require(value > 0, f"{at}.wsi.{key}", value, "must be positive")
                self.wsi[key] = value
        if self.robust_views is not None:
            self.robust_views = robust_views_settings(self.robust_views, f"{at}.robust_views")


@dataclass(kw_only=True)
class StudentConfig:
    """The timm ViT student.

    Attributes:
        arch: timm model name (``vit_small_patch16_224``, ...).
        img_size: Size its positional embedding is built for.
        drop_path_rate: Stochastic depth of the last block.
        pretrained: Start from timm's pretrained weights.
        kwargs: Further timm kwargs (``mlp_layer: swiglu_packed``, ``reg_tokens: 4``, ...).
        mean: Input normalisation mean (RGB).
        std: Input normalisation std (RGB).
        init_from: A teacher of this recipe (a timm ViT of the student's width and patch size) whose patch
            embedding, tokens, final norm and a spread of blocks initialise the student, as DistilBERT
            initialises its student from every other teacher layer.
        init_blocks: Which teacher blocks, one per student block (default: spread evenly, first and last
            included).
    """

    arch: str = field(metadata=_hint("a timm ViT name, e.g. student.arch=vit_small_patch16_224"))
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
                "Use a timm ViT name (see timm.list_models('vit*')) or an hf-hub:/local-dir: source."
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
        keep_ema: Keep an EMA copy of the student (and export it).
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
    keep_ema: bool = True
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


@dataclass(kw_only=True)
class Recipe:
    """A checked recipe. Build it with :func:`load_recipe` or :meth:`Recipe.from_dict`.

    Attributes:
        name: Run name (default: the recipe file's stem).
        seed: Random seed.
        output_dir: Run folder; ``{name}`` in it is replaced by the name (default ``runs/{name}``).
        data: Data and views.
        student: The student.
        teachers: Teacher name -> settings.
        heads: Teacher name -> projection-head config (checked by ``ProjectionHeads`` at build time).
        losses: Term name -> ``{type, weight, ...}`` (term keys checked against the term type here).
        optim: Optimiser.
        schedule: Run length and schedules.
        train: Loop settings.
        cache: Teacher-feature cache (folder, views per tile, stored dtype, pooling), or null.
        export: Export settings, or null.
    """

    name: str = field(metadata=_hint("e.g. name=my-run"))
    seed: int = 0
    output_dir: str = "runs/{name}"
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    losses: dict[str, dict[str, Any]] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig | None = None
    export: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> Recipe:
        """Check a merged recipe mapping and build the typed recipe.

        Args:
            data: The mapping (no ``defaults:`` left; see :func:`compose`).
            name: Default for ``name`` when the mapping has none (the recipe file's stem).

        Raises:
            MultiteachError: naming the key path, the bad value and what is allowed.
        """
        if not isinstance(data, Mapping):
            raise MultiteachError(f"recipe: expected a mapping of sections (name, data, ...), got {data!r}")
        raw = dict(data)
        if name is not None and raw.get("name") is None:
            raw["name"] = name
        teachers = raw.get("teachers")
        if isinstance(teachers, Mapping):
            raw["teachers"] = {k: {"source": k, **v} if isinstance(v, Mapping) else v for k, v in teachers.items()}
        return _build(cls, raw, "")

    def _finish(self, at: str) -> None:
        _require(bool(self.name.strip()), "name", self.name, "must be a non-empty string")
        _non_negative(self, at, "seed")
        self.output_dir = self.output_dir.replace("{name}", self.name)
        for teacher in self.teachers:
            if "." in teacher:
                raise MultiteachError(
                    f"teachers.{teacher}: teacher names cannot contain '.' (they key the projection heads); "
                    f"add a teacher with teachers.NAME={{source: ...}}"
                )
        if self.student.init_from is not None and self.student.init_from not in self.teachers:
            raise MultiteachError(f"student.init_from: {_not_configured(self.student.init_from, self.teachers)}")
        for teacher in self.heads:
            if teacher not in self.teachers:
                raise MultiteachError(f"heads.{teacher}: {_not_configured(teacher, self.teachers)}")
        for term, cfg in self.losses.items():
            _check_term(term, cfg, self.teachers)
            if (
                _term_weight(cfg) > 0
                and term_class(term, cfg["type"]).needs_clean_student
                and self.data.robust_views is None
            ):
                raise MultiteachError(
                    f"losses.{term}: type {cfg['type']!r} compares perturbed and clean student views and needs "
                    "data.robust_views (e.g. data.robust_views={} for the default ranges)"
                )

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (mappings, lists, scalars), every default filled in."""
        return _plain(self)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML; loading it again gives the same recipe."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=120)

    def active_losses(self) -> dict[str, dict[str, Any]]:
        """Loss terms that will be built (weight absent or > 0)."""
        return {k: v for k, v in self.losses.items() if _term_weight(v) > 0}

    def check_trainable(self) -> None:
        """Raise unless the recipe names training data and has at least one active loss term."""
        if self.data.train is None:
            raise MultiteachError(
                "data.train: required for training: a tile folder, a list file, or a list of them "
                "(e.g. data.train=/data/tiles)"
            )
        if not self.active_losses():
            raise MultiteachError("losses: no active term (every term is null or has weight 0)")


# ------------------------------------------------------------------------------- schema checks


def robust_views_settings(raw: Mapping[str, Any], at: str) -> dict[str, Any]:
    """Check ``data.robust_views`` and fill its defaults: ``{"p": float, name: [low, high], ...}``."""
    raw = dict(raw)
    p = raw.pop("p", 0.5)
    _require(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1, f"{at}.p", p, "must be in [0, 1]")
    ranges = check_ranges(raw, at) if raw else dict(DEFAULT_RANGES)
    return {"p": float(p), **{name: list(pair) for name, pair in ranges.items()}}


def _require(ok: bool, at: str, value: Any, allowed: str) -> None:
    """Raise ``"<at>: <allowed>, got <value>"`` unless ``ok``."""
    if not ok:
        raise MultiteachError(f"{at}: {allowed}, got {value!r}")


def _positive(obj: Any, at: str, *names: str) -> None:
    """Each named attribute is None or > 0."""
    for name in names:
        value = getattr(obj, name)
        _require(value is None or value > 0, _join(at, name), value, "must be positive")


def _non_negative(obj: Any, at: str, *names: str) -> None:
    """Each named attribute is None or >= 0."""
    for name in names:
        value = getattr(obj, name)
        _require(value is None or value >= 0, _join(at, name), value, "must be >= 0")


def _probabilities(obj: Any, at: str, *names: str) -> None:
    """Each named attribute is in [0, 1]."""
    for name in names:
        value = getattr(obj, name)
        _require(0 <= value <= 1, _join(at, name), value, "must be in [0, 1]")


def _check_crops(crops: GlobalCrops | LocalCrops, at: str, min_n: int) -> None:
    """Crop count, size and an ordered area-scale range within (0, 1]."""
    _require(crops.n >= min_n, f"{at}.n", crops.n, f"must be >= {min_n}")
    _positive(crops, at, "size")
    lo, hi = crops.scale
    _require(0 < lo <= hi <= 1, f"{at}.scale", list(crops.scale), "expected [low, high] with 0 < low <= high <= 1")


def _not_configured(teacher: Any, teachers: Collection[str]) -> str:
    """The message for a reference to a teacher missing from ``teachers:``."""
    return (
        f"teacher {teacher!r} is not configured under `teachers:`.{did_you_mean(str(teacher), teachers)} "
        f"Configured: {', '.join(teachers) or 'none'}."
    )


def _term_weight(cfg: Mapping[str, Any]) -> float:
    """A term's weight (1.0 when absent, 0.0 when null)."""
    weight = cfg.get("weight", 1.0)
    return 0.0 if weight is None else float(weight)


def _check_term(term: str, cfg: Mapping[str, Any], teachers: Collection[str]) -> None:
    """Check a loss term's type, keys, weight and (when active) the teachers it reads."""
    at = f"losses.{term}"
    if "type" not in cfg:
        raise MultiteachError(f"{at}: missing 'type'. Known types: {', '.join(LOSSES.keys())}.")
    term_cls = term_class(term, cfg["type"])
    allowed = ("type", "weight", *term_cls.allowed_keys)
    for key in cfg:
        if key not in allowed:
            raise MultiteachError(
                f"{at}.{key}: unknown key for type {cfg['type']!r}.{did_you_mean(key, allowed)} "
                f"Allowed: {', '.join(allowed)}."
            )
    weight = cfg.get("weight", 1.0)
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
        raise MultiteachError(f"{at}.weight: expected a number >= 0 (0 or null switches the term off), got {weight!r}")
    if _term_weight(cfg) == 0:
        return
    for key in ("teacher", "target"):
        ref = cfg.get(key)
        if ref is not None and ref != "ema" and ref not in teachers:
            raise MultiteachError(f"{at}.{key}: {_not_configured(ref, teachers)}")


# ------------------------------------------------------------------------------ type conversion


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Evaluated field types of a schema dataclass."""
    return get_type_hints(cls)


def _required(f: Field) -> bool:
    """Whether a schema field has no default."""
    return f.default is MISSING and f.default_factory is MISSING


def _join(at: str, key: Any) -> str:
    """Dotted key path of ``key`` below ``at`` (``at`` is empty at the top level)."""
    return f"{at}.{key}" if at else str(key)


def _build(cls: type[T], raw: Any, at: str) -> T:
    """Convert a mapping to the schema dataclass ``cls``, checking keys, types and ranges."""
    names = [f.name for f in fields(cls)]
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise MultiteachError(f"{at or 'recipe'}: expected a mapping with keys {', '.join(names)}; got {raw!r}")
    for key in raw:
        if key not in names:
            raise MultiteachError(
                f"{_join(at, key)}: unknown key.{did_you_mean(str(key), names)} Allowed: {', '.join(names)}."
            )
    kwargs = {}
    for f in fields(cls):
        path, tp = _join(at, f.name), _hints(cls)[f.name]
        if f.name in raw:
            kwargs[f.name] = _convert(tp, raw[f.name], path)
        elif _required(f) and is_dataclass(tp):
            kwargs[f.name] = _build(tp, {}, path)
        elif _required(f):
            hint = f" ({f.metadata['hint']})" if "hint" in f.metadata else ""
            raise MultiteachError(f"{path}: required key is missing{hint}")
    obj = cls(**kwargs)
    obj._finish(at)
    return obj


def _convert(tp: Any, value: Any, at: str) -> Any:
    """Check ``value`` against the type ``tp`` and return it in that type (tuples, floats, dataclasses)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(tp, args, value, at)
    if is_dataclass(tp):
        return _build(tp, value, at)
    if tp is Any:
        return copy.deepcopy(value)
    if origin is Literal:
        if value not in args:
            hint = did_you_mean(str(value), [str(a) for a in args])
            raise MultiteachError(f"{at}: {value!r} is not allowed; use one of {', '.join(map(str, args))}.{hint}")
        return value
    if origin in (list, tuple, dict):
        return _convert_container(tp, origin, args, value, at)
    if _is_scalar(tp, value):
        return float(value) if tp is float else value
    raise MultiteachError(f"{at}: expected {_describe(tp)}, got {value!r}")


def _convert_union(tp: Any, args: tuple[Any, ...], value: Any, at: str) -> Any:
    """``X | None`` passes None and reports X's own errors; wider unions take the first fitting option."""
    options = [a for a in args if a is not type(None)]
    if value is None and len(options) < len(args):
        return None
    if len(options) == 1:
        return _convert(options[0], value, at)
    for option in options:
        with contextlib.suppress(MultiteachError):
            return _convert(option, value, at)
    raise MultiteachError(f"{at}: expected {_describe(tp)}, got {value!r}")


def _convert_container(tp: Any, origin: type, args: tuple[Any, ...], value: Any, at: str) -> Any:
    """Lists, fixed-length tuples (written as YAML lists) and string-keyed mappings."""
    if origin is dict:
        if not isinstance(value, Mapping):
            raise MultiteachError(f"{at}: expected {_describe(tp)}, got {value!r}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise MultiteachError(f"{at}: keys must be strings, got {key!r}")
            if item is None and _is_mapping_type(args[1]):
                continue  # a null entry removes what a lower layer configured
            out[key] = _convert(args[1], item, _join(at, key))
        return out
    if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
        raise MultiteachError(f"{at}: expected {_describe(tp)}, got {value!r}")
    if origin is tuple:
        return tuple(_convert(a, v, f"{at}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    return [_convert(args[0], v, f"{at}[{i}]") for i, v in enumerate(value)]


def _is_scalar(tp: Any, value: Any) -> bool:
    """Whether ``value`` is a valid ``tp`` scalar (bools are not numbers; ints are floats)."""
    if tp is bool or isinstance(value, bool):
        return tp is bool and isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float))
    return tp in (int, str) and isinstance(value, tp)


_SCALAR_WORDS = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def _describe(tp: Any) -> str:
    """Human wording of a schema type, e.g. ``"null or a list of 2 numbers"``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"a list of {_SCALAR_WORDS.get(args[0], ('', 'values'))[1]}"
    if origin is tuple:
        return f"a list of {len(args)} {_SCALAR_WORDS.get(args[0], ('', 'values'))[1]}"
    if origin is dict or is_dataclass(tp):
        return "a mapping"
    return _SCALAR_WORDS.get(tp, ("any value",))[0]


def _is_mapping_type(tp: Any) -> bool:
    """Whether values of schema type ``tp`` are mappings (a dataclass section or a dict)."""
    return is_dataclass(tp) or get_origin(tp) is dict


def _plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively (YAML- and JSON-friendly)."""
    if is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------- layering


def list_builtin() -> list[str]:
    """Names of the built-in recipes (``multiteach/recipes/*.yaml``, fragments in ``_base/`` excluded)."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.name.startswith("_"))


def _builtin_file(name: str) -> Path | None:
    """The built-in recipe file called ``name`` (with or without ``.yaml``), or None."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = RECIPES_DIR / f"{stem}.yaml"
    return path if stem and path.is_file() else None


def find_recipe(source: str | os.PathLike[str]) -> Path:
    """Resolve a recipe argument: an existing YAML file, else a built-in recipe name.

    Raises:
        MultiteachError: when it is neither (with close built-in names).
    """
    path = Path(source)
    if path.is_file():
        return path
    builtin = _builtin_file(str(source))
    if builtin is not None:
        return builtin
    names = list_builtin()
    raise MultiteachError(
        f"recipe {str(source)!r}: no such file and no built-in recipe of that name.{did_you_mean(str(source), names)} "
        f"Built-in recipes: {', '.join(names) or 'none'}."
    )


def _find_default(entry: Any, owner: Path) -> Path:
    """Resolve a ``defaults:`` entry of ``owner``: relative to it, else a built-in (``_base/x``) name."""
    if not isinstance(entry, str) or not entry:
        raise MultiteachError(f"{owner}: defaults: entries must be recipe paths or names, got {entry!r}")
    for root in (owner.parent, RECIPES_DIR):
        base = root / entry
        for candidate in (base, base.with_name(base.name + ".yaml")):
            if candidate.is_file():
                return candidate
    fragments = [str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.glob("_base/*.yaml")]
    raise MultiteachError(
        f"{owner}: defaults entry {entry!r} not found next to the recipe or among the built-in fragments."
        f"{did_you_mean(entry.removesuffix('.yaml'), fragments)}"
    )


def _defaults_of(path: Path, data: dict[str, Any]) -> list[Path]:
    """Pop and resolve the ``defaults:`` list of a parsed recipe file."""
    entries = data.pop("defaults", None) or []
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        raise MultiteachError(f"{path}: defaults: expected a list of recipe files, got {entries!r}")
    return [_find_default(entry, path) for entry in entries]


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def compose(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping of a recipe file with its ``defaults:`` merged underneath (not yet checked).

    Raises:
        MultiteachError: for unreadable YAML, missing fragments or a cycle of defaults.
    """
    return _compose(Path(path).resolve(), ())


def _compose(path: Path, stack: tuple[Path, ...], origins: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`compose` for a resolved path; ``stack`` holds the files that named it (cycle check).

    Relative local paths are made absolute against the folder of the file that writes them; ``origins``
    (key -> rule, see :func:`path_rule`) collects how, lower layers first so that higher ones win.
    """
    if path in stack:
        raise MultiteachError(f"defaults form a cycle: {' -> '.join(p.name for p in (*stack, path))}")
    data = _read_yaml(path)
    merged: dict[str, Any] = {}
    for fragment in _defaults_of(path, data):
        merged = deep_merge(merged, _compose(fragment.resolve(), (*stack, path), origins))
    for key, node, name in _path_slots(data):
        node[name] = _resolve_paths(key, node[name], path.parent, f"in {path}", "its folder", origins)
    return deep_merge(merged, data)


# ------------------------------------------------------------------------------------------ paths

_LOCAL_DIR = "local-dir:"


def _path_slots(tree: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """The local-path entries of a raw recipe mapping: ``(key, mapping holding it, its name there)``."""
    slots: list[tuple[str, dict[str, Any], str]] = []
    for section, name in (("data", "train"), ("cache", "dir")):
        node = tree.get(section)
        if isinstance(node, dict) and name in node:
            slots.append((f"{section}.{name}", node, name))
    for section, name in (("teachers", "weights"), ("teachers", "source"), ("losses", "target_heads")):
        entries = tree.get(section)
        for entry_name, node in (entries or {}).items() if isinstance(entries, dict) else ():
            if isinstance(node, dict) and name in node:
                slots.append((f"{section}.{entry_name}.{name}", node, name))
    return slots


def _resolve_paths(key: str, value: Any, base: Path, where: str, base_name: str, origins: dict[str, str] | None) -> Any:
    """``value`` (a path or a list of them) with relative paths joined to ``base``; records each rule.

    ``where`` says where the value was written ("in FILE", "from the command line (k=v)") and ``base_name``
    what ``base`` is ("its folder", "the current folder"), for :func:`path_rule`.

    Non-path values (null, numbers, a ``source`` that is not ``local-dir:``) are returned unchanged.
    """
    if origins is not None:
        for old in [k for k in origins if k == key or k.startswith(f"{key}[")]:
            del origins[old]

    def one(item: Any, at: str) -> Any:
        prefix = ""
        if key.endswith(".source"):
            if not (isinstance(item, str) and item.startswith(_LOCAL_DIR)):
                return item
            prefix, item = _LOCAL_DIR, item[len(_LOCAL_DIR) :]
        if not isinstance(item, str) or not item.strip():
            return prefix + item if isinstance(item, str) else item
        given = Path(item).expanduser()
        if given.is_absolute():
            resolved, rule = os.path.normpath(given), f"absolute, {where}"
        else:
            resolved = os.path.normpath(base / given)
            rule = f"{item!r} {where}, relative to {base_name} {base}"
        if origins is not None:
            origins[at] = rule
        return prefix + resolved

    if isinstance(value, list):
        return [one(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return one(value, key)


def path_rule(recipe: Any, key: str) -> str:
    """How the local path at ``key`` (``data.train``, ``data.train[1]``, ``teachers.uni.weights``, ...) of a
    recipe from :func:`load_recipe` was made absolute, for error messages."""
    origins = getattr(recipe, "path_origins", None) or {}
    return origins.get(key) or origins.get(key.split("[")[0]) or f"relative to the current folder {Path.cwd()}"


def _local_paths(recipe: Recipe) -> list[tuple[str, Path, str]]:
    """``(key, path, what it must be)`` for every local path a recipe names (null entries left out)."""
    out: list[tuple[str, Path, str]] = []
    train = recipe.data.train
    if isinstance(train, str):
        out.append(("data.train", Path(train), "a tile folder or a list file"))
    else:
        out += [(f"data.train[{i}]", Path(p), "a tile folder or a list file") for i, p in enumerate(train or [])]
    for name, teacher in recipe.teachers.items():
        if teacher.weights:
            out.append((f"teachers.{name}.weights", Path(teacher.weights), "a weights file or folder"))
        if teacher.source.startswith(_LOCAL_DIR):
            out.append((f"teachers.{name}.source", Path(teacher.source[len(_LOCAL_DIR) :]), "a model folder"))
    for term, cfg in recipe.active_losses().items():
        if cfg.get("target_heads"):
            out.append((f"losses.{term}.target_heads", Path(cfg["target_heads"]), "a safetensors file"))
    return out


def check_paths(recipe: Recipe) -> list[str]:
    """Check that the data and weights paths of a recipe exist, without building anything.

    Returns:
        One line per path: key, absolute path, what was found there and how the path was resolved;
        ``data.train`` unset and a ``cache.dir`` not written yet are reported, not refused.

    Raises:
        MultiteachError: for the first path that does not exist, naming the absolute path and its rule.
    """
    lines = [] if recipe.data.train else ["data.train: not set (training needs it, e.g. data.train=/data/tiles)"]
    for key, path, expected in _local_paths(recipe):
        rule = path_rule(recipe, key)
        path = Path(os.path.abspath(path.expanduser()))
        if not path.exists():
            raise missing_path(key, path, rule, expected)
        lines.append(f"{key}: {path} ({'folder' if path.is_dir() else 'file'}, exists; {rule})")
    if recipe.cache is not None and recipe.cache.dir:
        key, path = "cache.dir", Path(os.path.abspath(Path(recipe.cache.dir).expanduser()))
        state = "exists" if path.is_dir() else "not written yet: `multiteach cache` writes it"
        lines.append(f"{key}: {path} ({state}; {path_rule(recipe, key)})")
    return lines


# ------------------------------------------------------------------------------------ overrides


def _parse_value(text: str, override: str) -> Any:
    """Parse an override's value as YAML."""
    if not text.strip():
        key = override.partition("=")[0]
        raise MultiteachError(f"override {override!r}: empty value; write {key}=null to clear it")
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise MultiteachError(f"override {override!r}: the value is not valid YAML: {exc}") from None


def _strip_none(tp: Any) -> Any:
    """``X | None`` -> ``X``; other types unchanged."""
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if get_origin(tp) in (Union, types.UnionType) and len(args) == 1 else tp


def _child_type(tp: Any, key: str) -> Any:
    """Schema type of ``key`` inside a node of type ``tp`` (Any when free-form or unknown)."""
    if is_dataclass(tp):
        return _strip_none(_hints(tp).get(key, Any))
    if get_origin(tp) is dict:
        return _strip_none(get_args(tp)[1])
    return Any


def _longest_match(parts: list[str], keys: Iterable[str]) -> tuple[str | None, list[str]]:
    """The longest dotted prefix of ``parts`` among ``keys``, and the remaining parts."""
    keys = set(keys)
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in keys:
            return candidate, parts[i:]
    return None, parts


def _suggest(parts: list[str], keys: list[str]) -> str:
    """Close matches for the longest prefix of ``parts`` that has any."""
    for i in range(len(parts), 0, -1):
        hint = did_you_mean(".".join(parts[:i]), keys)
        if hint:
            return hint
    return ""


def _new_key(parts: list[str], value: Any, tp: Any, keys: list[str], at: str, override: str) -> str:
    """The key a new entry gets, or an error naming the unknown path with close matches."""
    names_map = get_origin(tp) is dict and _is_mapping_type(get_args(tp)[1])
    if names_map and isinstance(value, dict):
        return ".".join(parts)
    if not names_map and not is_dataclass(tp) and len(parts) == 1:
        return parts[0]
    where = f"under {at!r}" if at else "at the top level"
    hint = f" To add an entry write {at}.NAME={{...}}." if names_map else ""
    raise MultiteachError(
        f"override {override!r}: unknown key {_join(at, '.'.join(parts))!r}.{_suggest(parts, keys)} "
        f"Known {where}: {', '.join(keys) or 'none'}.{hint}"
    )


def _assign(node: dict[str, Any], parts: list[str], value: Any, tp: Any, at: str, override: str) -> None:
    """Set ``value`` at the dotted ``parts`` below ``node`` (whose schema type is ``tp``)."""
    keys = [k for k in node if isinstance(k, str)]
    keys += [f.name for f in fields(tp) if f.name not in node] if is_dataclass(tp) else []
    key, rest = _longest_match(parts, keys)
    if key is None:
        node[_new_key(parts, value, tp, keys, at, override)] = value
        return
    if not rest:
        node[key] = value
        return
    child_tp, path = _child_type(tp, key), _join(at, key)
    if node.get(key) is None and _is_mapping_type(child_tp):
        node[key] = {}
    if not isinstance(node.get(key), dict):
        raise MultiteachError(
            f"override {override!r}: {path} is {node.get(key)!r}, not a mapping, so it has no key {'.'.join(rest)!r}"
        )
    _assign(node[key], rest, value, child_tp, path, override)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw recipe mapping, in place.

    Each level of the key is matched greedily against the longest existing (or schema) key, so
    ``losses.uni.cls.weight=0`` reaches the term ``uni.cls``. A new key is created only as the last
    step: ``losses.NAME={type: koleo}`` adds a term, ``student.kwargs.reg_tokens=4`` a free kwarg.

    Raises:
        MultiteachError: for a malformed override or an unknown path (with close matches).
    """
    key, sep, text = override.partition("=")
    if not sep or not key.strip() or "" in key.strip().split("."):
        raise MultiteachError(f"override {override!r}: expected dotted.key=value, e.g. optim.lr=1e-4")
    _assign(tree, key.strip().split("."), _parse_value(text, override), Recipe, "", override)


# --------------------------------------------------------------------------------- entry points


def load_recipe(source: str | os.PathLike[str], overrides: Iterable[str] = ()) -> Recipe:
    """Load, layer, override and check a recipe.

    Args:
        source: A YAML file or the name of a built-in recipe (see :func:`list_builtin`).
        overrides: ``dotted.key=value`` strings applied after the files, in order.

    Returns:
        The checked :class:`Recipe`.

    Raises:
        MultiteachError: for a missing recipe, bad YAML, a bad override or a schema violation.
    """
    path = find_recipe(source)
    origins: dict[str, str] = {}
    tree = _compose(path.resolve(), (), origins)
    for override in [overrides] if isinstance(overrides, str) else overrides:
        before = {key: copy.deepcopy(node[name]) for key, node, name in _path_slots(tree)}
        apply_override(tree, override)
        for key, node, name in _path_slots(tree):  # paths this override set: relative to the current folder
            if key not in before or node[name] != before[key]:
                where = f"from the command line ({override})"
                node[name] = _resolve_paths(key, node[name], Path.cwd(), where, "the current folder", origins)
    recipe = Recipe.from_dict(tree, name=path.stem)
    recipe.path_origins = origins
    return recipe


def save_resolved(recipe: Recipe, run_dir: str | os.PathLike[str]) -> Path:
    """Write the resolved recipe to ``run_dir/recipe.yaml`` atomically; returns that path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "recipe.yaml"
    atomic_write_text(target, recipe.to_yaml())
    return target


def _builtin_fragments(path: Path) -> list[Path]:
    """Built-in fragment files ``path`` names in ``defaults:``, recursively, first use first."""
    found: list[Path] = []
    for fragment in _defaults_of(path, _read_yaml(path)):
        fragment = fragment.resolve()
        if fragment.is_relative_to(RECIPES_DIR.resolve()) and fragment not in found:
            found += [fragment, *(f for f in _builtin_fragments(fragment) if f not in found)]
    return found


def copy_builtin(name: str, dest: str | os.PathLike[str], overwrite: bool = False) -> list[Path]:
    """Copy a built-in recipe out for editing (like ``tune cp``), with the ``_base`` fragments it uses.

    The recipe file is copied as is (comments kept) to ``dest`` (a file path, or a folder to copy into);
    its fragments go beside it under the same relative paths (``_base/x.yaml``), so the copy stands alone.
    Fragments already there with the same content are left alone.

    Args:
        name: Built-in recipe name (see :func:`list_builtin`).
        dest: Target file or existing folder.
        overwrite: Replace existing files that differ.

    Returns:
        The files written.

    Raises:
        MultiteachError: for an unknown name, or an existing target file (unless ``overwrite``).
    """
    src = _builtin_file(name)
    if src is None:
        builtin = list_builtin()
        raise MultiteachError(
            f"no built-in recipe {name!r}.{did_you_mean(name, builtin)} Built-in: {', '.join(builtin) or 'none'}."
        )
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / src.name
    root = RECIPES_DIR.resolve()
    plan = {dest: src, **{dest.parent / f.relative_to(root): f for f in _builtin_fragments(src)}}
    if dest.exists() and dest.resolve() == src.resolve():
        raise MultiteachError(f"{dest} is the built-in recipe itself; copy it somewhere else")
    todo = {d: s for d, s in plan.items() if d == dest or not (d.is_file() and d.read_bytes() == s.read_bytes())}
    clashes = [str(d) for d in todo if d.exists()]
    if clashes and not overwrite:
        raise MultiteachError(
            f"{', '.join(clashes)} already exist(s); pass overwrite=True (--overwrite) to replace, or pick another path"
        )
    for target, source in todo.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return list(todo)
