"""Small shared validators of the schema, ``data.robust_views``, and the recipe's loss-term check.

Every error names the key path, the bad value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from multiteach.data.views.perturb import DEFAULT_RANGES, check_ranges
from multiteach.errors import MultiteachError, did_you_mean
from multiteach.losses import check_term


def _join(at: str, key: Any) -> str:
    """Dotted key path of ``key`` below ``at`` (``at`` is empty at the top level)."""
    return f"{at}.{key}" if at else str(key)


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


def robust_views_settings(raw: Mapping[str, Any], at: str) -> dict[str, Any]:
    """Check ``data.robust_views`` and fill its defaults: ``{"p": float | {name: float}, name: [low, high], ...}``.

    ``p`` is one probability for every configured perturbation, or a mapping giving some of them their own (the
    others keep 0.5), e.g. ``{hed: 0.8, blur: 0.2}``: a small blur share beside a strong stain one.
    """
    raw = dict(raw)
    p = raw.pop("p", 0.5)
    ranges = check_ranges(raw, at) if raw else dict(DEFAULT_RANGES)
    if isinstance(p, Mapping):
        for name, value in p.items():
            _require(
                name in ranges,
                f"{at}.p.{name}",
                name,
                f"names a perturbation that is not configured (configured: {', '.join(ranges)})",
            )
            _require(_is_probability(value), f"{at}.p.{name}", value, "must be in [0, 1]")
        p = {name: float(value) for name, value in p.items()}
    else:
        _require(_is_probability(p), f"{at}.p", p, "must be in [0, 1] (or a mapping perturbation -> probability)")
        p = float(p)
    return {"p": p, **{name: list(pair) for name, pair in ranges.items()}}


def _is_probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _not_configured(teacher: Any, teachers: Collection[str]) -> str:
    """The message for a reference to a teacher missing from ``teachers:``."""
    return (
        f"teacher {teacher!r} is not configured under `teachers:`.{did_you_mean(str(teacher), teachers)} "
        f"Configured: {', '.join(teachers) or 'none'}."
    )


def _check_term(term: str, cfg: Mapping[str, Any], teachers: Collection[str], robust_views: bool) -> None:
    """Check a loss term of the recipe: its type, keys and weight, and what it needs when it is active.

    Type, keys and weight are :func:`~multiteach.losses.check_term`'s, the check the loss builder makes too;
    an active term must also name configured teachers and, when it compares clean and perturbed student views
    (``needs_clean_student``), have ``data.robust_views`` on.
    """
    term_cls, weight = check_term(term, cfg)
    if weight == 0:
        return
    for key in ("teacher", "target"):
        ref = cfg.get(key)
        if ref is not None and ref != "ema" and ref not in teachers:
            raise MultiteachError(f"losses.{term}.{key}: {_not_configured(ref, teachers)}")
    if term_cls.needs_clean_student and not robust_views:
        raise MultiteachError(
            f"losses.{term}: type {cfg['type']!r} compares perturbed and clean student views and needs "
            "data.robust_views (e.g. data.robust_views={} for the default ranges)"
        )
    view = cfg.get("student_view", "perturbed")
    if view != "perturbed" and not robust_views:
        raise MultiteachError(
            f"losses.{term}.student_view: {view!r} reads the student's clean and perturbed views and needs "
            "data.robust_views; without it the student has one view (student_view: perturbed, the default)"
        )


#: Keys an older multiteach accepted, with what replaced them (named in the unknown-key error).
RETIRED_KEYS = {
    "data.wsi": "It was replaced by data.slides (online patching from whole-slide images), "
    "e.g. data.slides.source=SLIDES data.slides.target_mpp=[0.5]",
    "cache.n_views": "It was renamed cache.views_per_tile (the augmented views stored per tile)",
    "cache.batch_size": "It was removed: a cache is filled with the recipe's own batches (optim.batch_size)",
}


def retired_hint(path: str) -> str:
    """`` It was replaced by ...`` for a retired key, else an empty string."""
    return f" {RETIRED_KEYS[path]}." if path in RETIRED_KEYS else ""
