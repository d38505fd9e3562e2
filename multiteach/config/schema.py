"""The recipe's sections as dataclasses: what each key means, its type and default, and its checks.

The sections live in three modules, re-exported here (``from multiteach.config.schema import X`` works for
all of them):

* :mod:`.data_schema`: ``data:`` (tiles or slides, crops, augmentation, masking, robust views).
* :mod:`.model_schema`: ``student:`` and ``teachers:`` (the only sections that need timm and the teachers).
* :mod:`.training_schema`: ``optim:``, ``schedule:``, ``train:`` (with ``train.distributed``) and ``cache:``.

Each section's ``_finish(at)`` checks ranges and relations once the converter (:mod:`.convert`) has
checked the types; ``at`` is the section's key path, for the messages. The top level is
:class:`~multiteach.config.recipe.Recipe`.
"""

from __future__ import annotations

from multiteach.config.data_schema import (
    AugmentConfig,
    DataConfig,
    GlobalCrops,
    LocalCrops,
    MaskingConfig,
    SlidesConfig,
    _hint,
)
from multiteach.config.model_schema import StudentConfig, TeacherConfig
from multiteach.config.training_schema import (
    CacheConfig,
    DeepSpeedConfig,
    DistributedConfig,
    EMAMomentumSchedule,
    FSDPConfig,
    OptimConfig,
    ScheduleConfig,
    TeacherTempSchedule,
    TrainConfig,
)

__all__ = [
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
    "ScheduleConfig",
    "SlidesConfig",
    "StudentConfig",
    "TeacherConfig",
    "TeacherTempSchedule",
    "TrainConfig",
    "_hint",
]
