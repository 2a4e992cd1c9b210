"""Token rows: a store row per (sample, target position) of a sequence data set.

A sequence store is a store of token rows. Sample i has ``lengths[i]`` target positions
(the positions whose label is not ``ignore_index``), fixed by its tokenisation, so its
j-th target position is the fixed row ``offsets[i] + j``: the writer, the seal, the memory
map and ``verify`` move rows exactly as they do for images, and padding is never stored.
The store's labels are the target tokens in that order (:func:`token_labels` builds them).

The trajectory tier of a sequence store holds per-sample summaries instead of per-token
records (trajectory.py), so it stays as small as an image store's.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE_INDEX = -100  # what torch's cross_entropy and Hugging Face's models skip


class TokenRows:
    """Where each sample's target positions live in a sequence store: rows
    ``offsets[i] .. offsets[i] + lengths[i]`` hold sample i's positions in order."""

    def __init__(self, lengths: np.ndarray):
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or len(lengths) == 0 or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError("lengths must be a non-empty 1-D array of integer target counts, one per sample")
        if lengths.min() < 0:
            raise ValueError(f"lengths count target positions, so none is negative; got {lengths.min()}")
        self.lengths = lengths.astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The store rows of samples ``ids``, sample by sample, each in position order."""
        ids = np.asarray(ids, dtype=np.int64)
        counts = self.lengths[ids]
        starts = np.repeat(self.offsets[ids] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return starts + np.arange(int(counts.sum()))

    def sample_of(self, rows: np.ndarray) -> np.ndarray:
        """The sample each row belongs to."""
        return np.searchsorted(self.offsets, rows, side="right") - 1


def token_labels(labels: Iterable[np.ndarray], ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample label sequences (padding marked ``ignore_index``) -> (the store's labels:
    every target token in sample and position order, the per-sample lengths): what
    ``SoftTargetStore.create(url, labels, vocab_size, lengths=lengths)`` takes."""
    kept = [np.asarray(sample).reshape(-1) for sample in labels]
    kept = [sample[sample != ignore_index] for sample in kept]
    if not kept:
        raise ValueError("a sequence store needs at least one sample")
    return np.concatenate(kept).astype(np.int64), np.array([len(sample) for sample in kept], dtype=np.int64)
