"""TokenWriter: a sequence model's per-token predictions into a sequence store's token rows.

``write(ids, logits, labels)`` takes what a language or translation model's step has:
sample ids (B,), logits (B, L, V) and labels (B, L) with ``ignore_index`` at the positions
that are not targets (padding, a prompt). Each sample's target positions go to its fixed
rows (sequences.py); padding is never stored. The target positions are picked on the
logits' device without a synchronisation: a stable sort of the padding flags puts each
row's targets first, in order, and the host knows how many there are from the store's
lengths. The rows then go through a :class:`~pskd_store.writer.PredictionWriter`, which
makes a top-k store's rows (softmax, top k, classes) where the logits are, so only k
values per token are copied.

That every sample has the number of targets its store rows were made for is checked at
:meth:`close` (one synchronisation per epoch): an epoch whose tokenisation changed is
abandoned, never sealed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .accelerator import accelerator_for
from .errors import StoreError
from .sequences import IGNORE_INDEX
from .writer import ClosesOnSuccess, PredictionWriter

if TYPE_CHECKING:
    from .store import SoftTargetStore


class TokenWriter(ClosesOnSuccess):
    """Record (sample ids, logits (B, L, V), labels (B, L)) of each step of ``epoch`` into a
    sequence store. Options as :class:`~pskd_store.writer.PredictionWriter`'s (``rank``,
    ``from_logits``, ``buffers``). A context manager closes on success and abandons the
    epoch's rows on an exception."""

    def __init__(self, store: SoftTargetStore, epoch: int, *, ignore_index: int = IGNORE_INDEX, **options: Any):
        token_rows = store.token_rows
        if token_rows is None:
            raise StoreError(
                f"{store.url} holds a row per sample, not per token: write it with a PredictionWriter, or create "
                "a sequence store with SoftTargetStore.create(..., lengths=...) (sequences.token_labels)"
            )
        self.epoch = epoch
        self.ignore_index = ignore_index
        self._token_rows = token_rows
        self._writer = PredictionWriter(store, epoch, **options)
        self._mismatches: torch.Tensor | None = None  # (S,) copies written with another number of targets
        self._counts: torch.Tensor | None = None  # (S,) targets of a copy of each sample, for the error message

    def write(self, ids: torch.Tensor | np.ndarray, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Record one batch. ``ids`` are dataset indices on the host (as a DataLoader gives
        them); ``logits`` and ``labels`` may live on an accelerator, which is not synchronised."""
        ids = torch.as_tensor(ids).cpu()
        if logits.ndim != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"logits must be (batch, length, vocabulary) and labels (batch, length), got {tuple(logits.shape)} "
                f"and {tuple(labels.shape)}: pass the model's per-position logits and the labels of the same positions"
            )
        if ids.ndim != 1 or len(ids) != len(logits):
            raise ValueError(f"ids must have shape ({len(logits)},) to match the logits, got {tuple(ids.shape)}")
        if len(ids) and (ids.min() < 0 or ids.max() >= self._token_rows.num_sequences):
            raise ValueError(f"ids must be sample indices in [0, {self._token_rows.num_sequences}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        expected = self._token_rows.lengths[ids.numpy()]
        length = logits.shape[1]
        if len(ids) and expected.max() > length:
            sample = int(ids[expected.argmax()])
            raise ValueError(
                f"sample {sample} has {int(expected.max())} target positions in the store but the batch is only "
                f"{length} long: the store was made from another tokenisation (longer sequences) of the data"
            )
        padding = labels == self.ignore_index
        targets_first = torch.sort(padding.to(torch.uint8), dim=1, stable=True).indices
        batch_index, position = np.nonzero(np.arange(length)[None, :] < expected[:, None])
        batch_index = torch.from_numpy(batch_index).to(logits.device, non_blocking=True)
        position = targets_first[batch_index, torch.from_numpy(position).to(logits.device, non_blocking=True)]
        self._record_counts(ids, length - padding.sum(dim=1), expected)
        rows = torch.from_numpy(self._token_rows.rows(ids.numpy()))
        self._writer.write(rows, logits[batch_index, position])

    def _record_counts(self, ids: torch.Tensor, counts: torch.Tensor, expected: np.ndarray) -> None:
        """Count, on the labels' device, the copies of each sample whose targets differ from its
        store rows: accumulated, so that a sample twice in a batch is checked in each copy
        (an accelerator's index_put keeps an unspecified one of the duplicates)."""
        device = counts.device
        if self._mismatches is None:
            self._mismatches = torch.zeros(self._token_rows.num_sequences, dtype=torch.int32, device=device)
            self._counts = torch.zeros(self._token_rows.num_sequences, dtype=torch.int32, device=device)
        ids = ids.to(device, non_blocking=True)
        counts = counts.to(torch.int32)
        wrong = counts != torch.from_numpy(expected).to(device, non_blocking=True)
        self._mismatches.index_put_((ids,), wrong.to(torch.int32), accumulate=True)
        self._counts[ids] = counts

    def close(self) -> None:
        """Check every written sample's number of targets, then close the writer (its part is
        complete). A sample whose labels hold another number of targets than its store rows
        abandons the epoch's rows and raises :class:`StoreError`."""
        if self._mismatches is not None:
            accelerator = accelerator_for(self._mismatches.device)
            if accelerator is not None:  # written on whichever streams were current: wait for them all
                accelerator.synchronize(self._mismatches.device)
            wrong = np.flatnonzero(self._mismatches.cpu().numpy())
            if len(wrong):
                self._writer.abandon()
                sample = int(wrong[0])
                stored, count = self._token_rows.lengths[sample], int(self._counts[sample])
                had = f"{count} target positions" if count != stored else "another number of target positions"
                raise StoreError(
                    f"sample {sample} had {had} (labels other than {self.ignore_index}) in epoch {self.epoch} but "
                    f"the store was made with {stored} ({len(wrong)} samples differ): the tokenisation must stay "
                    f"fixed for a run; nothing of epoch {self.epoch} was kept"
                )
        self._writer.close()

    def abandon(self) -> None:
        """Stop without closing: the epoch's rows stay unsealed (PredictionWriter.abandon)."""
        self._writer.abandon()
