"""The target store on disk: append-only safetensors shards of teacher targets, keyed by (tile identity, view).

A cache folder holds::

    cache.json                  the build key (teachers' weights and preprocessing, the view spec, the storage):
                                written once; a writer or reader with another key is refused, naming the key
    pca.safetensors             with ``cache.patch_dims``: per teacher ``{t}.mean`` (D,) and ``{t}.components``
                                (k, D), fitted on the first tiles before any target is stored; written once
    shards/{writer}-{n}.safetensors
                                one file per flush of one writer, never changed after it is renamed into place:
        keys              (R, 16) uint8   row key: sha256(tile identity, view parameters)[:16]
        {t}.summary[.scale]  (R, D)        stored precision (``cache.dtype``; int8 with per-token scales)
        {t}.patch[.scale]    (R, N', D')   N' = the grid after ``cache.patch_pool``, D' = ``cache.patch_dims``
        metadata "multiteach_cache": JSON {format, writer, grids, specs}; "multiteach_rows": [[provenance, view], ...]
    damaged/                    shards found truncated or unreadable, moved aside (their rows are refilled)

Writers never coordinate: each names its shards by host, process id and a random token, writes them to a
temporary file and renames it into place, so a reader sees whole shards or none, two runs filling one folder at
once lose nothing (a row both computed is stored twice and read once), and a crashed writer leaves only a
temporary file, which the next writer removes (its rows are computed again).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from multiteach.atomic import atomic_save_safetensors
from multiteach.cache.compress import PatchPCA, decode_tokens, encode_tokens, load_parts, store_parts
from multiteach.cache.key import key_diff
from multiteach.cache.settings import FORMAT
from multiteach.errors import MultiteachError
from multiteach.teachers.base import TeacherOutput

__all__ = [
    "DAMAGED",
    "FORMAT",
    "KEY_FILE",
    "META_KEY",
    "PCA_FILE",
    "SHARDS",
    "TargetStore",
    "row_key",
    "tile_identity",
]

log = logging.getLogger("multiteach.cache")

KEY_FILE = "cache.json"
PCA_FILE = "pca.safetensors"
SHARDS = "shards"
DAMAGED = "damaged"
META_KEY = "multiteach_cache"
ROWS_KEY = "multiteach_rows"  # a second metadata entry: the rows' descriptions, parsed only by `cache info`
SHARD_RE = re.compile(r"^(?P<writer>.+)-(?P<n>\d{5})\.safetensors$")
# the temporary file of a shard being written: ``.{host}_{pid}_{token}_r{rank}-{n}.safetensors.XXXX.tmp``
TEMP_RE = re.compile(r"^\.(?P<host>.+)_(?P<pid>\d+)_[0-9a-f]{6}_r\d+-\d{5}\.safetensors\..*\.tmp$")
STALE_TEMP_S = 3600.0  # a temporary file of another host is abandoned after this long
KEY_BYTES = 16


@functools.lru_cache(maxsize=4096)  # bounded: a worker meets millions of tile files, a few slides many times
def _file_stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def tile_identity(provenance: str, size: tuple[int, int]) -> str:
    """What identifies a tile's pixels: its provenance and the identity of the file it was read from.

    The provenance is a tile file's path, ``slide@x,y@mpp`` for a region read from a slide (the pyramid level
    and read size follow from the slide, µm/px and tile size), or ``shard.tar@offset``. The file's size and
    modification time (as in the tissue index's key) make an edited or replaced file a new tile.

    Args:
        provenance: ``SourceTile.provenance``.
        size: The tile's (width, height) in pixels.

    Returns:
        ``"{provenance}|{w}x{h}|{file size}|{mtime_ns}"``.
    """
    st = _file_stat(provenance)
    if st is None and "@" in provenance:
        st = _file_stat(provenance.split("@", 1)[0])
    size_b, mtime = st if st is not None else (-1, -1)
    return f"{provenance}|{size[0]}x{size[1]}|{size_b}|{mtime}"


def row_key(tile_id: str, view: Mapping[str, Any]) -> torch.Tensor:
    """The store key of one view of one tile: the first 16 bytes of sha256(tile identity, view parameters).

    Args:
        tile_id: :func:`tile_identity`.
        view: ``ViewParams.to_dict()`` of the view (crop box, dihedral element, colour parameters, size).

    Returns:
        (16,) uint8.
    """
    text = tile_id + "\0" + json.dumps(view, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:KEY_BYTES]
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8)


def _as_strings(keys: torch.Tensor | np.ndarray) -> np.ndarray:
    """(M, 16) uint8 -> (M,) ``S16`` (sortable, searchable)."""
    arr = keys.cpu().numpy() if torch.is_tensor(keys) else np.asarray(keys)
    return np.ascontiguousarray(arr.astype(np.uint8, copy=False)).view(f"S{KEY_BYTES}").reshape(-1)


def _exclusive_write(path: Path, write: Callable[[Path], Any]) -> bool:
    """Write ``path`` only if it does not exist yet (``os.link`` of a finished temporary file): True if this call
    wrote it, False if another writer got there first. Never leaves a half-written ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        write(tmp)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TargetStore:
    """One cache folder: its key, its fitted PCA, an index of the rows of every shard, and a write buffer.

    Args:
        root: The cache folder (created if absent).
        key: The build key the caller computes (:func:`multiteach.cache.key.cache_key`), or None to open an
            existing folder as it is. An existing folder with another key is refused, naming the keys that differ.
            The stored precision (``storage.dtype``) and PCA dims (``storage.patch_dims``) come from the key.
        shard_rows: Rows per shard file (a writer flushes when its buffer holds this many).
        max_gb: Stop storing new rows once the shards hold this many GB (targets are still computed).
        rank: The writer's process rank (part of its shard names).
        readonly: Open an existing cache without writing anything (``multiteach cache info``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        key: Mapping[str, Any] | None,
        shard_rows: int = 256,
        max_gb: float | None = None,
        rank: int = 0,
        readonly: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        self.shard_rows, self.max_bytes = int(shard_rows), None if max_gb is None else int(max_gb * 1e9)
        self.readonly = readonly
        self.writer = f"{socket.gethostname()}_{os.getpid()}_{secrets.token_hex(3)}_r{rank}"
        self.key = self._open_key(key)
        storage = self.key["storage"]  # the folder's own settings, whoever opens it
        self.dtype, self.patch_dims = storage["dtype"], storage["patch_dims"]
        self.pca: dict[str, PatchPCA] = self._load_pca()
        self.grids: dict[str, tuple[int, int]] = {}
        self.specs: dict[str, dict[str, Any]] = {}  # teacher -> TeacherSpec fields, as the first writer recorded
        self.damaged: list[tuple[str, str]] = []
        self._shards: list[str] = []
        self._index_keys = np.zeros(0, dtype=f"S{KEY_BYTES}")
        self._index_loc = np.zeros((0, 2), dtype=np.int64)  # (shard, row)
        self._handles: dict[int, Any] = {}
        self._buffer: list[tuple[torch.Tensor, Any, dict[str, dict[str, torch.Tensor]]]] = []
        self._written = 0
        self._full_warned = False
        self.stored_bytes = 0
        if not readonly:
            self._remove_abandoned_temps()
        self.scan()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    # ---- the key and the PCA ------------------------------------------------------------------------

    def _open_key(self, key: Mapping[str, Any] | None) -> dict[str, Any]:
        path = self.root / KEY_FILE
        if not path.is_file():
            if key is None or self.readonly:
                raise MultiteachError(
                    f"{self.root} is not a feature cache (no {KEY_FILE}); fill one by training with cache.dir set or "
                    "with `multiteach cache RECIPE`"
                )
            self.root.mkdir(parents=True, exist_ok=True)
            text = json.dumps(key, sort_keys=True, indent=1) + "\n"
            _exclusive_write(path, lambda tmp: tmp.write_text(text))
        stored = json.loads(path.read_text())
        if stored.get("format") != FORMAT:
            raise MultiteachError(
                f"feature cache {self.root} has format {stored.get('format')}; this version reads format {FORMAT}. "
                "Fill a new folder (set cache.dir to another path)."
            )
        if key is not None and stored != json.loads(json.dumps(key)):
            raise MultiteachError(
                f"feature cache {self.root} was built for other targets, so it is not used: {key_diff(stored, key)}. "
                "Set cache.dir to a new folder for these settings (or delete this one)."
            )
        return stored

    def _load_pca(self) -> dict[str, PatchPCA]:
        path = self.root / PCA_FILE
        if not path.is_file():
            return {}
        with safe_open(str(path), framework="pt") as f:
            names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
            return {
                n: PatchPCA.from_tensors(
                    {"mean": f.get_tensor(f"{n}.mean"), "components": f.get_tensor(f"{n}.components")},
                    explained=float(f.get_tensor(f"{n}.explained")),
                )
                for n in names
            }

    def needs_pca(self) -> bool:
        """Whether patch tokens are reduced (``cache.patch_dims``) and the PCA is not fitted yet."""
        return self.patch_dims is not None and not self.pca

    def fit_pca(self, tokens: Mapping[str, torch.Tensor]) -> None:
        """Fit each teacher's PCA on ``tokens[t]`` (M, D) and publish it, unless another writer published first
        (then that one is loaded: every row of a folder uses one PCA)."""
        fitted = {n: PatchPCA.fit(x.reshape(-1, x.shape[-1]), int(self.patch_dims)) for n, x in tokens.items()}
        tensors = {}
        for n, p in fitted.items():
            parts = p.to_tensors()
            tensors[f"{n}.mean"], tensors[f"{n}.components"] = parts["mean"], parts["components"]
            tensors[f"{n}.explained"] = torch.tensor(float(p.explained))
        won = _exclusive_write(self.root / PCA_FILE, lambda tmp: atomic_save_safetensors(tmp, tensors))
        self.pca = self._load_pca()
        kept = ", ".join(f"{n} {p.explained:.3f}" for n, p in fitted.items() if p.explained is not None)
        log.info(
            "cache: patch-token PCA to %d dims (%s; variance kept: %s)",
            self.patch_dims,
            "fitted" if won else "loaded",
            kept,
        )

    # ---- the index of stored rows --------------------------------------------------------------------

    def _shard_dir(self) -> Path:
        return self.root / SHARDS

    def _remove_abandoned_temps(self) -> None:
        """Temporary shard files of writers that died (same host: process gone; other hosts: over an hour old)."""
        folder = self._shard_dir()
        if not folder.is_dir():
            return
        host = socket.gethostname()
        for entry in os.scandir(folder):
            m = TEMP_RE.match(entry.name)
            if not m:
                continue
            mine = m.group("host") == host
            dead = (mine and not _pid_alive(int(m.group("pid")))) or (
                not mine and time.time() - entry.stat().st_mtime > STALE_TEMP_S
            )
            if dead:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                log.warning(
                    "cache: removed %s, left by a writer that stopped mid-write (its rows are refilled)", entry.name
                )

    def _move_damaged(self, name: str, reason: str) -> None:
        self.damaged.append((name, reason))
        log.warning("cache: shard %s is damaged (%s); skipped, its rows are computed again", name, reason)
        if self.readonly:
            return
        target = self.root / DAMAGED / name
        target.parent.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self._shard_dir() / name, target)

    def scan(self) -> None:
        """Index every whole shard in the folder (new ones from other writers included); damaged ones are moved to
        ``damaged/`` and listed in :attr:`damaged`."""
        folder = self._shard_dir()
        names = sorted(e.name for e in os.scandir(folder) if SHARD_RE.match(e.name)) if folder.is_dir() else []
        keys, locs, shards, total = [], [], [], 0
        for name in names:
            try:
                with safe_open(str(folder / name), framework="np") as f:
                    meta = json.loads((f.metadata() or {})[META_KEY])
                    k = f.get_tensor("keys")
            except Exception as err:  # noqa: BLE001 - a truncated or foreign file must not stop a run
                self._move_damaged(name, f"{type(err).__name__}: {err}")
                continue
            s = len(shards)
            shards.append(name)
            keys.append(_as_strings(k))
            locs.append(np.stack([np.full(len(k), s), np.arange(len(k))], axis=1))
            self.grids.update({t: (int(g[0]), int(g[1])) for t, g in meta["grids"].items()})
            self.specs.update(meta.get("specs", {}))
            total += (folder / name).stat().st_size
        self._shards, self._handles, self.stored_bytes = shards, {}, total
        self._index_keys, self._index_loc = np.zeros(0, dtype=f"S{KEY_BYTES}"), np.zeros((0, 2), np.int64)
        self._index(keys, locs)

    def _index(self, keys: list[np.ndarray], locs: list[np.ndarray]) -> None:
        """Merge rows ``(S16 keys, (shard, row) locations)`` into the sorted index; a key met twice (a row two
        writers both stored) keeps its first location."""
        all_keys = np.concatenate([self._index_keys, *keys])
        all_locs = np.concatenate([self._index_loc, *locs]).astype(np.int64)
        order = np.argsort(all_keys, kind="stable")
        all_keys, all_locs = all_keys[order], all_locs[order]
        first = np.ones(len(all_keys), dtype=bool)
        first[1:] = all_keys[1:] != all_keys[:-1]
        self._index_keys, self._index_loc = all_keys[first], all_locs[first]

    def __len__(self) -> int:
        return len(self._index_keys)

    def lookup(self, keys: torch.Tensor) -> np.ndarray:
        """Where each key is stored.

        Args:
            keys: (M, 16) uint8 row keys.

        Returns:
            (M, 2) int64 ``(shard, row)``; ``(-1, -1)`` for a key not stored.
        """
        want = _as_strings(keys)
        out = np.full((len(want), 2), -1, dtype=np.int64)
        if len(self._index_keys):
            pos = np.minimum(np.searchsorted(self._index_keys, want), len(self._index_keys) - 1)
            hit = self._index_keys[pos] == want
            out[hit] = self._index_loc[pos[hit]]
        return out

    def _handle(self, shard: int) -> Any:
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(str(self._shard_dir() / self._shards[shard]), framework="pt")
        return h

    def read(self, locs: np.ndarray, teachers: Sequence[str]) -> dict[str, TeacherOutput]:
        """The stored targets at ``locs`` (from :meth:`lookup`, all found), decoded to float32.

        Returns:
            Teacher -> TeacherOutput(summary (M, D), patch_tokens (M, N', D) with PCA undone, grid (h', w')).
        """
        by_shard: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for s in np.unique(locs[:, 0]).tolist():
            at = np.flatnonzero(locs[:, 0] == s)
            by_shard[s] = (at, locs[at, 1])
        out: dict[str, TeacherOutput] = {}
        for t in teachers:
            got: dict[str, torch.Tensor | None] = {"summary": None, "patch": None}
            for s, (at, rows) in by_shard.items():
                lo, hi = int(rows.min()), int(rows.max()) + 1  # one slice per shard and part (shards are small)
                pick = torch.from_numpy(rows - lo)
                for what in ("summary", "patch"):
                    slices = load_parts(_Slices(self._handle(s)), f"{t}.{what}", self.dtype)
                    values = decode_tokens({p: sl[lo:hi][pick] for p, sl in slices.items()}, self.dtype)
                    if got[what] is None:
                        got[what] = torch.empty(len(locs), *values.shape[1:])
                    got[what][torch.from_numpy(at)] = values
            summary, patch = got["summary"], got["patch"]
            if t in self.pca:
                patch = self.pca[t].decode(patch)
            out[t] = TeacherOutput(summary, patch, self.grids[t])
        return out

    # ---- adding rows -------------------------------------------------------------------------------------

    def encode(self, outputs: Mapping[str, TeacherOutput]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """Encode teacher outputs for storage and decode them back.

        Returns:
            ``(parts, decoded)``: the stored tensors per ``"{t}.summary"``/``"{t}.patch"`` and the float32
            TeacherOutputs a reader of these rows gets (what training must use, so that a run that computes a
            row and a run that reads it train on the same values).
        """
        parts: dict[str, dict[str, torch.Tensor]] = {}
        decoded: dict[str, TeacherOutput] = {}
        for t, o in outputs.items():
            summary, patch = o.summary.float().cpu(), o.patch_tokens.float().cpu()
            if t in self.pca:
                patch = self.pca[t].encode(patch)
            parts[f"{t}.summary"] = encode_tokens(summary, self.dtype)
            parts[f"{t}.patch"] = encode_tokens(patch, self.dtype)
            back_patch = decode_tokens(parts[f"{t}.patch"], self.dtype)
            if t in self.pca:
                back_patch = self.pca[t].decode(back_patch)
            decoded[t] = TeacherOutput(decode_tokens(parts[f"{t}.summary"], self.dtype), back_patch, tuple(o.grid))
            self.grids[t] = tuple(o.grid)
        return parts, decoded

    def add(self, keys: torch.Tensor, rows: Sequence[Any], parts: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Buffer encoded rows (from :meth:`encode`) for the next shard; flushes when ``shard_rows`` are buffered.

        Args:
            keys: (M, 16) uint8 row keys.
            rows: M JSON-serialisable descriptions (``[provenance, view]``), kept in the shard's metadata.
            parts: :meth:`encode`'s stored tensors for these M rows.
        """
        if self.readonly:
            raise MultiteachError(f"feature cache {self.root} is open read-only")
        self._buffer.append((keys.to(torch.uint8).cpu(), list(rows), {k: dict(v) for k, v in parts.items()}))
        if sum(len(b[0]) for b in self._buffer) >= self.shard_rows:
            self.flush()

    def pending(self) -> int:
        """Rows buffered and not yet written."""
        return sum(len(b[0]) for b in self._buffer)

    def flush(self) -> Path | None:
        """Write the buffered rows as one new shard (atomically); returns its path, or None if nothing was written
        (empty buffer, or the cache reached ``cache.max_gb``)."""
        if not self._buffer:
            return None
        buffer, self._buffer = self._buffer, []
        if self.max_bytes is not None:
            used = self.stored_bytes  # the shards of the last scan plus this writer's own since
            if used >= self.max_bytes:
                if not self._full_warned:
                    log.warning(
                        "cache: %s holds %.2f GB (cache.max_gb = %g): new targets are computed, not stored",
                        self.root,
                        used / 1e9,
                        self.max_bytes / 1e9,
                    )
                    self._full_warned = True
                return None
        tensors = {"keys": torch.cat([b[0] for b in buffer])}
        for name, parts in buffer[0][2].items():
            tensors.update(store_parts(name, {p: torch.cat([b[2][name][p] for b in buffer]) for p in parts}))
        meta = {
            "format": FORMAT,
            "writer": self.writer,
            "grids": {t: list(g) for t, g in self.grids.items()},
            "specs": self.specs,
        }
        rows = [r for b in buffer for r in b[1]]
        path = self._shard_dir() / f"{self.writer}-{self._written:05d}.safetensors"
        self._written += 1
        metadata = {
            META_KEY: json.dumps(meta, separators=(",", ":")),
            ROWS_KEY: json.dumps(rows, separators=(",", ":")),
        }
        atomic_save_safetensors(path, tensors, metadata)
        # index the new rows at once (this writer reads what it wrote without a rescan)
        s = len(self._shards)
        self._shards.append(path.name)
        new_keys = _as_strings(tensors["keys"])
        self._index([new_keys], [np.stack([np.full(len(new_keys), s), np.arange(len(new_keys))], axis=1)])
        self.stored_bytes += path.stat().st_size
        return path

    def shard_names(self) -> list[str]:
        """The whole shards indexed (file names under ``shards/``)."""
        return list(self._shards)


class _Slices:
    """A shard's tensors as lazy slices, by name (what :func:`load_parts` looks up)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.names = handle, set(handle.keys())

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> Any:
        return self.handle.get_slice(name)
