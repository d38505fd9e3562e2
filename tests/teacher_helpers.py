"""Small helpers shared by the teacher and loss tests: reproducible images, a reference normalisation,
parameter counts, and MahmoodLab's Hub repo layout in the offline cache."""

from __future__ import annotations

from pathlib import Path

import torch

from multiteach.standins import write_cache_repo


def images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``n`` reproducible RGB images in [0, 1], shape (n, 3, size, size)."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel: what a reference pipeline feeds the model."""
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def n_params(module: torch.nn.Module) -> int:
    """Number of (deduplicated) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def write_mahmood_repo(
    hf_cache: Path, repo_id: str, model_name: str, weights_file: str, state: dict[str, torch.Tensor]
) -> Path:
    """A MahmoodLab repo in the hub cache as their loaders read it: ``meta.yaml`` naming the model and one
    torch-pickled weights file."""
    return write_cache_repo(
        hf_cache,
        repo_id,
        {
            "meta.yaml": lambda p: p.write_text(f"model: {model_name}\n"),
            weights_file: lambda p: torch.save(state, p),
        },
    )
