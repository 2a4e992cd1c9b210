"""zarr's LocalStore, with its small reads and writes done where zarr asks for them.

zarr's stores are asynchronous, and its ``LocalStore`` hands every file operation to a
worker thread (``asyncio.to_thread``): a round trip of two thread switches, 60-140 us on a
small CPU, for a metadata document or a claim that the disk reads or writes in a few
microseconds. Every epoch makes a few dozen such calls (a writer's claim and arrays, the
seal's arrays, reads and publication), which made them most of the store's fixed cost per
epoch. This store runs those on the event loop's own thread; chunk data, whose size is not
bounded, still goes to zarr's worker threads, so large reads and writes overlap as before.
What is written, and how (atomically, through a temporary file; a create-if-absent through
a hard link), is what zarr's LocalStore does.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import zarr.abc.store
import zarr.storage
from zarr.abc.buffer import Buffer, BufferPrototype
from zarr.abc.store import ByteRequest
from zarr.buffer import default_buffer_prototype

INLINE_BYTES = 64 << 10  # writes up to this size are done on the event loop's thread
METADATA = "zarr.json"   # reads of metadata documents likewise (they are small)


class LocalStore(zarr.storage.LocalStore):
    """``zarr.storage.LocalStore`` that reads metadata documents, writes small values,
    checks and deletes keys without a worker thread (module doc)."""

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is not None or not key.endswith(METADATA):
            return await super().get(key, prototype, byte_range)
        if not self._is_open:
            await self._open()
        data = read_file(self.root / key)
        if data is None:
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        if len(value) > INLINE_BYTES:
            return await super()._set(key, value, exclusive)
        if not self._is_open:
            await self._open()
        self._check_writable()
        write_atomically(self.root / key, value.as_buffer_like(), exclusive)

    async def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    async def delete(self, key: str) -> None:
        self._check_writable()
        path = self.root / key
        if path.is_dir():
            await super().delete(key)
        else:
            path.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes | memoryview, exclusive: bool = False) -> None:
    """Write a temporary file beside ``path`` and move it there: a reader sees the old
    bytes or the new ones. ``exclusive`` moves it with a hard link, which fails with
    :class:`FileExistsError` when ``path`` exists (what ``set_if_not_exists`` relies on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{secrets.token_hex(8)}.partial")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
        if exclusive:
            os.link(temporary, path)
            os.unlink(temporary)
        else:
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def local_root(store: zarr.abc.store.Store) -> Path | None:
    """The directory of a store on a local disk, whose files the store's own modules read
    and write without zarr's asynchronous round trip; None for any other store."""
    return store.root if isinstance(store, zarr.storage.LocalStore) else None  # a Path: zarr makes it one


def read_file(path: Path) -> bytes | None:
    """A key's bytes, or None when there is no file (as a store's ``get``)."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
