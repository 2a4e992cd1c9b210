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
    for measure in ("ms", "cpu_ms", "directories_made", "files_written", "zarr_round_trips"):
        assert set(report[measure]) == {"set_epoch", "writer_open", "write", "writer_close", "seal"}
    assert report["fixed_ms"] > 0 and report["fixed_cpu_ms"] > 0 and report["baseline_npy_write_read_ms"] > 0
    assert report["disk"]["file_made_us"] > 0 and report["disk"]["directory_made_us"] > 0 and report["refresh_ms"] > 0
    # One chunk per array here. Directories: the staging epoch, its owners, the part and its
    # two arrays; the teacher and the trajectory (20 while zarr's default chunk keys made a
    # directory per chunk, c/0/0; 11 while the trajectory was a group of an array per field).
    # Files opened for writing: the decoded teacher (a temporary file, made, then opened as a
    # file object) and its checksum; the staging epoch's and the part's group documents, the
    # claim and the two arrays' documents (and owners/ had one); their chunks and the part's
    # closing document; the seal's claim, the teacher's document and chunk, the trajectory's,
    # the root.
    assert report["directories_made"] == {"set_epoch": 0, "writer_open": 5, "write": 0, "writer_close": 0, "seal": 2}
    assert report["files_written"] == {"set_epoch": 3, "writer_open": 5, "write": 0, "writer_close": 3, "seal": 6}
    assert report["directories_made_per_epoch"] == 7 and report["files_written_per_epoch"] == 17
    assert report["zarr_round_trips"] == dict.fromkeys(report["ms"], 0)  # 59 an epoch before store_io.py
    # two timed epochs (3 and 4), a window of one: the first is epoch 3's time, the last epoch 4's
    first, last = report["ms_first_and_last"]["first"], report["ms_first_and_last"]["last"]
    for phase, ms in report["ms"].items():
        assert first[phase] != last[phase] and ms == (first[phase] + last[phase]) / 2
