"""benchmarks/token_loss.py: PS-KD's token loss and cross-entropy timed in turn on the same logits."""

from __future__ import annotations

import argparse
import statistics

from conftest import benchmark_script


def test_both_losses_are_timed_in_turn_and_the_ratio_is_the_median_of_each_turns(monkeypatch):
    benchmark = benchmark_script("token_loss")
    order, timed = [], benchmark.timed

    def recording(loss, logits):
        order.append(id(loss))
        elapsed = timed(loss, logits)
        assert logits.grad is None  # each backward's gradient dropped: none accumulates into the next
        return elapsed

    monkeypatch.setattr(benchmark, "timed", recording)
    args = argparse.Namespace(batch_size=2, length=8, vocabulary=50, topk=4, repeats=4)
    result = benchmark.measure(args)
    times = result["per_turn_ms"]
    assert [len(values) for values in times.values()] == [4, 4]
    assert len(order) == 2 * 5 and order[0] == order[3] != order[1] == order[2]  # the first of each turn alternates
    ratios = [token / plain for token, plain in zip(times["token_loss_ms"], times["cross_entropy_ms"])]
    assert result["ratio"] == statistics.median(ratios)
    assert result["token_loss_ms"] == statistics.median(times["token_loss_ms"])
