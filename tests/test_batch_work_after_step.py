"""benchmarks/batch_work_after_step.py: the store's batch, CE's batch and write() timed warm,
after a training step and after the caches were emptied, each way its own epochs."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import benchmark_script

from pskd_store.writer import PredictionWriter

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
    assert {way: [len(values) for values in by.values()] for way, by in spent.items()} == {
        **dict.fromkeys(("warm", "after_step", "after_flush"), [5, 5, 5, 5]),  # 40 rows in batches of 8: an epoch each
        "next_step": [5, 5]}  # and one epoch of steps, each way's count
    # before each of three pieces of each batch of the after_step epoch; then two timed steps a batch
    assert len(steps) == 3 * 5 + 2 * 5
    # the store's batches of the timed epochs 2-5 each blend the teacher of the epoch before
    assert batches == [(epoch, epoch - 1) for epoch in (2, 3, 4, 5) for _ in range(5)]
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
    assert report["store_batch_extra_us"] == {way: medians[way]["store_batch_us"] - medians[way]["ce_batch_us"]
                                              for way in ("warm", "after_step", "after_flush")}
    next_step = medians["next_step"]
    assert report["step_after_store_over_after_ce"] == next_step["after_store_us"] / next_step["after_ce_us"]


def test_next_step_times_a_step_after_the_stores_work_and_one_after_ces(data_dir, tmp_path, monkeypatch):
    """Each batch of the ``next_step`` epoch: the store's batch and ``write()``, a step timed
    as ``after_store_us``, CE's batch, a step timed as ``after_ce_us``, the two in turn first
    (a batch's first step is slower by itself). The benchmark's clock here moves in steps
    only: 1 ms in a step right after a write, 10 µs in any other."""
    benchmark = benchmark_script("batch_work_after_step")
    events, now = [], [0.0]
    real_step, real_batch = benchmark.F.cross_entropy, benchmark.SoftTargetDataset.__getitems__
    real_write, real_collate = PredictionWriter.write, benchmark.default_collate

    def step(*args, **kwargs):
        now[0] += 1e-3 if events[-1] == "write" else 1e-5
        events.append("step")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(benchmark.F, "cross_entropy", step)
    monkeypatch.setattr(benchmark.SoftTargetDataset, "__getitems__",
                        lambda self, items: events.append("store") or real_batch(self, items))
    monkeypatch.setattr(PredictionWriter, "write", lambda self, *a: events.append("write") or real_write(self, *a))
    monkeypatch.setattr(benchmark, "default_collate", lambda batch: events.append("ce") or real_collate(batch))
    args = argparse.Namespace(arch="mnist1d_cnn", data_dir=str(data_dir), train_subset=40, batch_size=8, epochs=3,
                              flush_mb=1)
    spent = benchmark.measure(args, tmp_path)
    store_first, ce_first = ["store", "write", "step", "ce", "step"], ["ce", "step", "store", "write", "step"]
    assert events[-25:] == store_first + ce_first + store_first + ce_first + store_first  # the last epoch's 5 batches
    assert spent["next_step"] == {"after_store_us": pytest.approx([1000] * 5), "after_ce_us": pytest.approx([10] * 5)}
    assert benchmark.next_step_figures(spent) == {
        "step_after_store_extra_us": pytest.approx(990), "step_after_store_over_after_ce": pytest.approx(100)}


def test_the_step_after_the_stores_work_costs_the_median_of_each_batchs_difference():
    """A paired median: each batch's two steps ran a moment apart, on the same machine load."""
    benchmark = benchmark_script("batch_work_after_step")
    spent = {"next_step": {"after_store_us": [10.0, 50.0, 31.0], "after_ce_us": [1.0, 45.0, 30.0]}}
    assert benchmark.next_step_figures(spent) == {
        "step_after_store_extra_us": 5.0,  # differences 9, 5, 1; the medians' difference would be 1
        "step_after_store_over_after_ce": 31.0 / 30.0}
