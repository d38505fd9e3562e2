"""Finding and loading teacher weights: Hub download with actionable errors, safe state-dict reads,
and assign-loading into a meta-device model (so a 4.5 GB teacher never exists twice in RAM).

Before the first Hub request of a process, :func:`check_hub_reachable` tries one connection to the Hub
(``HF_ENDPOINT``, through the HTTPS proxy when one is set) with a short timeout. When nothing answers, the
whole process runs in ``huggingface_hub``'s offline mode: cached files are used and a missing one fails at
once with one message, instead of after five retries of every request (about 20 s per file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
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
from multiteach.teachers.base import TeacherSpec
from multiteach.teachers.keycheck import compare

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WRAPPER_KEYS = ("state_dict", "teacher", "model", "module")
HUB_CHECK_TIMEOUT_S = 2.0
log = logging.getLogger("multiteach.teachers.weights")
# why this process runs offline ("" while the Hub was reachable); None until the first Hub request checked it
_hub_offline_reason: str | None = None


def _connect_target(url: str) -> tuple[str, int]:
    """``(host, port)`` a request to ``url`` connects to first: its HTTPS/HTTP proxy when one applies, else
    the URL's own host."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or "", proxy_parts.port or 8080
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def hub_answers(url: str, timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or its proxy) opens within ``timeout`` seconds.

    The name lookup and the connection run in a daemon thread, so a resolver that hangs (no DNS server)
    cannot hold the caller longer than ``timeout`` either.
    """
    host, port = _connect_target(url)
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, name="multiteach-hub-check", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def check_hub_reachable() -> str:
    """Decide once per process whether the Hub can be reached; offline, switch ``huggingface_hub`` to offline
    mode for the rest of the process (``HF_HUB_OFFLINE``, also for the processes it starts).

    Returns:
        Why the process is offline (``""`` when the Hub answered): ``HF_HUB_OFFLINE is set`` or
        ``no connection to <endpoint> within 2 s``.
    """
    global _hub_offline_reason
    if _hub_offline_reason is not None:
        return _hub_offline_reason
    from huggingface_hub import constants

    if constants.is_offline_mode():
        _hub_offline_reason = "HF_HUB_OFFLINE is set"
    elif hub_answers(constants.ENDPOINT):
        _hub_offline_reason = ""
    else:
        _hub_offline_reason = f"no connection to {constants.ENDPOINT} within {HUB_CHECK_TIMEOUT_S:g} s"
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        log.debug("Hugging Face Hub unreachable (%s): offline mode for this process", _hub_offline_reason)
    return _hub_offline_reason


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


def hub_file(repo_id: str, filename: str, gated: bool = False, revision: str | None = None) -> Path:
    """Download (or find in the local cache) one file of a Hub repo, at ``revision`` when it is pinned.

    Raises:
        MultiteachError: naming the repo, whether it is gated, and how to fix access.
    """
    offline = check_hub_reachable()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except GatedRepoError:
        raise MultiteachError(f"cannot access {repo_id}/{filename}: {_hub_hint(repo_id, True)}") from None
    except RepositoryNotFoundError:
        raise MultiteachError(
            f"Hub repo {repo_id!r} not found (or private and you are not logged in). {_hub_hint(repo_id, gated)}"
        ) from None
    except LocalEntryNotFoundError:
        raise MultiteachError(
            f"{repo_id}/{filename}{f' at pinned revision {revision}' if revision else ''} is not in the local "
            f"Hugging Face cache and the Hub cannot be reached ({offline or 'no answer to the request'}). "
            f"{_hub_hint(repo_id, gated)}"
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"{repo_id} has no file {filename}") from None


def hub_weights(
    repo_id: str, gated: bool = False, candidates: tuple[str, ...] = WEIGHT_FILES, revision: str | None = None
) -> Path:
    """Return the first weights file among ``candidates`` available for ``repo_id`` (at ``revision``)."""
    last: Exception | None = None
    for name in candidates:
        try:
            return hub_file(repo_id, name, gated, revision)
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


def spec_weights(spec: TeacherSpec, local: tuple[str, ...], hub: tuple[str, ...]) -> Path:
    """The checkpoint of ``spec``: its ``weights:`` (a file, or a folder holding one of ``local``) or else the
    first of ``hub`` in its Hub repo, pinned to ``spec.revision``."""
    if spec.weights:
        return local_weights(spec.weights, local)
    if not spec.hub_id:
        raise MultiteachError(f"teacher {spec.name!r} has neither a hub_id nor `weights:`")
    return hub_weights(spec.hub_id, spec.gated, hub, spec.revision)


#: ``config.json`` key naming the catalog teacher a random multiteach stand-in imitates (:mod:`multiteach.standins`)
STANDIN_KEY = "multiteach_standin"


def standin_of(weights: str | Path | None) -> str | None:
    """The catalog teacher a ``weights:`` folder is a random multiteach stand-in of (its ``config.json`` says so),
    else None."""
    if not weights:
        return None
    root = Path(weights).expanduser()
    config = (root if root.is_dir() else root.parent) / "config.json"
    try:
        value = json.loads(config.read_text()).get(STANDIN_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON config file with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MultiteachError(f"cannot read config {path}: {exc}") from None


def unwrap_state_dict(obj: Any, path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Unwrap the dict wrappers public loaders unwrap (``state_dict``: conch, TRIDENT; ``teacher``: GPFM's
    release; ``model``: CTransPath/DINO), returning the state dict and the wrapper keys taken.

    Key prefixes are not touched: a ``module.`` or ``backbone.`` prefix is either in the catalog entry's
    ``strip_prefixes`` (the public loader strips it too) or a mismatch the error message explains.
    """
    taken: list[str] = []
    while isinstance(obj, dict) and not _is_state_dict(obj):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        taken.append(key)
        obj = obj[key]
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        kinds = ", ".join(sorted(str(k) for k in obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
        raise MultiteachError(f"{path} does not hold a state dict (top level: {kinds})")
    return obj, taken


def _is_state_dict(obj: dict[str, Any]) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | Path, with_wrappers: bool = False) -> Any:
    """Read a state dict without unpickling arbitrary objects.

    ``.safetensors`` is read with safetensors; ``.bin``/``.pth``/``.pt`` with
    ``torch.load(weights_only=True, mmap=True)``. Dict wrappers are unwrapped (:func:`unwrap_state_dict`).

    Args:
        path: The weights file.
        with_wrappers: Also return the wrapper keys that were unwrapped.

    Returns:
        The state dict, or ``(state dict, wrapper keys)`` with ``with_wrappers``.

    Raises:
        MultiteachError: naming the file when it cannot be read (truncated, not a checkpoint, pickled code).
    """
    path = Path(path)
    try:
        raw: Any = (
            load_file(str(path))
            if path.suffix == ".safetensors"
            else torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        )
    except Exception as exc:  # corrupt/truncated archives, unpickling refusals
        raise MultiteachError(
            f"cannot read weights {path} ({_size(path)} on disk): {str(exc).splitlines()[0]}. A truncated or "
            "interrupted download looks like this: download the file again."
        ) from None
    sd, taken = unwrap_state_dict(raw, path)
    return (sd, taken) if with_wrappers else sd


def _size(path: Path) -> str:
    try:
        return human_bytes(path.stat().st_size)
    except OSError:
        return "unreadable"


def human_bytes(n: float) -> str:
    """``1.21 GB``-style size."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def assign_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str | Path,
    dtype: torch.dtype = torch.float32,
    teacher: str | None = None,
    ignore_unexpected: tuple[str, ...] = (),
) -> nn.Module:
    """Load ``state_dict`` into a (meta-device) ``model`` by assignment, after checking every key and shape.

    Nothing is modified unless all keys and shapes match, so a failed load leaves no half-loaded model.

    Args:
        model: Model whose parameters may live on the meta device.
        state_dict: Tensors to adopt (they become the model's parameters, no copy).
        source: File name used in error messages.
        dtype: Floating-point dtype of the loaded parameters.
        teacher: Teacher name used in error messages.
        ignore_unexpected: Prefixes of keys dropped on purpose (e.g. a CoCa text tower).

    Raises:
        MultiteachError: naming the teacher and file, with missing/unexpected keys grouped by prefix, shape
            mismatches and the likely cause.
    """
    expected = model.state_dict()
    shapes = {k: tuple(t.shape) for k, t in expected.items()}
    diff = compare(shapes, {k: tuple(v.shape) for k, v in state_dict.items()}, ignore_unexpected)
    if not diff.ok:
        who = f"teacher {teacher!r}: " if teacher else ""
        check = f" Full report: multiteach teachers --check {teacher} --weights {source}" if teacher else ""
        raise MultiteachError(f"{who}weights {source} do not fit the architecture: {' | '.join(diff.lines())}.{check}")
    state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items() if k in expected}
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise MultiteachError(f"after loading {source}, tensors are still uninitialised: {', '.join(left[:5])}")
    return model
