"""Teachers whose weights ship inside the multiteach package (no network, no login): ``multiteach-tiny``.

Each shipped teacher is a folder under ``multiteach/assets/teachers/<name>/`` in timm's hub layout
(``config.json`` + ``model.safetensors``) with a model card (``README.md``) and ``SHA256SUMS``. Before
loading, the files are checked against their recorded digests, so a missing or damaged install fails
with the file's name and the reinstall command instead of a safetensors traceback.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from multiteach.errors import MultiteachError

SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "assets" / "teachers"
DIGESTS = "SHA256SUMS"
REINSTALL = (
    "reinstall multiteach (`pip install --force-reinstall --no-deps multiteach`, or `git checkout -- {path}` "
    "in a clone)"
)


def shipped_dir(name: str) -> Path:
    """The folder of the shipped teacher ``name`` (whether or not it is intact)."""
    return SHIPPED_ROOT / name


def is_shipped(path: str | Path | None) -> bool:
    """Whether ``path`` is (inside) a shipped teacher's folder."""
    if path is None:
        return False
    try:
        Path(path).expanduser().resolve().relative_to(SHIPPED_ROOT)
    except ValueError:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shipped(folder: str | Path) -> Path:
    """Check a shipped teacher's files against ``SHA256SUMS``.

    Args:
        folder: The shipped teacher's folder.

    Returns:
        The folder.

    Raises:
        MultiteachError: Naming the missing or damaged file and how to reinstall.
    """
    folder = Path(folder).expanduser().resolve()
    sums = folder / DIGESTS
    if not sums.is_file():
        raise MultiteachError(f"shipped teacher file {sums} is missing; {REINSTALL.format(path=folder)}")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        expected, name = line.split(maxsplit=1)
        path = folder / name.strip().lstrip("*")
        if not path.is_file():
            raise MultiteachError(f"shipped teacher file {path} is missing; {REINSTALL.format(path=path)}")
        if _sha256(path) != expected:
            raise MultiteachError(
                f"shipped teacher file {path} is damaged (sha256 differs from {sums.name}); "
                f"{REINSTALL.format(path=path)}"
            )
    return folder


def write_digests(folder: str | Path, names: tuple[str, ...] = ("config.json", "model.safetensors")) -> Path:
    """Record the sha256 of ``names`` in ``folder/SHA256SUMS`` (used when a shipped teacher is (re)built)."""
    folder = Path(folder)
    text = "".join(f"{_sha256(folder / n)}  {n}\n" for n in names)
    (folder / DIGESTS).write_text(text)
    return folder / DIGESTS
