"""Test-wide settings: an isolated, offline Hugging Face cache, and the path to ../shared/data."""

import os
import tempfile
from pathlib import Path

# Must happen before huggingface_hub is imported: it reads these at import time.
_HF_HOME = tempfile.mkdtemp(prefix="multiteach-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def hf_cache() -> Path:
    """The session's hub cache folder (``$HF_HOME/hub``)."""
    path = Path(os.environ["HF_HUB_CACHE"])
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip when this checkout has no ../shared beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real H&E data in {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
