"""array_files: the store's per-epoch arrays, made and written without zarr's per-call
machinery, must be exactly what zarr makes and writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.codecs
import zarr.storage

from pskd_store.array_files import (
    ARRAY_CONFIG,
    CHUNK_KEYS,
    ChunkFiles,
    codecs_with_checksum,
    create_array,
    create_group,
    delete_node,
    group_attributes,
    open_array,
    require_groups,
    set_group_attributes,
)

BLOSC = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
KINDS = [  # (shape, chunks, dtype, compressor): every kind the writers and the seal make
    ((1000,), (384,), np.int64, None),
    ((1000, 7), (384, 7), np.float16, None),
    ((1000, 7), (384, 7), np.float16, BLOSC),
    ((1000,), (1000,), np.float16, BLOSC),
    ((1000,), (1000,), np.int32, zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")),
    ((1000,), (1000,), np.bool_, BLOSC),
]


def _root(path: Path) -> zarr.Group:
    return zarr.open_group(zarr.storage.LocalStore(path), mode="a")


def _values(shape: tuple[int, ...], dtype: type, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype is np.bool_:
        return rng.random(shape) < 0.3
    return (rng.random(shape) * 50).astype(dtype)


@pytest.mark.parametrize("shape, chunks, dtype, compressor", KINDS)
def test_arrays_and_their_chunks_are_byte_for_byte_what_zarr_makes(tmp_path, shape, chunks, dtype, compressor):
    root = _root(tmp_path)
    values = _values(shape, dtype, seed=len(shape) + chunks[0])
    theirs = root.create_array("zarr_made", shape=shape, chunks=chunks, dtype=dtype,
                               compressors=codecs_with_checksum(compressor), chunk_key_encoding=CHUNK_KEYS,
                               config=ARRAY_CONFIG)
    theirs[:] = values
    for name in ("first", "second"):  # the first of a kind goes through zarr, the next one does not
        ours = create_array(root, name, shape=shape, dtype=dtype, chunks=chunks, compressor=compressor)
        files = ChunkFiles(ours)
        for chunk, lo in enumerate(range(0, shape[0], chunks[0])):
            files.write(chunk, values[lo:lo + chunks[0]])  # the last chunk is a partial one
        assert (tmp_path / name / "zarr.json").read_bytes() == (tmp_path / "zarr_made" / "zarr.json").read_bytes()
        made = sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*"))
        assert len(made) == 1 + -(-shape[0] // chunks[0])  # its document and its chunks, no directory per chunk
        assert made == sorted(p.relative_to(tmp_path / "zarr_made")
                              for p in (tmp_path / "zarr_made").rglob("*") if p.is_file())
        for file in made:
            assert (tmp_path / name / file).read_bytes() == (tmp_path / "zarr_made" / file).read_bytes(), file
        np.testing.assert_array_equal(zarr.open_array(zarr.storage.LocalStore(tmp_path), path=name)[:], values)


def test_a_group_is_what_zarr_makes_with_its_attributes(tmp_path):
    root = _root(tmp_path)
    attributes = {"owner": {"pid": 7, "host": "h"}, "closed": False}
    root.create_group("zarr_made", attributes=attributes)
    group = create_group(root, "ours", attributes=attributes)
    assert (tmp_path / "ours" / "zarr.json").read_bytes() == (tmp_path / "zarr_made" / "zarr.json").read_bytes()
    assert group.attrs.asdict() == attributes
    assert dict(zarr.open_group(zarr.storage.LocalStore(tmp_path), path="ours", mode="r").attrs) == attributes


def test_what_is_at_the_path_is_replaced_and_a_missing_parent_is_made(tmp_path):
    root = _root(tmp_path)
    kind = {"shape": (10, 3), "dtype": np.float16, "chunks": (4, 3), "compressor": BLOSC}
    old = create_array(root, "a", **kind)
    ChunkFiles(old).write(2, np.ones((2, 3)))
    stale = tmp_path / "a" / "c.2.0"
    assert stale.exists()
    create_array(root, "a", **kind)  # the kind is known: only an empty path would take the short way
    assert not stale.exists()  # replaced as zarr's overwrite does: no chunk of the old array survives
    group = create_group(root, "g", attributes={"x": 1})
    create_array(group, "child", **kind)
    create_group(root, "g", attributes={"x": 2})
    assert dict(_root(tmp_path)["g"].attrs) == {"x": 2}
    assert not (tmp_path / "g" / "child").exists()  # a group made again holds nothing of the old one

    create_array(root, "p/q/b", **kind)  # no group at p/q: zarr makes the parents
    opened = _root(tmp_path)["p/q/b"]
    assert opened.shape == (10, 3) and isinstance(_root(tmp_path)["p/q"], zarr.Group)


def test_chunk_files_refuse_an_array_of_other_codecs(tmp_path):
    root = _root(tmp_path)
    others = [
        root.create_array("plain", shape=(4,), dtype=np.int64, chunks=(4,), compressors=None),
        root.create_array("big_endian", shape=(4,), dtype=np.int64, chunks=(4,),
                          serializer=zarr.codecs.BytesCodec(endian="big"), compressors=codecs_with_checksum(None)),
        root.create_array("gzip", shape=(4,), dtype=np.int64, chunks=(4,),
                          compressors=(zarr.codecs.GzipCodec(), zarr.codecs.Crc32cCodec())),
    ]
    for array in others:
        with pytest.raises(ValueError, match="not an array of this store"):
            ChunkFiles(array)


@pytest.mark.parametrize("shape, chunks, dtype, compressor", KINDS)
def test_chunks_read_back_as_zarr_reads_them(tmp_path, shape, chunks, dtype, compressor):
    values = _values(shape, dtype, seed=chunks[0])
    array = _root(tmp_path).create_array("a", shape=shape, chunks=chunks, dtype=dtype,
                                         compressors=codecs_with_checksum(compressor), config=ARRAY_CONFIG)
    array[:] = values
    files = ChunkFiles(array)
    for start, stop in ((0, shape[0]), (5, 17), (chunks[0] - 3, chunks[0] + 3), (shape[0] - 1, shape[0]), (9, 9)):
        stop = min(stop, shape[0])  # across a chunk's end where there is one
        rows = files.read_rows(start, stop)
        assert rows.dtype == np.dtype(dtype) and rows.flags.writeable
        np.testing.assert_array_equal(rows, values[start:stop])
    np.testing.assert_array_equal(files.read(0)[:min(chunks[0], shape[0])], values[:chunks[0]])


def test_a_chunk_read_back_is_checked_against_its_checksum(tmp_path):
    array = _root(tmp_path).create_array("a", shape=(8,), chunks=(4,), dtype=np.int64,
                                         compressors=codecs_with_checksum(BLOSC), config=ARRAY_CONFIG)
    array[:] = np.arange(8)
    chunk = tmp_path / "a" / "c" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    files = ChunkFiles(array)
    np.testing.assert_array_equal(files.read_rows(0, 4), np.arange(4))  # the other chunk
    with pytest.raises(ValueError, match="a/c/1 does not match its checksum"):
        files.read_rows(2, 6)
    chunk.unlink()
    with pytest.raises(KeyError, match="a/c/1"):
        files.read(1)


def _store(kind: str, tmp_path: Path) -> zarr.abc.store.Store:
    """A local store (its files written by the module itself) or one that is not (written
    through zarr's store API, as an object store is)."""
    return zarr.storage.LocalStore(tmp_path) if kind == "local" else zarr.storage.MemoryStore()


@pytest.mark.parametrize("kind", ["local", "memory"])
@pytest.mark.parametrize("member", [True, False], ids=["a member group", "the root group"])
def test_group_attributes_are_replaced_and_its_children_stay(tmp_path, kind, member):
    store = _store(kind, tmp_path)
    root = zarr.open_group(store, mode="w", attributes={"before": 1})
    group = root.create_group("g", attributes={"before": 1}) if member else root
    create_array(group, "child", shape=(4,), dtype=np.int64, chunks=(4,), compressor=None)[:] = np.arange(4)
    returned = set_group_attributes(group, {"after": [2, 3]})
    assert returned.attrs.asdict() == {"after": [2, 3]}
    reread = zarr.open_group(store, mode="r", path="g" if member else "")
    assert reread.attrs.asdict() == {"after": [2, 3]}  # the document at the group's own path
    np.testing.assert_array_equal(reread["child"][:], np.arange(4))
    if kind == "local":
        documents = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("zarr.json"))
        assert documents == (["g/child/zarr.json", "g/zarr.json", "zarr.json"] if member
                             else ["child/zarr.json", "zarr.json"])


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_delete_node_removes_one_member_whole_and_nothing_else(tmp_path, kind):
    store = _store(kind, tmp_path)
    root = zarr.open_group(store, mode="w")
    group = create_group(root, "g")
    for name in ("a", "b"):
        create_array(group, name, shape=(4,), dtype=np.int64, chunks=(2,), compressor=None)[:] = np.arange(4)
    delete_node(group, "a")
    delete_node(group, "a")  # nothing there: nothing to do
    assert sorted(zarr.open_group(store, mode="r", path="g").array_keys()) == ["b"]
    np.testing.assert_array_equal(zarr.open_group(store, mode="r")["g/b"][:], np.arange(4))
    with pytest.raises(ValueError, match="not the group itself"):
        delete_node(group, "")


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_require_groups_makes_the_missing_levels_and_leaves_the_others(tmp_path, kind):
    store = _store(kind, tmp_path)
    root = zarr.open_group(store, mode="w")
    root.create_group("a", attributes={"kept": 1})
    require_groups(root, "a/b/c")
    require_groups(root, "a/b/c")  # all there: nothing to do
    require_groups(root, "x/y")
    reread = zarr.open_group(store, mode="r")
    assert sorted(reread.group_keys()) == ["a", "x"] and list(reread["x"].group_keys()) == ["y"]
    assert reread["a"].attrs.asdict() == {"kept": 1}
    assert isinstance(reread["a/b/c"], zarr.Group) and reread["a/b"].attrs.asdict() == {}
    if kind == "local":
        made_by_zarr = (tmp_path / "zarr.json").read_bytes()  # the root, an empty group too
        assert (tmp_path / "a" / "b" / "zarr.json").read_bytes() == made_by_zarr


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_open_array_reads_what_zarr_opens_and_refuses_what_is_no_array(tmp_path, kind):
    store = _store(kind, tmp_path)
    root = zarr.open_group(store, mode="w")
    made = create_array(create_group(root, "g"), "x", shape=(6, 2), dtype=np.float16, chunks=(4, 2), compressor=BLOSC)
    made[:] = np.arange(12).reshape(6, 2)
    opened = open_array(root, "g/x")
    assert opened.metadata == root["g/x"].metadata and opened.path == "g/x"
    np.testing.assert_array_equal(opened[:], np.arange(12).reshape(6, 2))
    with pytest.raises(KeyError, match="g/missing"):
        open_array(root, "g/missing")
    with pytest.raises(ValueError, match="g is not an array"):
        open_array(root, "g")


def test_open_array_parses_a_document_once_and_each_array_keeps_its_own_path_and_shape(tmp_path):
    """Arrays of one kind share a document: its parsed metadata is reused, never what
    another document said, nor another array's path."""
    root = _root(tmp_path)
    for name, values in (("a", np.arange(6)), ("b", np.arange(6) * 2)):
        create_array(root, name, shape=(6,), dtype=np.int64, chunks=(6,), compressor=None)[:] = values
    a, b = open_array(root, "a"), open_array(root, "b")
    assert a.metadata is b.metadata and (a.path, b.path) == ("a", "b")
    np.testing.assert_array_equal(b[:], np.arange(6) * 2)
    create_array(root, "a", shape=(4, 3), dtype=np.float16, chunks=(4, 3), compressor=BLOSC)[:] = 1
    reopened = open_array(root, "a")
    assert reopened.shape == (4, 3) and reopened.metadata == root["a"].metadata
    np.testing.assert_array_equal(reopened[:], np.ones((4, 3)))


def test_require_groups_on_an_object_store_accepts_a_group_another_process_just_made(monkeypatch):
    root = zarr.open_group(zarr.storage.MemoryStore(), mode="w")

    def made_meanwhile(group, path):
        raise zarr.errors.ContainsGroupError(path)

    monkeypatch.setattr(zarr.Group, "require_group", made_meanwhile)
    require_groups(root, "a/b")  # what zarr raises when its check and its write straddle another process's


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_group_attributes_are_read_from_a_group_document_only(tmp_path, kind):
    store = _store(kind, tmp_path)
    root = zarr.open_group(store, mode="w", attributes={"r": 1})
    create_array(create_group(root, "g", attributes={"a": [1, 2]}), "x", shape=(4,), dtype=np.int64, chunks=(4,),
                 compressor=None)
    assert group_attributes(store, "") == {"r": 1} and group_attributes(store, "g") == {"a": [1, 2]}
    assert group_attributes(store, "g/x") is None  # an array's document
    assert group_attributes(store, "missing") is None
    if kind == "local":
        (tmp_path / "g" / "zarr.json").write_text("{not json")
        with pytest.raises(ValueError):
            group_attributes(store, "g")

