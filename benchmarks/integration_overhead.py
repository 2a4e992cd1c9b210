"""What the Lightning and Hugging Face integrations cost a user's loop; prints JSON.

Each loop trains the same model on the same data twice, alternating (plain, pskd, plain,
...) so that drift of a shared machine hits both alike:
  * Lightning: ``mnist1d_cnn`` on MNIST-1D (``--copies`` of it); ``plain`` is an unchanged ``LightningModule``
    on one-hot labels, ``pskd`` the same module with the ``PSKD`` callback (its data set
    wrapped, its ``training_step`` returning the logits);
  * Hugging Face: a two-layer BERT built from a config on the test suite's synthetic text
    set (tests/transformers_run.py); ``plain`` is ``transformers.Trainer``, ``pskd`` is
    ``PSKDTrainer``.
An epoch is timed from its start to the next one's (the seal and the next teacher's
decode included); samples/s is over epochs 2..T (epoch 1 has no teacher).

    python benchmarks/integration_overhead.py --repeats 3 --threads 1
    python benchmarks/integration_overhead.py --copies 8 --texts 8000   # 4-8x longer epochs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ARMS = ("plain", "pskd")


def epoch_rate(starts: list[float], samples: int) -> float:
    """Samples/s over epochs 2..T from the start times of epochs 1..T and the end of training."""
    return samples * (len(starts) - 2) / (starts[-1] - starts[1])


def lightning_arm(arm: str, splits, args, workdir: Path) -> float:
    import lightning.pytorch as pl
    from torch.utils.data import ConcatDataset, DataLoader

    from pskd_store.integrations.lightning import PSKD
    from pskd_store.models import create_model

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = create_model("mnist1d_cnn", splits.num_classes)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch[0], batch[1]  # plain: (input, label); pskd: (input, target, label, id)
            logits = self.net(inputs)
            return {"loss": F.cross_entropy(logits, targets), "logits": logits}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True)

    class EpochStarts(pl.Callback):
        def __init__(self):
            self.times = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.times.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.times.append(time.perf_counter())

    torch.manual_seed(0)
    timer = EpochStarts()
    callbacks = [timer]
    data = ConcatDataset([splits.train] * args.copies)
    if arm == "pskd":
        pskd = PSKD(workdir / f"store-{time.time_ns()}", num_classes=splits.num_classes, alpha_T=0.8)
        data = pskd.wrap(data, labels=np.tile(splits.train_labels, args.copies))
        callbacks.append(pskd)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(), DataLoader(data, batch_size=128, shuffle=True))
    return epoch_rate(timer.times, len(data))


def transformers_arm(arm: str, records: list[dict], args, workdir: Path) -> float:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers_run import K, tokenizer

    from pskd_store.integrations.transformers import PSKDTrainer

    class EpochStarts(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_epoch_begin(self, *_, **__):
            self.times.append(time.perf_counter())

        def on_train_end(self, *_, **__):
            self.times.append(time.perf_counter())

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer()), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=16, num_labels=K)
    training = TrainingArguments(output_dir=str(workdir / f"hf-{time.time_ns()}"), num_train_epochs=args.epochs,
                                 per_device_train_batch_size=32, save_strategy="no", logging_strategy="no",
                                 report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    timer = EpochStarts()
    common = dict(model=BertForSequenceClassification(config), args=training, train_dataset=records,
                  data_collator=DataCollatorWithPadding(tokenizer()), callbacks=[timer])
    if arm == "pskd":
        trainer = PSKDTrainer(**common, pskd_store=workdir / f"store-{time.time_ns()}", alpha_T=0.8,
                              labels=[record["labels"] for record in records])
    else:
        trainer = Trainer(**common)
    trainer.train()
    return epoch_rate(timer.times, len(records))


def compare(arm_runner, data, samples: int, args, workdir: Path) -> dict:
    rates = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm in ARMS:
            with contextlib.redirect_stdout(sys.stderr):  # the libraries' own prints: stdout is this JSON
                rates[arm].append(arm_runner(arm, data, args, workdir))
    median = {arm: statistics.median(values) for arm, values in rates.items()}
    epoch_s = {arm: samples / rate for arm, rate in median.items()}
    return {"samples_per_s": median, "runs": rates, "epoch_s": epoch_s,
            # what the integration adds to an epoch: mostly the seal and the next teacher's decode
            "added_s_per_epoch": epoch_s["pskd"] - epoch_s["plain"],
            "pskd_over_plain": median["pskd"] / median["plain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", nargs="+", choices=["lightning", "transformers"],
                        default=["lightning", "transformers"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--copies", type=int, default=1,
                        help="copies of MNIST-1D's 8,000 training signals in the Lightning epoch (a longer epoch)")
    parser.add_argument("--texts", type=int, default=2000, help="sentences in the Hugging Face training set")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--threads", type=int, help="torch compute threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "integration_overhead", "config": vars(args),
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory() as tmp:
        if "lightning" in args.loops:
            from pskd_store.data import build_datasets

            splits = build_datasets("mnist1d", args.data_dir)
            result["lightning"] = compare(lightning_arm, splits, len(splits.train) * args.copies, args, Path(tmp))
        if "transformers" in args.loops:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from transformers_run import sentences

            result["transformers"] = compare(transformers_arm, sentences(args.texts, 1), args.texts, args, Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
