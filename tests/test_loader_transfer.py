"""benchmarks/loader_transfer.py: what receiving a batch from DataLoader workers costs the
training thread, for CE's batch and the store's, each handed over as it says."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import benchmark_script
from torch.utils.data import DataLoader

pytestmark = pytest.mark.slow  # worker processes for four loaders: the full suite only


def test_each_loader_hands_its_batch_over_as_named_and_the_report_compares_them(data_dir, monkeypatch, capsys):
    benchmark = benchmark_script("loader_transfer")
    splits = benchmark.build_datasets("mnist1d", str(data_dir))
    shared = {}  # loader -> which of the batch's tensors came through shared memory
    for by_value in (False, True):  # one_tensor_us's two ways, whatever the size
        sized = benchmark.Sized(1, 4 * benchmark.BY_VALUE_BYTES, by_value)
        _, tensor = next(iter(DataLoader(sized, num_workers=1, collate_fn=benchmark.as_made)))
        assert isinstance(tensor, np.ndarray) == by_value and tensor.nbytes == 4 * benchmark.BY_VALUE_BYTES
    for name, kwargs in (("ce", {}), ("ce_by_value", {"collate_fn": benchmark.collate_as_the_store_does}),
                         ("store_four_tensors", {"collate_fn": benchmark.four_tensors})):
        data = splits.train if name.startswith("ce") else benchmark.served_dataset(splits, data_dir / name)
        batch = next(iter(DataLoader(data, batch_size=8, num_workers=1, **kwargs)))
        shared[name] = [t.untyped_storage().is_shared() for t in batch]
    assert shared == {"ce": [True, True], "ce_by_value": [True, False], "store_four_tensors": [True] * 4}

    monkeypatch.setattr(sys, "argv", ["loader_transfer.py", "--data-dir", str(data_dir), "--workers", "1",
                                      "--epochs", "2", "--step-ms", "0", "--sizes", "8,300"])
    benchmark.main()
    report = json.loads(capsys.readouterr().out)
    us = report["receive_us_per_batch"]
    assert set(us) == {"ce", "ce_by_value", "store", "store_four_tensors"} and min(us.values()) > 0
    assert report["store_over_ce_by_value"] == us["store"] / us["ce_by_value"]
    assert report["store_four_tensors_minus_ce_us"] == us["store_four_tensors"] - us["ce"]
    assert report["machine"]["sharing_strategy"] == torch.multiprocessing.get_sharing_strategy()
    assert set(report["one_tensor_us"]) == {"8", "300"}
    assert all(min(ways["shared"], ways["by_value"]) > 0 for ways in report["one_tensor_us"].values())
