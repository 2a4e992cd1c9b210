"""TokenTargetDataset: a sequence data set whose items carry each target position's teacher."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset import TeacherEpochDataset, TokenTargetItems, require_pairs
from .sequences import IGNORE_INDEX
from .store import SoftTargetStore, StoreError
from .store_keys import token_from_int


class TokenTargetDataset(TeacherEpochDataset):
    """Wrap a map-style data set of ``(input, labels)`` for a sequence store, ``labels`` a
    (L,) integer sequence with ``ignore_index`` where a position is not a target; items
    become ``(input, labels, teacher_probs, teacher_classes, alpha, index)``.

    ``teacher_probs`` (L, w) float32 and ``teacher_classes`` (L, w) int64 hold, at each
    target position, the previous epoch's stored probabilities and their classes (the k
    largest of a top-k store, all V of a dense one), zeros elsewhere; ``alpha`` is a_t, 0
    in epoch 1 (no teacher yet). :func:`~pskd_store.loss.token_soft_cross_entropy` rebuilds
    PS-KD's target from them on the device, so no (B, L, V) target exists on the host.
    Items of one length collate with ``default_collate``, and with
    :func:`~pskd_store.dataset.collate_soft_targets` into a tuple whose small tensors a
    worker hands over by value. Epochs, workers, ``seed`` and ``rank``:
    :class:`~pskd_store.dataset.TeacherEpochDataset`.
    """

    def __init__(self, base: Dataset, store: SoftTargetStore, alpha_T: float, total_epochs: int, *,
                 ignore_index: int = IGNORE_INDEX, **options):
        self.ignore_index = ignore_index
        super().__init__(base, store, alpha_T, total_epochs, **options)
        self._token_rows = store.token_rows
        self._width = store.topk or store.num_classes

    def _require_same_data(self, base: Dataset, store: SoftTargetStore) -> None:
        if store.token_rows is None:
            raise StoreError(f"{store.url} holds a row per sample, not per target token: wrap the data set with "
                             "SoftTargetDataset, or create a sequence store (SoftTargetStore.create(..., lengths=...))")
        if len(base) != store.token_rows.num_sequences:
            raise StoreError(f"the data set has {len(base)} sequences but the store was made for "
                             f"{store.token_rows.num_sequences}: use the store of this data set")

    def __getitems__(self, indices: list[int]) -> TokenTargetItems:
        epoch, teacher, token, prepared = self._current()
        items = self._load(indices, epoch)
        ids = np.array([int(i) for i in indices], dtype=np.int64)
        try:
            labels = [torch.as_tensor(label) for _, label in items]
        except (TypeError, ValueError):
            require_pairs(items, indices)
            raise
        targets = [label != self.ignore_index for label in labels]
        probs, classes, alpha = self._lookup(ids, labels, targets, epoch, teacher, token, prepared)
        out, at = [], 0
        for (input, _), label, target, i in zip(items, labels, targets, ids):
            n = int(target.sum())
            item_probs = torch.zeros((len(label), self._width))
            item_classes = torch.zeros((len(label), self._width), dtype=torch.int64)
            item_probs[target] = probs[at:at + n]
            item_classes[target] = classes[at:at + n]
            out.append((input, label, item_probs, item_classes, alpha, int(i)))
            at += n
        return TokenTargetItems(out)

    def teacher(self, labels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """What the items of samples ``ids`` with (B, L) ``labels`` carry, for a batch at once:
        (teacher_probs (B, L, w), teacher_classes (B, L, w), alpha), for loops that look the
        teacher up in the main process (``integrations.transformers``)."""
        labels = torch.as_tensor(labels).cpu()
        targets = labels != self.ignore_index
        probs, classes, alpha = self._lookup(torch.as_tensor(ids).cpu().numpy().astype(np.int64), list(labels),
                                             list(targets), *self._current())
        batch_probs = torch.zeros((*labels.shape, self._width))
        batch_classes = torch.zeros((*labels.shape, self._width), dtype=torch.int64)
        batch_probs[targets] = probs  # row-major: sample by sample, positions in order, as the rows
        batch_classes[targets] = classes
        return batch_probs, batch_classes, alpha

    def _lookup(self, ids: np.ndarray, labels: list[torch.Tensor], targets: list[torch.Tensor], epoch: int,
                teacher: int, token: int, prepared: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(probabilities, classes) of every target position of ``ids`` in row order, and a_t."""
        rows = self._check_tokens(ids, labels, targets)
        if teacher == 0:
            return torch.zeros((len(rows), self._width)), torch.zeros((len(rows), self._width), dtype=torch.int64), 0.0
        probs, classes = self.service.encoding.sparse(self.service.stored_rows(teacher, token_from_int(token), rows,
                                                                               prepared))
        return torch.from_numpy(probs), torch.from_numpy(classes), self._alpha(epoch)

    def _check_tokens(self, ids: np.ndarray, labels: list[torch.Tensor], targets: list[torch.Tensor]) -> np.ndarray:
        """The store rows of ``ids``, once their target positions and tokens are the ones the
        store was made for (another tokenisation would put each teacher row at another token)."""
        counts = np.array([int(target.sum()) for target in targets], dtype=np.int64)
        expected = self._token_rows.lengths[ids]
        wrong = np.flatnonzero(counts != expected)
        if len(wrong):
            first = wrong[0]
            raise StoreError(
                f"sample {ids[first]} has {counts[first]} target positions (labels other than {self.ignore_index}) "
                f"but the store was made with {expected[first]}: keep the tokenisation the store was made from, "
                "or create a new store"
            )
        rows = self._token_rows.rows(ids)
        tokens = np.concatenate([label[target].numpy() for label, target in zip(labels, targets)]).astype(np.int64)
        differs = np.flatnonzero(tokens != self._labels[rows])
        if len(differs):
            sample = int(self._token_rows.sample_of(rows[differs[0]]))
            raise StoreError(
                f"sample {sample} has other target tokens than the store was made for ({len(differs)} of "
                f"{len(rows)} checked tokens differ): wrap the data set the store was created for, in the same "
                "order, or create a new store"
            )
        return rows
