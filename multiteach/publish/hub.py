"""Push an export folder to a Hugging Face model repo (private by default), or list what a push would send.

The token is left to ``huggingface_hub`` (``HF_TOKEN``, ``hf auth login``) or passed straight to ``HfApi``: it is
never printed, logged, returned or written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from multiteach.errors import MultiteachError

log = logging.getLogger("multiteach.publish.hub")


def export_files(export_dir: str | Path) -> list[tuple[str, int]]:
    """``(relative path, bytes)`` of every file an upload of ``export_dir`` sends, sorted.

    Raises:
        MultiteachError: when ``export_dir`` is not an export (``config.json`` or ``model.safetensors`` missing).
    """
    root = Path(export_dir)
    missing = [n for n in ("config.json", "model.safetensors") if not (root / n).is_file()]
    if missing:
        raise MultiteachError(f"{root} is not a multiteach export (missing {', '.join(missing)}); run export first")
    files = [
        (p.relative_to(root).as_posix(), p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files)


def check_repo_id(repo_id: str) -> None:
    """Raise unless ``repo_id`` looks like ``ORG/NAME``."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")) or " " in repo_id:
        raise MultiteachError(f"Hub repo id must look like ORG/NAME, got {repo_id!r}")


def push_to_hub(
    export_dir: str | Path,
    repo_id: str,
    private: bool = True,
    dry_run: bool = False,
    token: str | None = None,
    api: Any = None,
) -> dict[str, Any]:
    """Upload an export folder to a Hugging Face model repo (created if missing, private by default).

    Args:
        export_dir: A folder written by :func:`~multiteach.publish.export.export_run`.
        repo_id: ``ORG/NAME``.
        private: Create the repo private (an existing repo keeps its visibility).
        dry_run: Only list what would be uploaded; nothing is contacted.
        token: A Hub token; when None huggingface_hub looks in its usual places (``HF_TOKEN``, ``hf auth
            login``). It is never printed, logged, returned or written.
        api: An ``HfApi``-like object (tests); built from ``token`` when None.

    Returns:
        ``{"repo_id", "private", "repo_type", "dry_run", "files": [(path, bytes), ...]}`` plus ``"commit_url"``
        after a real upload.
    """
    check_repo_id(repo_id)
    files = export_files(export_dir)
    result: dict[str, Any] = {
        "repo_id": repo_id,
        "private": bool(private),
        "repo_type": "model",
        "dry_run": bool(dry_run),
        "files": files,
    }
    if dry_run:
        return result
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(export_dir),
        repo_type="model",
        allow_patterns=[path for path, _ in files],
        commit_message="Upload multiteach export",
    )
    url = getattr(info, "commit_url", None)
    if url:
        result["commit_url"] = str(url)
    log.info("uploaded %d file(s) to %s", len(files), repo_id)
    return result


def format_files(files: list[tuple[str, int]]) -> str:
    """Aligned ``bytes  path`` lines (the CLI's dry-run listing)."""
    return "\n".join(f"{size:>14,d}  {path}" for path, size in files)
