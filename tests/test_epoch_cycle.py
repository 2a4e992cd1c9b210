"""benchmarks/epoch_cycle.py: the store's cycle of an epoch without training, and how few
calls a local store still makes through zarr's event loop (each a round trip between
threads that cost more than the file operation it carried)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "epoch_cycle.py"


def test_an_epoch_on_a_local_store_makes_few_round_trips_through_zarr(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--samples", "300", "--classes", "7", "--epochs", "4",
                                      "--window", "1"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    report = json.loads(capsys.readouterr().out)
    for measure in ("ms", "cpu_ms", "directories_made", "zarr_round_trips"):
        assert set(report[measure]) == {"set_epoch", "writer_open", "write", "writer_close", "seal"}
    assert report["fixed_ms"] > 0 and report["fixed_cpu_ms"] > 0 and report["baseline_npy_write_read_ms"] > 0
    assert report["directories_made"]["write"] == 0 < report["directories_made"]["seal"]
    assert report["directories_made_per_epoch"] == sum(report["directories_made"].values())
    assert report["zarr_round_trips"] == dict.fromkeys(report["ms"], 0)  # 59 an epoch before store_io.py
    # two timed epochs (3 and 4), a window of one: the first is epoch 3's time, the last epoch 4's
    first, last = report["ms_first_and_last"]["first"], report["ms_first_and_last"]["last"]
    for phase, ms in report["ms"].items():
        assert first[phase] != last[phase] and ms == (first[phase] + last[phase]) / 2
