"""Finding and loading teacher weights: Hub download with actionable errors, safe state-dict reads,
and assign-loading into a meta-device model (so a 4.5 GB teacher never exists twice in RAM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors.torch import load_file
from torch import nn

from multiteach.errors import MultiteachError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module")


def _hub_hint(repo_id: str, gated: bool) -> str:
    gate = (
        f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and run `hf auth login` "
        "(or set HF_TOKEN). "
        if gated
        else ""
    )
    return (
        f"{gate}Without network access, download it once elsewhere and copy the Hugging Face cache, "
        f"or point the teacher's `weights:` at a local file or folder."
    )


def hub_file(repo_id: str, filename: str, gated: bool = False) -> Path:
    """Download (or find in the local cache) one file of a Hub repo.

    Raises:
        MultiteachError: naming the repo, whether it is gated, and how to fix access.
    """
    try:
        return Path(hf_hub_download(repo_id, filename))
    except GatedRepoError:
        raise MultiteachError(f"cannot access {repo_id}/{filename}: {_hub_hint(repo_id, True)}") from None
    except RepositoryNotFoundError:
        raise MultiteachError(
            f"Hub repo {repo_id!r} not found (or private and you are not logged in). {_hub_hint(repo_id, gated)}"
        ) from None
    except LocalEntryNotFoundError:
        raise MultiteachError(
            f"{repo_id}/{filename} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE or no network). {_hub_hint(repo_id, gated)}"
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"{repo_id} has no file {filename}") from None


def hub_weights(repo_id: str, gated: bool = False, candidates: tuple[str, ...] = WEIGHT_FILES) -> Path:
    """Return the first weights file among ``candidates`` available for ``repo_id``."""
    last: Exception | None = None
    for name in candidates:
        try:
            return hub_file(repo_id, name, gated)
        except (FileNotFoundError, MultiteachError) as exc:
            last = exc
    assert last is not None
    raise (
        last if isinstance(last, MultiteachError) else MultiteachError(f"{repo_id} has none of {', '.join(candidates)}")
    )


def local_weights(path: str | Path, candidates: tuple[str, ...] = WEIGHT_FILES) -> Path:
    """Resolve a ``weights:`` value (file, or folder holding one of ``candidates``)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in candidates:
            if (p / name).is_file():
                return p / name
        raise MultiteachError(f"weights folder {p} holds none of {', '.join(candidates)}")
    raise MultiteachError(f"weights path {p} does not exist")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON config file with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MultiteachError(f"cannot read config {path}: {exc}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling arbitrary objects.

    ``.safetensors`` is read with safetensors; ``.bin``/``.pth``/``.pt`` with
    ``torch.load(weights_only=True, mmap=True)``. Common wrappers (``state_dict``, ``model``,
    ``teacher``) and a DDP ``module.`` prefix are removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # unpickling refusals and corrupt archives
            raise MultiteachError(f"cannot read weights {path}: {exc}") from None
    while isinstance(sd, dict) and len(sd) == 1 and next(iter(sd)) in _WRAPPER_KEYS:
        sd = next(iter(sd.values()))
    for key in _WRAPPER_KEYS[:3]:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise MultiteachError(f"{path} does not hold a state dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def assign_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Load ``state_dict`` into a (meta-device) ``model`` by assignment, after checking every key and shape.

    Nothing is modified unless all keys and shapes match, so a failed load leaves no half-loaded model.

    Args:
        model: Model whose parameters may live on the meta device.
        state_dict: Tensors to adopt (they become the model's parameters, no copy).
        source: File name used in error messages.
        dtype: Floating-point dtype of the loaded parameters.

    Raises:
        MultiteachError: listing missing/unexpected keys or shape mismatches.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        (k, tuple(t.shape), tuple(state_dict[k].shape))
        for k, t in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(t.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(f"{k} expects {e} but file has {g}" for k, e, g in wrong[:5]))
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
        raise MultiteachError(
            f"weights {source} do not fit the architecture: {' | '.join(parts)}. "
            "Check the teacher's arch/model_kwargs or that `weights:` points at the right model."
        )
    state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise MultiteachError(f"after loading {source}, tensors are still uninitialised: {', '.join(left[:5])}")
    return model
