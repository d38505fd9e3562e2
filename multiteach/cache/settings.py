"""The recipe's ``cache:`` settings as the cache package reads them, and the folder format version."""

from __future__ import annotations

from typing import Any

from multiteach.config import CacheConfig

__all__ = ["FORMAT", "cache_settings", "uses_cache"]

FORMAT = 2
"""Version of the folder layout (``cache.json``, ``pca.safetensors``, ``shards/``); a folder of another is refused."""


def cache_settings(recipe: Any) -> CacheConfig:
    """The recipe's :class:`~multiteach.config.CacheConfig` (defaults when ``cache:`` is null)."""
    return recipe.cache if recipe.cache is not None else CacheConfig()


def uses_cache(recipe: Any) -> bool:
    """Whether training reads and fills a teacher-target cache (``cache.dir`` is set)."""
    return recipe.cache is not None and recipe.cache.dir is not None
