"""What the machine runs fast: bf16 is a win on GPUs and on CPUs with native bf16 units, a 10-20x loss elsewhere.

Measured on a 2-core AVX2 EPYC (no AVX-512): a ViT-Ti/16 forward+backward at 112 px took 60 s in bf16
autocast vs 3 s in float32, because every bf16 matmul is emulated. ``auto`` settings therefore pick bf16
only where it is native.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_bf16() -> bool:
    """Whether bf16 maths is native here: a CUDA device with bf16 support, or a CPU with AVX512-BF16/AMX."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str) -> str:
    """Accelerate mixed precision for a recipe's ``train.precision``: ``auto`` -> ``bf16`` if native, else ``no``."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16() else "no"


def resolve_dtype(dtype: str) -> str:
    """A teacher's ``dtype``: ``auto`` -> ``bfloat16`` if native, else ``float32``."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16() else "float32"
