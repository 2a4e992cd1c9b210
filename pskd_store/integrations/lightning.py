"""PS-KD in a PyTorch Lightning ``Trainer``: one callback, the data set it wraps, and a
``training_step`` that returns its logits.

::

    pskd = PSKD("run/store", num_classes=10, alpha_T=0.8)
    loader = DataLoader(pskd.wrap(train_set), batch_size=128, shuffle=True, num_workers=4,
                        collate_fn=collate_soft_targets)  # from pskd_store: the fastest handover
    trainer = L.Trainer(max_epochs=T, callbacks=[pskd])
    trainer.fit(module, loader)

    # in the LightningModule: a batch is (inputs, targets, labels, ids)
    def training_step(self, batch, batch_idx):
        inputs, targets, *_ = batch
        logits = self(inputs)
        return {"loss": F.cross_entropy(logits, targets), "logits": logits}

With ``PSKD(..., per_token=True)`` the wrapped data set holds ``(input, labels)`` sequences
(labels aligned with the model's output positions, -100 where no target), a batch is
``(inputs, labels, teacher_probs, teacher_classes, alpha, ids)`` and ``training_step``
returns its (B, L, V) logits; the loss is
:func:`~pskd_store.loss.token_soft_cross_entropy` (docs/sequences.md).

Each training epoch t serves sealed epoch t-1 (``set_epoch`` before the epoch's DataLoader
is iterated), records every batch's returned logits under its ids, and seals the epoch
on rank 0 between barriers once its last training batch has ended: before validation and
before any checkpoint of that epoch. The strategy's ranks are the writers' ranks. The
callback's state (store URL, last sealed epoch) rides in Lightning's checkpoints, so
``trainer.fit(..., ckpt_path=...)`` rolls the store back to the checkpoint's epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import labels_of
from ..dataset import SoftTargetBatch, SoftTargetDataset
from ..distributed import Distributed
from ..errors import StoreError
from ..sequences import token_labels
from ..token_dataset import TokenTargetDataset
from .session import StoreSession


class SoftTargets(Dataset):
    """The training data set a :class:`PSKD` callback serves: items ``(input, target,
    label, id)``, or a sequence store's ``TokenTargetDataset`` items. Its targets exist once
    the Trainer starts fitting (the store is opened on the strategy's ranks then); until
    that, only its length is known."""

    def __init__(self, base: Dataset, labels: Sequence | np.ndarray | None, per_token: bool):
        self.base = base
        self.lengths = None
        if per_token:  # the store's labels are every target token; lengths divide them into samples
            self.labels, self.lengths = token_labels(
                (base[i][1] for i in range(len(base))) if labels is None else labels)
        else:
            self.labels = labels_of(base) if labels is None else np.asarray(labels, dtype=np.int64)
        self.served: SoftTargetDataset | TokenTargetDataset | None = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple:
        return self._served()[index]

    def __getitems__(self, indices: list[int]) -> SoftTargetBatch:
        return self._served().__getitems__(indices)

    def _served(self) -> SoftTargetDataset | TokenTargetDataset:
        if self.served is None:
            raise RuntimeError("this data set's targets come from the PSKD callback that wrapped it: pass that "
                               "callback to the Trainer (L.Trainer(callbacks=[pskd])) and iterate it inside fit()")
        return self.served


class PSKD(pl.Callback):
    """PS-KD's soft targets for a Lightning run, from a store at ``store`` (a path or
    ``s3://`` URL) made for the wrapped data set.

    ``logits_key`` names the entry of ``training_step``'s returned dict that holds the
    batch's logits (B, K); a batch whose entry is ``None`` records nothing (its samples
    carry their previous prediction forward), e.g. one mixed by CutMix, and so does a batch
    whose ``training_step`` returns ``None`` (Lightning's way to skip it). ``epochs``: the
    run's T, needed only for ``max_epochs=1000``, which Lightning also sets when
    ``max_epochs`` is not given. ``per_token``: a
    sequence model's per-token targets (logits (B, L, V), ``num_classes`` the vocabulary
    size; ``store_options`` ``topk=8`` keeps a vocabulary's rows small). ``overwrite``
    replaces a store left at ``store`` by an earlier run; ``store_options`` go to
    :meth:`SoftTargetStore.create` (``dtype``, ``topk``, ``keep_epochs``, ...).
    """

    def __init__(self, store: str | Path, num_classes: int, alpha_T: float = 0.8, *, logits_key: str = "logits",
                 overwrite: bool = False, cache_dir: str | None = None, seed: int | None = None,
                 per_token: bool = False, epochs: int | None = None, **store_options: Any):
        self.url = str(store)
        self.num_classes = num_classes
        self.alpha_T = alpha_T
        self.logits_key = logits_key
        self.overwrite = overwrite
        self.cache_dir = cache_dir
        self.seed = seed
        self.store_options = store_options
        self.per_token = per_token
        self.epochs = epochs
        self.data: SoftTargets | None = None
        self.session: StoreSession | None = None
        self._resumed: dict | None = None  # the callback's state in the checkpoint being resumed
        self._failed_mid_epoch = False  # an exception abandoned an epoch's writer: later checkpoints are mid-epoch

    def wrap(self, base: Dataset, labels: Sequence[int] | np.ndarray | None = None) -> SoftTargets:
        """The training data set to build the Trainer's DataLoader from. ``labels`` (in
        index order; per token: each sample's label sequence) spare reading every item when
        ``base`` has no ``targets``."""
        if self.data is not None:
            raise RuntimeError("this PSKD callback already wraps a training data set: wrap it once (in the "
                               "module's or data module's __init__, not in train_dataloader() or setup(), which "
                               "Lightning calls again) and build every DataLoader from what wrap() returned; "
                               "one callback per data set")
        self.data = SoftTargets(base, labels, self.per_token)
        return self.data

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open the store (a resumed run: rolled back to its checkpoint, whose state Lightning
        has loaded by now) and serve the first epoch's teacher: Lightning iterates the first
        epoch's DataLoader, whose workers copy the data set and start loading, before
        ``on_train_epoch_start``."""
        if self.data is None:
            raise RuntimeError("wrap the training data set with pskd.wrap(train_set) and train on that")
        _require_epochs(trainer, self.epochs)
        resuming = trainer.ckpt_path is not None
        if not resuming and trainer.current_epoch > 0:
            raise StoreError(
                f"this Trainer already trained {trainer.current_epoch} epochs: PS-KD goes on with a run only from "
                "its checkpoint (trainer.fit(..., ckpt_path=...), under the same max_epochs), or trains a new run "
                "with a new Trainer")
        if resuming and self._resumed is None:
            raise StoreError(f"the checkpoint {trainer.ckpt_path} holds no PSKD state: resume a run that trained "
                             "with the PSKD callback (strategies that restore checkpoints after on_fit_start, "
                             "such as DeepSpeed, are not supported)")
        if resuming and self._resumed["writing"]:
            epoch = self._resumed["sealed"] + 1
            raise StoreError(f"the checkpoint {trainer.ckpt_path} was taken during epoch {epoch}: "
                             "PS-KD resumes from a checkpoint taken at an epoch's end (ModelCheckpoint's default), "
                             "whose predictions are all sealed; resume from one of those")
        self._failed_mid_epoch = False
        self.session = StoreSession.open(
            self.url, self.data.base, self.data.labels, num_classes=self.num_classes, alpha_T=self.alpha_T,
            total_epochs=trainer.max_epochs, env=_ranks(trainer), resuming=resuming, overwrite=self.overwrite,
            cache_dir=self.cache_dir, seed=self.seed, lengths=self.data.lengths, **self.store_options,
        )
        if resuming:  # a checkpoint from before seal tokens were recorded has none
            self.session.resume_after(self._resumed["sealed"], self._resumed.get("seal_token"))
        self.data.served = self.session.data
        self.session.serve(self.session.sealed + 1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.session.begin_epoch(trainer.current_epoch + 1)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # a checkpoint of an epoch's last step is saved after this callback's seal; Lightning
        # resumes it into the next epoch without on_train_epoch_start
        if self.session.writer is None:
            self.session.begin_epoch(trainer.current_epoch + 1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # training_step returned None: Lightning's skip (under manual optimization, what every step returns)
        skipped = pl_module.automatic_optimization and isinstance(outputs, Mapping) and not outputs
        if not skipped and (not isinstance(outputs, Mapping) or self.logits_key not in outputs):
            raise ValueError(f"training_step must return a dict with the batch's logits under {self.logits_key!r} "
                             f"(e.g. return {{'loss': loss, {self.logits_key!r}: logits}}) for PS-KD to record them, "
                             "or None to skip the batch")
        ids = _ids_of(batch, self.per_token)
        logits = None if skipped else outputs[self.logits_key]
        if logits is not None and self.per_token:
            self.session.record(ids, logits, batch[1])
        elif logits is not None:
            self.session.record(ids, logits)
        if batch_idx + 1 == trainer.num_training_batches:
            self.session.end_epoch()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session.writer is not None:  # an epoch that ended before num_training_batches
            self.session.end_epoch()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give the epoch's part up unsealed. Lightning calls checkpoint callbacks after this
        one (OnExceptionCheckpoint saves here): their checkpoint is still mid-epoch."""
        if self.session is not None:
            self._failed_mid_epoch = self.session.writer is not None
            self.session.abandon()

    def state_dict(self) -> dict[str, Any]:
        session = self.session  # None before fit() starts
        return {"store": self.url, "sealed": session.sealed if session else 0,
                "seal_token": session.seal_token if session else None,
                "writing": session is not None and (session.writer is not None or self._failed_mid_epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["store"] != self.url:
            raise StoreError(f"the checkpoint's run kept its predictions in {state_dict['store']}, not in "
                             f"{self.url}: resume with PSKD({state_dict['store']!r}, ...)")
        self._resumed = state_dict


def _ids_of(batch: Any, per_token: bool) -> torch.Tensor:
    """The store ids of a batch of the wrapped data set (its items collated as they are:
    ``(inputs, targets, labels, ids)``, per token six fields, ids last), or an error naming why
    not: several training DataLoaders give a list or dict of such batches."""
    fields = 6 if per_token else 4
    ids = batch[fields - 1] if isinstance(batch, (tuple, list)) and len(batch) == fields else None
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.dtype.is_floating_point:
        raise ValueError(f"PSKD reads each training batch as the items of the data set pskd.wrap() returned, "
                         f"collated as they are: a tuple of {fields} fields, the ids last; this one is a "
                         f"{type(batch).__name__}. A collate_fn that makes a dict, or several training "
                         "DataLoaders (a list or dict of them, a CombinedLoader), are not supported")
    return ids


def _require_epochs(trainer: pl.Trainer, epochs: int | None) -> None:
    """PS-KD's T: the Trainer's ``max_epochs``, which 1000 may only be when ``epochs`` says
    so (Lightning sets it when ``max_epochs`` is not given, and a_t would be alpha_T·t/1000)."""
    if trainer.max_epochs is None or trainer.max_epochs < 1:
        raise ValueError("PS-KD's alpha_t = alpha_T·t/T needs the number of epochs: set L.Trainer(max_epochs=T)")
    if epochs is not None and epochs != trainer.max_epochs:
        raise ValueError(f"PSKD(epochs={epochs}) but L.Trainer(max_epochs={trainer.max_epochs}): PS-KD's T is the "
                         "run's number of epochs; give both the same")
    if trainer.max_steps != -1:
        raise ValueError(f"max_steps={trainer.max_steps} may stop the run before max_epochs: PS-KD's alpha_t = "
                         "alpha_T·t/T counts whole epochs; leave max_steps unset (fast_dev_run and Tuner.lr_find set "
                         "it: run those without the PSKD callback)")
    if epochs is None and trainer.max_epochs == 1000:
        raise ValueError("max_epochs is 1000, what Lightning sets when max_epochs is not given: PS-KD's alpha_t = "
                         "alpha_T·t/T needs the run's real length; set L.Trainer(max_epochs=T) (a run of 1000 "
                         "epochs: also PSKD(..., epochs=1000))")


def _ranks(trainer: pl.Trainer) -> Distributed:
    return Distributed(rank=trainer.global_rank, world_size=trainer.world_size, local_rank=trainer.local_rank,
                       local_world_size=trainer.num_devices)
