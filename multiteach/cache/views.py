"""The fixed views a cache stores: which views of a tile are cached, and the dataset that draws and renders them.

View ``v`` of tile ``i`` is the first global view that ``MultiCropTransform.sample_params`` draws from a
generator seeded by :func:`view_seed` (recipe seed, ``"cache"``, i, v): it depends on nothing else, so any
writer (rank, resume, batch size) draws the same views. **Training** with a cache uses view
``(e * n_global + c) % n_views`` for global crop ``c`` of a tile in epoch ``e``
(:func:`multiteach.data.loader.cached_view`); the student's crops are rebuilt from the parameters recorded
in the shards (:meth:`multiteach.cache.FeatureCache.view_params`) with ``apply_view``, exactly what the
teacher saw. Local crops and iBOT masks are drawn as without a cache.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import Dataset

from multiteach.data.views.multicrop import MultiCropTransform, ViewParams, apply_view

__all__ = ["TileViews", "cache_view_params", "view_seed"]


def view_seed(seed: int, tile: int, view: int) -> int:
    """A 63-bit generator seed unique to (recipe seed, ``"cache"``, tile index, view index)."""
    digest = hashlib.sha256(f"{seed}/cache/{tile}/{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def cache_view_params(
    transform: MultiCropTransform, seed: int, tile: int, view: int, height: int, width: int
) -> ViewParams:
    """Parameters of cached view ``view`` of tile ``tile`` (a ``height`` x ``width`` image).

    The first global view ``transform.sample_params`` draws from a generator seeded by :func:`view_seed`;
    only the global-crop settings (size, scale, augmentation) matter.
    """
    g = torch.Generator().manual_seed(view_seed(seed, tile, view))
    return transform.sample_params(height, width, generator=g)[0]


class TileViews(Dataset):
    """All cached views of some tiles: item ``j`` is (tile index, [n_views ViewParams dicts], (V, 3, G, G)).

    Args:
        tiles: The tile dataset (indexable, items are PIL images).
        indices: The tile indices to serve, in order.
        transform: The recipe's multi-crop transform (only its global-crop settings matter).
        seed: The recipe seed.
        n_views: Views per tile.
    """

    def __init__(self, tiles: Any, indices: list[int], transform: MultiCropTransform, seed: int, n_views: int) -> None:
        self.tiles, self.indices, self.transform, self.seed, self.n_views = tiles, indices, transform, seed, n_views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, list[dict[str, Any]], torch.Tensor]:
        i = self.indices[j]
        image = self.tiles[i]
        params = [
            cache_view_params(self.transform, self.seed, i, v, image.height, image.width) for v in range(self.n_views)
        ]
        threads = torch.get_num_threads()
        if torch.utils.data.get_worker_info() is None:  # per-image ops: intra-op threads only slow them down
            torch.set_num_threads(1)
        try:
            crops = torch.stack([apply_view(image, p) for p in params])
        finally:
            torch.set_num_threads(threads)
        return i, [p.to_dict() for p in params], crops
