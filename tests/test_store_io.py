"""store_io: a store's keys as bytes, the same on a local disk (system calls) as through
zarr's store API (any other store; S3 in test_object_store.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr.storage

from pskd_store import store_io


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path: Path) -> zarr.abc.store.Store:
    return zarr.storage.LocalStore(tmp_path) if request.param == "local" else zarr.storage.MemoryStore()


def test_put_get_and_delete(store):
    assert store_io.get(store, "a/b") is None
    store_io.put(store, "a/b", b"one")
    store_io.put(store, "a/b", b"two")  # replaced
    assert store_io.get(store, "a/b") == b"two"
    assert store_io.get_many(store, ["a/b", "a/missing", "a"]) == [b"two", None, None]
    store_io.delete(store, "a/b")
    store_io.delete(store, "a/b")  # not there: nothing to do
    assert store_io.get(store, "a/b") is None


def test_put_if_absent_keeps_what_is_there(store):
    store_io.put_if_absent(store, "owners/w.0", b"first")
    store_io.put_if_absent(store, "owners/w.0", b"second")
    assert store_io.get(store, "owners/w.0") == b"first"


def test_listing_and_deleting_a_prefix(store):
    for key in ("x/zarr.json", "x/c/0", "x/c/1", "y/zarr.json", "zarr.json"):
        store_io.put(store, key, key.encode())
    assert sorted(store_io.list_dir(store, "x")) == ["c", "zarr.json"]
    assert store_io.list_dir(store, "nothing") == []
    assert sorted(store_io.list_prefix(store, "x/")) == ["x/c/0", "x/c/1", "x/zarr.json"]
    assert sorted(store_io.list_prefix(store, "")) == ["x/c/0", "x/c/1", "x/zarr.json", "y/zarr.json", "zarr.json"]
    store_io.delete_dir(store, "x")
    store_io.delete_dir(store, "x")  # gone: nothing to do
    assert sorted(store_io.list_prefix(store, "")) == ["y/zarr.json", "zarr.json"]
    with pytest.raises(ValueError, match="not the whole of it"):
        store_io.delete_dir(store, "")


def test_the_size_under_a_prefix_is_zarrs_nbytes_stored(store):
    array = zarr.create_array(store, name="teacher/epoch_0001", shape=(100, 3), chunks=(30, 3), dtype="float32")
    array[:70] = 1.5  # chunks 0-2 written, chunk 3 never
    assert store_io.size_prefix(store, "teacher/epoch_0001") == array.nbytes_stored() > 0
