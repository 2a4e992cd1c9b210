"""CS-KD's batches: every sample together with another sample of its class.

CS-KD (Yun et al., CVPR 2020) regularises the prediction of a sample towards the
prediction of another sample of the same class. Its authors' ``PairBatchSampler``
(alinlab/cs-kd, ``datasets.py``) yields each batch of B shuffled ids followed by B
partners, partner i drawn uniformly among the samples of class(i) (the sample itself
included). This one does the same from a generator seeded by (seed, epoch), so a resumed
run draws the same batches, and shards the shuffled ids over DDP ranks as
``DistributedSampler`` does (padding with the first ids). Partners are yielded as
:class:`~pskd_store.seeding.Draw`: a partner is augmented independently of the same
sample's other draws in the epoch, as the authors' per-item transforms do.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from .seeding import Draw


class ClassPairBatchSampler(Sampler[list[int]]):
    """Batches of ``2 * batch_size`` ids: ``batch_size`` shuffled ids, then a partner of
    the same class for each. Call :meth:`set_epoch` before each epoch."""

    def __init__(self, labels: np.ndarray, batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0):
        labels = np.asarray(labels, dtype=np.int64)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self._by_class = np.argsort(labels, kind="stable")  # ids grouped by class
        counts = np.bincount(labels)
        self._class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._class_count = counts
        self._labels = labels
        self._per_replica = -(-len(labels) // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self._per_replica // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self._labels), generator=generator).numpy()
        padded = np.concatenate([order, order[:self._per_replica * self.num_replicas - len(order)]])
        ids = padded[self.rank::self.num_replicas]
        # every rank draws the same numbers, so a partner depends only on (seed, epoch, position)
        uniform = torch.rand(len(padded), generator=generator, dtype=torch.float64).numpy()
        uniform = uniform[self.rank::self.num_replicas]
        classes = self._labels[ids]
        offsets = np.minimum((uniform * self._class_count[classes]).astype(np.int64), self._class_count[classes] - 1)
        partners = self._by_class[self._class_start[classes] + offsets]
        for start in range(0, len(ids), self.batch_size):
            # a partner is another draw of a sample this epoch: repeat = its place in the epoch + 1
            yield ids[start:start + self.batch_size].tolist() + [
                Draw(partner, start + offset + 1)
                for offset, partner in enumerate(partners[start:start + self.batch_size].tolist())]
