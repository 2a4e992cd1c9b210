"""The arrays and groups the store makes every epoch, made and written as zarr does, in fewer steps.

Each epoch every writer makes its staging arrays and the seal makes the teacher and the
trajectory arrays: the same few kinds of array, each time under a new path. zarr's
``create_array`` validates and resolves the same specification every time, and its
``__setitem__`` runs the codec pipeline for every slice: a millisecond or more of Python
each, which on a small epoch is most of the store's cost per epoch, and on the writer's
background thread takes the interpreter from the training steps. So zarr makes the first
array of each kind in a process; later ones reuse its metadata document, written with one
store call, and whole chunks are encoded by the array's own codecs (Blosc through
numcodecs, as zarr calls it, then crc32c) and written with one system call on a local
disk. What lands in the store is what zarr writes, and the seal reads every chunk back
through its checksum before it publishes an epoch.
"""

from __future__ import annotations

import functools
import json
import os

import google_crc32c
import numcodecs
import numpy as np
import zarr
import zarr.codecs
import zarr.storage
from zarr.buffer import default_buffer_prototype
from zarr.core.array import parse_array_metadata
from zarr.core.metadata import ArrayMetadata
from zarr.storage import StorePath

from . import store_io
from .local_store import local_root
from .zarr_sync import sync

ARRAY_CONFIG = {"write_empty_chunks": True}  # every chunk exists: a missing one is damage (integrity.py)
# chunk keys ``c.3.0`` beside the array's document, where zarr's default ``c/3/0`` makes a
# directory per chunk row: making a directory costs as much as writing a small chunk (and
# on some disks, network file systems above all, far more), and an ImageNet epoch has
# thousands of chunks. Arrays written with either are read alike (the key is in the metadata).
CHUNK_KEYS = {"name": "default", "separator": "."}


def checksum_matches(stored: bytes) -> bool:
    """Whether a stored chunk ends with the crc32c of the bytes before it (zarr's crc32c
    codec: four bytes, little-endian)."""
    return len(stored) >= 4 and google_crc32c.value(
        np.frombuffer(stored, dtype=np.uint8)[:-4]) == int.from_bytes(stored[-4:], "little")


def codecs_with_checksum(compressor: zarr.codecs.BloscCodec | None) -> tuple:
    """The bytes-to-bytes codecs of every array: the compressor, then a crc32c checksum."""
    return (compressor, zarr.codecs.Crc32cCodec()) if compressor is not None else (zarr.codecs.Crc32cCodec(),)


_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
            "bitshuffle": numcodecs.Blosc.BITSHUFFLE}
_MADE: dict[tuple, tuple] = {}  # (shape, dtype, chunks, compressor) -> (metadata, its document) zarr made


def create_array(group: zarr.Group, name: str, *, shape: tuple[int, ...], dtype: np.dtype,
                 chunks: tuple[int, ...], compressor: zarr.codecs.BloscCodec | None) -> zarr.Array:
    """``group.create_array(name, ..., overwrite=True)`` with the store's codecs (the
    compressor, if any, then crc32c), chunk keys (``CHUNK_KEYS``) and every chunk written
    (``ARRAY_CONFIG``). zarr makes it when it is the first of its kind here, or when
    something is at its path or its parent group is missing (zarr replaces the one and
    writes the other)."""
    codec = None if compressor is None else json.dumps(compressor.to_dict())
    kind = (tuple(shape), np.dtype(dtype).str, tuple(chunks), codec)
    made = _MADE.get(kind)
    path = f"{group.path}/{name}" if group.path else name
    parent = path.rpartition("/")[0]
    if made is None or not _free(group.store, path, parent):
        array = group.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                                   compressors=codecs_with_checksum(compressor), chunk_key_encoding=CHUNK_KEYS,
                                   config=ARRAY_CONFIG, overwrite=True)
        _MADE[kind] = (array.metadata, array.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"])
        return array
    metadata, document = made
    store_io.put(group.store, _document_key(path), document.to_bytes())
    return zarr.Array(zarr.AsyncArray(metadata, StorePath(group.store, path), config=ARRAY_CONFIG))


def create_group(group: zarr.Group, name: str, *, attributes: dict | None = None) -> zarr.Group:
    """``group.create_group(name, overwrite=True, attributes=attributes)``: one store write
    when nothing is at its path and its parent group exists; zarr's otherwise."""
    path = f"{group.path}/{name}" if group.path else name
    if not _free(group.store, path, path.rpartition("/")[0]):
        return group.create_group(name, overwrite=True, attributes=attributes)
    return _write_group(group.store, path, attributes or {})


def open_array(group: zarr.Group, path: str) -> zarr.Array:
    """``group[path]`` for an array: its document read with one store call and parsed by
    zarr (once per distinct document: every epoch's arrays of a kind share theirs).
    KeyError when there is none, ValueError when it is no array's."""
    full = f"{group.path}/{path}" if group.path else path
    document = store_io.get(group.store, _document_key(full))
    if document is None:
        raise KeyError(full)
    metadata = _parsed_array_document(document)
    if metadata is None:
        node_type = json.loads(document).get("node_type")
        raise ValueError(f"{full} is not an array (its node type is {node_type!r})")
    return zarr.Array(zarr.AsyncArray(metadata, StorePath(group.store, full)))


@functools.lru_cache(maxsize=64)
def _parsed_array_document(document: bytes) -> ArrayMetadata | None:
    """zarr's metadata of an array document, None for another node's. Cached by the bytes
    (the metadata is immutable): parsing costs ~0.1 ms warm and several times that after a
    training step, four times an epoch."""
    metadata = json.loads(document)
    return parse_array_metadata(metadata) if metadata.get("node_type") == "array" else None


def group_attributes(store: zarr.abc.store.Store, path: str) -> dict | None:
    """The attributes of the group at ``path`` ("" is the root), read with one store call;
    None when there is no group document there. ValueError when it is not JSON."""
    document = store_io.get(store, _document_key(path))
    if document is None:
        return None
    metadata = json.loads(document)
    if not isinstance(metadata, dict) or metadata.get("node_type") != "group":
        return None
    attributes = metadata.get("attributes", {})
    return attributes if isinstance(attributes, dict) else None


def require_groups(group: zarr.Group, path: str) -> None:
    """``group.require_group(path)``: every group along ``path`` exists afterwards, also
    when another process makes it at the same moment. On a local disk a missing group is
    one document written (two processes write the same bytes, atomically); zarr's otherwise."""
    full = f"{group.path}/{path}" if group.path else path
    root = local_root(group.store)
    if root is None:
        try:
            group.require_group(path)
        except zarr.errors.ContainsGroupError:  # made by another process between zarr's check and its write
            pass
        return
    levels = full.split("/")
    for depth in range(1, len(levels) + 1):
        level = "/".join(levels[:depth])
        if not (root / _document_key(level)).is_file():
            _put_group_document(group.store, level, {})


def set_group_attributes(group: zarr.Group, attributes: dict, *, compact: bool = False) -> zarr.Group:
    """Replace the attributes of ``group`` (its children stay): one store write, where
    ``group.attrs.update`` reads the document and writes it back. For a group that one
    writer owns, so that nothing else writes it in between. ``compact`` writes the document
    without zarr's indentation: json encodes indented documents in Python, compact ones in
    C, five times faster (3.2 against 0.6 ms for a root listing 300 epochs): for a document
    rewritten often that grows, as the store's root."""
    return _write_group(group.store, group.path, attributes, compact=compact)


def delete_node(group: zarr.Group, name: str) -> None:
    """``del group[name]`` when something is there; nothing when not."""
    if not name:
        raise ValueError("delete_node deletes a member of a group, not the group itself")
    store_io.delete_dir(group.store, f"{group.path}/{name}" if group.path else name)


def _write_group(store: zarr.abc.store.Store, path: str, attributes: dict, compact: bool = False) -> zarr.Group:
    document = _put_group_document(store, path, attributes, compact)
    return zarr.Group(zarr.AsyncGroup.from_dict(StorePath(store, path), document))


def _put_group_document(store: zarr.abc.store.Store, path: str, attributes: dict, compact: bool = False) -> dict:
    """Write the group document zarr's GroupMetadata writes, byte for byte (unless
    ``compact``), without its deep copy of the attributes (a store's root holds every sealed
    epoch's statistics)."""
    document = {"attributes": attributes, "zarr_format": 3, "node_type": "group"}
    indent = None if compact else zarr.config.get("json_indent")
    store_io.put(store, _document_key(path), json.dumps(document, indent=indent, allow_nan=True).encode())
    return document


def _document_key(path: str) -> str:
    """The key of the metadata document of the node at ``path`` ("" is the root group)."""
    return f"{path}/zarr.json" if path else "zarr.json"


def _free(store: zarr.abc.store.Store, path: str, parent: str) -> bool:
    """Nothing at ``path`` and a group document at ``parent``."""
    root = local_root(store)
    if root is not None:
        return not (root / path).exists() and (not parent or (root / _document_key(parent)).is_file())

    async def free() -> bool:
        return await store.is_empty(f"{path}/") and (not parent or await store.exists(f"{parent}/zarr.json"))

    return sync(free())


def codecs_problem(array: zarr.Array) -> str | None:
    """What is wrong with ``array``'s codecs for an array of this store, None when nothing:
    the store writes little-endian bytes, Blosc-compressed or not, then a crc32c checksum.
    Any other chain (another byte order, a transpose) would decode the same stored bytes,
    checksums and all, into other values."""
    described = []
    for codec in array.metadata.codecs:
        spec = codec.to_dict()
        endian = spec.get("configuration", {}).get("endian") if spec["name"] == "bytes" else None
        described.append(f"bytes ({endian}-endian)" if endian not in (None, "little") else spec["name"])
    if described in (["bytes", "crc32c"], ["bytes", "blosc", "crc32c"]):
        return None  # a one-byte dtype's bytes codec names no byte order
    return f"its codecs are {' -> '.join(described)}, expected bytes (little-endian) -> blosc (or none) -> crc32c"


class ChunkFiles:
    """Writes and reads whole chunks (along the first axis) of one array as zarr stores
    them: the chunk's bytes (zero rows after the values when they do not fill it),
    Blosc-compressed when the array is, then the crc32c of those bytes, little-endian. The
    array's constants are looked up once, not per chunk. Refuses any other array."""

    def __init__(self, array: zarr.Array):
        problem = codecs_problem(array)
        if problem:
            raise ValueError(f"{array.path} is not an array of this store: {problem}")
        codecs = array.metadata.codecs
        self._blosc = None
        if len(codecs) == 3:
            config = codecs[1].to_dict()["configuration"]
            self._blosc = numcodecs.Blosc(cname=config["cname"], clevel=config["clevel"],
                                          shuffle=_SHUFFLE[config["shuffle"]], blocksize=config["blocksize"],
                                          typesize=config["typesize"])
        self._store = array.store
        self._shape = (array.chunks[0], *array.shape[1:])
        self._dtype = np.dtype(array.dtype)
        self._prefix = f"{array.path}/"
        self._encode_key = array.metadata.encode_chunk_key
        self._root = local_root(self._store)

    def write(self, chunk: int, values: np.ndarray) -> None:
        if len(values) < self._shape[0]:
            padded = np.zeros(self._shape, dtype=self._dtype)
            padded[:len(values)] = values
            values = padded
        data = np.ascontiguousarray(values, dtype=self._dtype).reshape(-1).view(np.uint8)
        if self._blosc is not None:
            data = np.frombuffer(self._blosc.encode(data), dtype=np.uint8)
        checksum = google_crc32c.value(data).to_bytes(4, "little")
        key = self._key(chunk)
        if self._root is None:
            store_io.put(self._store, key, data.tobytes() + checksum)
            return
        path = self._root / key  # a local disk: one system call for the bytes
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:  # the array's first chunk
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = os.writev(fd, [data, checksum])
            if written < len(data) + len(checksum):  # a short write (a disk filling up): the rest, or its error
                rest = memoryview(data.tobytes() + checksum)[written:]
                while rest:
                    rest = rest[os.write(fd, rest):]
        finally:
            os.close(fd)

    def read(self, chunk: int) -> np.ndarray:
        """Chunk ``chunk`` whole (its padding too), read-only: KeyError when it is missing,
        ValueError when its bytes do not match their checksum."""
        key = self._key(chunk)
        return self._checked(key, store_io.get(self._store, key))

    def decode(self, stored: bytes) -> np.ndarray:
        """A chunk whole from its stored bytes (their checksum checked by the caller), read-only."""
        body = np.frombuffer(stored, dtype=np.uint8)[:-4]
        if self._blosc is not None:
            body = self._blosc.decode(body)
        return np.frombuffer(body, dtype=self._dtype).reshape(self._shape)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new array (what ``array[start:stop]`` returns, without
        zarr's machinery around each chunk; an object store's chunks fetched together). Where
        zarr reads a missing chunk as its fill value, KeyError; ValueError for a chunk whose
        bytes do not match their checksum."""
        rows = self._shape[0]
        out = np.empty((max(0, stop - start), *self._shape[1:]), dtype=self._dtype)
        chunks = range(start // rows, -(-stop // rows)) if stop > start else range(0)
        keys = [self._key(chunk) for chunk in chunks]
        for chunk, key, data in zip(chunks, keys, store_io.get_many(self._store, keys)):
            lo, hi = max(start, chunk * rows), min(stop, (chunk + 1) * rows)
            out[lo - start:hi - start] = self._checked(key, data)[lo - chunk * rows:hi - chunk * rows]
        return out

    def _checked(self, key: str, data: bytes | None) -> np.ndarray:
        """The chunk stored at ``key`` as ``data``: KeyError when it is missing, ValueError
        when its bytes do not match their checksum."""
        if data is None:
            raise KeyError(key)
        if not checksum_matches(data):
            raise ValueError(f"{key} does not match its checksum")
        return self.decode(data)

    def _key(self, chunk: int) -> str:
        return self._prefix + self._encode_key((chunk,) + (0,) * (len(self._shape) - 1))
