"""Deterministic multi-crop loading: a sample's views depend only on (seed, epoch, index), and each
process takes its slice of every global batch. One process with batch 32 and two processes with 16
each therefore see exactly the same crops, masks and order, and a resumed run restarts at its step."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from multiteach.data.sources.base import TileSource
from multiteach.data.views.masking import sample_ibot_masks
from multiteach.data.views.multicrop import MultiCropTransform, apply_view
from multiteach.data.views.perturb import ORDER, RobustViews


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed unique to (run seed, epoch, tile index)."""
    return (seed * 1_000_003 + epoch * 10_007 + index * 7_919 + 1) % (2**63 - 1)


def cached_view(epoch: int, crop: int, n_global: int, views_per_tile: int) -> int:
    """The replayed view that global crop ``crop`` of a tile uses in ``epoch`` when training with a teacher-target
    cache: ``(epoch * n_global + crop) % views_per_tile``, so consecutive epochs walk through all of a tile's stored
    views before any repeats."""
    return (epoch * n_global + crop) % views_per_tile


class SeededMultiCrop(Dataset):
    """Multi-crop views (and iBOT masks for the global crops) of tile ``index`` in ``epoch``.

    Args:
        tiles: The training source (:class:`~multiteach.data.sources.base.TileSource`): tile ``index`` of ``epoch``.
        transform: Draws the crop/augmentation parameters of every view.
        seed: Run seed.
        mask_grid: Student patch grid (h, w) of a global crop, for iBOT masks.
        masking: ``{"probability": p, "ratio": [lo, hi]}`` or None for no masks.
        cache: A :class:`multiteach.cache.ViewReplay`, or None. With a cache the global crops are the tile's
            replayed views (global crop ``c`` in ``epoch`` is view :func:`cached_view`), drawn from the tile's
            identity; local crops and masks are drawn as without a cache.
        robust: ``data.robust_views``: the student's global views become perturbed copies of the clean ones
            the teachers (and a cache) see, pixel-aligned; None for the same view on both sides.

    Returns (per item):
        ``{"global": [n_global x (3, G, G)], "local": [n_local x (3, L, L)], "masks"?: (n_global, h*w) bool}``
        with floats in [0, 1]; with a cache also ``"cache_keys": [n_global x (16,) uint8]`` (row keys) and
        ``"cache_rows"`` (n_global ``[provenance, view]``); with ``robust`` also ``"student_global":
        [n_global x (3, G, G)]`` and ``"robust": [n_global x (5,)]`` (strength per perturbation in
        :data:`multiteach.data.views.perturb.ORDER`, 0 = not applied); ``"skipped"``: ``(what, reason)`` pairs
        of unreadable files or slides the source replaced while producing this tile.
    """

    def __init__(
        self,
        tiles: TileSource,
        transform: MultiCropTransform,
        seed: int,
        mask_grid: tuple[int, int] | None = None,
        masking: dict[str, Any] | None = None,
        cache: Any | None = None,
        robust: RobustViews | None = None,
    ) -> None:
        self.tiles = tiles
        self.robust = robust
        self.transform = transform
        self.seed = seed
        self.mask_grid = mask_grid
        self.masking = masking
        self.cache = cache

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        tile = self.tiles.read(index, epoch)
        image = tile.image
        params = self.transform.sample_params(image.height, image.width, generator=g)
        n_global = self.transform.n_global
        if self.cache is not None:  # the same draws as without a cache; only the global views are replaced
            params[:n_global], keys, rows = self.cache.global_views(image, tile.provenance, epoch, n_global)
        with _one_thread():
            views = [apply_view(image, p) for p in params]
        out: dict[str, Any] = {"global": views[:n_global], "local": views[n_global:], "skipped": tile.skipped}
        if self.cache is not None:
            out["cache_keys"], out["cache_rows"] = keys, rows
        if self.masking is not None and self.mask_grid is not None:
            out["masks"] = sample_ibot_masks(
                n_global, self.mask_grid, self.masking["probability"], tuple(self.masking["ratio"]), generator=g
            )
        if self.robust is not None:  # drawn last, so the switch leaves every other draw unchanged
            drawn = [self.robust.sample(g) for _ in range(n_global)]
            with _one_thread():
                out["student_global"] = [p.apply(v) for p, v in zip(drawn, out["global"], strict=True)]
            out["robust"] = [torch.tensor([p.strengths()[k] for k in ORDER], dtype=torch.float32) for p in drawn]
        return out


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the training DataLoader: leave SIGINT/SIGTERM to the main process, one thread.

    SLURM, ``kill -- -PGID`` and torchrun signal every process of a job, DataLoader workers included. A
    worker killed by SIGTERM makes the main process fail with "DataLoader worker ... is killed by signal"
    before it can write its stop checkpoint; ignoring the signals here lets the main process finish the
    step, checkpoint, and shut the workers down itself (they also exit when the main process dies).
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    torch.set_num_threads(1)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run per-tile augmentation single-threaded in the main process (``num_workers: 0``).

    The ops act on one small image: with torch's intra-op threads they are 10-100x slower (thread start-up
    and contention with the training step), measured 97 ms vs 0.8 ms for a 224 px HED jitter on 2 cores.
    DataLoader workers already run with one thread.
    """
    if torch.utils.data.get_worker_info() is not None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


MAX_STORED_PERMUTATION = 1 << 24  # above this many tiles an epoch's order is computed per entry, not stored
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def feistel_permute(i: int, n: int, key: int, rounds: int = 4) -> int:
    """Entry ``i`` of a pseudo-random permutation of ``range(n)`` keyed by ``key``, in O(1) memory.

    A balanced Feistel network is a bijection on ``2^(2h) >= n`` values; "cycle walking" (apply it again until
    the value falls below ``n``) restricts it to ``range(n)`` and stays a bijection. Used for corpora too large to
    hold one ``randperm`` per epoch.
    """
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    low = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & low
        for r in range(rounds):
            left, right = right, left ^ (_mix64((key << 8) ^ (r << 56) ^ right) & low)
        x = (left << half) | right
        if x < n:
            return x


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this process's micro-batches of (index, epoch) keys, step after step.

    The global batch of optimiser step ``s`` holds sample positions ``s*G .. s*G+G-1`` of an endless
    stream of per-epoch permutations (seeded by ``seed + epoch``), or of the indices in order when the
    source draws its own random positions (``shuffle=False``, online patching: consecutive positions then
    share a slide visit). It is cut into ``grad_accum`` micro-steps, and each micro-step into
    ``world_size`` equal slices; rank ``r`` gets slice ``r``.

    Args:
        num_samples: Dataset size.
        global_batch: Images per optimiser step over all processes.
        steps: Total optimiser steps of the run.
        rank: This process's rank.
        world_size: Number of processes.
        grad_accum: Micro-steps per optimiser step.
        seed: Run seed.
        start_step: First optimiser step to yield (resume).
        shuffle: Permute the indices of every epoch (False: position ``p`` is index ``p % num_samples``).
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        steps: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        seed: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.n, self.global_batch, self.steps, self.shuffle = num_samples, global_batch, steps, shuffle
        self.rank, self.world, self.accum, self.seed, self.start = rank, world_size, grad_accum, seed, start_step
        self.micro = global_batch // (world_size * grad_accum)
        self._perms: dict[int, torch.Tensor] = {}

    def _key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset, epoch
        if self.n > MAX_STORED_PERMUTATION:  # 10^8 tiles: an 800 MB permutation per epoch; compute each entry
            return feistel_permute(offset, self.n, self.seed + epoch), epoch
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][offset]), epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.steps):
            for micro in range(self.accum):
                first = step * self.global_batch + (micro * self.world + self.rank) * self.micro
                yield [self._key(p) for p in range(first, first + self.micro)]

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum
