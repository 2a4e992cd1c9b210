"""PredictionWriter: the hook that records every training step's predictions for one epoch.

The training thread only checks shapes and copies each batch into a chunk-sized host
buffer: pinned memory and a non-blocking copy when the outputs live on an accelerator
(turned into stored rows there first: probabilities in the store's dtype, or their top k
and classes), so the step never waits on the device. Top-k rows are made by the training
thread on the host too: a buffer then holds k-wide rows, not K-wide logits (a vocabulary's
for token rows). Each full buffer goes to a background thread that waits for the copies
into it, applies the softmax (for dense CPU outputs), validates the values and appends the
buffer as one whole chunk to this writer's own staging part (staging.py). Each writer (one
per DDP rank) claims its part when it is made: a second writer of the same part is
refused, so writers never read-modify-write a chunk that another one writes.

Value errors (ids out of range, NaN/inf, with ``from_logits=False`` rows that are not
probability vectors) are found by the background thread, so that no device tensor is ever
synchronised; they are raised by the next ``write`` or ``close``. So are logits that already
look like probability rows in the first chunk (a softmax applied twice would flatten them).
"""

from __future__ import annotations

import functools
import queue
import threading
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import torch

from .accelerator import Accelerator, accelerator_for
from .errors import StoreError, os_problem
from .row_encoding import rounding_tolerance, summation_slack

if TYPE_CHECKING:
    from typing_extensions import Self  # typing's from Python 3.11

    from .store import SoftTargetStore

_CLOSE = object()
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # CPU outputs copied through NumPy


@dataclass
class _ChunkBuffer:
    """One chunk of rows on the host: filled by the training thread, written by the worker."""

    ids: torch.Tensor     # (R,) int64
    values: torch.Tensor  # (R, K) raw outputs (CPU), or (R, width) stored rows (row_encoding.py)
    checks: torch.Tensor  # (R,) bool, device outputs: per checked write into it, all its rows are probabilities
    raw: bool             # still needs the softmax and the conversion to stored rows
    filled: int = 0
    checked: int = 0      # writes into this buffer that carried a check (the first ``checked`` checks)
    copies: list = field(default_factory=list)  # one accelerator event per device write into it
    tolerance: float = 0.0  # how far from 1 a probability row's sum may be
    host: tuple | None = None  # NumPy views of (ids, values), made by the first write from the host


class ClosesOnSuccess(ABC):
    """A writer as a context manager: ``close()`` when the block succeeds, ``abandon()``
    (the epoch's rows stay unsealed, the part given up) when it raises."""

    @abstractmethod
    def close(self) -> None:
        """Write what is buffered and mark the part complete."""

    @abstractmethod
    def abandon(self) -> None:
        """Stop without closing: the epoch's rows stay unsealed."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


class PredictionWriter(ClosesOnSuccess):
    """Record (dataset ids, logits) of each training step of ``epoch`` into ``store``.

    ``from_logits=False`` takes probabilities instead of logits. ``rank`` names this
    writer's staging part; under DDP give each rank its own and seal once, on one rank,
    after every writer has closed. A part has one writer: making a second one for a part
    that a live writer holds, or that was closed, raises :class:`StoreError`.
    ``world_size``, the number of writers of the epoch (default: torch.distributed's when
    it is initialized), is kept with the part: the seal refuses parts of writers that
    counted different numbers, the closed parts of an earlier try of the epoch among
    them (a DDP run restarted on fewer processes would otherwise seal its dead ranks'
    rows over the new ones). ``buffers``
    chunk-sized host buffers bound the memory in flight; when all are waiting to be
    written, ``write`` waits. A context manager closes on success and abandons the
    unsealed rows on an exception.
    """

    def __init__(
        self,
        store: SoftTargetStore,
        epoch: int,
        *,
        rank: int = 0,
        world_size: int | None = None,
        from_logits: bool = True,
        buffers: int = 3,
    ):
        if buffers < 1:
            raise ValueError(f"buffers must be at least 1 (chunk-sized host buffers the rows wait in), got {buffers}")
        if world_size is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.store = store
        self.epoch = epoch
        self.from_logits = from_logits
        self.num_classes = store.num_classes
        self._num_samples = store.num_samples
        self._torch_dtype = getattr(torch, str(store.dtype))
        self._encoding = store.encoding
        self._chunk_rows = store.chunk_rows
        # refuses a sealed epoch, a read-only store or a part that another writer holds, now
        self._part = store.staging(epoch).claim(rank)
        self._buffers = buffers
        self._free: queue.Queue = queue.Queue()  # buffers the training thread may fill
        self._allocated = 0
        self._current: _ChunkBuffer | None = None
        self._error: BaseException | None = None
        self._first_chunk = True  # the background thread's: logits are checked for looking like probabilities
        # the (device type, dtype) of the first write's outputs, every write's: the rows of a
        # buffer are converted alike (cast into it, softmaxed or encoded), so a kind is not mixed
        self._kind: tuple[str, torch.dtype] | None = None
        self._device: torch.device | None = None  # the first write's outputs', where their copies are queued
        self._closed = False
        self._abandoned = False
        self._queue: queue.Queue = queue.Queue()
        try:  # here, not in the background thread: on a CPU, that thread's work slows the steps it overlaps
            self._part.create(self._num_samples, self._encoding.width, self._chunk_rows, self._encoding.stored_dtype,
                              world_size)
        except Exception as err:
            self._part.release()  # so that a new writer of this rank may claim the part
            self._error = err
            self._raise_if_failed()
        # started by the first full chunk followed by more rows: an epoch of one chunk is
        # written by close() alone, with no thread to start and join (0.3-2 ms of an epoch on a 2-core VM)
        self._thread: threading.Thread | None = None

    # -- the training thread's side ------------------------------------------------------

    def write(self, ids: torch.Tensor | np.ndarray, outputs: torch.Tensor | np.ndarray) -> None:
        """Record one batch: ``ids`` (B,) dataset indices, ``outputs`` (B, K) logits.

        Never synchronises an accelerator: device tensors are copied without blocking, on
        the current stream. Call it on the stream that made ``outputs`` (or after the current
        stream waits for that one), as any consumer of a tensor on another stream must.
        """
        self._raise_if_failed()
        if self._closed:
            raise StoreError(f"this writer of epoch {self.epoch} is closed; make a new one for the next epoch")
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if not isinstance(outputs, torch.Tensor):
            outputs = torch.as_tensor(outputs)  # a NumPy array too
        if not outputs.dtype.is_floating_point:
            raise TypeError(
                f"outputs must be floating-point {'logits' if self.from_logits else 'probabilities'}, "
                f"got dtype {outputs.dtype}: pass the model's output tensor itself"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"ids must be integer dataset indices, got dtype {ids.dtype}")
        if outputs.ndim != 2 or outputs.shape[1] != self.num_classes:
            raise ValueError(
                f"outputs must have shape (batch, K={self.num_classes}) to match the store, "
                f"got {tuple(outputs.shape)}: was the store made for another number of classes?"
            )
        if ids.ndim != 1 or ids.shape[0] != outputs.shape[0]:
            raise ValueError(f"ids must have shape ({outputs.shape[0]},) to match outputs, got {tuple(ids.shape)}")
        count = outputs.shape[0]
        if not count:  # nothing to record (a batch whose rows were all mixed): no device work
            return
        outputs = outputs.detach()
        first_write, kind = self._kind is None, (outputs.device.type, outputs.dtype)
        if first_write:
            self._kind, self._device = kind, outputs.device
        elif kind != self._kind:
            raise TypeError(
                f"outputs of {outputs.dtype} on {outputs.device.type} after outputs of {self._kind[1]} on "
                f"{self._kind[0]} in epoch {self.epoch}'s writes: a writer converts every write alike, so pass one "
                "dtype on one device every step (e.g. outputs.float())"
            )
        accelerator = accelerator_for(outputs.device)
        tolerance = _sum_tolerance(self.num_classes, outputs.dtype, self._torch_dtype)
        check = None
        # stored rows made where the outputs are: on a device, half the copy (far less for top-k);
        # for top-k on the host, a buffer of k-wide rows instead of K-wide logits (a vocabulary's)
        encode_now = accelerator is not None or self._encoding.topk is not None
        if encode_now:
            if not self.from_logits or first_write:  # probabilities always; logits in the first write
                check = _probability_rows(outputs, tolerance).reshape(1)  # read by the background thread
            outputs = self._to_rows(outputs)
        host = accelerator is None and outputs.dtype in _NUMPY_FLOATS and ids.device.type == "cpu"
        if host:  # NumPy's copies cost a third of torch's at a batch's size
            host_ids, host_outputs = ids.numpy(), outputs.numpy()
        done = 0
        while done < count:
            if self._current is not None and self._current.filled == self._chunk_rows:
                self._submit()  # when more rows come: a last full chunk is close()'s, with no thread to start
            buffer = self._current or self._take_buffer(like=outputs, accelerator=accelerator, raw=not encode_now)
            buffer.tolerance = max(buffer.tolerance, tolerance)
            n = min(count - done, self._chunk_rows - buffer.filled)
            rows = slice(buffer.filled, buffer.filled + n)
            if check is not None and accelerator is None:
                buffer.checks[buffer.checked:buffer.checked + 1].copy_(check)
                buffer.checked += 1
            if host:
                if buffer.host is None:  # once per buffer: later writes fill it without a torch call
                    buffer.host = (buffer.ids.numpy(), buffer.values.numpy())
                buffer.host[0][rows] = host_ids[done:done + n]
                buffer.host[1][rows] = host_outputs[done:done + n]
            elif accelerator is None:
                buffer.ids[rows].copy_(ids[done:done + n])
                buffer.values[rows].copy_(outputs[done:done + n])
            else:  # queued on the current stream (write()'s docstring); an event marks when they land
                if check is not None:
                    accelerator.copy_to_host(buffer.checks[buffer.checked:buffer.checked + 1], check)
                    buffer.checked += 1
                accelerator.copy_to_host(buffer.ids[rows], ids[done:done + n])
                accelerator.copy_to_host(buffer.values[rows], outputs[done:done + n])
                buffer.copies.append(accelerator.record(outputs.device))
            buffer.filled += n
            done += n
            self._current = buffer

    def close(self) -> None:
        """Write every buffered row and mark this writer's part complete (idempotent).

        A writer that failed gives its part up instead, so that the rank can be rewritten;
        an abandoned one refuses, so that an epoch it gave up is never sealed short of rows.
        """
        if self._abandoned:
            raise StoreError(
                f"this writer of epoch {self.epoch} was abandoned: the rows it was given are not kept, and "
                "closing it would seal the epoch without them; write the epoch again with a new writer"
            )
        if not self._closed:
            self._stop()  # the chunks handed over are written first, in order
            if self._current is not None and self._error is None:
                self._write_last_chunk()
        if self._error is not None:
            self._part.release()
        self._raise_if_failed()
        if not self._part.closed:
            self._part.close(self._given_sum_tolerance())

    def _given_sum_tolerance(self) -> float | None:
        """For probabilities (from_logits=False): how far from 1 their rows' sums were allowed,
        one dtype every write, which the seal records so that verify allows the stored rows as
        much (bfloat16 rows: 1.6%); None for logits."""
        if self.from_logits or self._kind is None:
            return None
        return _sum_tolerance(self.num_classes, self._kind[1], self._torch_dtype)

    def abandon(self) -> None:
        """Stop without closing: the epoch's rows stay unsealed and invisible to readers,
        and the part is given up, so that a new writer of the same rank may redo it."""
        if not self._closed:
            self._abandoned = True
            self._stop()
            self._part.release()

    def _take_buffer(self, like: torch.Tensor, accelerator: Accelerator | None, raw: bool) -> _ChunkBuffer:
        """A free buffer; allocates up to ``buffers`` of them, then waits for one. Device
        outputs get host memory their copies land in without blocking (pinned on a GPU)."""
        if self._allocated < self._buffers and self._free.empty():
            self._allocated += 1
            # zeros, not empty: touching the pages now keeps page faults out of write()
            allocate = torch.zeros if accelerator is None else accelerator.host_buffer
            return _ChunkBuffer(
                ids=allocate((self._chunk_rows,), dtype=torch.int64),
                values=allocate((self._chunk_rows, like.shape[1]), dtype=like.dtype),
                checks=allocate((self._chunk_rows,), dtype=torch.bool),
                raw=raw,
            )
        buffer = self._free.get()
        self._raise_if_failed()
        return buffer

    def _write_last_chunk(self) -> None:
        """The last, partial buffer, written by the thread that closes: it waits for it
        anyway, and a small epoch's rows all sit in this one buffer, which handing over to
        the background thread (and torch's thread pool there) made slower."""
        buffer, self._current = self._current, None
        try:
            self._write_chunk(buffer)
        except BaseException as err:  # reported as the background thread's errors are
            self._error = err

    def _submit(self) -> None:
        buffer, self._current = self._current, None
        if self._thread is None:
            thread = threading.Thread(target=_drain, args=(weakref.ref(self), self._queue, self._device),
                                      name=f"pskd-writer-{self.epoch}", daemon=True)
            thread.start()  # first: a thread that cannot start leaves the writer as it was
            self._thread, self._stops_with_it = thread, weakref.finalize(self, self._queue.put, _CLOSE)
        self._queue.put(buffer)

    def _stop(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._stops_with_it.detach()
            self._queue.put(_CLOSE)
            self._thread.join()

    def _raise_if_failed(self) -> None:
        """Raise the first error of this writer, its part given up: nothing more is written to
        it, and a loop that drops the failed writer and makes a new one may claim it at once
        (the error's traceback holds the writer until a garbage collection)."""
        if self._error is not None:
            self._part.release()
            error = self._error
            problem = os_problem(error, self.store.url) if isinstance(error, OSError) else str(error)
            raise StoreError(f"the prediction writer of epoch {self.epoch} failed: {problem}") from error

    # -- the background thread's side ------------------------------------------------------

    def _to_rows(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs -> stored rows (row_encoding.py): the softmax of fp32 logits, or the probabilities."""
        return self._encoding.encode(outputs.float().softmax(dim=1) if self.from_logits else outputs)

    def _written(self, buffer: _ChunkBuffer, failed: BaseException | None = None) -> None:
        """The background thread's work on one buffer, which it then hands back (``failed``:
        the thread's own error, which stops it writing)."""
        if self._error is None:
            try:
                if failed is not None:
                    raise failed
                self._write_chunk(buffer)
            except BaseException as err:  # reported to the training thread
                self._error = err
        buffer.filled = buffer.checked = 0
        buffer.copies.clear()
        buffer.tolerance = 0.0
        self._free.put(buffer)  # also after an error, so write() never waits forever

    def _write_chunk(self, buffer: _ChunkBuffer) -> None:
        for copied in buffer.copies:  # every copy into this buffer has landed
            copied.synchronize()
        values = buffer.values[:buffer.filled]
        if not buffer.raw:  # the checks made on the device: every write's for probabilities
            all_probabilities = buffer.checked > 0 and bool(buffer.checks[:buffer.checked].all())
        elif not self.from_logits:
            _require_probability_rows(values, buffer.tolerance, self.epoch)  # says which rows, how far off
            all_probabilities = True
        else:  # logits that look like probabilities: misuse of a whole run, seen in its first chunk
            all_probabilities = self._first_chunk and bool(_probability_rows(values, buffer.tolerance))
        self._first_chunk = False
        if self.from_logits and all_probabilities:  # softmaxed again, they would be flattened toward uniform
            raise ValueError(
                f"the outputs written for epoch {self.epoch} look like probabilities (non-negative rows summing "
                "to 1), but the writer applies a softmax to them: pass from_logits=False when writing "
                "probabilities, or pass the logits; nothing of this epoch will be sealed"
            )
        rows = (self._to_rows(values) if buffer.raw else values).numpy()
        ids = buffer.ids[:buffer.filled].numpy()
        if ids.min() < 0 or ids.max() >= self._num_samples:
            bad = ids[(ids < 0) | (ids >= self._num_samples)][:5]
            raise ValueError(
                f"ids out of range: {bad.tolist()} not in [0, N={self._num_samples}); pass dataset "
                "indices (SoftTargetDataset returns them), not batch positions"
            )
        if not _all_finite(self._encoding.values(rows)):
            raise ValueError(
                "predictions contain NaN or inf: the model diverged (lower the learning rate or "
                "check the loss); nothing of this epoch will be sealed"
            )
        if not self.from_logits and not all_probabilities:
            raise ValueError(
                f"from_logits=False takes probability rows, but rows written for epoch {self.epoch} are not "
                "(negative, or not summing to 1): pass logits with from_logits=True, or softmax the outputs"
            )
        self._part.append(ids, rows)


def _drain(writer: weakref.ref[PredictionWriter], buffers: queue.Queue, device: torch.device) -> None:
    """The background thread: writes each buffer handed over. It holds the writer only while
    it writes one, so that a writer a loop dropped unclosed is freed with its part's claim
    (staging.py), and the writer's finalizer then stops it.

    On an accelerator it first makes the outputs' device its own, as torch's DataLoader pin
    thread does: CUDA's current device is a thread's, and a thread left on device 0 that
    waits for an event makes a context there (about 0.5 GiB of rank 0's GPU per rank)."""
    failed = None
    try:
        if (accelerator := accelerator_for(device)) is not None:
            accelerator.set_device(device)
    except BaseException as err:  # reported to the training thread, as a write's error is
        failed = err
    while (buffer := buffers.get()) is not _CLOSE and (live := writer()) is not None:
        live._written(buffer, failed)
        del live


@functools.lru_cache(maxsize=None)  # called on every write: the training thread's time
def _sum_tolerance(num_classes: int, *dtypes: torch.dtype) -> float:
    """How far from 1 a probability row's sum may be: the rounding to the coarsest of
    ``dtypes`` and float32's summation of K terms (row_encoding.py)."""
    return rounding_tolerance(*(torch.finfo(dtype).eps for dtype in dtypes)) + summation_slack(num_classes)


def _probability_rows(values: torch.Tensor, tolerance: float) -> torch.Tensor:
    """A 0-d bool tensor: every row is non-negative and sums to 1 (on the values' device;
    False for a NaN). Reductions only: elementwise comparisons of float16 are slow on a CPU."""
    sums = values.sum(dim=1, dtype=torch.float32)
    return (values.min() >= 0) & ((sums - 1).abs().max() <= tolerance)


def _all_finite(values: np.ndarray) -> bool:
    """``isfinite(values).all()``, in the common case by one float32 sum (a NaN or an
    infinity makes it non-finite), which is far faster than an elementwise test of float16.
    (A top-k row's values are a strided view of its bytes: copied, they are few. A view
    of one such row counts as contiguous, uncopied, with a row stride torch refuses:
    flattened, it has none.)"""
    values = torch.from_numpy(np.ascontiguousarray(values).reshape(-1))
    return bool(values.sum(dtype=torch.float32).isfinite()) or bool(values.isfinite().all())


def _require_probability_rows(values: torch.Tensor, tolerance: float, epoch: int) -> None:
    """``from_logits=False``: refuse rows that are negative or do not sum to 1 (NaN rows are
    left to the finiteness check, which names them)."""
    sums = values.sum(dim=1, dtype=torch.float32)
    bad = torch.nonzero(((sums - 1).abs() > tolerance) | (values.amin(dim=1) < 0)).flatten()
    if len(bad):
        row = int(bad[0])
        raise ValueError(
            f"from_logits=False takes probability rows, but {len(bad)} of {len(values)} rows written for "
            f"epoch {epoch} are not (one sums to {float(sums[row]):.4g}, its smallest value is "
            f"{float(values[row].min()):.4g}): pass logits with from_logits=True, or softmax the outputs"
        )
