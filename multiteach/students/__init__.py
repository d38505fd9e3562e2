"""Students: a timm ``VisionTransformer``, or any timm model with a spatial feature map, returning a
:class:`TeacherOutput`.

:func:`build_student` picks the kind from the architecture:

- :class:`ViTStudent` (``vit_*``, DeiT, hybrids): CLS token as summary, patch tokens, and a DINOv2-style learned
  ``mask_token`` kept outside the timm model for iBOT masking;
- :class:`FeatureMapStudent` (ConvNeXt, EfficientNet, ResNet, RegNet, FastViT, MobileNetV3/V4, Swin, MaxViT, ...):
  the model's own pooled feature (``forward_head(pre_logits=True)``) as summary and its final feature map
  flattened to (B, h*w, C) as patch tokens, so every feature term reaches each teacher's grid through the usual
  grid resampling. No mask token: iBOT and ``student.init_from`` need a ViT (:func:`check_student_recipe` says so
  when the recipe is read).

Either way the student is a plain timm model (``Student.model``), so an export reloads with ``timm.create_model``
alone. Architecture kwargs that are classes in timm (``mlp_layer``, ``act_layer``, ``norm_layer``) are written in
recipes as names and resolved through :data:`multiteach.layers.LAYER_NAMES`, the table the teacher loaders use
too, so an exported student's config reloads the same way.

Modules:
    base: the base :class:`Student` and :func:`student_mean_std`.
    vit: :class:`ViTStudent`.
    feature_map: :class:`FeatureMapStudent`.
    build: :func:`build_student`, :func:`arch_info` and :func:`check_student_recipe`.
    teacher_init: :func:`init_from_teacher` and :func:`spread_blocks`.
"""

from multiteach.students.base import Student, student_mean_std
from multiteach.students.build import VIT_ONLY_KWARGS, ArchInfo, arch_info, build_student, check_student_recipe
from multiteach.students.feature_map import FEATURE_MAP_EXAMPLES, FeatureMapStudent
from multiteach.students.teacher_init import init_from_teacher, spread_blocks
from multiteach.students.vit import ViTStudent

__all__ = [
    "FEATURE_MAP_EXAMPLES",
    "VIT_ONLY_KWARGS",
    "ArchInfo",
    "FeatureMapStudent",
    "Student",
    "ViTStudent",
    "arch_info",
    "build_student",
    "check_student_recipe",
    "init_from_teacher",
    "spread_blocks",
    "student_mean_std",
]
