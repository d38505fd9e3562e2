"""A checkpoint's tensor names, shapes and dtypes, read without loading its data (for the weights doctor).

Safetensors files are read from their JSON header alone (and checked for truncation against the data offsets
it describes); pickled checkpoints are memory-mapped with ``weights_only=True`` and unwrapped as the loader
unwraps them. Every tensor comes back on the meta device, so a 6 GB checkpoint costs kilobytes of memory.
:mod:`multiteach.teachers.doctor` compares the result with the architecture a teacher would load.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multiteach.errors import MultiteachError
from multiteach.teachers.weights import human_bytes, unwrap_state_dict

__all__ = ["FileInfo", "meta_tensor", "read_file_info"]

# safetensors header dtype -> (torch dtype, bytes per element)
_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}


@dataclass
class FileInfo:
    """A checkpoint's tensors as meta tensors (names, shapes, dtypes), plus how it was read.

    Attributes:
        tensors: Tensor name -> meta tensor of the stored shape and dtype.
        wrappers: The dict keys unwrapped on the way to the state dict (e.g. ``["model"]``), outermost first.
        size: Bytes on disk.
        described: Bytes the safetensors header describes (None for pickled checkpoints).
    """

    tensors: dict[str, torch.Tensor]
    wrappers: list[str]
    size: int
    described: int | None


def meta_tensor(shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of ``shape`` and ``dtype`` on the meta device (no storage)."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _read_safetensors(path: Path) -> FileInfo:
    """Parse a safetensors header without reading the data; detect truncation from the data offsets."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise MultiteachError(f"the file is {size} bytes, too short to hold a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise MultiteachError(
                f"the header says {human_bytes(n)} of metadata but the file is {human_bytes(size)}: truncated or "
                "not a safetensors file"
            )
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MultiteachError("the safetensors header is not valid JSON: the file is damaged") from None
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    for name, info in header.items():
        dtype, _ = _ST_DTYPES.get(info.get("dtype", ""), (torch.float32, 4))
        tensors[name] = meta_tensor(info["shape"], dtype)
        end = max(end, int(info["data_offsets"][1]))
    described = 8 + n + end
    if size < described:
        raise MultiteachError(
            f"the file is truncated: {human_bytes(size)} on disk but its header describes {human_bytes(described)} "
            "(an interrupted download or copy): download it again"
        )
    return FileInfo(tensors, [], size, described)


def read_file_info(path: str | Path) -> FileInfo:
    """Names, shapes and dtypes of a checkpoint's tensors, without loading the data into memory.

    Args:
        path: A ``.safetensors`` file (header only) or a pickled checkpoint (memory-mapped, ``weights_only``).

    Returns:
        The tensors as meta tensors, the unwrapped dict keys and the sizes (:class:`FileInfo`).

    Raises:
        MultiteachError: when the file cannot be read (missing, truncated, not a checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise MultiteachError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    size = path.stat().st_size
    try:
        raw: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip archives, refused pickles
        raise MultiteachError(
            f"cannot read it ({human_bytes(size)} on disk): {str(exc).splitlines()[0]} — a truncated or "
            "interrupted download looks like this: download it again"
        ) from None
    sd, wrappers = unwrap_state_dict(raw, path)
    return FileInfo({k: meta_tensor(v.shape, v.dtype) for k, v in sd.items()}, wrappers, size, None)
