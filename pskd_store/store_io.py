"""A store's keys as bytes, for what the store writes besides array chunks: metadata
documents, claims, read-backs, deletions.

Every call through zarr's asynchronous store API is a round trip through its event loop
(and, for zarr's LocalStore, a worker thread): 60-300 us on a small CPU, a few dozen times
an epoch, which made most of a small epoch's fixed cost. On a local disk these functions
are a system call or two; any other store (S3, any fsspec URL) goes through zarr's API.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from zarr.abc.store import Store
from zarr.buffer import default_buffer_prototype

from .local_store import local_root, read_file, write_atomically
from .zarr_sync import sync


def get(store: Store, key: str) -> bytes | None:
    """The bytes at ``key``, or None when there are none."""
    return get_many(store, [key])[0]


def get_many(store: Store, keys: list[str]) -> list[bytes | None]:
    """The bytes of each key (None where missing); an object store's fetched in parallel."""
    root = local_root(store)
    if root is not None:
        return [read_file(root / key) for key in keys]

    async def fetch() -> list[bytes | None]:
        buffers = await asyncio.gather(*(store.get(key, prototype=default_buffer_prototype()) for key in keys))
        return [None if buffer is None else buffer.to_bytes() for buffer in buffers]

    return sync(fetch())


def put(store: Store, key: str, data: bytes) -> None:
    """Write ``key`` whole: a reader sees the old bytes or the new ones."""
    root = local_root(store)
    if root is not None:
        write_atomically(root / key, data)
    else:
        sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def put_if_absent(store: Store, key: str, data: bytes) -> None:
    """Write ``key`` unless it exists: atomically on a local disk (a hard link) and on S3
    (a conditional PUT); elsewhere zarr's check-then-write (staging.py says what a claim
    can rely on)."""
    root = local_root(store)
    fs = getattr(store, "fs", None)
    if root is not None:
        try:
            write_atomically(root / key, data, exclusive=True)
        except FileExistsError:
            pass
    elif fs is not None and "s3" in fs.protocol:
        try:
            sync(fs._pipe_file(f"{store.path}/{key}", data, mode="create"))
        except FileExistsError:  # the server refused: the key is there
            pass
    else:
        sync(store.set_if_not_exists(key, default_buffer_prototype().buffer.from_bytes(data)))


def delete(store: Store, key: str) -> None:
    """Remove ``key`` (nothing when it is not there)."""
    root = local_root(store)
    if root is not None:
        (root / key).unlink(missing_ok=True)
    else:
        sync(store.delete(key))


def delete_dir(store: Store, prefix: str) -> None:
    """Remove every key under ``prefix`` (nothing when there are none)."""
    if not prefix:
        raise ValueError("delete_dir removes a part of a store, not the whole of it")
    root = local_root(store)
    if root is None:
        sync(store.delete_dir(prefix))
    elif (root / prefix).is_dir():
        shutil.rmtree(root / prefix)


def list_dir(store: Store, prefix: str) -> list[str]:
    """The names directly under ``prefix``."""
    root = local_root(store)
    if root is not None:
        try:
            return [entry.name for entry in (root / prefix).iterdir()]
        except (FileNotFoundError, NotADirectoryError):
            return []

    async def names() -> list[str]:
        return [name async for name in store.list_dir(prefix)]

    return sync(names())


def is_object(store: Store) -> bool:
    """Whether an object store's own key is an object, not a prefix. Its listing names such
    a key "", as it names a folder marker (the empty ``prefix/`` object that S3's console
    makes for a folder); only the first is no place for a store."""
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    return fs is not None and sync(fs._isfile(path))


def list_prefix(store: Store, prefix: str) -> list[str]:
    """Every key under ``prefix`` (keys, not names: ``prefix`` included)."""
    root = local_root(store)
    if root is not None:
        keys = []
        for folder, _, names in os.walk(root / prefix):
            under = Path(folder).relative_to(root).as_posix()
            keys += names if under == "." else [f"{under}/{name}" for name in names]
        return keys

    async def keys() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return sync(keys())


def size_prefix(store: Store, prefix: str) -> int:
    """The bytes of every key under ``prefix`` (zarr's ``nbytes_stored`` of an array there)."""
    root = local_root(store)
    if root is not None:
        return sum((root / key).stat().st_size for key in list_prefix(store, prefix))
    return sync(store.getsize_prefix(prefix))
