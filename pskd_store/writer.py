"""PredictionWriter: the hook that records every training step's predictions for one epoch.

The training thread only checks shapes, starts an asynchronous device-to-host copy into
pinned memory (on an accelerator) and enqueues the batch. A background thread waits for
the copy, turns logits into probabilities, validates the values, buffers rows and writes
whole chunks to this writer's own staging part. Each writer (one per DDP rank) owns its
part, so writers never read-modify-write a chunk that another one writes.

Value errors (ids out of range, NaN/inf) are found by the background thread, so that no
device tensor is ever synchronised; they are raised by the next ``write`` or ``close``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import torch

from .store import SoftTargetStore, StoreError

_CLOSE = object()


class PredictionWriter:
    """Record (dataset ids, logits) of each training step of ``epoch`` into ``store``.

    ``from_logits=False`` takes probabilities instead of logits. ``rank`` names this
    writer's staging part; under DDP give each rank its own and seal once, on one rank,
    after every writer has closed. A context manager closes on success and abandons the
    unsealed rows on an exception.
    """

    def __init__(
        self,
        store: SoftTargetStore,
        epoch: int,
        *,
        rank: int = 0,
        from_logits: bool = True,
        max_pending_batches: int = 64,
    ):
        self.store = store
        self.epoch = epoch
        self.from_logits = from_logits
        self.num_classes = store.num_classes
        self._num_samples = store.num_samples
        self._dtype = store.dtype
        self._torch_dtype = getattr(torch, str(store.dtype))
        self._chunk_rows = store.chunk_rows
        self._part = store.staging_group(epoch).create_group(f"writer_{rank:04d}", overwrite=True)
        self._ids = self._part.create_array(
            "ids", shape=(self._num_samples,), chunks=(self._chunk_rows,), dtype=np.int64,
            compressors=store.codec,
        )
        self._probs = self._part.create_array(
            "probs", shape=(self._num_samples, self.num_classes),
            chunks=(self._chunk_rows, self.num_classes), dtype=self._dtype, compressors=store.codec,
        )
        self._rows = 0  # rows written to the staging arrays
        self._buffer_ids: list[np.ndarray] = []
        self._buffer_probs: list[np.ndarray] = []
        self._buffered = 0
        self._error: BaseException | None = None
        self._closed = False
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending_batches)
        self._thread = threading.Thread(target=self._drain, name=f"pskd-writer-{epoch}", daemon=True)
        self._thread.start()

    # -- the training thread's side ------------------------------------------------------

    def write(self, ids: torch.Tensor | np.ndarray, outputs: torch.Tensor) -> None:
        """Record one batch: ``ids`` (B,) dataset indices, ``outputs`` (B, K) logits.

        Never synchronises an accelerator: device tensors are copied without blocking.
        """
        self._raise_if_failed()
        if self._closed:
            raise StoreError(f"this writer of epoch {self.epoch} is closed; make a new one for the next epoch")
        ids = torch.as_tensor(ids)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"ids must be integer dataset indices, got dtype {ids.dtype}")
        if outputs.ndim != 2 or outputs.shape[1] != self.num_classes:
            raise ValueError(
                f"outputs must have shape (batch, K={self.num_classes}) to match the store, "
                f"got {tuple(outputs.shape)}: was the store made for another number of classes?"
            )
        if ids.ndim != 1 or ids.shape[0] != outputs.shape[0]:
            raise ValueError(f"ids must have shape ({outputs.shape[0]},) to match outputs, got {tuple(ids.shape)}")
        outputs = outputs.detach()
        if outputs.device.type == "cpu":
            self._queue.put((ids, outputs, None))
            return
        # On an accelerator: probabilities in the store's dtype there, halving the copy.
        probs = self._to_probs(outputs)
        host_probs = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
        host_probs.copy_(probs, non_blocking=True)
        host_ids = ids
        if ids.device.type != "cpu":
            host_ids = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            host_ids.copy_(ids, non_blocking=True)
        done = torch.cuda.Event() if probs.is_cuda else None
        if done is not None:
            done.record()
        self._queue.put((host_ids, host_probs, done))

    def close(self) -> None:
        """Flush every buffered row and mark this writer's part complete (idempotent)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_CLOSE)
            self._thread.join()
        self._raise_if_failed()
        if not self._part.attrs.get("closed"):
            self._part.attrs.update({"closed": True, "rows": self._rows})

    def seal(self) -> dict[str, Any]:
        """Close, then seal the epoch in the store (single-writer runs; see the class doc)."""
        self.close()
        return self.store.seal(self.epoch)

    def abandon(self) -> None:
        """Stop without closing: the epoch's rows stay unsealed and invisible to readers."""
        if not self._closed:
            self._closed = True
            self._queue.put(_CLOSE)
            self._thread.join()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    # -- the background thread's side ------------------------------------------------------

    def _to_probs(self, outputs: torch.Tensor) -> torch.Tensor:
        probs = outputs.float().softmax(dim=1) if self.from_logits else outputs
        return probs.to(self._torch_dtype)

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                break
            if self._error is not None:
                continue  # keep draining so write() never blocks on a full queue
            try:
                self._accept(*item)
            except BaseException as err:  # reported to the training thread
                self._error = err
        if self._error is None:
            try:
                self._flush(final=True)
            except BaseException as err:
                self._error = err

    def _accept(self, ids: torch.Tensor, outputs: torch.Tensor, done: Any) -> None:
        if done is not None:
            done.synchronize()
            probs = outputs
        else:
            probs = self._to_probs(outputs)
        ids_np = ids.numpy().astype(np.int64, copy=False)
        probs_np = probs.numpy()
        if len(ids_np) and (ids_np.min() < 0 or ids_np.max() >= self._num_samples):
            bad = ids_np[(ids_np < 0) | (ids_np >= self._num_samples)][:5]
            raise ValueError(
                f"ids out of range: {bad.tolist()} not in [0, N={self._num_samples}); pass dataset "
                "indices (SoftTargetDataset returns them), not batch positions"
            )
        if not np.isfinite(probs_np).all():
            raise ValueError(
                "predictions contain NaN or inf: the model diverged (lower the learning rate or "
                "check the loss); nothing of this epoch will be sealed"
            )
        self._buffer_ids.append(ids_np)
        self._buffer_probs.append(probs_np)
        self._buffered += len(ids_np)
        if self._buffered >= self._chunk_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write whole chunks (and, when ``final``, the remainder) to the staging part."""
        if not self._buffered:
            return
        ids = np.concatenate(self._buffer_ids)
        probs = np.concatenate(self._buffer_probs)
        n = len(ids) if final else len(ids) - len(ids) % self._chunk_rows
        end = self._rows + n
        if end > self._ids.shape[0]:  # more rows than samples: duplicates; grow the part
            capacity = max(end, 2 * self._ids.shape[0])
            self._ids.resize((capacity,))
            self._probs.resize((capacity, self.num_classes))
        self._ids[self._rows:end] = ids[:n]
        self._probs[self._rows:end] = probs[:n]
        self._rows = end
        self._buffer_ids, self._buffer_probs = [ids[n:]], [probs[n:]]
        self._buffered = len(ids) - n

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(f"the prediction writer of epoch {self.epoch} failed: {self._error}") from self._error
