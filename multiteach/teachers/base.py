"""The teacher contract: what a teacher is (``TeacherSpec``), what it returns (``TeacherOutput``)
and the frozen wrapper every loader family hands back (``Teacher``).

Every teacher takes RGB floats in [0, 1] of shape (B, 3, H, W), resizes and normalises the batch
itself with buffers (so one batch feeds every teacher), and returns a summary embedding plus its
patch tokens with the prefix tokens (CLS, registers) removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from multiteach.errors import MultiteachError
from multiteach.teachers.licences import licence_terms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Loader = Literal["timm", "transformers", "conch", "conch_v15", "open_clip"]
Embedding = Literal["cls", "cls+mean", "pooled"]


@dataclass(frozen=True)
class TeacherSpec:
    """Everything a user would otherwise look up on a model card.

    Attributes:
        name: Catalog key (e.g. ``"uni"``) or the generic source string.
        loader: Loader family that builds it: ``timm``, ``transformers``, ``conch``, ``conch_v15`` or
            ``open_clip``.
        hub_id: Hugging Face repo id (``ORG/NAME``) holding the weights, or ``None``.
        arch: Architecture name for the loader (timm model name, transformers class, CONCH config).
        model_kwargs: Architecture kwargs. Non-JSON values are written as names the loader resolves
            (``"mlp_layer": "swiglu_packed"``, ``"act_layer": "silu"``).
        embed_dim: Width of the patch tokens, D_patch.
        summary_dim: Width of the tile embedding, D_summary (2 * embed_dim for CLS||mean).
        patch_size: Patch size in pixels.
        num_prefix_tokens: CLS + register tokens preceding the patch tokens.
        input_size: Native square input size in pixels.
        mean: Per-channel normalisation mean (RGB).
        std: Per-channel normalisation std (RGB).
        embedding: How the tile embedding is formed: ``cls``, ``cls+mean`` (CLS || mean of patch
            tokens) or ``pooled`` (the model's own pooling/projection).
        license: Licence of the weights, a key of :data:`multiteach.teachers.licences.LICENCES` for catalog
            entries (any other string counts as unknown).
        gated: Whether the Hub repo requires accepting terms and logging in.
        noncommercial_derivatives: Whether models trained on this teacher's outputs are barred from commercial
            use. Derived from the licence (any non-commercial or no-derivatives licence sets it); an entry may
            only make it stricter, never contradict its licence.
        interpolation: Resize filter used for preprocessing (``bicubic`` or ``bilinear``).
        weights: Local file or folder that replaces the Hub download (the recipe's ``weights:``).
        hub_filename: Weights file name in the Hub repo when it is not ``model.safetensors`` or
            ``pytorch_model.bin``.
        patch_tokens: Whether the teacher gives spatial patch tokens (False for summary-only sources).
        weights_format: Key layout of the weights: ``native`` for the loader's own, ``dinov2``
            for original DINOv2 checkpoints that timm must convert.
        url: Model card address.
        notes: Anything a user should know.
        revision: Hub commit the entry was checked against; downloads are pinned to it when set.
        remote_code: Whether loading the Hub weights executes model code from the repo (``auto_map``).
        trust_remote_code: The user's opt-in to run that code (recipe ``trust_remote_code: true`` or
            ``--trust-remote-code``); never set by the catalog.
        strip_prefixes: Key prefixes the public loading code strips (GPFM's ``backbone.``), applied to keys
            that carry them; anything else must match the architecture exactly.
        verified_against: Public references the facts were checked against (``owner/repo@commit:path`` or a
            model-card quote).
        checked: Which facts those references confirm (architecture kwargs, token layout, embedding rule,
            preprocessing, key layout, licence, gating).
        unverified: Facts that could not be checked, each ``fact: reason``.
    """

    name: str
    loader: Loader
    hub_id: str | None
    arch: str
    embed_dim: int
    patch_size: int
    num_prefix_tokens: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    embedding: Embedding = "cls"
    summary_dim: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    license: str = "unknown"
    gated: bool = False
    noncommercial_derivatives: bool | None = None
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    weights: str | None = None
    weights_format: Literal["native", "dinov2"] = "native"
    hub_filename: str | None = None
    patch_tokens: bool = True
    url: str | None = None
    notes: str = ""
    revision: str | None = None
    remote_code: bool = False
    trust_remote_code: bool = False
    strip_prefixes: tuple[str, ...] = ()
    verified_against: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()
    unverified: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.summary_dim is None:
            dim = 2 * self.embed_dim if self.embedding == "cls+mean" else self.embed_dim
            object.__setattr__(self, "summary_dim", dim)
        terms = licence_terms(self.license)
        derived = bool(terms and terms.restricts_student)
        if self.noncommercial_derivatives is None:
            object.__setattr__(self, "noncommercial_derivatives", derived)
        elif derived and not self.noncommercial_derivatives:
            raise MultiteachError(
                f"teacher {self.name!r}: licence {self.license!r} restricts students ({terms.reason}), "
                "so noncommercial_derivatives cannot be False"
            )

    @property
    def weight_files(self) -> tuple[str, ...]:
        """Weights file names to look for, in order."""
        first = (self.hub_filename,) if self.hub_filename else ()
        return (*first, "model.safetensors", "pytorch_model.bin")

    @property
    def num_registers(self) -> int:
        """Register tokens (prefix tokens other than CLS)."""
        return max(self.num_prefix_tokens - 1, 0)

    def grid_at(self, size: int) -> tuple[int, int]:
        """Patch grid (h, w) for a square input of ``size`` pixels."""
        return size // self.patch_size, size // self.patch_size

    def tokens_at(self, size: int) -> int:
        """Total tokens (prefix + patches) for a square input of ``size`` pixels."""
        h, w = self.grid_at(size)
        return self.num_prefix_tokens + h * w

    def replace(self, **changes: Any) -> TeacherSpec:
        """A copy with some fields changed (e.g. ``weights=...``)."""
        return dataclasses.replace(self, **changes)


class TeacherOutput(NamedTuple):
    """What every teacher (and the student) returns.

    Attributes:
        summary: Tile embedding, shape (B, D_summary).
        patch_tokens: Patch tokens without prefix tokens, shape (B, N, D_patch), N = h * w.
        grid: Patch grid (h, w).
    """

    summary: torch.Tensor
    patch_tokens: torch.Tensor
    grid: tuple[int, int]

    def as_target(self) -> TeacherOutput:
        """Copies usable inside an autograd graph (teachers return inference-mode tensors)."""
        return TeacherOutput(self.summary.clone(), self.patch_tokens.clone(), self.grid)


class TokenBackbone(nn.Module):
    """Adapter base: a loaded model that maps a normalised batch to a :class:`TeacherOutput`.

    Subclasses implement :meth:`forward` for one loader family.
    """

    def forward(self, x: torch.Tensor) -> TeacherOutput:  # pragma: no cover - interface
        raise NotImplementedError


def split_tokens(
    tokens: torch.Tensor,
    num_prefix: int,
    grid: tuple[int, int],
    embedding: Embedding,
    pooled: torch.Tensor | None = None,
) -> TeacherOutput:
    """Split a (B, prefix + N, D) token sequence into summary and patch tokens.

    Args:
        tokens: Final-layer tokens, shape (B, num_prefix + h*w, D).
        num_prefix: CLS + register tokens at the front.
        grid: Patch grid (h, w).
        embedding: Tile-embedding rule (``cls``, ``cls+mean`` or ``pooled``).
        pooled: The model's own pooled embedding, (B, D_summary); required for ``pooled``.

    Returns:
        TeacherOutput with summary (B, D_summary) and patch tokens (B, h*w, D).
    """
    patches = tokens[:, num_prefix:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise MultiteachError(
            f"token layout mismatch: expected {grid[0]}x{grid[1]}={grid[0] * grid[1]} patch tokens after "
            f"{num_prefix} prefix tokens, got {patches.shape[1]}; check num_prefix_tokens/patch_size in the spec."
        )
    if embedding == "cls":
        summary = tokens[:, 0]
    elif embedding == "cls+mean":
        summary = torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)
    else:
        if pooled is None:
            raise MultiteachError("embedding 'pooled' needs the model's pooled output")
        summary = pooled
    return TeacherOutput(summary, patches, grid)


def check_image_batch(x: torch.Tensor, who: str) -> None:
    """Raise a clear error unless ``x`` is a float (B, 3, H, W) batch with values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise MultiteachError(f"{who}: expected a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise MultiteachError(f"{who}: expected shape (B, 3, H, W) RGB, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise MultiteachError(
            f"{who}: expected float RGB in [0, 1], got dtype {x.dtype}; divide uint8 images by 255 first"
        )
    if x.device.type != "meta" and x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise MultiteachError(
                f"{who}: expected values in [0, 1], got min {lo:.3g} max {hi:.3g}; pass un-normalised RGB "
                "(each teacher applies its own mean/std)"
            )


class Teacher(nn.Module):
    """A frozen, self-preprocessing teacher.

    Args:
        spec: The teacher's facts (input size, mean/std, token layout, ...).
        backbone: Loader-family adapter returning a :class:`TeacherOutput` from a normalised batch.
        input_size: Square size the input is resized to; defaults to ``spec.input_size``.
            ``None`` in a recipe means native; pass ``0`` to keep the incoming size.
        dtype: Compute dtype: ``torch.float32`` or ``torch.bfloat16`` (autocast).

    Shapes:
        forward: (B, 3, H, W) floats in [0, 1] -> TeacherOutput(summary (B, D_summary),
        patch_tokens (B, h*w, D_patch), grid (h, w)).
    """

    def __init__(
        self,
        spec: TeacherSpec,
        backbone: TokenBackbone,
        input_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.input_size = spec.input_size if input_size is None else int(input_size)
        self.dtype = dtype
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    @property
    def name(self) -> str:
        return self.spec.name

    def train(self, mode: bool = True) -> Teacher:
        """Teachers stay in eval mode whatever the caller asks (dropout/drop-path off)."""
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resize (B, 3, H, W) in [0, 1] to the teacher's input size and normalise it."""
        check_image_batch(x, f"teacher {self.spec.name!r}")
        size = self.input_size
        if size and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(
                x.float(), size=(size, size), mode=self.spec.interpolation, align_corners=False, antialias=True
            ).clamp_(0, 1)
        elif size == 0 and (x.shape[-1] % self.spec.patch_size or x.shape[-2] % self.spec.patch_size):
            raise MultiteachError(
                f"teacher {self.spec.name!r}: input {tuple(x.shape[-2:])} is not a multiple of patch size "
                f"{self.spec.patch_size}; set input_size to resize"
            )
        return (x.float() - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> TeacherOutput:
        """Embed a batch; see the class docstring for shapes."""
        x = self.preprocess(x)
        use_bf16 = self.dtype == torch.bfloat16
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with autocast:
            out = self.backbone(x)
        if use_bf16:
            out = TeacherOutput(out.summary.float(), out.patch_tokens.float(), out.grid)
        return out

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, input_size={self.input_size}, dtype={self.dtype}"
