"""The paper's comparison at a scale this machine runs: CE, LS, CS-KD, TF-KD, PS-KD, and
CE and PS-KD with Cutout (and, on image data, CutMix) like for like, several seeds each,
plus sweeps on a held-out split (PS-KD's alpha_T; TF-KD's multiplier and CS-KD's weight,
which their authors tuned on CIFAR-100). ``--dataset mnist1d`` (the offline default)
or ``fashionmnist`` (real images; offline from Debian's dataset-fashion-mnist).

Prints JSON (every run's final test metrics, and mean/std per method) followed by the
Markdown tables that the README shows. Every run is a normal run directory under --out,
so `pskd-store inspect` can look at any of them afterwards.

    python benchmarks/method_table.py                      # MNIST-1D, 3 seeds, 40 epochs
    python benchmarks/method_table.py --dataset fashionmnist --alphas "" --epochs 5   # README: 91 min
    python benchmarks/method_table.py --seeds 0 --epochs 5 --alphas 0.8   # a quick look
    # where the network memorises (docs/results.md; 25 min, after a 12-min held-out sweep):
    python benchmarks/method_table.py --dataset fashionmnist --train-subset 5000 --no-crop-flip --epochs 30 \
        --no-cutmix --alphas "" --alpha-T 0.8 --tfkd-multiplier 1 --cskd-weight 0.5
    python benchmarks/method_table.py --sweeps-only --alphas "" --tfkd-multipliers 1,10,100 --cskd-weights 0.5,1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pskd_store.recipe import PLACEMENT_OPTIONS, TrainConfig
from pskd_store.run_directory import RunDirectory
from pskd_store.training import train

METHODS = {  # label -> TrainConfig overrides
    "CE": dict(method="ce"),
    "LS (0.1)": dict(method="ls"),
    "CS-KD": dict(method="cskd"),
    "TF-KD": dict(method="tfkd"),
    "PS-KD": dict(method="pskd"),
    "CE + Cutout": dict(method="ce", aug="cutout"),
    "PS-KD + Cutout": dict(method="pskd", aug="cutout"),
}
IMAGE_METHODS = {  # CutMix needs 2-D images
    "CE + CutMix": dict(method="ce", aug="cutmix"),
    "PS-KD + CutMix": dict(method="pskd", aug="cutmix"),
}
COLUMNS = {"train_err": "Train err (%)", "top1_err": "Top-1 err (%)", "top5_err": "Top-5 err (%)", "nll": "NLL",
           "ece": "ECE (%)", "aurc": "AURC (x1e3)"}


def run_one(base: dict, overrides: dict, seed: int, directory: Path, split: str) -> dict:
    config = TrainConfig(**{**base, **overrides, "seed": seed}).resolved()
    if (directory / "summary.json").is_file():  # a finished run: reused for the configuration it trained only
        require_the_config_of(directory, config)
    else:
        train(config, directory, quiet=True)
    final = json.loads((directory / "summary.json").read_text())["final"][split]
    # the last epoch's error on its own (augmented) training passes: ~0 once the network memorises
    return {**final, "train_err": RunDirectory(directory).metrics_rows()[-1]["train"]["top1_err"]}


def require_the_config_of(directory: Path, config: TrainConfig) -> None:
    """A table printed from runs of another configuration (other epochs, subset, dtype) under
    the same --out would show their numbers as this one's."""
    saved = json.loads(RunDirectory(directory).config.read_text())
    differing = sorted(name for name, value in dataclasses.asdict(config).items()  # a field newer than the
                       if name not in PLACEMENT_OPTIONS and name in saved and saved[name] != value)  # run: its default
    if differing:
        raise SystemExit(f"{directory} holds a run of another configuration ({', '.join(differing)} differ): pass "
                         "another --out, or delete that run to train it again")


def mean_std(rows: list[dict]) -> dict:
    return {k: {"mean": statistics.mean(r[k] for r in rows),
                "std": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0} for k in COLUMNS}


def markdown(title: str, table: dict[str, dict]) -> str:
    lines = [f"| {title} | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, stats in table.items():
        cells = [f"{stats[k]['mean']:.2f} ± {stats[k]['std']:.2f}" for k in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--arch")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--alphas", default="0.2,0.4,0.6,0.8", help="PS-KD's alpha_T sweep; empty to skip")
    parser.add_argument("--tfkd-multipliers", default="", help="TF-KD's multiplier sweep (default: none)")
    parser.add_argument("--cskd-weights", default="", help="CS-KD's weight (lambda) sweep (default: none)")
    parser.add_argument("--sweeps-only", action="store_true", help="skip the method table, run only the sweeps")
    parser.add_argument("--val-split", type=float, default=0.1)
    parser.add_argument("--train-subset", type=int,
                        help="train on this many samples, as many of each class (the memorising regime)")
    parser.add_argument("--no-crop-flip", dest="crop_flip", action="store_false",
                        help="train on the images as they are (no random crop or flip)")
    parser.add_argument("--no-cutmix", dest="cutmix", action="store_false", help="skip the CutMix rows")
    parser.add_argument("--alpha-T", dest="alpha_T", type=float, help="PS-KD's alpha_T in the table (a tuned value)")
    parser.add_argument("--tfkd-multiplier", type=float, help="TF-KD's multiplier in the table (a tuned value)")
    parser.add_argument("--cskd-weight", type=float, help="CS-KD's weight in the table (a tuned value)")
    parser.add_argument("--store-dtype", choices=("float32", "float16"), help="teacher rows (default: the recipe's)")
    parser.add_argument("--out", default="runs/method_table")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sweeps = {  # row label -> TrainConfig overrides, each run on the held-out split
        f"{label} {value:g}": {**fixed, field: value}
        for label, fixed, field, values in (
            ("alpha_T", dict(method="pskd"), "alpha_T", args.alphas),
            ("TF-KD multiplier", dict(method="tfkd"), "tfkd_multiplier", args.tfkd_multipliers),
            ("CS-KD weight", dict(method="cskd"), "cskd_weight", args.cskd_weights))
        for value in (float(v) for v in values.split(",") if v)}
    base = {k: v for k, v in dict(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch,
                                   epochs=args.epochs, workers=0, train_subset=args.train_subset,
                                   crop_flip=args.crop_flip, store_dtype=args.store_dtype).items()
            if v is not None}
    out = Path(args.out)
    started = time.time()

    runs: dict[str, list[dict]] = {}
    methods = METHODS if args.dataset == "mnist1d" or not args.cutmix else {**METHODS, **IMAGE_METHODS}
    tuned = {k: v for k, v in dict(alpha_T=args.alpha_T, tfkd_multiplier=args.tfkd_multiplier,
                                   cskd_weight=args.cskd_weight).items() if v is not None}
    for label, overrides in ({} if args.sweeps_only else methods).items():
        overrides = {**overrides, **tuned}  # each method reads only its own fields
        slug = label.lower().replace(" ", "").replace("+", "-").replace("(0.1)", "")
        runs[label] = [run_one(base, overrides, seed, out / args.dataset / f"{slug}-seed{seed}", "test")
                       for seed in seeds]
    sweep: dict[str, list[dict]] = {}
    if sweeps:
        sweeps = {"CE": dict(method="ce"), **sweeps}
    for label, overrides in sweeps.items():
        slug = "sweep-" + label.lower().replace(" ", "").replace("-", "").replace("_", "")
        sweep[label] = [run_one(base, {**overrides, "val_split": args.val_split}, seed,
                                out / args.dataset / f"{slug}-seed{seed}", "val") for seed in seeds]

    table = {label: mean_std(rows) for label, rows in runs.items()}
    sweep_table = {label: mean_std(rows) for label, rows in sweep.items()}
    result = {
        "benchmark": "method_table",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "config": {**vars(args), "resolved": TrainConfig(**base).resolved().__dict__},
        "seeds": seeds,
        "test": table,
        "sweeps_val": sweep_table,
        "runs": {"test": runs, "val": sweep},
        "minutes": (time.time() - started) / 60,
    }
    print(json.dumps(result, indent=2))
    print()
    if table:
        print(markdown("Method (test split)", table))
    if sweep_table:
        print()
        print(markdown(f"Setting (held-out {args.val_split:.0%} of train)", sweep_table))


if __name__ == "__main__":
    main()
