"""The tissue index: per-slide tissue masks and geometry, built once in parallel and shared by every run.

Online patching needs, for every slide, a tissue mask (where to draw tiles) and its pyramid geometry (which level
to read). Computing a mask reads a thumbnail of the slide (about half a second for a small slide, seconds for a
large one), so it is done once per slide and kept in an index folder, never in the slide folders:

- ``$MULTITEACH_INDEX_DIR``, else ``$XDG_CACHE_HOME/multiteach/tissue-index`` (``~/.cache/...``), or the
  folder a recipe names in ``data.slides.index_dir`` (:func:`default_index_dir`);
- ``entries/ab/<key>.npz``: one small file per slide, written atomically (temporary file, then rename). The key
  hashes the slide's identity (real path, size, mtime_ns), the mask settings (``thumb_size``,
  ``min_saturation``, the tissue detector's constants) and :data:`INDEX_FORMAT`: touching or replacing a slide,
  or changing a mask setting, makes a new entry; the old one is simply no longer used. The entry holds the
  bit-packed mask from :func:`~multiteach.data.wsi.tissue.tissue_mask`, its scale, the level-0 size and
  scanned bounds, every level's size and downsample, the µm/px the metadata records (NaN if none), the tissue
  pixel count and the background colour: all a worker needs to read tiles without re-reading metadata.
- ``lists/<hash>.npz``: one summary per slide list and settings, written after a build, so a warm start reads one
  file (after checking every slide's identity with ``stat``) instead of one per slide.

The µm/px used for a slide is resolved when the index is loaded, not stored in the key: a CSV ``mpp`` value
wins over the metadata, and ``data.slides.mpp`` fills in for slides whose metadata records none. Changing
those never rebuilds a mask.

An unreadable slide gets a small *failed* entry with the reason; it is not retried on later runs until the
file changes (new size or mtime) or ``retry_failed=True`` (``multiteach data index --retry-failed``): opening a
truncated multi-gigabyte slide can take seconds before it fails, at every start of every run otherwise.
"""

from multiteach.data.index.build import build_index
from multiteach.data.index.entries import (
    ENV_INDEX_DIR,
    INDEX_FORMAT,
    IndexSettings,
    default_index_dir,
    entry_key,
    entry_path,
    load_mask,
    read_entry_header,
)
from multiteach.data.index.table import SlideIndex

__all__ = [
    "ENV_INDEX_DIR",
    "INDEX_FORMAT",
    "IndexSettings",
    "SlideIndex",
    "build_index",
    "default_index_dir",
    "entry_key",
    "entry_path",
    "load_mask",
    "read_entry_header",
]
