"""benchmarks/train_overhead.py: its arms take turns step by step, so that a shared
machine's drift hits them alike, each clock running on its own turns only, and it reports
each target of the store's throughput."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import benchmark_script

pytestmark = pytest.mark.slow  # six epochs of three arms: the full suite only


@pytest.mark.parametrize("evaluate", [False, True], ids=["steps", "with-evaluation"])
def test_the_arms_take_turns_step_by_step_in_an_order_rotated_and_reversed(data_dir, monkeypatch, capsys, evaluate):
    benchmark = benchmark_script("train_overhead")
    turns = []  # (arm, None) after each step, (arm, epoch) after each epoch
    real = benchmark.arm_epochs

    def logged(arm, *args, **kwargs):
        for done in real(arm, *args, **kwargs):
            turns.append((arm, None if done is None else done["epoch"]))
            yield done

    monkeypatch.setattr(benchmark, "arm_epochs", logged)
    malloc = "default" if evaluate else "keep"
    monkeypatch.setattr(sys, "argv", ["train_overhead.py", "--data-dir", str(data_dir), "--train-subset", "1000",
                                      "--epochs", "2", "--repeats", "1", "--threads", "1", "--malloc", malloc,
                                      *(["--evaluate"] if evaluate else [])])
    benchmark.main()
    report = json.loads(capsys.readouterr().out)
    assert [turn for turn in turns if turn[1] is not None] == [
        ("ce", 1), ("store", 1), ("teacher", 1), ("ce", 2), ("teacher", 2), ("store", 2)]
    steps = [arm for arm, epoch in turns if epoch is None]
    per_epoch = len(steps) // 6  # ceil(1000 / 128) batches of the subset
    assert per_epoch == 8 and steps == ["ce", "store", "teacher"] * per_epoch + ["ce", "teacher", "store"] * per_epoch
    assert report["machine"]["freed_memory_kept"] is (malloc == "keep")  # glibc, on this machine
    for arm, parts in report["parts_ms_per_epoch"].items():  # an arm's epoch is its own turns, not the others'
        assert 1000 * report["epoch_s"][arm] == pytest.approx(sum(parts.values()), rel=1e-9)
        assert min(parts["loading"], parts["step"]) > 0
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
