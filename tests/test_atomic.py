"""Atomic writes: success replaces the file, a failure leaves the old one intact and no temp file behind."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from multiteach.atomic import (
    atomic_path,
    atomic_save_safetensors,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def _umask_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def test_success_replaces_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "f.txt"
    assert atomic_write_text(path, "one\n") == path and path.read_text() == "one\n"
    atomic_write_text(path, "two\r\n")
    assert path.read_bytes() == b"two\r\n"  # written as given
    assert os.listdir(path.parent) == ["f.txt"]
    assert path.stat().st_mode & 0o777 == _umask_mode()  # not mkstemp's owner-only 0600
    atomic_write_bytes(path, b"\x00\x01", mode=0o600)
    assert path.read_bytes() == b"\x00\x01" and path.stat().st_mode & 0o777 == 0o600


def test_json_and_safetensors(tmp_path):
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "c.json").read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=2)
    atomic_write_json(tmp_path / "d.json", {"b": 1, "a": 2}, indent=None, sort_keys=True)
    assert (tmp_path / "d.json").read_text() == '{"a": 2, "b": 1}'
    x = torch.arange(6.0).reshape(2, 3).t()  # not contiguous
    atomic_save_safetensors(tmp_path / "w.safetensors", {"x": x}, metadata={"format": "pt"})
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["x"], x)
    assert sorted(os.listdir(tmp_path)) == ["c.json", "d.json", "w.safetensors"]


@pytest.mark.parametrize("how", ["writer", "context", "replace"])
def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, how):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        if how == "writer":
            atomic_write(path, half_then_fail)
        elif how == "context":
            with atomic_path(path) as tmp:
                half_then_fail(tmp)
        else:

            def fail(src, dst):
                raise OSError("disk full")

            monkeypatch.setattr(os, "replace", fail)
            atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_failure_without_old_file_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "f.bin") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".f.bin.") and tmp.name.endswith(".tmp")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_bulk_writes_skip_fsync_but_stay_atomic(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    path = tmp_path / "tile.png"
    with atomic_path(path, fsync=False) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and synced == [] and os.listdir(tmp_path) == ["tile.png"]
    with pytest.raises(RuntimeError), atomic_path(path, fsync=False) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["tile.png"]  # the old file survives
    atomic_write_text(path, "synced")
    assert len(synced) == 2  # the default still flushes the file and its folder
