"""Reading a store's arrays so that damage is an error, never a value.

Every array carries zarr's crc32c codec after compression, so a flipped byte fails its
chunk's checksum instead of decoding into other numbers. Every chunk is written, even one
equal to the fill value (``write_empty_chunks``), so a missing chunk file is damage, and
:class:`CheckedArray` reports it instead of letting zarr read it as the fill value. Errors
name what was damaged, the rows, and `pskd-store verify`.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import zarr

from . import store_io
from .array_files import ChunkFiles, checksum_matches, codecs_problem, open_array
from .errors import EpochNotSealedError, StoreDamagedError, StoreError

READ_BACK_BATCH = 32  # chunks fetched at once by stored_digest: tens of MiB, parallel requests to an object store
MovedOn = Callable[[], "str | None"]  # CheckedArray's moved_on


@dataclass(frozen=True)
class DamagedChunk:
    """One chunk (along the first axis) that cannot be read back as written."""

    rows: tuple[int, int]  # [start, end)
    problem: str


class CheckedArray:
    """Row slices of a stored array, returned whole and exactly as written, or an error.

    ``what`` names the array in messages ("the teacher of epoch 7"); ``url`` is the store's,
    for the `pskd-store verify` hint. ``moved_on``, asked when rows cannot be read as sealed,
    says (a message) whether another process pruned, rolled back or sealed the epoch again
    since this one opened it: then that is the error, not damage.
    """

    def __init__(self, array: zarr.Array, what: str, url: str, *, sealed_digest: str | None = None,
                 moved_on: MovedOn | None = None):
        self.what = what
        self.url = url
        self.moved_on = moved_on
        problem = codecs_problem(array)  # before any chunk is decoded by them
        if problem:
            raise self.damaged(f"the metadata of {array.path} was changed: {problem}")
        self.array = array
        self.sealed_digest = sealed_digest  # stored_digest's at the seal, which whole() compares
        self._present: set[int] | None = None
        self._files = ChunkFiles(array)  # chunks read by their keys: a missing one is an error, never zeros

    @classmethod
    def open(cls, group: zarr.Group, path: str, what: str, url: str, *, shape: tuple[int, ...],
             dtype: np.dtype, chunk_rows: int | None = None, sealed_digest: str | None = None,
             moved_on: MovedOn | None = None) -> CheckedArray:
        """The array at ``path``, refused unless its metadata (shape, dtype, chunks, codecs)
        is what the store made."""
        try:
            array = open_array(group, path)
        except Exception as err:  # a deleted or unreadable zarr.json
            raise _damaged(what, url, f"its array {path} cannot be opened ({_reason(err)})", moved_on) from err
        problem = _metadata_problem(array, shape, np.dtype(dtype), chunk_rows)
        if problem:
            raise _damaged(what, url, f"the metadata of {path} was changed: {problem}", moved_on)
        return cls(array, what, url, sealed_digest=sealed_digest, moved_on=moved_on)

    def damaged(self, problem: str) -> StoreError:
        """The error for rows that cannot be read as sealed (``problem`` says how)."""
        return _damaged(self.what, self.url, problem, self.moved_on)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.array.chunks

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows ``start:stop`` (a slice along the first axis)."""
        start, stop, _ = rows.indices(len(self))
        missing = [c for c in self._chunk_range(start, stop) if c not in self.present_chunks()]
        if missing:
            raise self.damaged(f"rows {_ranges([self._rows(c) for c in missing])} are missing "
                               "(their chunk files were deleted)")
        try:
            return self._files.read_rows(start, stop)
        except Exception as err:  # a checksum mismatch, a chunk that does not decode or went missing
            damaged = list(self.damaged_chunks(start, stop)) or [DamagedChunk((start, stop), _chunk_problem(err))]
            raise self.damaged(f"rows {_ranges([d.rows for d in damaged])} {damaged[0].problem}") from err

    def whole(self) -> Iterator[tuple[int, np.ndarray]]:
        """Every row, a chunk at a time in order: ``(first row, rows)``, read-only. Each chunk
        is present and matches its checksum; after the last, its keys and checksums are
        compared with ``sealed_digest`` (when the seal recorded one). Chunk files swapped,
        copied over one another or rewritten after the seal, each with a valid checksum of
        its own, pass every chunk's check but not this one: a caller uses nothing it made
        of the rows until the iteration has ended."""
        digest = hashlib.sha256()
        for chunk, key, data in _stored_chunks(self, "are missing (their chunk files were deleted)"):
            digest.update(_digest_entry(key, data))
            lo, hi = self._rows(chunk)
            try:
                rows = self._files.decode(data)
            except Exception as err:  # a checksum that holds over bytes that do not decompress
                raise self.damaged(f"rows {_ranges([(lo, hi)])} {_chunk_problem(err)}") from err
            yield lo, rows[:hi - lo]
        if self.sealed_digest is not None and digest.hexdigest() != self.sealed_digest:
            raise self.damaged("its chunks are not the ones sealed: their keys and checksums do not match the "
                               "digest recorded at the seal (chunk files swapped, copied or rewritten after it)")

    def reject(self, bad: np.ndarray, start: int, problem: str) -> None:
        """Raise :class:`StoreDamagedError` naming the rows ``start + i`` where ``bad[i]``:
        rows whose checksums hold but whose values cannot be what the store wrote."""
        rows = np.flatnonzero(bad)
        if len(rows):
            ranges = [(start + int(r), start + int(r) + 1) for r in rows]
            raise self.damaged(f"rows {_ranges(ranges)} {problem}")

    def damaged_chunks(self, start: int = 0, stop: int | None = None) -> Iterator[DamagedChunk]:
        """Every chunk of rows ``start:stop`` that is missing or does not decode, read one
        at a time (what `verify` and error messages report)."""
        stop = len(self) if stop is None else stop
        for chunk in self._chunk_range(start, stop):
            lo, hi = self._rows(chunk)
            if chunk not in self.present_chunks():
                yield DamagedChunk((lo, hi), "are missing (their chunk file was deleted)")
                continue
            try:
                self._files.read(chunk)
            except KeyError:
                yield DamagedChunk((lo, hi), "are missing (their chunk file was deleted)")
            except Exception as err:
                yield DamagedChunk((lo, hi), _chunk_problem(err))

    def present_chunks(self) -> set[int]:
        """Indices (along the first axis) of the chunks whose files exist, listed once."""
        if self._present is None:
            prefix = f"{self.array.path}/" if self.array.path else ""
            keys = store_io.list_prefix(self.array.store, prefix)
            index = {self.array.metadata.encode_chunk_key((c,) + (0,) * (self.array.ndim - 1)): c
                     for c in range(self.array.cdata_shape[0])}
            self._present = {index[key[len(prefix):]] for key in keys if key[len(prefix):] in index}
        return self._present

    def _chunk_range(self, start: int, stop: int) -> range:
        rows = self.array.chunks[0]
        return range(start // rows, -(-stop // rows)) if stop > start else range(0)

    def _rows(self, chunk: int) -> tuple[int, int]:
        rows = self.array.chunks[0]
        return chunk * rows, min(len(self), (chunk + 1) * rows)


def stored_digest(arrays: list[CheckedArray]) -> str:
    """Read every chunk of ``arrays`` back as stored: each must be present and match the
    crc32c that follows its bytes. Returns a SHA-256 over the chunks' keys and checksums:
    a digest of exactly these stored bytes, computed from what the checksums already hold.
    A chunk rewritten later — even with a valid checksum of its own — changes it."""
    digest = hashlib.sha256()
    for checked in arrays:
        for _, key, data in _stored_chunks(checked, "are missing (their chunk was lost while it was written)"):
            digest.update(_digest_entry(key, data))
    return digest.hexdigest()


def _stored_chunks(checked: CheckedArray, missing: str) -> Iterator[tuple[int, str, bytes]]:
    """(chunk along the first axis, key, stored bytes) of every chunk of ``checked`` in
    order, fetched ``READ_BACK_BATCH`` at a time; a chunk that is not there (``missing``
    says why) or does not match its checksum raises :class:`StoreDamagedError`."""
    array = checked.array
    coords = list(itertools.product(*(range(n) for n in array.cdata_shape)))
    keys = [f"{array.path}/{array.metadata.encode_chunk_key(c)}" for c in coords]
    for lo in range(0, len(keys), READ_BACK_BATCH):
        batch = keys[lo:lo + READ_BACK_BATCH]
        for coord, key, data in zip(coords[lo:lo + READ_BACK_BATCH], batch, store_io.get_many(array.store, batch)):
            rows = checked._rows(coord[0])
            if data is None:
                raise checked.damaged(f"rows {_ranges([rows])} {missing}")
            if not checksum_matches(data):
                raise checked.damaged(f"rows {_ranges([rows])} do not match their checksum (their bytes changed "
                                      "after they were written)")
            yield coord[0], key, data


def _digest_entry(key: str, stored: bytes) -> bytes:
    """What a chunk adds to a digest: its key and the crc32c its stored bytes end with."""
    return key.encode() + b"\0" + stored[-4:]


def _metadata_problem(array: zarr.Array, shape: tuple[int, ...], dtype: np.dtype,
                      chunk_rows: int | None) -> str | None:
    if array.shape != tuple(shape):
        return f"shape {array.shape}, expected {tuple(shape)}"
    if array.dtype != dtype:
        return f"dtype {array.dtype}, expected {dtype}"
    if chunk_rows is not None and array.chunks[0] != chunk_rows:
        return f"{array.chunks[0]} rows per chunk, expected {chunk_rows}"
    if tuple(array.chunks[1:]) != tuple(shape[1:]):
        return f"chunks {array.chunks}, expected whole rows"
    return None


def _chunk_problem(err: BaseException) -> str:
    if "checksum" in str(err):
        return "do not match their checksum (their bytes changed after they were written)"
    return f"cannot be decoded ({_reason(err)})"


def _reason(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) < 160 else text[:157] + "..."


def row_ranges(ranges: list[tuple[int, int]]) -> list[str]:
    """[(0, 512), (512, 1024), (2048, 2560)] -> ['0-1023', '2048-2559'] (inclusive)."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and merged[-1][1] == lo:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    return [f"{lo}-{hi - 1}" for lo, hi in merged]


def _ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(row_ranges(ranges))


def _damaged(what: str, url: str, problem: str, moved_on: MovedOn | None) -> StoreError:
    """:class:`EpochNotSealedError` when another process moved the store on past what was
    being read (``moved_on`` says so), else :class:`StoreDamagedError` naming ``problem``."""
    moved = moved_on() if moved_on is not None else None
    return EpochNotSealedError(moved) if moved else StoreDamagedError(_message(what, url, problem))


def _message(what: str, url: str, problem: str) -> str:
    return (f"{what} in {url} is damaged: {problem}. None of its values were used; "
            f"`pskd-store verify {url}` lists everything that is damaged")
