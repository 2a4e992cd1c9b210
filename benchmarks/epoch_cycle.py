"""The store's fixed cost per epoch, without training around it; prints JSON.

Each epoch: ``set_epoch`` of a SoftTargetDataset (decoding last epoch's teacher into the
memory map), a writer made (its part claimed and made), ``batches`` writes of random
logits, the writer closed, the epoch sealed. Reported per phase, median over the epochs
after the first two: milliseconds; CPU milliseconds (every thread of the process: the
work, apart from waiting on the disk, whose metadata operations vary several-fold from
hour to hour on a shared VM); the directories made and the files opened for writing (each
new file a metadata write on the disk); and the calls made through zarr's synchronous API
(each a round trip through zarr's event-loop thread, counted at
``asyncio.run_coroutine_threadsafe``). Measured in the same run: writing the epoch's rows
as one ``.npy`` file and reading it back, what the bytes alone cost on this disk
(``fixed_over_baseline`` is the cycle's time without its writes over it), and ``disk``:
what making an empty file and a directory takes here, the unit of most of the fixed cost.
``ms_first_and_last``: each phase's median milliseconds over the first and the last
``--window`` timed epochs, which tell what grows with the run's length (the root document
lists every sealed epoch: run ``--epochs 300``, the paper's CIFAR length, to see it);
``refresh_ms``: ``store.refresh()`` after the last epoch (median of 50 calls), which reads
that document, twice an epoch (opening the writer, sealing).

    python benchmarks/epoch_cycle.py                       # N = 8,000, K = 10: train_overhead's epoch
    python benchmarks/epoch_cycle.py --samples 50000 --classes 100
    python benchmarks/epoch_cycle.py --epochs 300                # what grows with the run
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from pskd_store.dataset import SoftTargetDataset
from pskd_store.store import SoftTargetStore

PHASES = ("set_epoch", "writer_open", "write", "writer_close", "seal")


def _opens_for_writing(file, mode: str = "r", *args, **kwargs) -> bool:
    return any(letter in kwargs.get("mode", mode) for letter in "wxa+")


def _creates(path, flags: int, *args, **kwargs) -> bool:
    return bool(flags & os.O_CREAT)


class _Counted:
    """Counts the calls of ``module.name`` (those ``which`` accepts): pathlib's and zarr's
    mkdir go through ``os.mkdir``, files are made through ``open``, ``os.open`` or (pathlib)
    ``io.open``, zarr's ``sync`` hands coroutines to its loop through
    ``asyncio.run_coroutine_threadsafe``."""

    def __init__(self, module, name: str, which: Callable[..., bool] = lambda *args, **kwargs: True):
        self.count = 0
        self._module, self._name, self._real, self._which = module, name, getattr(module, name), which

    def __enter__(self):
        def counted(*args, **kwargs):
            result = self._real(*args, **kwargs)  # a call that raises (a directory there) is not counted
            self.count += self._which(*args, **kwargs)
            return result

        setattr(self._module, self._name, counted)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self._module, self._name, self._real)


def cycle(args: argparse.Namespace, root: Path) -> tuple[dict[str, dict[str, list[float]]], float]:
    """Each measure of each phase, one value per epoch from the third on; and the median
    milliseconds of ``store.refresh()`` after the last epoch."""
    labels = np.random.default_rng(0).integers(0, args.classes, args.samples)
    store = SoftTargetStore.create(root / "store", labels, args.classes)
    data = SoftTargetDataset(TensorDataset(torch.zeros(args.samples, 1), torch.from_numpy(labels)), store,
                             0.8, args.epochs)
    measures = ("ms", "cpu_ms", "directories_made", "files_written", "zarr_round_trips")
    spent: dict[str, dict[str, list[float]]] = {measure: {phase: [] for phase in PHASES} for measure in measures}
    logits = torch.randn(args.samples, args.classes)
    with (_Counted(asyncio, "run_coroutine_threadsafe") as trips, _Counted(os, "mkdir") as directories,
          _Counted(builtins, "open", _opens_for_writing) as opened, _Counted(io, "open", _opens_for_writing) as by_path,
          _Counted(os, "open", _creates) as created):
        def files_written() -> int:
            return opened.count + by_path.count + created.count

        for epoch in range(1, args.epochs + 1):
            order = torch.randperm(args.samples)
            writer = None

            def run(phase: str, step) -> None:
                counts = directories.count, files_written(), trips.count
                started, cpu = time.perf_counter(), time.process_time()
                step()
                if epoch > 2:
                    for measure, value in zip(measures, (
                            1000 * (time.perf_counter() - started), 1000 * (time.process_time() - cpu),
                            directories.count - counts[0], files_written() - counts[1],
                            trips.count - counts[2])):
                        spent[measure][phase].append(value)

            def write() -> None:
                for lo in range(0, args.samples, args.batch_size):
                    ids = order[lo:lo + args.batch_size]
                    writer.write(ids, logits[ids])

            def open_writer() -> None:
                nonlocal writer
                writer = store.writer(epoch)

            run("set_epoch", lambda: data.set_epoch(epoch))
            run("writer_open", open_writer)
            run("write", write)
            run("writer_close", lambda: writer.close())
            run("seal", lambda: store.seal(epoch))
    refreshes = []
    for _ in range(50):
        started = time.perf_counter()
        store.refresh()
        refreshes.append(time.perf_counter() - started)
    return spent, 1000 * statistics.median(refreshes)


def medians(by_phase: dict[str, list[float]], epochs: slice = slice(None)) -> dict[str, float]:
    return {phase: statistics.median(values[epochs]) for phase, values in by_phase.items()}


def baseline_ms(args: argparse.Namespace, root: Path) -> float:
    """An epoch's rows (float16) written as one .npy file and read back: the bytes alone."""
    rows = np.random.default_rng(1).random((args.samples, args.classes)).astype(np.float16)
    spent = []
    for epoch in range(args.epochs):
        path = root / f"baseline-{epoch}.npy"
        started = time.perf_counter()
        np.save(path, rows)
        np.load(path)
        spent.append(time.perf_counter() - started)
    return 1000 * statistics.median(spent[2:])


def metadata_us(root: Path, count: int = 200) -> dict[str, float]:
    """What this disk takes to make an empty file and a directory (median microseconds):
    the unit of the store's fixed cost, which makes a few dozen of them an epoch."""
    made = {"file": [], "directory": []}
    for i in range(count):
        started = time.perf_counter()
        os.close(os.open(root / f"file-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        made["file"].append(time.perf_counter() - started)
        started = time.perf_counter()
        os.mkdir(root / f"directory-{i}")
        made["directory"].append(time.perf_counter() - started)
    return {f"{kind}_made_us": 1e6 * statistics.median(spent) for kind, spent in made.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20, help="epochs 3.. are reported")
    parser.add_argument("--window", type=int, default=10, help="epochs in each of ms_first_and_last's medians")
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error(f"--epochs must be at least 3 (epochs 3.. are reported), got {args.epochs}")
    with tempfile.TemporaryDirectory() as tmp:
        spent, refresh_ms = cycle(args, Path(tmp))
        baseline = baseline_ms(args, Path(tmp))
        disk = metadata_us(Path(tmp))
    measured = {measure: medians(by_phase) for measure, by_phase in spent.items()}
    fixed, fixed_cpu = (sum(ms for phase, ms in measured[measure].items() if phase != "write")
                        for measure in ("ms", "cpu_ms"))
    print(json.dumps({
        "benchmark": "epoch_cycle",
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "config": vars(args),
        **measured,
        "fixed_ms": fixed,
        "fixed_cpu_ms": fixed_cpu,
        "directories_made_per_epoch": sum(measured["directories_made"].values()),
        "files_written_per_epoch": sum(measured["files_written"].values()),
        "disk": disk,
        "zarr_round_trips_per_epoch": sum(measured["zarr_round_trips"].values()),
        "baseline_npy_write_read_ms": baseline,
        "fixed_over_baseline": fixed / baseline,
        "ms_first_and_last": {"first": medians(spent["ms"], slice(args.window)),
                              "last": medians(spent["ms"], slice(-args.window, None))},
        "refresh_ms": refresh_ms,
    }, indent=2))


if __name__ == "__main__":
    main()
