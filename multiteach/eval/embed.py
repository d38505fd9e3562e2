"""Turn a model named on the command line into an embedder, and embed image files with it.

A model is named in one of three ways (:func:`resolve_model`):

- a **run directory** written by ``multiteach train`` (it holds ``recipe.yaml``): its student from the
  last checkpoint (EMA weights when the run kept them), with the recipe's ``student.mean/std`` and
  ``student.img_size``;
- an **exported student folder** (``config.json`` + ``model.safetensors``, timm's hub layout, and no
  ``checkpoints/``: an export may carry the run's ``recipe.yaml`` too): loaded
  with ``timm.create_model("local-dir:DIR", pretrained=True)``; layer classes that JSON cannot hold
  (``mlp_layer: swiglu_packed``, ...) are read from the config's ``multiteach`` section; input size,
  mean and std come from its ``pretrained_cfg``;
- a **teacher**: a catalog name (``uni``, ``conch``, ...) or a generic source (``hf-hub:``,
  ``local-dir:``, ``transformers:``, ``open_clip:``, a timm model name), via
  :func:`multiteach.teachers.build_teacher` (``weights=`` replaces the Hub download).

Every kind is wrapped in the same frozen, self-preprocessing :class:`~multiteach.teachers.Teacher`
(resize + normalise with its own buffers), so an :class:`Embedder` always takes RGB in [0, 1].
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from multiteach.data.lists.images import IMAGE_ERRORS, load_rgb
from multiteach.data.views.augment import to_tensor01
from multiteach.errors import MultiteachError, did_you_mean
from multiteach.layers import LAYER_NAMES, resolve_layer_kwargs
from multiteach.runs import load_run_student
from multiteach.students import FeatureMapStudent
from multiteach.teachers import (
    CATALOG,
    DTYPES,
    GENERIC_PREFIXES,
    Teacher,
    TeacherOutput,
    build_teacher,
    resolve_spec,
)
from multiteach.teachers.base import IMAGENET_MEAN, IMAGENET_STD, TeacherSpec, TokenBackbone
from multiteach.teachers.timm_vit import TimmTokens

ModelKind = Literal["run", "export", "teacher"]
RUN_MARKER = "recipe.yaml"
CHECKPOINTS = "checkpoints"
EXPORT_FILES = ("config.json", "model.safetensors")
#: Keys of an exported ``config.json``'s ``multiteach`` section that may hold layer-name kwargs.
_KWARG_SECTIONS = ("model_kwargs", "layer_kwargs", "kwargs", "model_args")

ACCEPTED_KINDS = (
    "a run directory (a folder with recipe.yaml, written by `multiteach train`)",
    "an exported student folder (config.json + model.safetensors)",
    "a teacher: a catalog name ({catalog}), a timm model name, or a source prefixed with {prefixes}",
)


def _accepted_text() -> str:
    kinds = [k.format(catalog=", ".join(CATALOG.keys()), prefixes=", ".join(GENERIC_PREFIXES)) for k in ACCEPTED_KINDS]
    return "Accepted: (1) " + "; (2) ".join(kinds[:2]) + "; (3) " + kinds[2] + "."


class _StudentBackbone(TokenBackbone):
    """Adapter: a run's :class:`~multiteach.students.Student` as a teacher backbone (normalised input)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) normalised -> TeacherOutput(summary (B, D), patch_tokens (B, h*w, D), grid)."""
        return self.student(x)


@dataclass
class Embedder:
    """A frozen model that embeds RGB batches in [0, 1] with its own resize and normalisation.

    Attributes:
        name: Display name (the spec for teachers, the folder name for run/export folders).
        kind: ``"run"``, ``"export"`` or ``"teacher"``.
        source: The spec it was resolved from.
        model: The self-preprocessing :class:`~multiteach.teachers.Teacher` wrapper.
        run: For ``kind == "run"``: the :class:`~multiteach.runs.RunStudent` (recipe, heads state).
        info: Provenance for reports (checkpoint, EMA or live weights, weights path, ...).

    Shapes:
        ``embedder(x)``: (B, 3, H, W) float in [0, 1] -> summary (B, D).
        ``embedder.patch_tokens(x)``: (B, 3, H, W) -> (B, h*w, D_patch).
    """

    name: str
    kind: ModelKind
    source: str
    model: Teacher
    run: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> TeacherSpec:
        """The model's token layout and preprocessing facts."""
        return self.model.spec

    @property
    def input_size(self) -> int:
        """Square size the embedder resizes its input to (0: keeps the incoming size)."""
        return int(self.model.input_size)

    @property
    def dim(self) -> int:
        """Width D of the summary embedding."""
        return int(self.spec.summary_dim)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.model.parameters()).device

    @property
    def has_patch_tokens(self) -> bool:
        """Whether :meth:`patch_tokens` is available."""
        return bool(self.spec.patch_tokens)

    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """Summary and patch tokens of a batch.

        Args:
            x: RGB (B, 3, H, W) float in [0, 1], any size (resized to :attr:`input_size`).

        Returns:
            TeacherOutput(summary (B, D), patch_tokens (B, h*w, D_patch), grid (h, w)), float32.
        """
        out = self.model(x.to(self.device))
        return TeacherOutput(out.summary.float(), out.patch_tokens.float(), out.grid)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Summary embeddings (B, D) of RGB (B, 3, H, W) in [0, 1]."""
        return self.forward(x).summary

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h*w, D_patch) of RGB (B, 3, H, W) in [0, 1].

        Raises:
            MultiteachError: When the model gives no spatial tokens (summary-only sources).
        """
        if not self.has_patch_tokens:
            raise MultiteachError(f"model {self.name!r} gives no patch tokens (summary-only source)")
        return self.forward(x).patch_tokens

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, kind={self.kind!r}, input_size={self.input_size}, dim={self.dim})"


# --------------------------------------------------------------------------- classification of specs
def model_kind(spec: str) -> ModelKind:
    """Say which of the three kinds ``spec`` names, without loading anything.

    Args:
        spec: A run directory, an exported student folder, or a teacher name/source.

    Returns:
        ``"run"``, ``"export"`` or ``"teacher"``.

    Raises:
        MultiteachError: Naming the value and the accepted kinds (with close catalog names) when it is
            none of them, or when it is a folder that is neither a run nor an export.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        # An export also carries the run's recipe.yaml; only a run has checkpoints/.
        if all((path / f).is_file() for f in EXPORT_FILES) and not (path / CHECKPOINTS).is_dir():
            return "export"
        if (path / RUN_MARKER).is_file():
            return "run"
        present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise MultiteachError(
            f"model {spec!r} is a folder but neither a run directory (no {RUN_MARKER}) nor an exported student "
            f"(needs {' + '.join(EXPORT_FILES)}); it holds: {present}. {_accepted_text()}"
        )
    try:
        resolve_spec(spec)
    except MultiteachError:
        hint = did_you_mean(spec, CATALOG.keys())
        where = ""
        if path.exists():
            where = f" {str(path)!r} is a file; name the folder that holds it."
        elif os.sep in spec or spec.startswith((".", "~")) or path.suffix:
            where = f" There is no folder {str(path)!r}."
        raise MultiteachError(
            f"model {spec!r} is not a run directory, an exported student or a teacher name."
            f"{where}{hint} {_accepted_text()}"
        ) from None
    return "teacher"


# --------------------------------------------------------------------------- loaders
def _check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise MultiteachError(f"dtype {dtype} not supported; use float32 or bfloat16")
        return dtype
    if dtype not in DTYPES:
        raise MultiteachError(f"dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _load_run(spec: str, device: str | torch.device, input_size: int | None, dtype: torch.dtype, use_ema: bool):
    run = load_run_student(spec, use_ema=use_ema)
    student = run.student.to(device)
    s = run.recipe.student
    tspec = TeacherSpec(
        name=Path(spec).expanduser().resolve().name,
        loader="timm",
        hub_id=None,
        arch=student.arch,
        embed_dim=student.embed_dim,
        summary_dim=student.summary_dim,
        patch_size=student.patch_size,
        num_prefix_tokens=student.num_prefix_tokens,
        input_size=int(s.img_size),
        mean=tuple(s.mean),
        std=tuple(s.std),
        embedding="cls",
    )
    model = Teacher(tspec, _StudentBackbone(student), input_size=input_size, dtype=dtype).to(device)
    info = {"run_dir": str(Path(spec).resolve()), "checkpoint": str(run.checkpoint), "weights": run.weights}
    return model, run, info


def _export_layer_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Layer-name kwargs (``mlp_layer``/``act_layer``/``norm_layer``) from a config's ``multiteach`` section."""
    section = config.get("multiteach") or {}
    if not isinstance(section, Mapping):
        return {}
    found: dict[str, Any] = {}
    for sub in _KWARG_SECTIONS:
        nested = section.get(sub)
        if isinstance(nested, Mapping):
            found.update({k: v for k, v in nested.items() if k in LAYER_NAMES and v is not None})
    found.update({k: v for k, v in section.items() if k in LAYER_NAMES and v is not None})
    return found


def _load_export(spec: str, device: str | torch.device, input_size: int | None, dtype: torch.dtype):
    from timm.models import VisionTransformer

    folder = Path(spec).expanduser().resolve()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MultiteachError(f"exported student {spec!r}: cannot read config.json ({exc})") from None
    if not isinstance(config, Mapping) or not config.get("architecture"):
        raise MultiteachError(f"exported student {spec!r}: config.json has no 'architecture' (not a timm config)")
    layer_kwargs = resolve_layer_kwargs(_export_layer_kwargs(config))
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0, **layer_kwargs)
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as exc:
        raise MultiteachError(
            f"exported student {spec!r}: timm could not load it: {type(exc).__name__}: {exc}"
        ) from None
    model = model.to(device=device, dtype=dtype).eval()
    pcfg = dict(getattr(model, "pretrained_cfg", None) or config.get("pretrained_cfg") or {})
    size = pcfg.get("input_size") or (3, 224, 224)
    interpolation = pcfg.get("interpolation") if pcfg.get("interpolation") in ("bicubic", "bilinear") else "bicubic"
    if isinstance(model, VisionTransformer):
        backbone = TimmTokens(model, "pooled")
        dims = (int(model.embed_dim), int(model.num_features), int(model.patch_embed.patch_size[0]))
        prefix = int(model.num_prefix_tokens)
    else:  # any other family: its pooled feature and its final feature map, as it was trained
        student = FeatureMapStudent(model, str(config["architecture"]), {}, img_size=int(size[-1]))
        backbone = _StudentBackbone(student)
        dims, prefix = (student.embed_dim, student.summary_dim, student.patch_size), 0
    tspec = TeacherSpec(
        name=folder.name,
        loader="timm",
        hub_id=None,
        arch=str(config["architecture"]),
        embed_dim=dims[0],
        summary_dim=dims[1],
        patch_size=dims[2],
        num_prefix_tokens=prefix,
        input_size=int(size[-1]),
        mean=tuple(float(v) for v in pcfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in pcfg.get("std", IMAGENET_STD)),
        embedding="pooled",
        interpolation=interpolation,
    )
    teacher = Teacher(tspec, backbone, input_size=input_size, dtype=dtype).to(device)
    return teacher, {"folder": str(folder), "architecture": tspec.arch}


def resolve_model(
    spec: str,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    *,
    weights: str | None = None,
    pretrained: bool = True,
    use_ema: bool = True,
    seed: int = 0,
) -> Embedder:
    """Load the model ``spec`` names as a frozen :class:`Embedder`.

    Args:
        spec: A run directory (holds ``recipe.yaml``), an exported student folder (``config.json`` +
            ``model.safetensors``), or a teacher catalog name / generic source (see the module docstring).
        device: Where the model lives.
        input_size: Square size to resize inputs to, replacing the model's own (None: the recipe's
            ``student.img_size``, the export's ``pretrained_cfg`` size or the teacher's native size).
        dtype: ``float32`` or ``bfloat16`` (autocast in the forward pass).
        weights: Teachers only: a local weights file or folder replacing the Hub download.
        pretrained: Teachers only: False builds random-initialised weights (seeded with ``seed``),
            e.g. ``resolve_model("vit_small_patch16_224", pretrained=False)`` as a baseline.
        use_ema: Runs only: take the EMA weights when the run kept them (else the live weights).
        seed: Seed of the random initialisation when ``pretrained`` is False.

    Returns:
        The embedder, in eval mode with gradients off.

    Raises:
        MultiteachError: For a spec that is none of the three kinds (the message lists them and close
            catalog names), a folder that cannot be loaded, or options that do not apply to its kind.
    """
    spec = str(spec)
    kind = model_kind(spec)
    torch_dtype = _check_dtype(dtype)
    if input_size is not None and int(input_size) < 0:
        raise MultiteachError(f"input_size must be >= 0 (0 keeps the incoming size), got {input_size}")
    if kind != "teacher" and weights is not None:
        raise MultiteachError(f"model {spec!r} is a {kind} folder; weights= applies to teacher names only")
    if kind != "teacher" and not pretrained:
        raise MultiteachError(f"model {spec!r} is a {kind} folder; pretrained=False applies to teacher names only")
    if kind == "run":
        model, run, info = _load_run(spec, device, input_size, torch_dtype, use_ema)
        return Embedder(Path(spec).expanduser().resolve().name, kind, spec, model, run=run, info=info)
    if kind == "export":
        model, info = _load_export(spec, device, input_size, torch_dtype)
        return Embedder(Path(spec).expanduser().resolve().name, kind, spec, model, info=info)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        teacher = build_teacher(
            spec, weights=weights, input_size=input_size, dtype=torch_dtype, pretrained=pretrained, device=device
        )
    info = {"weights_path": weights, "pretrained": pretrained}
    if not pretrained:
        info["seed"] = int(seed)
    return Embedder(spec, kind, spec, teacher, info=info)


# --------------------------------------------------------------------------- images
def read_image(path: str | os.PathLike[str], size: int | None) -> torch.Tensor:
    """Read one image file as RGB and resize it (bicubic, antialiased by PIL) to ``size`` x ``size``.

    Args:
        path: Image file.
        size: Square output size; None or 0 keeps the file's size.

    Returns:
        Float32 (3, size, size) in [0, 1].

    Raises:
        MultiteachError: Naming the file when it cannot be decoded.
    """
    try:
        image = load_rgb(path)
    except IMAGE_ERRORS as exc:
        raise MultiteachError(f"cannot read image {str(path)!r}: {type(exc).__name__}: {exc}") from None
    if size and image.size != (size, size):
        image = image.resize((int(size), int(size)), Image.Resampling.BICUBIC)
    return to_tensor01(image)


def iter_image_batches(
    paths: Sequence[str | os.PathLike[str]], batch_size: int, size: int | None
) -> Iterator[torch.Tensor]:
    """Yield batches (b, 3, size, size) float32 in [0, 1] of the images in ``paths``, in order.

    Without ``size`` every image in a batch must have the same size.
    """
    if int(batch_size) < 1:
        raise MultiteachError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(paths), int(batch_size)):
        chunk = [read_image(p, size) for p in paths[start : start + int(batch_size)]]
        shapes = {tuple(t.shape) for t in chunk}
        if len(shapes) > 1:
            raise MultiteachError(f"images of different sizes {sorted(shapes)} in one batch; give a size to resize to")
        yield torch.stack(chunk)


def load_images(paths: Sequence[str | os.PathLike[str]], size: int | None, batch_size: int = 64) -> torch.Tensor:
    """All images of ``paths`` as one (N, 3, size, size) float32 tensor in [0, 1]."""
    if not paths:
        raise MultiteachError("no image paths given")
    return torch.cat(list(iter_image_batches(paths, batch_size, size)))


def embed_folder(
    embedder: Embedder,
    paths: Sequence[str | os.PathLike[str]],
    batch_size: int = 32,
    size: int | None = None,
) -> np.ndarray:
    """Embed image files with ``embedder``; images are read with PIL and resized to the model's input size.

    Args:
        embedder: From :func:`resolve_model` (or anything with ``input_size`` and ``__call__``
            mapping (B, 3, H, W) in [0, 1] to (B, D)).
        paths: Image files; the row order of the result follows them.
        batch_size: Images per forward pass.
        size: Square size images are resized to on reading; default the embedder's input size
            (224 when it keeps the incoming size).

    Returns:
        Float32 array of shape (N, D).

    Raises:
        MultiteachError: For an empty path list, an unreadable file (named) or non-finite embeddings.
    """
    if not paths:
        raise MultiteachError("embed_folder: no image paths given")
    size = int(size or embedder.input_size or 224)
    chunks = []
    with torch.inference_mode():
        for batch in iter_image_batches(paths, batch_size, size):
            chunks.append(torch.as_tensor(embedder(batch)).detach().float().cpu().numpy())
    out = np.concatenate(chunks).astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise MultiteachError(f"model {getattr(embedder, 'name', '?')!r} produced NaN or inf embeddings")
    return out


def resize_batch(x: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Resize (B, 3, H, W) in [0, 1] to (B, 3, size, size) as the teachers do (antialiased, clamped)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.nn.functional.interpolate(
        x.float(), size=(size, size), mode=interpolation, align_corners=False, antialias=True
    )
    return out.clamp_(0.0, 1.0)
