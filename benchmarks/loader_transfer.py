"""What receiving a batch from DataLoader workers costs the training thread; prints JSON.

With workers, the training thread's share of loading is receiving each batch: every
tensor in it is a shared-memory file whose descriptor the training process fetches from
the worker (torch's default ``file_descriptor`` sharing). Four loaders over MNIST-1D,
``--workers`` persistent workers each, batch 128, taking turns epoch by epoch:
  * ``ce``: the base data set, batches ``(inputs, labels)``, ``default_collate``,
  * ``ce_by_value``: the same, its labels handed over by value as the store's batch is
    (``train_overhead.py``'s CE arm): the speed for the store to match,
  * ``store``: a SoftTargetDataset serving sealed epoch 1, ``collate_soft_targets``:
    ``(inputs, targets, labels, ids)``, the last three handed over by value,
  * ``store_four_tensors``: the same batches handed over as four shared-memory tensors
    (the collate's batch turned into a plain tuple), as before batch_transfer.py.
Between batches the training thread sleeps ``--step-ms`` (an accelerator's step, which
leaves the CPU to the workers). Reported: the median microseconds of a ``next()`` on the
training thread, per loader; the store's over CE's handed over alike (what the store's
batch costs), and the four-tensor batch's over plain CE's (what it cost before).

``one_tensor_us``: the same for batches of ``(inputs, one float32 tensor of --sizes KB)``,
the tensor in shared memory or by value: where copying stops paying (``BY_VALUE_BYTES``).

    python benchmarks/loader_transfer.py
    python benchmarks/loader_transfer.py --workers 4 --step-ms 10 --sizes 64,512,2048
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from pskd_store.batch_transfer import BY_VALUE_BYTES
from pskd_store.data import build_datasets
from pskd_store.dataset import SoftTargetDataset, collate_soft_targets
from pskd_store.store import SoftTargetStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import collate_as_the_store_does  # noqa: E402

LOADERS = ("ce", "ce_by_value", "store", "store_four_tensors")


def four_tensors(batch) -> tuple:
    """``collate_soft_targets`` whose batch crosses as separate tensors."""
    return tuple(collate_soft_targets(batch))


class Sized(Dataset):
    """Batches of ``(inputs, one float32 tensor of nbytes)``, made whole by ``__getitems__``;
    ``by_value``: the tensor as a NumPy array, which a worker hands over in the message
    whatever its size (as ByValueBatch does up to BY_VALUE_BYTES)."""

    def __init__(self, batches: int, nbytes: int, by_value: bool):
        self.batches, self.nbytes, self.by_value = batches, nbytes, by_value

    def __len__(self) -> int:
        return self.batches

    def __getitems__(self, indices: list[int]) -> tuple:
        tensor = torch.rand(self.nbytes // 4)
        return torch.zeros(len(indices), 40), tensor.numpy() if self.by_value else tensor


def as_made(batch):
    """The ``collate_fn`` of batches their data set made whole."""
    return batch


def one_tensor_us(sizes_kb: list[int], args) -> dict[str, dict[str, float]]:
    """Per size: the median microseconds a ``next()`` takes, the tensor shared or by value."""
    measured = {}
    for size in sizes_kb:
        loaders = {way: DataLoader(Sized(64, size << 10, way == "by_value"), batch_size=1, num_workers=args.workers,
                                   persistent_workers=True, collate_fn=as_made)
                   for way in ("shared", "by_value")}
        spent: dict[str, list[float]] = {way: [] for way in loaders}
        for epoch in range(args.epochs):
            for way, loader in loaders.items():
                seconds = received_seconds(loader, args.step_ms / 1000)
                if epoch > 0:
                    spent[way] += seconds
        measured[str(size)] = {way: 1e6 * statistics.median(values) for way, values in spent.items()}
    return measured


def served_dataset(splits, root: Path) -> SoftTargetDataset:
    """A SoftTargetDataset at epoch 2 of 4: its targets blend a sealed epoch 1 of random logits."""
    store = SoftTargetStore.create(root / "store", splits.train_labels, splits.num_classes)
    data = SoftTargetDataset(splits.train, store, 0.8, 4)
    data.set_epoch(1)
    count = len(splits.train)
    with store.writer(1) as writer:
        for start in range(0, count, 1024):
            ids = torch.arange(start, min(count, start + 1024))
            writer.write(ids, torch.randn(len(ids), splits.num_classes))
    store.seal(1)
    data.set_epoch(2)
    return data


def received_seconds(loader: DataLoader, step_s: float) -> list[float]:
    """One epoch: the seconds of each ``next()``, after the workers have filled their prefetch."""
    batches = iter(loader)
    time.sleep(0.3)
    spent = []
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        spent.append(time.perf_counter() - started)
        if batch is None:
            return spent[:-1]
        time.sleep(step_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--step-ms", type=float, default=4.0, help="the training thread's sleep between batches")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each loader, taking turns; 2.. are timed")
    parser.add_argument("--sizes", default="4,16,32,64,256,1024", help="KB of one_tensor_us's tensors ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = build_datasets("mnist1d", args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data = served_dataset(splits, Path(tmp))
        common = dict(batch_size=args.batch_size, shuffle=True, num_workers=args.workers, persistent_workers=True)
        loaders = {"ce": DataLoader(splits.train, **common),
                   "ce_by_value": DataLoader(splits.train, collate_fn=collate_as_the_store_does, **common),
                   "store": DataLoader(data, collate_fn=collate_soft_targets, **common),
                   "store_four_tensors": DataLoader(data, collate_fn=four_tensors, **common)}
        spent: dict[str, list[float]] = {name: [] for name in LOADERS}
        for epoch in range(args.epochs):
            for name in LOADERS[epoch % len(LOADERS):] + LOADERS[:epoch % len(LOADERS)]:
                seconds = received_seconds(loaders[name], args.step_ms / 1000)
                if epoch > 0:  # each loader's first epoch starts its workers
                    spent[name] += seconds
    us = {name: 1e6 * statistics.median(values) for name, values in spent.items()}
    sizes = one_tensor_us([int(kb) for kb in args.sizes.split(",") if kb], args)
    print(json.dumps({
        "benchmark": "loader_transfer",
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "sharing_strategy": torch.multiprocessing.get_sharing_strategy()},
        "config": vars(args),
        "receive_us_per_batch": us,
        "store_over_ce_by_value": us["store"] / us["ce_by_value"],
        "store_minus_ce_by_value_us": us["store"] - us["ce_by_value"],
        "store_four_tensors_over_ce": us["store_four_tensors"] / us["ce"],
        "store_four_tensors_minus_ce_us": us["store_four_tensors"] - us["ce"],
        "one_tensor_us": sizes,
        "by_value_bytes": BY_VALUE_BYTES,
    }, indent=2))


if __name__ == "__main__":
    main()
