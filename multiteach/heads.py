"""Projection heads mapping student tokens to teacher spaces, and the DINO/iBOT prototype head.

Every head maps the last dimension, so it accepts (B, D) summaries and (B, N, D) patch tokens alike.
Linear layers of the MLP parts start from a truncated normal (std 0.02) with zero bias, as in DINOv2.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from multiteach.errors import MultiteachError, did_you_mean

Target = Literal["summary", "patch"]
TARGETS: tuple[str, ...] = ("summary", "patch")


def check_dim(owner: str, arg: str, value: Any) -> int:
    """Return ``value`` if it is a positive int, else raise a MultiteachError naming ``arg``.

    Args:
        owner: Who takes the argument (for the message), e.g. ``"GPFMHead"``.
        arg: The argument name, e.g. ``"bottleneck"``.
        value: The value to check.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MultiteachError(f"{owner}: {arg} must be a positive integer, got {value!r}")
    return value


def _init_linear(module: nn.Module) -> None:
    """DINOv2 init for an ``nn.Linear``: truncated normal weight (std 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (eps 1e-6 in fp16, else 1e-12, as DINOv2); shape unchanged."""
    eps = 1e-6 if x.dtype == torch.float16 else 1e-12
    return F.normalize(x, dim=-1, p=2, eps=eps)


def weight_normed_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A bias-free ``Linear(in_dim -> out_dim)`` with weight norm, gain initialised to 1 (DINOv2).

    The weight is ``g * v / ||v||`` per output row, parametrised as
    ``parametrizations.weight.original0`` (g, (out_dim, 1)) and ``.original1`` (v, (out_dim, in_dim)).
    """
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    with torch.no_grad():
        layer.parametrizations.weight.original0.fill_(1.0)
    return layer


class LinearHead(nn.Module):
    """One linear map ``in_dim -> out_dim``.

    Args:
        in_dim: Student width D_in.
        out_dim: Teacher width D_out.

    Shapes:
        (..., D_in) -> (..., D_out), e.g. (B, D) or (B, N, D).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(check_dim("LinearHead", "in_dim", in_dim), check_dim("LinearHead", "out_dim", out_dim))
        _init_linear(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project (..., D_in) to (..., D_out)."""
        return self.proj(x)


class MLPHead(nn.Module):
    """Two-layer MLP ``Linear -> GELU -> Linear``.

    Args:
        in_dim: Student width D_in.
        out_dim: Teacher width D_out.
        hidden_dim: Hidden width; ``max(in_dim, out_dim)`` when None.

    Shapes:
        (..., D_in) -> (..., D_out).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        check_dim("MLPHead", "in_dim", in_dim)
        check_dim("MLPHead", "out_dim", out_dim)
        hidden_dim = max(in_dim, out_dim) if hidden_dim is None else check_dim("MLPHead", "hidden_dim", hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        self.mlp.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project (..., D_in) to (..., D_out)."""
        return self.mlp(x)


class DINOHead(nn.Module):
    """DINO/iBOT head: MLP -> L2-normalise -> weight-normed prototypes (no bias).

    ``nlayers=1`` is a single ``Linear(in_dim -> bottleneck_dim)``; otherwise
    ``Linear(in, hidden), GELU, [Linear(hidden, hidden), GELU] * (nlayers - 2), Linear(hidden, bottleneck)``.

    Args:
        in_dim: Student width D_in.
        out_dim: Number of prototypes K.
        hidden_dim: MLP hidden width (unused when ``nlayers == 1``).
        bottleneck_dim: Width B of the normalised bottleneck.
        nlayers: Linear layers in the MLP (>= 1).

    Shapes:
        (..., D_in) -> (..., K) prototype scores (logits before temperature).
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        dims = {"in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim, "bottleneck_dim": bottleneck_dim}
        for arg, value in {**dims, "nlayers": nlayers}.items():
            check_dim(owner, arg, value)
        self.mlp = _build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        self.mlp.apply(_init_linear)
        self.last_layer = weight_normed_linear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score (..., D_in) against the K prototypes: (..., K)."""
        return self.last_layer(l2_normalize(self.mlp(x)))


def _build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Module:
    """The DINOHead MLP: (..., in_dim) -> (..., bottleneck_dim) with ``nlayers`` Linear layers."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class GPFMHead(DINOHead):
    """GPFM's expert projection: Linear(in -> bottleneck) -> L2-normalise -> weight-normed Linear(-> out).

    The same as ``DINOHead(in_dim, out_dim, bottleneck_dim=bottleneck, nlayers=1)``; the output lies in
    the teacher's feature space (not prototypes).

    Args:
        in_dim: Student width D_in.
        out_dim: Teacher width D_out.
        bottleneck: Width of the normalised bottleneck.

    Shapes:
        (..., D_in) -> (..., D_out).
    """

    def __init__(self, in_dim: int, out_dim: int, bottleneck: int = 256) -> None:
        check_dim("GPFMHead", "bottleneck", bottleneck)
        super().__init__(in_dim, out_dim, bottleneck_dim=bottleneck, nlayers=1)


class IdentityHead(nn.Module):
    """No projection: the student's own tokens are compared with the teacher's (RADIO-style, no adaptor).

    Only for a student as wide as the teacher. Distilling through it makes the student's backbone embedding
    itself imitate the teacher's, so the exported backbone (which has no heads) keeps the teacher's
    neighbourhoods; a learned head can absorb part of the mismatch instead.

    Args:
        in_dim: Student width D.
        out_dim: Teacher width; must equal ``in_dim``.

    Shapes:
        (..., D) -> (..., D), unchanged.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim != out_dim:
            raise MultiteachError(
                f"projection head 'identity' needs the student as wide as the teacher, got {in_dim} -> {out_dim}; "
                "use kind linear, mlp or gpfm"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x``."""
        return x


HEAD_TYPES: dict[str, type[nn.Module]] = {
    "linear": LinearHead,
    "mlp": MLPHead,
    "gpfm": GPFMHead,
    "identity": IdentityHead,
}


def build_projection_head(kind: str, in_dim: int, out_dim: int, **kwargs: Any) -> nn.Module:
    """Build a projection head from :data:`HEAD_TYPES` by name.

    Args:
        kind: ``linear``, ``mlp``, ``gpfm`` or ``identity`` (student as wide as the teacher).
        in_dim: Student width D_in.
        out_dim: Teacher width D_out.
        **kwargs: The kind's own options (``hidden_dim`` for ``mlp``, ``bottleneck`` for ``gpfm``).

    Returns:
        A module mapping (..., D_in) to (..., D_out).

    Raises:
        MultiteachError: for an unknown kind, an option the kind does not take, or a non-positive dim.
    """
    options = head_options(kind)
    for key in kwargs:
        if key not in options:
            accepted = ", ".join(options) or "no options"
            raise MultiteachError(
                f"projection head {kind!r} takes no option {key!r}.{did_you_mean(key, options)} Accepted: {accepted}."
            )
    return HEAD_TYPES[kind](in_dim, out_dim, **kwargs)


def head_options(kind: str) -> list[str]:
    """The options a head kind takes besides ``in_dim``/``out_dim`` (e.g. ``["bottleneck"]`` for gpfm).

    Raises:
        MultiteachError: for an unknown kind (the message lists close matches).
    """
    if kind not in HEAD_TYPES:
        raise MultiteachError(
            f"unknown projection head kind {kind!r}.{did_you_mean(str(kind), HEAD_TYPES)} "
            f"Known: {', '.join(HEAD_TYPES)}."
        )
    params = inspect.signature(HEAD_TYPES[kind].__init__).parameters
    return [p for p in params if p not in ("self", "in_dim", "out_dim")]


#: Per-teacher head config used when a teacher has none.
DEFAULT_HEAD_CONFIG: dict[str, Any] = {"kind": "linear", "shared": False}
# Config key -> build_projection_head option.
_CONFIG_OPTIONS = {"bottleneck": "bottleneck", "hidden": "hidden_dim"}
_CONFIG_KEYS = ("kind", "shared", *_CONFIG_OPTIONS)


class ProjectionHeads(nn.Module):
    """Student -> teacher projection heads, built only for the (teacher, target) pairs in use.

    Heads live in ``self.heads[teacher]`` (a ``ModuleDict``) under ``"summary"`` and/or ``"patch"``,
    or under ``"shared"`` when one head serves both targets (GPFM style).

    Args:
        in_dim: Student width D_in, or ``{"summary": D_s, "patch": D_p}`` when the student's summary and patch
            tokens differ in width (a feature-map student whose head widens its pooled feature, MobileNetV3).
        targets: Teacher name -> {target: teacher width} for the targets that are used, e.g.
            ``{"uni": {"summary": 1024, "patch": 1024}, "conch": {"summary": 512}}``.
        configs: Teacher name -> ``{kind, shared, bottleneck?, hidden?}``; teachers left out get
            :data:`DEFAULT_HEAD_CONFIG`.

    Shapes:
        forward(name, target, x): (B, D_in) or (B, N, D_in) -> (B, D_t) or (B, N, D_t).
    """

    def __init__(
        self,
        in_dim: int | Mapping[str, int],
        targets: Mapping[str, Mapping[str, int]],
        configs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        dims = dict(in_dim) if isinstance(in_dim, Mapping) else dict.fromkeys(TARGETS, in_dim)
        self.in_dims = {t: check_dim("ProjectionHeads", "in_dim", dims.get(t)) for t in TARGETS}
        self.in_dim = self.in_dims["summary"]
        configs = dict(configs or {})
        for name in configs:
            if name not in targets:
                raise MultiteachError(
                    f"head config for teacher {name!r}, which has no distillation target.{did_you_mean(name, targets)}"
                )
        self.heads = nn.ModuleDict()
        self._targets: dict[str, tuple[str, ...]] = {}
        for name, dims in targets.items():
            _check_teacher_name(name)
            self.heads[name] = _teacher_heads(name, self.in_dims, dims, configs.get(name, DEFAULT_HEAD_CONFIG))
            self._targets[name] = tuple(t for t in TARGETS if t in dims)

    def teachers(self) -> list[str]:
        """Teacher names with at least one head, in construction order."""
        return list(self.heads.keys())

    def targets(self, name: str) -> tuple[str, ...]:
        """The targets (``summary``/``patch``) teacher ``name`` has a head for."""
        self._teacher(name)
        return self._targets[name]

    def forward(self, name: str, target: Target, x: torch.Tensor) -> torch.Tensor:
        """Project student tokens ``x`` (..., D_in) into teacher ``name``'s ``target`` space (..., D_t)."""
        if target not in TARGETS:
            raise MultiteachError(f"projection target must be 'summary' or 'patch', got {target!r}")
        if target not in self.targets(name):
            raise MultiteachError(f"teacher {name!r} has no {target} head (built for: {', '.join(self.targets(name))})")
        if x.shape[-1] != self.in_dims[target]:
            raise MultiteachError(
                f"teacher {name!r} {target} head expects (..., {self.in_dims[target]}) input, got {tuple(x.shape)}"
            )
        heads = self._teacher(name)
        return heads["shared" if "shared" in heads else target](x)

    def _teacher(self, name: str) -> nn.ModuleDict:
        """The ModuleDict of teacher ``name``'s heads."""
        if name not in self.heads:
            raise MultiteachError(
                f"no projection heads for teacher {name!r}.{did_you_mean(name, self.heads.keys())} "
                f"Known: {', '.join(self.heads.keys())}."
            )
        return self.heads[name]


def _check_teacher_name(name: str) -> None:
    """Raise unless ``name`` can key a ModuleDict (non-empty, no '.', not a ModuleDict attribute)."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict, name):
        raise MultiteachError(f"teacher name {name!r} cannot key a projection head; use letters, digits, '_' or '-'")


def _teacher_heads(
    name: str, in_dims: Mapping[str, int], dims: Mapping[str, int], config: Mapping[str, Any]
) -> nn.ModuleDict:
    """Build one teacher's heads from the student widths ``in_dims`` ({target: D_in}), its used targets ``dims``
    ({target: D_t}) and its ``config``.

    Returns:
        A ModuleDict with ``summary``/``patch`` heads, or one ``shared`` head.
    """
    owner = f"teacher {name!r}"
    _check_config(owner, dims, config)
    kind = config.get("kind", DEFAULT_HEAD_CONFIG["kind"])
    accepted = head_options(kind)
    options = {}
    for key in config.keys() & _CONFIG_OPTIONS.keys():
        if _CONFIG_OPTIONS[key] not in accepted:
            raise MultiteachError(f"{owner}: head kind {kind!r} takes no {key!r}")
        options[_CONFIG_OPTIONS[key]] = config[key]
    out = {t: check_dim(owner, f"{t} dim", d) for t, d in dims.items()}
    heads = nn.ModuleDict()
    if config.get("shared", False):
        if len(set(out.values())) > 1:
            raise MultiteachError(
                f"{owner}: a shared head needs equal summary and patch dims, got {out}; set shared: false"
            )
        student_widths = {t: in_dims[t] for t in out}
        if len(set(student_widths.values())) > 1:
            raise MultiteachError(
                f"{owner}: a shared head needs equal student summary and patch widths, got {student_widths}; "
                "set shared: false"
            )
        heads["shared"] = build_projection_head(kind, in_dims[next(iter(out))], next(iter(out.values())), **options)
    else:
        for target, dim in out.items():
            heads[target] = build_projection_head(kind, in_dims[target], dim, **options)
    return heads


def _check_config(owner: str, dims: Mapping[str, int], config: Mapping[str, Any]) -> None:
    """Raise for unknown targets or config keys, no targets, or a non-bool ``shared``."""
    _check_keys(owner, "target", dims, TARGETS)
    _check_keys(owner, "head config key", config, _CONFIG_KEYS)
    if not dims:
        raise MultiteachError(f"{owner}: no targets given; use summary and/or patch")
    if not isinstance(config.get("shared", False), bool):
        raise MultiteachError(f"{owner}: head config 'shared' must be true or false, got {config['shared']!r}")


def _check_keys(owner: str, what: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise a MultiteachError with close matches for the first key of ``given`` not in ``allowed``."""
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            raise MultiteachError(
                f"{owner}: unknown {what} {key!r}.{did_you_mean(str(key), allowed)} Allowed: {', '.join(allowed)}."
            )
