"""The steps of training and evaluation, apart from the recipe around them: device moves,
autocast, one epoch of training steps, and predictions of an evaluation set. Everything
arrives as an explicit argument, as in torchvision's ``references/classification``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .accelerator import accelerator_for
from .augment import BatchAugment
from .distributed import Distributed
from .methods import Method
from .metrics import true_class_rank
from .writer import PredictionWriter

T = TypeVar("T")


def to_device(inputs: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    inputs = inputs.to(device, non_blocking=True)
    if channels_last and inputs.ndim == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bfloat16 mixed precision (no loss scaling needed) on the training device, GPU or
    CPU, with ``amp``; full precision without."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


# torch's float32 precision settings of cuDNN's convolutions and RNNs and of cuBLAS's matrix products
_PRECISION_SETTINGS = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
# and of oneDNN's (CPU) matrix products, which torch.set_float32_matmul_precision sets with cuBLAS's
_CPU_MATMUL = torch.backends.mkldnn.matmul


@contextmanager
def float32_precision(tf32: bool) -> Iterator[None]:
    """Convolutions and matrix products in full float32 inside the block, as the paper's runs
    (PyTorch 1.6, before TensorFloat-32) computed them; PyTorch's cuDNN default would run
    every convolution in TF32 on Ampere and later GPUs, with 10 of float32's 23 mantissa
    bits. ``tf32`` opts in to TF32 for both (faster, not the paper's arithmetic).

    torch keeps two sets of switches: the older flags (``cudnn.allow_tf32``, the matmul
    precision), which its TunableOp and other libraries read, and torch 2.9's per-operation
    ``fp32_precision``. Set alone, the newer leave the older unreadable; so both are set,
    each operation's explicitly (an unset one inherits a caller's backend-wide setting).
    The CPU's (oneDNN's) are left as they are (where a caller set them, torch's one matmul
    precision reading, which folds in both, is unreadable inside). Put back afterwards: the
    newer settings as found, the older where they were readable. (torch reads back what a
    setting resolves to: one that followed a backend-wide setting before is set to that
    value after, and no longer follows a later change of it.)"""
    kept = [setting.fp32_precision for setting in (*_PRECISION_SETTINGS, _CPU_MATMUL)]
    cudnn_flag = _readable(lambda: torch.backends.cudnn.allow_tf32)
    matmul_flag = _readable(lambda: torch.backends.cuda.matmul.allow_tf32)
    matmul = _readable(torch.get_float32_matmul_precision)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    for setting in _PRECISION_SETTINGS:
        setting.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        if cudnn_flag is not None:
            torch.backends.cudnn.allow_tf32 = cudnn_flag
        if matmul_flag is not None:
            torch.backends.cuda.matmul.allow_tf32 = matmul_flag
        if matmul is not None:  # after the flag, which it implies where both were readable
            torch.set_float32_matmul_precision(matmul)
        for setting, value in zip((*_PRECISION_SETTINGS, _CPU_MATMUL), kept):
            setting.fp32_precision = value


def _readable(getter: Callable[[], T]) -> T | None:
    """One of torch's older precision flags; None where the caller set the newer settings
    alone, which leaves it unreadable."""
    try:
        return getter()
    except RuntimeError:
        return None


def train_one_epoch(model: torch.nn.Module, method: Method, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    writer: PredictionWriter, device: torch.device, *, epoch: int, epochs: int, steps: int,
                    augment: BatchAugment | None, amp: bool, channels_last: bool, quiet: bool) -> torch.Tensor:
    """``steps`` steps of ``method`` on ``loader``'s batches, each step's recorded rows
    handed to ``writer``. Returns (loss sum, correct, samples) on ``device``: nothing
    waits for the device during the epoch, but the progress bar's loss every 10 steps."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    started = time.perf_counter()
    # a bar on a terminal only (disable=None): a redirected log keeps the per-epoch lines, not \r frames
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", disable=True if quiet else None, leave=False,
               dynamic_ncols=True)
    for step, (inputs, targets, labels, ids) in enumerate(loader):
        if step == steps:
            break
        batch = method.batch(to_device(inputs, device, channels_last), targets,
                             labels.to(device, non_blocking=True), ids)
        if augment is not None:
            batch = method.augment(augment, batch, epoch=epoch, step=step)
        with autocast(device, amp):
            logits = model(batch.inputs)
        partner_logits = None
        if batch.partners is not None:  # after the trained batch's forward, as CS-KD's authors' loop
            with torch.no_grad(), autocast(device, amp):
                partner_logits = model(batch.partners)
        loss = method.loss(logits, batch.targets, partner_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if batch.recorded:  # a CutMix-mixed batch records nothing
            writer.write(batch.ids[:batch.recorded], logits[:batch.recorded])
        totals[0] += loss.detach() * len(batch.labels)
        totals[1] += (logits.argmax(1) == batch.labels).sum()
        totals[2] += len(batch.labels)
        if not bar.disable and (step % 10 == 0 or step == steps - 1):  # loss.item() waits for the step
            loss_sum, correct, seen = totals.tolist()
            bar.set_postfix(loss=f"{loss.item():.3f}", err=f"{100 * (1 - correct / seen):.1f}%",
                            alpha_t=f"{method.alpha(epoch, epochs):.3f}",
                            samples_s=f"{seen / (time.perf_counter() - started):.0f}")
        bar.update()
    bar.close()
    return totals


def eval_loader(data: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """An in-order loader for evaluation, its workers kept alive between epochs. A generator
    of its own: the workers' base seed (unused) is drawn from it, not from the process's
    stream, which dropout draws from and a resume restores (persistent workers draw once a
    run, a loader without workers every epoch)."""
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=accelerator_for(device) is not None,
                      generator=torch.Generator())


class Predictions(NamedTuple):
    """An evaluation set's predictions, sample by sample in its order."""

    probs: np.ndarray  # (N, K) float32 softmax of the fp32 logits
    labels: np.ndarray  # (N,) int64
    nll: np.ndarray | None  # (N,) float32 cross-entropy of the fp32 logits, which the authors' NLL
    # averages; None for probabilities without logits (an ensemble's average)
    rank: np.ndarray | None  # (N,) int64 rank of the true class among the logits, which the authors'
    # top-1/top-5 count; None without logits


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device, *, amp: bool,
            channels_last: bool) -> Predictions:
    """Softmax probabilities, labels, each sample's cross-entropy and its true class's rank,
    of ``loader``'s data, in order. The cross-entropy and the rank come from the logits, as
    the authors' ``main.py`` takes them (``nn.CrossEntropyLoss``, ``output.topk``): a
    probability that underflows to 0 in float32 still has its loss and its place."""
    model.eval()
    probs, labels, nll, rank = [], [], [], []
    for inputs, target in loader:
        with autocast(device, amp):
            logits = model(to_device(inputs, device, channels_last)).float()
        target = torch.as_tensor(target)
        probs.append(logits.softmax(1).cpu())
        nll.append(F.cross_entropy(logits, target.to(logits.device), reduction="none").cpu())
        rank.append(true_class_rank(logits.cpu().numpy(), target.numpy()))
        labels.append(target)
    if not probs:  # an empty shard of a set smaller than the world
        return Predictions(np.empty((0, 0), np.float32), np.empty(0, np.int64), np.empty(0, np.float32),
                           np.empty(0, np.int64))
    return Predictions(torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(nll).numpy(),
                       np.concatenate(rank))


def predict_sharded(model: torch.nn.Module, loader: DataLoader, env: Distributed, device: torch.device, *,
                    amp: bool, channels_last: bool) -> Predictions | None:
    """Predictions of a whole evaluation set, in index order, on rank 0 (None elsewhere):
    each rank predicts its shard (every world_size-th sample, from its rank on) and rank 0
    interleaves them back."""
    shards = env.gather_to_main(predict(model, loader, device, amp=amp, channels_last=channels_last))
    if shards is None:
        return None
    size = sum(len(shard.labels) for shard in shards)
    whole = Predictions(np.empty((size, shards[0].probs.shape[1]), dtype=np.float32), np.empty(size, dtype=np.int64),
                        np.empty(size, dtype=np.float32), np.empty(size, dtype=np.int64))
    for rank, shard in enumerate(shards):
        if not len(shard.labels):
            continue
        for into, part in zip(whole, shard):
            into[rank::len(shards)] = part
    return whole
