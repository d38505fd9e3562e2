"""The ``student:`` and ``teachers:`` sections: the timm student and each teacher (the sections that need timm
and the teacher catalog to check).

Each section's ``_finish(at)`` checks ranges and relations once the converter (:mod:`.convert`) has
checked the types; ``at`` is the section's key path, for the messages. :mod:`.schema` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import timm

from multiteach.config.checks import _positive, _require
from multiteach.config.data_schema import _hint
from multiteach.errors import MultiteachError, did_you_mean
from multiteach.teachers import resolve_spec
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD, Embedding


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
