"""One CE epoch of `pskd-store train` on the offline default (MNIST-1D): what a baseline
pays per epoch for the store it never reads from; prints JSON.

Reports the median over epochs 2..T (epoch 1 has no teacher) of the whole epoch
(steps, seal, evaluation: ``epoch_seconds``) and of the steps alone, and the seconds
spent pointing the data set at the last sealed epoch (``set_epoch``: decoding the
teacher, for a method that reads one). Run it on two versions to compare them.

    python benchmarks/baseline_epoch.py --epochs 8 --method ce
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pskd_store.dataset import SoftTargetDataset
from pskd_store.recipe import TrainConfig
from pskd_store.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="ce")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_epoch_seconds = []
    set_epoch = SoftTargetDataset.set_epoch

    def timed_set_epoch(self, epoch):
        started = time.perf_counter()
        set_epoch(self, epoch)
        set_epoch_seconds.append(time.perf_counter() - started)

    SoftTargetDataset.set_epoch = timed_set_epoch  # this script's process only
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(method=args.method, epochs=args.epochs, data_dir=args.data_dir).resolved()
        train(config, Path(tmp) / "run", quiet=True)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:]
    print(json.dumps({
        "method": args.method, "arch": config.arch, "epochs": args.epochs, "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "epoch_seconds_median": statistics.median(row["epoch_seconds"] for row in later),
        "steps_seconds_median": statistics.median(row["train"]["seconds"] for row in later),
        "set_epoch_seconds_median": statistics.median(set_epoch_seconds[1:]),
    }, indent=2))


if __name__ == "__main__":
    main()
