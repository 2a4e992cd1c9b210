"""The store's side of a training loop that another library drives, one epoch at a time.

Both integrations do what ``training.py``'s own loop does around the steps: open (or, on a
resume, roll back) the store on rank 0 while the other ranks wait; at each epoch's start
serve sealed epoch t-1 (each node's local rank 0 decodes it first) and open this rank's
writer; record each step's logits; at the epoch's end close every writer, seal on rank 0
between barriers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..dataset import SoftTargetDataset
from ..distributed import Distributed, local_main_first
from ..errors import StoreError, StoreExistsError
from ..store import SoftTargetStore
from ..token_dataset import TokenTargetDataset
from ..token_writer import TokenWriter
from ..writer import PredictionWriter


class StoreSession:
    """A store, the training data set that serves its targets, and this rank's writer."""

    def __init__(self, store: SoftTargetStore, data: SoftTargetDataset | TokenTargetDataset, env: Distributed,
                 sealed: int):
        self.store, self.data, self.env = store, data, env
        self.sealed = sealed  # the last epoch sealed, 0 before the first: what a checkpoint records
        self.seal_token: str | None = None  # which seal of ``sealed`` the checkpoint's run made
        self.writer: PredictionWriter | TokenWriter | None = None

    @classmethod
    def open(cls, url: str | Path, base: Dataset, labels: Sequence[int] | np.ndarray, *, num_classes: int,
             alpha_T: float, total_epochs: int, env: Distributed, resuming: bool, overwrite: bool = False,
             cache_dir: str | None = None, seed: int | None = None, lengths: np.ndarray | None = None,
             **create_kwargs: Any) -> StoreSession:
        """Every rank's view of the run's store: rank 0 creates it first for a fresh run; a
        resumed run opens the one there and rolls it back with :meth:`resume_after`. With
        ``lengths`` it is a sequence store (``labels`` its target tokens) served by a
        TokenTargetDataset."""
        labels = np.asarray(labels, dtype=np.int64)
        if env.is_main and not resuming:
            _create(url, labels, num_classes, overwrite, {**create_kwargs, "lengths": lengths})
        env.barrier()
        store = SoftTargetStore.open(url, labels=labels, num_classes=num_classes, lengths=lengths,
                                     storage_options=create_kwargs.get("storage_options"))
        served = SoftTargetDataset if lengths is None else TokenTargetDataset
        data = served(base, store, alpha_T, total_epochs, cache_dir=cache_dir, seed=seed, rank=env.rank)
        return cls(store, data, env, sealed=0)

    def resume_after(self, epoch: int, seal_token: str | None = None) -> None:
        """Forget what the store holds after ``epoch``, the last epoch sealed before the
        checkpoint being resumed (rank 0 rolls back while the other ranks wait); with the
        ``seal_token`` the checkpoint recorded, refuse a store whose epoch another run sealed."""
        self._require_the_schedule_of(epoch)  # before anything is rolled back
        self._require_the_seal_of(epoch, seal_token)
        if self.env.is_main:
            self.store.rollback(epoch)
        self.env.barrier()
        self.store.refresh()
        if (self.store.latest_sealed or 0) != epoch:
            raise StoreError(f"the store at {self.store.url} has sealed epochs {self.store.sealed_epochs} but the "
                             f"checkpoint being resumed was taken after epoch {epoch}: resume with the run's own store")
        self.sealed, self.seal_token = epoch, seal_token

    def _require_the_seal_of(self, epoch: int, seal_token: str | None) -> None:
        """A checkpoint's epoch sealed anew by another run (trained into the same store with
        overwrite=True, say) would serve that run's predictions as this one's teachers."""
        stored = self.store.epoch_info(epoch).get("seal_token") if epoch in self.store.sealed_epochs else None
        if None not in (seal_token, stored) and stored != seal_token:
            raise StoreError(
                f"the store at {self.store.url} holds an epoch {epoch} that another run sealed (its seal token "
                "differs from the one the checkpoint recorded): another run trained into this store since, and its "
                "predictions are not this run's teachers. Resume with the run's own store, or train a new run")

    def _require_the_schedule_of(self, epoch: int) -> None:
        """Refuse to resume after ``epoch`` with another alpha_T or number of epochs than
        the run's (recorded when it sealed the epoch), as ``pskd-store train --resume`` does."""
        recorded = self.store.epoch_info(epoch).get("schedule") if epoch in self.store.sealed_epochs else None
        if recorded is not None and recorded != self._schedule():
            raise StoreError(
                f"the run being resumed trained with alpha_T={recorded['alpha_T']} over {recorded['total_epochs']} "
                f"epochs, this one with alpha_T={self.data.alpha_T} over {self.data.total_epochs}: alpha_t = "
                f"alpha_T·t/T would change every target from epoch {epoch + 1} on. Resume with the run's alpha_T "
                "and number of epochs, or train a new run")

    def _schedule(self) -> dict[str, float]:
        """What alpha_t = alpha_T·t/T is made of: recorded with each sealed epoch."""
        return {"alpha_T": float(self.data.alpha_T), "total_epochs": int(self.data.total_epochs)}  # JSON's

    @property
    def epoch(self) -> int:
        return self.data.epoch

    def serve(self, epoch: int) -> None:
        """Serve sealed epoch ``epoch - 1`` to the data set (each node's local rank 0 decodes it first)."""
        local_main_first(self.env, lambda: self.data.set_epoch(epoch))

    def begin_epoch(self, epoch: int) -> None:
        """Open this rank's writer for ``epoch``, serving its teacher first unless it already is."""
        if self.data.epoch != epoch:
            self.serve(epoch)
        self.writer = self.store.writer(epoch, rank=self.env.rank, world_size=self.env.world_size)

    def record(self, ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """This step's predictions of samples ``ids``; a sequence store's with the labels that
        mark their target positions. The writer queues its copies without a device sync; ids
        that a loop moved to the device are read back (Hugging Face's Trainer moves them)."""
        if labels is None:
            self.writer.write(ids, logits.detach())
        else:
            self.writer.write(ids, logits.detach(), labels)

    def end_epoch(self) -> None:
        """Close every rank's writer and seal the epoch on rank 0: it is the next teacher."""
        self.writer.close()
        self.writer = None
        self.env.barrier()
        if self.env.is_main:
            # a loop whose every batch recorded nothing carries ids forward, but says so: most
            # likely its logits never reached the writer, and PS-KD trains as cross-entropy
            sealed = self.store.seal(self.epoch, allow_empty=True, schedule=self._schedule())
            if not sealed["ids_written"]:
                recorded = [e for e in self.store.sealed_epochs if self.store.epoch_info(e)["ids_written"]]
                then = (f"epoch {recorded[-1]}'s predictions again" if recorded else
                        "every sample's one-hot label, so PS-KD trains as cross-entropy")
                warnings.warn(f"epoch {self.epoch} recorded no predictions: every sample's teacher carries forward, "
                              f"and the next epoch's targets blend {then}; record each batch's logits "
                              "(Lightning: return them from training_step, not None)", RuntimeWarning, stacklevel=2)
        self.env.barrier()
        self.store.refresh()  # rank 0's seal: every rank's checkpoint (one per node, say) records its token
        self.sealed, self.seal_token = self.epoch, self.store.epoch_info(self.epoch)["seal_token"]

    def abandon(self) -> None:
        """After a failed step: give this rank's part up, unsealed, so a resume can redo it."""
        if self.writer is not None:
            self.writer.abandon()
            self.writer = None


def _create(url: str | Path, labels: np.ndarray, num_classes: int, overwrite: bool, options: dict) -> None:
    try:
        SoftTargetStore.create(url, labels, num_classes, overwrite=overwrite, **options)
    except StoreExistsError as err:
        store = SoftTargetStore.open_or_create(url, labels, num_classes, **options)  # this data, these rows
        if store.sealed_epochs or not store.staging(1).abandoned():
            raise StoreExistsError(f"a store already exists at {url}: to continue its run, resume from the run's "
                                   "checkpoint; to train anew, give a new store URL or pass overwrite=True (if a "
                                   "run is writing its first epoch there now, it is that run's)") from err
        # a run that sealed nothing and whose writers are all gone (killed in epoch 1, before any
        # checkpoint), started again: its store is taken over, its staged rows given up
        store.discard_staging(1)
