"""Replayed views: the ``views_per_tile`` augmented views of a tile a cache stores, drawn from the tile's identity.

View ``v`` of a tile is the first global view ``MultiCropTransform.sample_params`` draws from a generator seeded by
:func:`view_seed` (recipe seed, ``"cache"``, tile identity, v): it depends on what the tile is (its provenance and
file, see :func:`~multiteach.cache.store.tile_identity`), never on a sample index, rank, epoch or run, so a tile
drawn again (another epoch, another run of a sweep, online patching landing on the same position) is replayed
with the same K views and finds their targets stored. Global crop ``c`` of a tile in epoch ``e`` is view
``(e * n_global + c) % K`` (:func:`multiteach.data.loader.cached_view`); the parameters (crop box, dihedral
element, HED/colour jitter, blur) are recorded with the rows. Local crops and iBOT masks are drawn as without a
cache.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from PIL import Image

from multiteach.cache.store import row_key, tile_identity
from multiteach.data.loader import cached_view
from multiteach.data.views.multicrop import MultiCropTransform, ViewParams

__all__ = ["ViewReplay", "view_seed"]


def view_seed(seed: int, tile_id: str, view: int) -> int:
    """A 63-bit generator seed unique to (recipe seed, ``"cache"``, tile identity, view index)."""
    digest = hashlib.sha256(f"{seed}/cache/{tile_id}/{view}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ViewReplay:
    """What the training loader needs from a cache: each global crop's replayed view and its row key.

    Light and picklable (no file handle): DataLoader workers get a copy.

    Args:
        transform: The recipe's multi-crop transform (only its global-crop settings matter here).
        seed: The recipe seed.
        views_per_tile: K, the views stored per tile.
    """

    def __init__(self, transform: MultiCropTransform, seed: int, views_per_tile: int) -> None:
        self.transform, self.seed, self.views_per_tile = transform, int(seed), int(views_per_tile)

    def view_params(self, tile_id: str, view: int, height: int, width: int) -> ViewParams:
        """Parameters of view ``view`` of the tile ``tile_id`` (a ``height`` x ``width`` image)."""
        g = torch.Generator().manual_seed(view_seed(self.seed, tile_id, view))
        return self.transform.sample_params(height, width, generator=g)[0]

    def global_views(
        self, image: Image.Image, provenance: str, epoch: int, n_global: int
    ) -> tuple[list[ViewParams], list[torch.Tensor], list[list[Any]]]:
        """The replayed global views of one tile in ``epoch``.

        Returns:
            ``(params, keys, rows)``: n_global ViewParams, n_global (16,) uint8 row keys, and n_global
            ``[provenance, view index]`` descriptions stored with the rows.
        """
        tile_id = tile_identity(provenance, image.size)
        views = [cached_view(epoch, c, n_global, self.views_per_tile) for c in range(n_global)]
        params = [self.view_params(tile_id, v, image.height, image.width) for v in views]
        keys = [row_key(tile_id, p.to_dict()) for p in params]
        return params, keys, [[provenance, v] for v in views]
