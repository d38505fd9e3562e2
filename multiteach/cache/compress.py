"""Storage codecs for cached teacher targets: precision (float32/bfloat16/float16/int8) and PCA of patch tokens.

A codec turns a float tensor of tokens ``(..., D)`` into named *parts* and back. A part named ``""`` is the
tensor itself; any other part is a side tensor stored under a dotted suffix, so a caller writes

    parts = encode_tokens(patch, "int8")              # {"": q (..., D) int8, "scale": (..., 1) float16}
    tensors.update(store_parts(f"{teacher}.patch", parts))   # "{teacher}.patch", "{teacher}.patch.scale"

and reads back with ``decode_tokens(load_parts(tensors, f"{teacher}.patch", "int8"), "int8")``.

Codecs (:data:`STORE_CODECS`):

* ``float32`` / ``bfloat16`` / ``float16``: a plain cast. ``float16`` refuses values that overflow (above
  65504) and points to ``bfloat16`` (same size, float32 range); tiny values (< 6e-8) flush to zero.
* ``int8``: symmetric per-token quantisation. Each token (vector along the last dim) gets
  ``scale = absmax / 127`` stored as **float16**, rounded *up* to the next float16 value, so that
  ``|x / scale| <= 127`` and ``q = round(x / scale)`` never clips: the error is at most ``scale / 2`` per
  element with the stored scale, at any magnitude. Float16 scales cost 2 bytes a token (vs 4 for float32)
  and lose nothing in that bound, because quantisation uses the rounded scale itself. What they cost: for
  ``absmax >= 127 * 2**-14`` (about 7.8e-3) the step is within 0.1% of ``absmax / 127``; below that the
  scale is a float16 subnormal (spacing 6e-8), so the step is up to ``6e-8`` coarser in absolute terms
  (tokens with ``absmax`` under 3e-8 round to zero); above ``127 * 65504`` (about 8.3e6) encoding
  is refused. Teacher features are O(1)-O(1e3), far inside that range. An all-zero token gets scale 1.

:class:`PatchPCA` projects patch tokens onto their top-``k`` principal components (``cache.patch_dims``);
its coefficients are then stored with any codec above. :func:`cosine_fidelity` measures how close decoded
targets stay to the originals, and :func:`bytes_per_row` does the bytes-per-tile accounting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from multiteach.errors import MultiteachError, did_you_mean

__all__ = [
    "DTYPE_ALIASES",
    "FP16_MAX",
    "STORE_CODECS",
    "PatchPCA",
    "bytes_per_row",
    "canonical_dtype",
    "cosine_fidelity",
    "decode_tokens",
    "encode_tokens",
    "load_parts",
    "part_key",
    "part_names",
    "store_parts",
]

STORE_CODECS = ("float32", "bfloat16", "float16", "int8")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FP16_MAX = 65504.0
INT8_MAX = 127
SCALE = "scale"
SCALE_DTYPE = torch.float16

_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ITEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SCALE_BYTES = 2  # one float16 scale per token for int8
_FIT_CHUNK = 65536  # rows per chunk when accumulating the PCA covariance


def canonical_dtype(name: str, key: str = "cache.dtype") -> str:
    """The canonical codec name of a storage dtype setting.

    Args:
        name: ``float32``, ``bfloat16``, ``float16``, ``int8`` or an alias ``fp32``/``bf16``/``fp16``
            (case-insensitive).
        key: The setting named in the error message.

    Returns:
        One of :data:`STORE_CODECS`.

    Raises:
        MultiteachError: ``name`` is not a known codec; the message lists the allowed values and close matches.
    """
    lowered = str(name).strip().lower()
    if lowered in STORE_CODECS:
        return lowered
    if lowered in DTYPE_ALIASES:
        return DTYPE_ALIASES[lowered]
    aliases = ", ".join(DTYPE_ALIASES)
    raise MultiteachError(
        f"{key}: unknown storage dtype {name!r}; allowed: {', '.join(STORE_CODECS)} (aliases {aliases})."
        + did_you_mean(lowered, [*STORE_CODECS, *DTYPE_ALIASES])
    )


def part_names(dtype: str) -> tuple[str, ...]:
    """The part names a codec produces: ``("",)`` for float codecs, ``("", "scale")`` for ``int8``."""
    return ("", SCALE) if canonical_dtype(dtype) == "int8" else ("",)


def part_key(name: str, part: str) -> str:
    """The stored tensor name of one part: ``name`` for the main part ``""``, else ``f"{name}.{part}"``."""
    return f"{name}.{part}" if part else name


def store_parts(name: str, parts: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Name the parts of one encoded tensor for storage, e.g. ``{"uni.patch": q, "uni.patch.scale": s}``.

    Args:
        name: The stored name of the main tensor, e.g. ``f"{teacher}.patch"``.
        parts: What :func:`encode_tokens` returned.
    """
    return {part_key(name, part): tensor for part, tensor in parts.items()}


def load_parts(tensors: Mapping[str, Tensor], name: str, dtype: str) -> dict[str, Tensor]:
    """Collect the parts of the stored tensor ``name`` written with codec ``dtype`` (inverse of :func:`store_parts`).

    Args:
        tensors: Stored tensors by name (e.g. one shard's contents).
        name: The stored name of the main tensor, e.g. ``f"{teacher}.patch"``.
        dtype: The codec the tensors were written with.

    Raises:
        MultiteachError: A part is missing.
    """
    out = {}
    for part in part_names(dtype):
        stored = part_key(name, part)
        if stored not in tensors:
            raise MultiteachError(
                f"stored tensor {stored!r} is missing (needed to decode {name!r} written as {canonical_dtype(dtype)})"
            )
        out[part] = tensors[stored]
    return out


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise MultiteachError(f"{name}: {bad} of {x.numel()} values are NaN or infinite; refusing to store them")


def encode_tokens(x: Tensor, dtype: str, *, name: str = "tokens") -> dict[str, Tensor]:
    """Encode tokens for storage.

    Args:
        x: (..., D) floating tokens (cast to float32 first); must be finite.
        dtype: A codec name or alias (see :func:`canonical_dtype`).
        name: What ``x`` is, for error messages (e.g. ``"uni.patch"``).

    Returns:
        ``{"": (..., D)}`` in the stored dtype for float codecs; for ``int8``,
        ``{"": (..., D) int8, "scale": (..., 1) float16}``.

    Raises:
        MultiteachError: ``x`` is not floating point, has no last dimension or holds NaN/inf; ``float16``
            overflows (use ``bfloat16``); an ``int8`` scale overflows float16.
    """
    codec = canonical_dtype(dtype)
    if not torch.is_floating_point(x) or x.dim() == 0:
        raise MultiteachError(
            f"{name}: expected floating-point tokens of shape (..., D); got {x.dtype} {tuple(x.shape)}"
        )
    x = x.detach().float()
    _check_finite(x, name)
    if codec == "int8":
        return _encode_int8(x, name)
    stored = x.to(_FLOAT_DTYPES[codec])
    if codec == "float16" and not bool(torch.isfinite(stored).all()):
        peak = float(x.abs().max())
        raise MultiteachError(
            f"{name}: float16 storage overflows: max |value| is {peak:.6g}, above the float16 limit {FP16_MAX:g}. "
            "Store with bfloat16 instead (same size, float32 range) or float32."
        )
    return {"": stored}


def _encode_int8(x: Tensor, name: str) -> dict[str, Tensor]:
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    stored = scale.to(SCALE_DTYPE)
    # Round the float16 scale up (positive float16 bit patterns are ordered) so |x / scale| <= 127: no clipping.
    low = stored.float() < scale
    if bool(low.any()):
        stored = torch.where(low, (stored.view(torch.int16) + 1).view(SCALE_DTYPE), stored)
    if not bool(torch.isfinite(stored).all()):
        peak = float(absmax.max())
        raise MultiteachError(
            f"{name}: int8 storage keeps one float16 scale per token, which holds |values| up to "
            f"{INT8_MAX * FP16_MAX:.4g}; max |value| is {peak:.6g}. Store with bfloat16 or float32 instead."
        )
    q = torch.round(x / stored.float()).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return {"": q, SCALE: stored}


def decode_tokens(parts: Mapping[str, Tensor], dtype: str, *, name: str = "tokens") -> Tensor:
    """Decode stored parts back to float32 tokens (inverse of :func:`encode_tokens`).

    Args:
        parts: ``{"": (..., D)}`` for float codecs; ``{"": (..., D) int8, "scale": (..., 1)}`` for ``int8``.
        dtype: The codec the parts were written with.
        name: What the tokens are, for error messages.

    Returns:
        (..., D) float32 tokens.

    Raises:
        MultiteachError: A part is missing or its dtype/shape does not fit the codec.
    """
    codec = canonical_dtype(dtype)
    if "" not in parts:
        raise MultiteachError(f"{name}: the main part is missing (parts given: {sorted(parts)})")
    main = parts[""]
    if codec != "int8":
        if not torch.is_floating_point(main):
            raise MultiteachError(f"{name}: stored as {main.dtype}, which is not a {codec} tensor; wrong cache dtype?")
        return main.float()
    if main.dtype != torch.int8:
        raise MultiteachError(f"{name}: stored as {main.dtype}, not int8; was it written with another cache dtype?")
    if SCALE not in parts:
        raise MultiteachError(f"{name}: int8 tokens need their {SCALE!r} part (the per-token scales); it is missing")
    scale = parts[SCALE]
    want = (*main.shape[:-1], 1)
    if tuple(scale.shape) != want:
        raise MultiteachError(f"{name}: int8 scales have shape {tuple(scale.shape)}; expected {want}")
    return main.float() * scale.float()


class PatchPCA:
    """Principal components of patch tokens: stores ``(..., k)`` coefficients instead of ``(..., D)`` tokens.

    Attributes:
        mean: (D,) float32 token mean.
        components: (k, D) float32 orthonormal rows, largest variance first; each row's largest-|value|
            entry is positive (a deterministic sign), so two fits on the same data are bit-identical.
        explained: Fraction of the fitted tokens' variance the ``k`` components keep (``None`` when unknown,
            e.g. after :meth:`from_tensors` without it).
    """

    def __init__(self, mean: Tensor, components: Tensor, explained: float | None = None) -> None:
        """Wrap fitted tensors: ``mean`` (D,), ``components`` (k, D); see :meth:`fit` to compute them."""
        if mean.dim() != 1 or components.dim() != 2 or components.shape[1] != mean.shape[0]:
            raise MultiteachError(
                f"PCA tensors do not fit together: mean {tuple(mean.shape)}, components {tuple(components.shape)}; "
                "expected mean (D,) and components (k, D)"
            )
        self.mean = mean.detach().float().contiguous()
        self.components = components.detach().float().contiguous()
        self.explained = None if explained is None else float(explained)

    @property
    def k(self) -> int:
        """Number of kept components."""
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        """Token dimension D."""
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, tokens: Tensor, k: int, key: str = "cache.patch_dims") -> PatchPCA:
        """Fit the top-``k`` principal components of patch tokens (float64, on centred data, via ``eigh``).

        Args:
            tokens: (M, D) token rows, or (T, N, D) patch tokens of T tiles (flattened to (T*N, D)).
            k: Components to keep, ``1 <= k <= D``.
            key: The setting named in error messages.

        Returns:
            The fitted :class:`PatchPCA`.

        Raises:
            MultiteachError: ``k`` out of range, fewer than ``k`` token rows, wrong shape or NaN/inf tokens.
        """
        if tokens.dim() not in (2, 3) or tokens.shape[-1] == 0:
            raise MultiteachError(f"{key}: PCA fits (M, D) or (T, N, D) patch tokens; got shape {tuple(tokens.shape)}")
        d = int(tokens.shape[-1])
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
            raise MultiteachError(f"{key} = {k!r} is out of range: it must be an integer with 1 <= {key} <= {d} (D)")
        per_tile = int(tokens.shape[1]) if tokens.dim() == 3 else None
        rows = tokens.reshape(-1, d)
        m = int(rows.shape[0])
        if m < k:
            if per_tile:
                need = f"{k} token rows, i.e. at least {math.ceil(k / per_tile)} tiles of {per_tile} tokens"
                got = f"{tokens.shape[0]} tiles ({m} rows)"
            else:
                need, got = f"{k} token rows (tiles x tokens per tile)", f"{m} rows"
            raise MultiteachError(f"{key} = {k}: fitting the PCA needs at least {need}; got {got}")
        _check_finite(rows, f"{key} PCA fit")
        mean = torch.zeros(d, dtype=torch.float64)
        for start in range(0, m, _FIT_CHUNK):
            mean += rows[start : start + _FIT_CHUNK].to(torch.float64).sum(0)
        mean /= m
        cov = torch.zeros(d, d, dtype=torch.float64)
        for start in range(0, m, _FIT_CHUNK):
            c = rows[start : start + _FIT_CHUNK].to(torch.float64) - mean
            cov += c.T @ c
        cov /= m
        cov = (cov + cov.T) / 2
        values, vectors = torch.linalg.eigh(cov)  # ascending
        values = values.flip(0).clamp_(min=0)
        comps = vectors.flip(1)[:, :k].T.contiguous()  # (k, D)
        peak = comps.abs().argmax(dim=1, keepdim=True)
        signs = torch.sign(comps.gather(1, peak))
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
        total = float(values.sum())
        explained = float(values[:k].sum()) / total if total > 0 else 1.0
        return cls(mean.float(), comps.float(), min(explained, 1.0))

    def _check_dim(self, x: Tensor, want: int, what: str) -> None:
        if x.dim() == 0 or x.shape[-1] != want:
            raise MultiteachError(f"PCA {what}: expected (..., {want}); got shape {tuple(x.shape)}")

    def encode(self, x: Tensor) -> Tensor:
        """Project tokens onto the components.

        Args:
            x: (..., D) tokens.

        Returns:
            (..., k) float32 coefficients.
        """
        self._check_dim(x, self.dim, "encode")
        x = x.float()
        return (x - self.mean.to(x.device)) @ self.components.to(x.device).T

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruct tokens from coefficients.

        Args:
            z: (..., k) coefficients.

        Returns:
            (..., D) float32 tokens.
        """
        self._check_dim(z, self.k, "decode")
        z = z.float()
        return z @ self.components.to(z.device) + self.mean.to(z.device)

    def to_tensors(self) -> dict[str, Tensor]:
        """The tensors to store: ``{"mean": (D,), "components": (k, D)}``, float32."""
        return {"mean": self.mean.clone(), "components": self.components.clone()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], explained: float | None = None) -> PatchPCA:
        """Rebuild from :meth:`to_tensors` output.

        Args:
            tensors: ``{"mean": (D,), "components": (k, D)}``.
            explained: The variance fraction recorded at fit time, if known.

        Raises:
            MultiteachError: A tensor is missing or the shapes do not fit.
        """
        missing = [name for name in ("mean", "components") if name not in tensors]
        if missing:
            raise MultiteachError(f"PCA tensors missing: {', '.join(missing)} (have {sorted(tensors)})")
        return cls(tensors["mean"], tensors["components"], explained)


def cosine_fidelity(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity between matching token vectors of ``a`` and ``b`` ("target fidelity").

    Rows that are all zero in both count as 1 (reproduced exactly); a zero row against a non-zero one counts 0.

    Args:
        a: (..., D) reference tokens.
        b: (..., D) tokens of the same shape, e.g. decoded from storage.

    Returns:
        The mean over all ``prod(...)`` rows, in [-1, 1].

    Raises:
        MultiteachError: The shapes differ or there are no rows.
    """
    if a.shape != b.shape or a.dim() == 0:
        raise MultiteachError(
            f"cosine_fidelity: shapes must match as (..., D); got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    x = a.detach().reshape(-1, a.shape[-1]).double()
    y = b.detach().reshape(-1, b.shape[-1]).to(x.device).double()
    if x.shape[0] == 0:
        raise MultiteachError("cosine_fidelity: no rows to compare")
    cos = F.cosine_similarity(x, y, dim=-1, eps=1e-12)
    both_zero = (x == 0).all(dim=-1) & (y == 0).all(dim=-1)
    return float(torch.where(both_zero, torch.ones_like(cos), cos).clamp(-1.0, 1.0).mean())


def bytes_per_row(dtype: str, n_tokens: int, dim: int) -> int:
    """Stored bytes of one row of ``n_tokens`` tokens of ``dim`` values (e.g. one view's patch tokens).

    Float codecs take ``n_tokens * dim * itemsize``; ``int8`` takes ``n_tokens * (dim + 2)`` (one byte a value
    plus a float16 scale a token). Use ``n_tokens=1`` for a summary vector.

    Args:
        dtype: A codec name or alias.
        n_tokens: Tokens per row (>= 1).
        dim: Values per token (>= 1), e.g. ``k`` after PCA.

    Raises:
        MultiteachError: Unknown codec or non-positive sizes.
    """
    codec = canonical_dtype(dtype)
    for what, value in (("n_tokens", n_tokens), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MultiteachError(f"bytes_per_row: {what} must be a positive integer; got {value!r}")
    if codec == "int8":
        return n_tokens * (dim + _SCALE_BYTES)
    return n_tokens * dim * _ITEM_BYTES[codec]
