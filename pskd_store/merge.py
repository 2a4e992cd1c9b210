"""The seal's merge: staged parts -> one compressed (N, K) epoch, in bounded memory.

Staged rows are in write order (random ids, duplicates, several parts); the epoch is in id
order. An ImageNet epoch (1.28M x 1000 float16) is 2.6 GB, so the merge never holds it:

1. Winners. Every part's ids (8 bytes a row) give each id the position of its last write:
   within a part the later row, across parts the higher rank (parts come in rank order).
2. Scatter. Each part's rows are read in slices; the winning rows are sorted by id and
   appended to their bucket's region of an unlinked scratch file (a bucket is a run of
   whole output chunks, ~64 MiB of rows; its region holds exactly its winning rows).
3. Gather. Bucket by bucket: read its region back and place the rows; ids never written
   take their row of the previous epoch (only the chunks that need it are read) or their
   one-hot label; derive the trajectory tier; hand the block to zarr, which compresses and
   writes its chunks on its own threads while the next bucket is gathered.

An epoch of one bucket (up to 64 MiB of rows: CIFAR's, say) skips the scratch file: its
winning rows go straight into the block, which is then completed and written as in step 3.

Peak memory is a few buckets (a few hundred MiB) plus 40 bytes per sample; the scratch file
takes at most one uncompressed epoch of disk, and its pages are page cache, not the
process's memory. It is unlinked on creation, so even a killed seal leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .array_files import ChunkFiles
from .errors import StoreError
from .integrity import CheckedArray
from .local_store import local_root
from .row_encoding import RowEncoding
from .staging import StagedPart
from .store_keys import slice_rows
from .trajectory import RowTrajectory, SequenceTrajectory

BUCKET_BYTES = 64 << 20  # rows gathered in memory at a time (two buckets are in flight)


@dataclass
class Merged:
    """What the merge found: the coverage statistics and the epoch's trajectory record."""

    rows_written: int
    ids_written: int
    carried_forward: int
    trajectory: dict[str, np.ndarray]


def merge_epoch(
    parts: Sequence[StagedPart],
    out: zarr.Array,
    previous: CheckedArray | None,
    labels: np.ndarray,
    encoding: RowEncoding,
    record: RowTrajectory | SequenceTrajectory,
    scratch_dir: str | Path | None = None,
) -> Merged:
    """Write the epoch of ``parts`` (in rank order) into the empty array ``out``.

    ``previous`` is the latest sealed epoch (None: ids never written get one-hot labels);
    ``encoding`` says what a row holds (row_encoding.py); ``record`` accumulates the
    epoch's trajectory tier (trajectory.py).
    """
    scratch_dir = Path(scratch_dir if scratch_dir is not None else tempfile.gettempdir())
    if not scratch_dir.is_dir():  # refused even by an epoch that needs no scratch file
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(scratch_dir))
    num_samples = out.shape[0]
    ids = [_read_ids(part, num_samples) for part in parts]
    last = _last_writes(ids, num_samples)
    buckets = _Buckets(last >= 0, _bucket_rows(out))
    one_block = len(buckets) == 1
    winning = _winning_rows(parts, ids, last, out.chunks[0], in_id_order=not one_block)
    if one_block:  # the whole epoch is one block: no scratch file, no threads
        block = np.empty(out.shape, dtype=out.dtype)
        for row_ids, rows in winning:
            block[row_ids] = rows
        _complete(block, 0, buckets, previous, labels, encoding, record, slice_rows(out.chunks[0], block[0].nbytes))
        _block_writer(out)(0, block)
    else:
        with tempfile.TemporaryFile(dir=scratch_dir, prefix="pskd-seal-") as scratch:
            try:
                _scatter(winning, buckets, scratch.fileno())
            except OSError as err:  # names the scratch file's directory: a write to a file carries no name
                raise OSError(err.errno, f"{err.strerror}, writing the seal's scratch file (pass another "
                                         "scratch_dir)", str(scratch_dir)) from err
            _gather(out, buckets, scratch.fileno(), previous, labels, encoding, record)
    written = int(buckets.written.sum())
    return Merged(sum(len(i) for i in ids), written, num_samples - written, record.result())


def _read_ids(part: StagedPart, num_samples: int) -> np.ndarray:
    ids = part.ids[:part.rows]
    if len(ids) and (ids.min() < 0 or ids.max() >= num_samples):
        raise StoreError(f"staged ids of writer {part.rank} fall outside [0, {num_samples})")
    return ids


def _last_writes(ids: list[np.ndarray], num_samples: int) -> np.ndarray:
    """For each id, the position of its last write in the parts laid end to end, or -1."""
    last = np.full(num_samples, -1, dtype=np.int64)
    start = 0
    for part_ids in ids:
        np.maximum.at(last, part_ids, np.arange(start, start + len(part_ids)))
        start += len(part_ids)
    return last


def _bucket_rows(out: zarr.Array) -> int:
    chunk_rows, num_classes = out.chunks
    row_bytes = num_classes * out.dtype.itemsize
    return max(1, BUCKET_BYTES // (chunk_rows * row_bytes)) * chunk_rows


class _Buckets:
    """Runs of ``rows`` output rows, and where each one's winning rows go in the scratch file."""

    def __init__(self, written: np.ndarray, rows: int):
        self.written = written
        self.rows = rows
        count = -(-len(written) // rows)
        self.counts = np.bincount(np.flatnonzero(written) // rows, minlength=count)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.filled = self.starts.copy()
        self.ids = np.empty(int(self.counts.sum()), dtype=np.int64)  # the id of each scratch row

    def __len__(self) -> int:
        return len(self.counts)

    def bounds(self, bucket: int) -> tuple[int, int]:
        return bucket * self.rows, min(len(self.written), (bucket + 1) * self.rows)


def _winning_rows(
    parts: Sequence[StagedPart], ids: list[np.ndarray], last: np.ndarray, chunk_rows: int, *, in_id_order: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, rows) of the writes that win, a slice of a part at a time; ``in_id_order``
    sorts each slice's by id, which the scatter's one write per bucket needs. A one-block
    epoch places its rows by id in any order: sorting 8,000 shuffled ids took 0.25 ms."""
    start = 0
    for part, part_ids in zip(parts, ids):
        step = slice_rows(chunk_rows, part.encoded.shape[1] * part.encoded.dtype.itemsize)
        for lo in range(0, part.rows, step):
            hi = min(part.rows, lo + step)
            slice_ids = part_ids[lo:hi]
            winners = np.flatnonzero(last[slice_ids] == np.arange(start + lo, start + hi))
            if in_id_order:
                winners = winners[np.argsort(slice_ids[winners], kind="stable")]
            if len(winners):
                yield slice_ids[winners], part.encoded[lo:hi].take(winners, axis=0)
        start += part.rows


def _scatter(winning: Iterator[tuple[np.ndarray, np.ndarray]], buckets: _Buckets, fd: int) -> None:
    """Append every winning row to its bucket's region of the scratch file.

    A thread writes one slice's rows while the next slice is read (at most two in memory).
    """
    pending: Future | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="pskd-seal") as writer:
        for row_ids, rows in winning:
            bucket_of = row_ids // buckets.rows
            edges = np.flatnonzero(np.diff(bucket_of)) + 1
            runs = []  # (scratch row, first, end): one contiguous write per bucket
            for first, end in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(row_ids)]])):
                bucket = bucket_of[first]
                at = buckets.filled[bucket]
                buckets.ids[at:at + end - first] = row_ids[first:end]
                buckets.filled[bucket] += end - first
                runs.append((at, first, end))
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_runs, fd, rows, runs, rows[0].nbytes)
        if pending is not None:
            pending.result()


def _write_runs(fd: int, rows: np.ndarray, runs: list[tuple[int, int, int]], row_bytes: int) -> None:
    for at, first, end in runs:
        _pwrite(fd, rows[first:end], at * row_bytes)


def _gather(
    out: zarr.Array, buckets: _Buckets, fd: int, previous: CheckedArray | None, labels: np.ndarray,
    encoding: RowEncoding, record: RowTrajectory | SequenceTrajectory,
) -> None:
    """Write ``out`` bucket by bucket, adding each bucket to the epoch's trajectory ``record``.

    Two block buffers take turns (one is built while zarr writes the other) and are reused,
    so no bucket pays for fresh pages; scratch rows and previous rows come in slices.
    """
    num_classes = out.shape[1]
    row_bytes = num_classes * out.dtype.itemsize
    step = slice_rows(out.chunks[0], row_bytes)
    blocks = [np.empty((buckets.rows, num_classes), dtype=out.dtype) for _ in range(min(2, len(buckets)))]
    rows = np.empty((step, num_classes), dtype=out.dtype)
    write = _block_writer(out)
    pending: Future | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="pskd-seal") as writer:
        for bucket in range(len(buckets)):
            lo, hi = buckets.bounds(bucket)
            block = blocks[bucket % 2][:hi - lo]  # its last write was waited for below
            first, end = buckets.starts[bucket], buckets.starts[bucket] + buckets.counts[bucket]
            for at in range(first, end, step):
                piece = rows[:min(step, end - at)]
                _pread(fd, piece, at * row_bytes)
                block[buckets.ids[at:at + len(piece)] - lo] = piece
            _complete(block, lo, buckets, previous, labels, encoding, record, step)
            if pending is not None:
                pending.result()  # one block is written while the next is built
            pending = writer.submit(write, lo, block)
        if pending is not None:
            pending.result()


def _complete(
    block: np.ndarray, lo: int, buckets: _Buckets, previous: CheckedArray | None, labels: np.ndarray,
    encoding: RowEncoding, record: RowTrajectory | SequenceTrajectory, step: int,
) -> None:
    """Fill the rows of a block (rows ``lo`` on) that were never written, and add the block
    to the epoch's trajectory ``record``."""
    hi = lo + len(block)
    missing = np.flatnonzero(~buckets.written[lo:hi])
    if len(missing):
        _fill_missing(block, missing, lo, previous, labels, encoding, step)
    record.add(lo, encoding.trajectory(block, labels[lo:hi]), labels[lo:hi], buckets.written[lo:hi])


def _block_writer(out: zarr.Array) -> Callable[[int, np.ndarray], None]:
    """How a block of whole chunks from row ``lo`` is written. By zarr, which compresses a
    block's chunks in parallel (and sends an object store its chunks in parallel); but a
    block of one chunk on a local disk — a whole small epoch — by ``ChunkFiles``, with the
    array's own codecs and one system call: zarr's machinery around that chunk cost more
    than compressing it (3.8 ms against ~1 ms at 8,000 x 10 rows)."""
    chunk_rows = out.chunks[0]
    files = ChunkFiles(out) if local_root(out.store) is not None else None

    def write(lo: int, block: np.ndarray) -> None:
        if files is not None and len(block) <= chunk_rows:
            files.write(lo // chunk_rows, block)
        else:
            out[lo:lo + len(block)] = block

    return write


def _fill_missing(
    block: np.ndarray, missing: np.ndarray, lo: int, previous: CheckedArray | None, labels: np.ndarray,
    encoding: RowEncoding, step: int,
) -> None:
    """Rows never written: the previous epoch's (read a slice at a time, only the slices
    that hold such rows), or their one-hot labels."""
    if previous is None:
        block[missing] = encoding.onehot(labels[lo + missing])
        return
    for start in range(missing[0] // step * step, missing[-1] + 1, step):
        here = missing[np.searchsorted(missing, start):np.searchsorted(missing, start + step)]
        if len(here):
            earlier = previous[lo + start:lo + min(start + step, len(block))]
            block[here] = earlier[here - start]


def _pwrite(fd: int, rows: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread(fd: int, into: np.ndarray, offset: int) -> None:
    view = memoryview(into.reshape(-1).view(np.uint8))  # into is contiguous: a view of it
    while len(view):
        done = os.preadv(fd, [view], offset)
        if done == 0:
            raise StoreError("the seal's scratch file ended early: is its disk full?")
        view, offset = view[done:], offset + done
