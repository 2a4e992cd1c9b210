"""benchmarks/train_overhead.py: its arms take turns epoch by epoch, so that a shared
machine's drift hits them alike, and it reports each target of the store's throughput."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import benchmark_script

pytestmark = pytest.mark.slow  # six epochs of three arms: the full suite only



@pytest.mark.parametrize("evaluate", [False, True], ids=["steps", "with-evaluation"])
def test_the_arms_take_turns_epoch_by_epoch_in_a_rotating_order(data_dir, monkeypatch, capsys, evaluate):
    benchmark = benchmark_script("train_overhead")
    turns = []
    real = benchmark.arm_epochs

    def logged(arm, *args):
        for epoch in real(arm, *args):
            turns.append((arm, epoch["epoch"]))
            yield epoch

    monkeypatch.setattr(benchmark, "arm_epochs", logged)
    monkeypatch.setattr(sys, "argv", ["train_overhead.py", "--data-dir", str(data_dir), "--epochs", "2",
                                      "--repeats", "1", "--threads", "1", *(["--evaluate"] if evaluate else [])])
    benchmark.main()
    report = json.loads(capsys.readouterr().out)
    assert turns == [("ce", 1), ("store", 1), ("teacher", 1), ("store", 2), ("teacher", 2), ("ce", 2)]
    paired = report["paired_median"]
    assert set(paired) == {"store_over_ce", "store_steps_over_ce", "teacher_over_ce"}
    assert 0 < paired["store_over_ce"] < paired["store_steps_over_ce"]  # the fixed cost is left out of the second
    assert report["targets"] == {
        "store_steps_at_least_0.97_of_ce": paired["store_steps_over_ce"] >= 0.97,
        "store_at_least_0.93_of_ce": paired["store_over_ce"] >= 0.93,
        "both_at_least_0.2_above_the_teacher": paired["store_over_ce"] >= paired["teacher_over_ce"] + 0.2,
    }
    store = report["parts_ms_per_epoch"]["store"]
    ce = report["parts_ms_per_epoch"]["ce"]
    assert store["write"] > 0 and store["writer_close"] > 0 and ce["writer_close"] == 0
    if evaluate:  # every arm evaluates; the seal runs meanwhile, what is left of it is waited for
        assert min(store["evaluate"], ce["evaluate"], report["parts_ms_per_epoch"]["teacher"]["evaluate"]) > 1.0  # ms
    else:  # the seal is the epoch's end; CE has nothing to seal
        assert store["evaluate"] == ce["evaluate"] == 0 and store["seal"] > 100 * ce["seal"]
