"""multiteach: distil pathology foundation models into small, fast, robust students.

The main entry points, importable from the package::

    from multiteach import build_teacher, build_student, build_loss, load_recipe, train
"""

import importlib
import os

# OpenMP threads that spin-wait at every barrier burn the time slices their descheduled siblings need when
# another process shares the CPUs (a demo-sized step: 1.9 s -> 14.5 s beside one busy process). This must be
# set before torch loads its OpenMP runtime; an explicit setting wins (see multiteach/threads.py).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import multiteach_tvshim  # noqa: E402

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
