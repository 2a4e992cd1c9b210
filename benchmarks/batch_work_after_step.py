"""What a training step does to the store's small work after it; prints JSON.

``train_overhead.py`` measured ``write()`` at several times what a loop of writes takes on
the reference VM (0.14 against 0.01 ms a batch when this was written): the same call, the
same rows; likewise the data set's batch
(the memory-map gather, the label check, the blend) costs several times more over CE's in
training than in a loop. The difference is what runs between two batches. A training step
streams its weights, activations and the kernels' scratch through the caches, and the
CPU's caches hold none of the interpreter's, torch's dispatcher's or the store's code and
data when the step returns; the next few hundred microseconds of Python run from main
memory. So the store's per-batch work costs several times what a loop of it measures, and
so does any other small work at that point: one ``torch.add`` of the batch's logits is
timed after the write as the control.

Each batch of MNIST-1D (train_overhead's data), four pieces are timed, each right after what its way puts before it: the
store's batch (``SoftTargetDataset.__getitems__`` and ``collate_soft_targets``, reading
the sealed epoch before), CE's batch of the same items (``default_collate``), ``write()``
of the batch's logits and the ``torch.add`` after it. Three ways, one an epoch of
the training split, in turn over ``--epochs`` epochs (the median of each way's calls; ways
alternated batch by batch would warm each other's caches): ``warm`` (nothing between),
``after_step`` (a training step of ``--arch`` on a random batch, as in training),
``after_flush`` (a sum over ``--flush-mb`` of memory: the caches emptied, nothing else).
``store_batch_extra_us``: the store's batch less CE's, per way.

The other way round, ``next_step``: in as many more epochs as each way had, a training
step timed after the store's batch and ``write()`` (``after_store_us``) and after CE's
batch (``after_ce_us``), in turn each batch, the store's first in even batches and CE's
first in odd ones (of two steps in a row the first runs slower whatever precedes it: an
order effect of 10–40 µs on the reference VM, which a fixed order would count as the
store's); ``step_after_store_extra_us`` is the median of each batch's difference, what the
store's work costs the step that follows it.

    python benchmarks/batch_work_after_step.py
    python benchmarks/batch_work_after_step.py --arch mnist1d_mlp --flush-mb 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from pskd_store.data import build_datasets
from pskd_store.dataset import SoftTargetDataset, collate_soft_targets
from pskd_store.models import create_model
from pskd_store.models.small import MNIST1D_LENGTH, MNIST1D_MODELS
from pskd_store.store import SoftTargetStore

WAYS = ("warm", "after_step", "after_flush")
PIECES = ("store_batch_us", "ce_batch_us", "write_us", "add_us")
NEXT_STEP = ("after_store_us", "after_ce_us")


def measure(args: argparse.Namespace, root: Path) -> dict[str, dict[str, list[float]]]:
    """Microseconds of each piece of each batch (:data:`PIECES`), per way; and under
    ``next_step``, of each step after each arm's batch work (:data:`NEXT_STEP`)."""
    torch.manual_seed(0)
    splits = build_datasets("mnist1d", args.data_dir, train_subset=args.train_subset)
    base, classes, samples = splits.train, splits.num_classes, len(splits.train)
    model = create_model(args.arch, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs = torch.randn(args.batch_size, 1, MNIST1D_LENGTH)  # MNIST-1D samples
    labels = torch.randint(0, classes, (args.batch_size,))
    logits = torch.randn(samples, classes)
    flushed = np.ones(args.flush_mb << 17)  # float64: 8 bytes each

    def step() -> None:
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    before: dict[str, Callable[[], object]] = {"warm": lambda: None, "after_step": step, "after_flush": flushed.sum,
                                               "next_step": lambda: None}  # its steps follow each arm's work
    spent = {way: {piece: [] for piece in PIECES} for way in WAYS}
    store = SoftTargetStore.create(root / "store", splits.train_labels, classes)
    next_step_epochs = range(args.epochs + 2, args.epochs + 2 + args.epochs // len(WAYS))
    data = SoftTargetDataset(base, store, alpha_T=0.8, total_epochs=next_step_epochs[-1])
    clock = time.perf_counter

    def timed(way: str, piece: str, work: Callable[[], object]) -> None:
        before[way]()
        started = clock()
        work()
        spent[way][piece].append(1e6 * (clock() - started))

    for epoch in range(1, args.epochs + 2):  # epoch 1 untimed: the teacher of epoch 2
        order = torch.randperm(samples)
        way = WAYS[(epoch - 2) % len(WAYS)] if epoch > 1 else None
        data.set_epoch(epoch)
        with store.writer(epoch) as writer:
            for lo in range(0, samples, args.batch_size):
                ids = order[lo:lo + args.batch_size]
                items, batch = ids.tolist(), logits[ids]
                if way is None:
                    writer.write(ids, batch)
                    continue
                timed(way, "store_batch_us", lambda: collate_soft_targets(data.__getitems__(items)))
                timed(way, "ce_batch_us", lambda: default_collate([base[i] for i in items]))
                before[way]()
                started = clock()
                writer.write(ids, batch)
                written = clock()
                torch.add(batch, 1)
                spent[way]["write_us"].append(1e6 * (written - started))
                spent[way]["add_us"].append(1e6 * (clock() - written))
        store.seal(epoch)
    spent["next_step"] = {piece: [] for piece in NEXT_STEP}
    for epoch in next_step_epochs:
        order = torch.randperm(samples)
        data.set_epoch(epoch)
        with store.writer(epoch) as writer:
            for batch, lo in enumerate(range(0, samples, args.batch_size)):
                ids = order[lo:lo + args.batch_size]
                items = ids.tolist()
                store_work = ("after_store_us", lambda: (collate_soft_targets(data.__getitems__(items)),
                                                         writer.write(ids, logits[ids])))
                ce_work = ("after_ce_us", lambda: default_collate([base[i] for i in items]))
                # which comes first alternates: the first of two steps in a row runs slower by itself
                for piece, work in (store_work, ce_work) if batch % 2 == 0 else (ce_work, store_work):
                    work()
                    timed("next_step", piece, step)
        store.seal(epoch)
    return spent


def next_step_figures(spent: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """What the store's work costs the step after it: the median of each batch's difference
    (its two steps ran a moment apart, under the same load), and the ratio of the medians."""
    after_store, after_ce = spent["next_step"]["after_store_us"], spent["next_step"]["after_ce_us"]
    return {
        "step_after_store_extra_us": float(statistics.median(np.subtract(after_store, after_ce))),
        "step_after_store_over_after_ce": statistics.median(after_store) / statistics.median(after_ce),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mnist1d_cnn", choices=sorted(MNIST1D_MODELS))
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--train-subset", type=int, help="n training samples (default: all 8,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6, help="timed epochs, a multiple of 3: each way's")
    parser.add_argument("--flush-mb", type=int, default=64, help="memory summed before each after_flush piece")
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads")
    args = parser.parse_args()
    if args.epochs < 3 or args.epochs % 3:
        parser.error(f"--epochs must be a positive multiple of 3 (each way's), got {args.epochs}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spent = measure(args, Path(tmp))
    medians = {way: {name: statistics.median(values) for name, values in by.items()}
               for way, by in spent.items()}
    print(json.dumps({
        "benchmark": "batch_work_after_step",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "config": vars(args),
        "median_us": medians,
        "write_after_step_over_warm": medians["after_step"]["write_us"] / medians["warm"]["write_us"],
        "add_after_step_over_warm": medians["after_step"]["add_us"] / medians["warm"]["add_us"],
        "write_after_flush_over_warm": medians["after_flush"]["write_us"] / medians["warm"]["write_us"],
        "store_batch_after_step_over_warm": medians["after_step"]["store_batch_us"] / medians["warm"]["store_batch_us"],
        "store_batch_extra_us": {way: medians[way]["store_batch_us"] - medians[way]["ce_batch_us"] for way in WAYS},
        **next_step_figures(spent),
    }, indent=2))


if __name__ == "__main__":
    main()
