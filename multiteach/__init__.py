"""multiteach: distil pathology foundation models into small, fast, robust students.

The main entry points, importable from the package::

    from multiteach import build_teacher, build_student, build_loss, load_recipe, train
"""

import importlib

import multiteach_tvshim

multiteach_tvshim.apply()  # before anything imports timm/open_clip/transformers

__version__ = "0.1.0"

_API = {
    "build_teacher": "multiteach.teachers",
    "resolve_spec": "multiteach.teachers",
    "Teacher": "multiteach.teachers",
    "TeacherOutput": "multiteach.teachers",
    "TeacherSpec": "multiteach.teachers",
    "build_student": "multiteach.students",
    "Student": "multiteach.students",
    "build_loss": "multiteach.losses",
    "LossContext": "multiteach.losses",
    "LossTerm": "multiteach.losses",
    "LOSSES": "multiteach.losses",
    "load_recipe": "multiteach.config",
    "train": "multiteach.train",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    """Import the public API lazily, so ``import multiteach`` stays cheap."""
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'multiteach' has no attribute {name!r}")
