"""The recipe: the single source of truth of a run, from YAML layers to a checked, typed :class:`Recipe`.

Modules:
    schema: The recipe's sections as dataclasses, re-exported from data_schema (data), model_schema (student,
        teachers) and training_schema (optim, schedule, train, cache).
    recipe: :class:`Recipe`, the top level: its sections, the checks across them, plain-data and YAML output.
    checks: Small shared validators, ``data.robust_views`` settings and the recipe's loss-term check.
    convert: The typed converter from plain data to the dataclasses: key-path errors, "Did you mean".
    yamlio: YAML 1.2-style reading and writing (``5e-4`` is a float; only ``true``/``false`` are booleans).
    load: Recipe files: ``defaults:`` layering, built-in recipes, :func:`load_recipe`, saving, copying out.
    paths: Local paths made absolute against the file that wrote them; :func:`check_paths`, :func:`path_rule`.
    overrides: Command-line ``dotted.key=value`` overrides, matched greedily against the schema.
"""

from multiteach.config.checks import robust_views_settings
from multiteach.config.load import (
    RECIPES_DIR,
    compose,
    copy_builtin,
    deep_merge,
    find_recipe,
    list_builtin,
    load_recipe,
    save_resolved,
)
from multiteach.config.overrides import apply_override
from multiteach.config.paths import check_paths, path_rule
from multiteach.config.recipe import Recipe
from multiteach.config.schema import (
    AugmentConfig,
    CacheConfig,
    DataConfig,
    DeepSpeedConfig,
    DistributedConfig,
    EMAMomentumSchedule,
    FSDPConfig,
    GlobalCrops,
    LocalCrops,
    MaskingConfig,
    OptimConfig,
    ScheduleConfig,
    StudentConfig,
    TeacherConfig,
    TeacherTempSchedule,
    TrainConfig,
)

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
    "robust_views_settings",
    "save_resolved",
]
