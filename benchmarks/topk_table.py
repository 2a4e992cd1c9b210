"""PS-KD with a dense store (float32 rows, the recipe's, and float16) against top-k stores
(k = 1, 3, 5) on the offline default, same seeds: test metrics side by side, and the bytes
each stores per epoch.

With k = K - 1 the rebuilt target equals the dense one up to rounding; with small k every
class outside the top k gets the same share of the remaining mass, which is what this
table measures the effect of. Prints JSON, then the Markdown table the README shows.

    python benchmarks/topk_table.py --data-dir data          # 3 seeds x 5 stores, ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from method_table import markdown, mean_std, run_one

from pskd_store.recipe import TrainConfig

STORES = {  # row -> the store's TrainConfig fields (the recipe's dtype, float32, unless named)
    "dense float32": dict(store_dtype="float32"),
    "dense float16": dict(store_dtype="float16"),
    **{f"top-{k}": dict(store_topk=k) for k in (5, 3, 1)},
}


def stored_bytes_per_epoch(run: Path) -> float:
    epochs = json.loads((run / "summary.json").read_text())["store"]["epochs"].values()
    return statistics.mean(info["nbytes_stored"] for info in epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/topk_table")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = {k: v for k, v in dict(dataset="mnist1d", data_dir=args.data_dir, epochs=args.epochs, workers=0,
                                   method="pskd").items() if v is not None}
    out = Path(args.out)
    started = time.time()
    runs, stored = {}, {}
    for label, store in STORES.items():
        directories = [out / f"{label.replace(' ', '-')}-seed{seed}" for seed in seeds]
        runs[label] = [run_one(base, store, seed, directory, "test")
                       for seed, directory in zip(seeds, directories)]
        stored[label] = statistics.mean(stored_bytes_per_epoch(d) for d in directories)
    table = {label: mean_std(rows) for label, rows in runs.items()}
    print(json.dumps({
        "benchmark": "topk_table",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "config": {**vars(args), "resolved": TrainConfig(**base).resolved().__dict__},
        "test": table, "stored_bytes_per_epoch": stored, "runs": runs,
        "minutes": (time.time() - started) / 60,
    }, indent=2))
    print()
    print(markdown("PS-KD store (test split)", table))
    print()
    print(" | ".join(f"{label}: {stored[label] / 1024:.0f} KiB/epoch" for label in STORES))


if __name__ == "__main__":
    main()
