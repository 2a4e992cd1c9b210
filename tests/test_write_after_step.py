"""benchmarks/write_after_step.py: write() timed warm, after a training step and after the
caches were emptied, each way its own epochs."""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

from conftest import benchmark_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "write_after_step.py"


def test_each_way_has_its_own_epochs_and_the_ratios_are_the_medians(tmp_path, monkeypatch, capsys):
    benchmark = benchmark_script("write_after_step")
    steps = []
    real_step = benchmark.F.cross_entropy
    monkeypatch.setattr(benchmark.F, "cross_entropy", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    args = argparse.Namespace(arch="mnist1d_cnn", samples=40, classes=5, batch_size=8, epochs=3, flush_mb=1)
    spent = benchmark.measure(args, tmp_path)
    assert {way: [len(values) for values in by.values()] for way, by in spent.items()} == dict.fromkeys(
        ("warm", "after_step", "after_flush"), [5, 5])  # 40 rows in batches of 8: an epoch each
    assert len(steps) == 5  # a training step before each write of the after_step epoch only
    monkeypatch.undo()

    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--samples", "40", "--classes", "5", "--batch-size", "8",
                                      "--epochs", "3", "--flush-mb", "1"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    report = json.loads(capsys.readouterr().out)
    medians = report["median_us"]
    assert min(value for by in medians.values() for value in by.values()) > 0
    assert report["write_after_step_over_warm"] == medians["after_step"]["write_us"] / medians["warm"]["write_us"]
    assert report["add_after_step_over_warm"] == medians["after_step"]["add_us"] / medians["warm"]["add_us"]
