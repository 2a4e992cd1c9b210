"""benchmarks/batch_work_after_step.py: the store's batch, CE's batch and write() timed warm,
after a training step and after the caches were emptied, each way its own epochs."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

from conftest import benchmark_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "batch_work_after_step.py"


def test_each_way_has_its_own_epochs_and_the_ratios_are_the_medians(data_dir, tmp_path, monkeypatch, capsys):
    benchmark = benchmark_script("batch_work_after_step")
    steps, batches = [], []
    real_step, real_batch = benchmark.F.cross_entropy, benchmark.SoftTargetDataset.__getitems__
    monkeypatch.setattr(benchmark.F, "cross_entropy", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    monkeypatch.setattr(benchmark.SoftTargetDataset, "__getitems__",
                        lambda self, items: batches.append((self.epoch, self._current()[1])) or real_batch(self, items))
    args = argparse.Namespace(arch="mnist1d_cnn", data_dir=str(data_dir), train_subset=40, batch_size=8, epochs=3,
                              flush_mb=1)
    spent = benchmark.measure(args, tmp_path)
    assert {way: [len(values) for values in by.values()] for way, by in spent.items()} == dict.fromkeys(
        ("warm", "after_step", "after_flush"), [5, 5, 5, 5])  # 40 rows in batches of 8: an epoch each
    assert len(steps) == 3 * 5  # before each of three pieces of each batch of the after_step epoch only
    # the store's batches of the timed epochs 2-4 each blend the teacher of the epoch before
    assert batches == [(epoch, epoch - 1) for epoch in (2, 3, 4) for _ in range(5)]
    monkeypatch.undo()

    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--data-dir", str(data_dir), "--train-subset", "40",
                                      "--batch-size", "8", "--epochs", "3", "--flush-mb", "1"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    report = json.loads(capsys.readouterr().out)
    medians = report["median_us"]
    assert min(value for by in medians.values() for value in by.values()) > 0
    assert report["write_after_step_over_warm"] == medians["after_step"]["write_us"] / medians["warm"]["write_us"]
    assert report["add_after_step_over_warm"] == medians["after_step"]["add_us"] / medians["warm"]["add_us"]
    assert report["store_batch_after_step_over_warm"] == (medians["after_step"]["store_batch_us"]
                                                          / medians["warm"]["store_batch_us"])
    assert report["store_batch_extra_us"] == {way: by["store_batch_us"] - by["ce_batch_us"]
                                              for way, by in medians.items()}
