"""What a training step does to the small work after it; prints JSON.

``train_overhead.py`` measures ``write()`` at ~0.14 ms a batch on the reference VM where a
loop of writes takes ~0.01 ms: the same call, the same rows. The difference is what runs
between two writes. A training step streams its weights, activations and the kernels'
scratch through the caches, and the CPU's caches hold none of the interpreter's, torch's
dispatcher's or the writer's code and data when the step returns; the next few hundred
microseconds of Python run from main memory. So the store's per-batch work (the data set's
gather, check and blend; ``write()``) costs several times what a loop of it measures, and so
does any other small work at that point: one ``torch.add`` of the batch's logits is timed
beside it as the control.

Three ways, one an epoch of ``--samples`` rows, in turn over ``--epochs`` epochs (the median
of each way's calls; ways alternated batch by batch would warm each other's caches):
``warm`` (writes back to back), ``after_step`` (a training step of ``--arch`` on a random
batch before each write, as in training), ``after_flush`` (a sum over ``--flush-mb`` of
memory before each write: the caches emptied, nothing else).

    python benchmarks/write_after_step.py
    python benchmarks/write_after_step.py --arch mnist1d_mlp --flush-mb 256
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

from pskd_store.models import create_model
from pskd_store.models.small import MNIST1D_LENGTH, MNIST1D_MODELS
from pskd_store.store import SoftTargetStore

WAYS = ("warm", "after_step", "after_flush")


def measure(args: argparse.Namespace, root: Path) -> dict[str, dict[str, list[float]]]:
    """Microseconds of each ``write()`` and of the ``torch.add`` after it, per way."""
    torch.manual_seed(0)
    model = create_model(args.arch, args.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs = torch.randn(args.batch_size, 1, MNIST1D_LENGTH)  # MNIST-1D samples
    labels = torch.randint(0, args.classes, (args.batch_size,))
    logits = torch.randn(args.samples, args.classes)
    flushed = np.ones(args.flush_mb << 17)  # float64: 8 bytes each

    def step() -> None:
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    before: dict[str, Callable[[], object]] = {"warm": lambda: None, "after_step": step, "after_flush": flushed.sum}
    spent = {way: {"write_us": [], "add_us": []} for way in WAYS}
    store = SoftTargetStore.create(root / "store", np.random.default_rng(0).integers(0, args.classes, args.samples),
                                   args.classes)
    clock = time.perf_counter
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(args.samples)
        way = WAYS[(epoch - 1) % len(WAYS)]
        with store.writer(epoch) as writer:
            for lo in range(0, args.samples, args.batch_size):
                ids = order[lo:lo + args.batch_size]
                batch = logits[ids]
                before[way]()
                started = clock()
                writer.write(ids, batch)
                written = clock()
                torch.add(batch, 1)
                spent[way]["write_us"].append(1e6 * (written - started))
                spent[way]["add_us"].append(1e6 * (clock() - written))
        store.seal(epoch)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mnist1d_cnn", choices=sorted(MNIST1D_MODELS))
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6, help="a multiple of 3: each way's epochs")
    parser.add_argument("--flush-mb", type=int, default=64, help="memory summed before each after_flush write")
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spent = measure(args, Path(tmp))
    medians = {way: {name: statistics.median(values) for name, values in by.items()}
               for way, by in spent.items()}
    print(json.dumps({
        "benchmark": "write_after_step",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "config": vars(args),
        "median_us": medians,
        "write_after_step_over_warm": medians["after_step"]["write_us"] / medians["warm"]["write_us"],
        "add_after_step_over_warm": medians["after_step"]["add_us"] / medians["warm"]["add_us"],
        "write_after_flush_over_warm": medians["after_flush"]["write_us"] / medians["warm"]["write_us"],
    }, indent=2))


if __name__ == "__main__":
    main()
