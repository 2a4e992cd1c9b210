"""local_store: zarr's LocalStore with its small operations done on the event loop's own
thread must store exactly what zarr's LocalStore stores, as atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage
from zarr.buffer import default_buffer_prototype

from pskd_store.local_store import INLINE_BYTES, LocalStore, local_root, read_file, write_atomically
from pskd_store.zarr_sync import sync


def _buffer(data: bytes):
    return default_buffer_prototype().buffer.from_bytes(data)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_hierarchy_written_through_it_is_what_zarr_s_local_store_writes(tmp_path):
    values = np.arange(20_000, dtype=np.float32).reshape(5000, 4)  # chunks above and below INLINE_BYTES
    for name, store in (("zarr", zarr.storage.LocalStore(tmp_path / "zarr")), ("ours", LocalStore(tmp_path / "ours"))):
        root = zarr.open_group(store, mode="w", attributes={"a": 1})
        root.create_group("g", attributes={"b": [1, 2]})
        array = root.create_array("g/x", shape=values.shape, chunks=(8192, 4), dtype=values.dtype, compressors=None)
        array[:] = values
        root.attrs["a"] = 2
    assert _files(tmp_path / "ours") == _files(tmp_path / "zarr")
    assert max(len(b) for b in _files(tmp_path / "ours").values()) > INLINE_BYTES  # both paths were taken
    reread = zarr.open_group(LocalStore(tmp_path / "zarr"), mode="r")
    np.testing.assert_array_equal(reread["g/x"][:], values)
    assert reread.attrs["a"] == 2


@pytest.mark.parametrize("size", [10, INLINE_BYTES + 1])
def test_set_if_not_exists_keeps_the_first_value_and_set_replaces_it(tmp_path, size):
    store = LocalStore(tmp_path)
    first, second = b"1" * size, b"2" * size
    sync(store.set_if_not_exists("owners/claim.0", _buffer(first)))
    sync(store.set_if_not_exists("owners/claim.0", _buffer(second)))  # refused: the first claim stays
    assert (tmp_path / "owners" / "claim.0").read_bytes() == first
    sync(store.set("owners/claim.0", _buffer(second)))
    assert (tmp_path / "owners" / "claim.0").read_bytes() == second
    assert [p.name for p in (tmp_path / "owners").iterdir()] == ["claim.0"]  # no temporary file left


def test_get_exists_and_delete_of_small_keys(tmp_path):
    store = LocalStore(tmp_path)
    assert sync(store.get("a/zarr.json")) is None and not sync(store.exists("a/zarr.json"))
    sync(store.set("a/zarr.json", _buffer(b"{}")))
    assert sync(store.get("a/zarr.json")).to_bytes() == b"{}" and sync(store.exists("a/zarr.json"))
    assert not sync(store.exists("a"))  # a directory is no key
    sync(store.delete("a/zarr.json"))
    sync(store.delete("a/zarr.json"))  # a missing key: nothing to do, as zarr's
    assert not (tmp_path / "a" / "zarr.json").exists()
    sync(store.set("a/b/c", _buffer(b"x")))
    sync(store.delete("a"))  # a directory: all of it, as zarr's
    assert not (tmp_path / "a").exists()


def test_a_read_only_store_refuses_writes(tmp_path):
    LocalStore(tmp_path).root.mkdir(exist_ok=True)
    store = LocalStore(tmp_path, read_only=True)
    with pytest.raises(ValueError, match="read-only"):
        sync(store.set("zarr.json", _buffer(b"{}")))
    with pytest.raises(ValueError, match="read-only"):
        sync(store.delete("zarr.json"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "zarr.json"
    write_atomically(path, b"old")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["zarr.json"]


def test_local_root_and_read_file(tmp_path):
    assert local_root(LocalStore(tmp_path)) == tmp_path
    assert local_root(zarr.storage.LocalStore(tmp_path)) == tmp_path
    assert local_root(zarr.storage.MemoryStore()) is None
    assert read_file(tmp_path / "missing") is None and read_file(tmp_path) is None
