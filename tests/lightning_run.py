"""A small Lightning run with the PSKD callback, written as a user writes one: imported by
tests/test_lightning.py for one process (and a forked one it kills), run as a script for
DDP (Lightning re-launches the script on each rank).

Each rank saves what its training steps saw (epoch, ids, logits, targets) to
``ROOT/seen_rank{R}.pt``; rank 0 saves the final weights to ``ROOT/final.pt``.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pskd_store.dataset import collate_soft_targets
from pskd_store.integrations.lightning import PSKD

N, K, FEATURES = 96, 4, 8


def blobs() -> TensorDataset:
    """K Gaussian blobs, the same on every rank and in every run."""
    generator = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(K, FEATURES, generator=generator)
    labels = torch.arange(N) % K
    return TensorDataset(centres[labels] + torch.randn(N, FEATURES, generator=generator), labels)


class Classifier(pl.LightningModule):
    """A user's module; the one PS-KD line is the returned logits."""

    def __init__(self, kill_in_epoch: int | None = None, kill_at: str = "mid-epoch"):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, K))
        self.kill_in_epoch, self.kill_at = kill_in_epoch, kill_at
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        inputs, targets, labels, ids = batch
        logits = self.net(inputs)
        self.seen.append((self.current_epoch + 1, ids, logits.detach().clone(), targets))
        return {"loss": F.cross_entropy(logits, targets), "logits": logits}

    def on_before_optimizer_step(self, optimizer):
        if self.global_rank == 1 and self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            time.sleep(0.5)  # rank 1 closes its writer late: rank 0 must wait for it before sealing

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.current_epoch + 1 == self.kill_in_epoch and self.kill_at == "mid-epoch" and batch_idx == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # some rows staged

    def on_train_epoch_end(self):
        if self.current_epoch + 1 == self.kill_in_epoch and self.kill_at == "after-seal":
            os.kill(os.getpid(), signal.SIGKILL)  # sealed, but ModelCheckpoint (after this hook) has not saved it

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def fit(root: Path, *, devices: int = 1, epochs: int = 4, workers: int = 0, kill_in_epoch: int | None = None,
        kill_at: str = "mid-epoch", resume: bool = False, precision: str = "32-true", **pskd_options) -> Classifier:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    pskd = PSKD(root / "store", num_classes=K, alpha_T=0.8, chunk_rows=16, **pskd_options)
    data = pskd.wrap(blobs())
    if devices == 1:  # shuffled by epoch, so that a resumed run draws the batches an uninterrupted one does
        loader = DataLoader(data, batch_size=16, sampler=DistributedSampler(data, num_replicas=1, rank=0, seed=0),
                            num_workers=workers, persistent_workers=workers > 0, collate_fn=collate_soft_targets)
    else:  # Lightning gives each rank a DistributedSampler; default_collate, as a user may leave it
        loader = DataLoader(data, batch_size=16, shuffle=True, num_workers=workers)
    module = Classifier(kill_in_epoch, kill_at)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", filename="{epoch}", save_last=True, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=devices, precision=precision,
                         strategy="ddp" if devices > 1 else "auto", callbacks=[pskd, checkpoints], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(module, loader, ckpt_path=root / "checkpoints" / "last.ckpt" if resume else None)
    torch.save(module.seen, root / f"seen_rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        torch.save(module.net.state_dict(), root / "final.pt")
    return module


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    fit(args.root, devices=args.devices)
