"""benchmarks/gpu_check.py is what a lent GPU runs, once: it must not fail for a reason a
CPU could have shown. Its device-independent check runs here on the CPU."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import benchmark_script

pytestmark = pytest.mark.slow  # torchrun, object-store servers, kills: the full suite only

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_every_method_and_augmentation_trains_through_the_gpu_checks_matrix(tmp_path, monkeypatch, torch_state_kept):
    """The script as a GPU machine runs it (its command line and JSON file), in this process."""
    out = tmp_path / "gpu_check.json"
    monkeypatch.setattr(sys, "argv", [str(GPU_CHECK), "--device", "cpu", "--checks", "matrix", "--matrix-steps", "1",
                                      "--matrix-batch", "2", "--matrix-workers", "0", "--out", str(out)])
    runpy.run_path(str(GPU_CHECK), run_name="__main__")
    matrix = json.loads(out.read_text())["matrix"]
    runs = {name: result for name, result in matrix.items() if "+" in name}
    assert len(runs) == 15 and matrix["ok"], {name: r for name, r in runs.items() if not r["ok"]}
    # PS-KD records the half of each batch that trained on its targets; the others every row
    # (CutMix mixes a batch half of the time: a mixed one records nothing)
    assert runs["pskd+cutout"]["ids_written"] == runs["pskd+cutmix"]["ids_written"] == [1, 1]
    assert runs["ce+none"]["ids_written"] == runs["cskd+cutout"]["ids_written"] == [2, 2]
    assert all(written in ([0, 0], [0, 2], [2, 0], [2, 2]) for written in
               (runs[f"{method}+cutmix"]["ids_written"] for method in ("ce", "ls", "tfkd", "cskd")))


def test_the_throughput_check_runs_its_three_arms_on_the_cpu(tmp_path):
    """Check 5 as a GPU runs it (its settings parsed by train_overhead.py's own parser, with
    channels_last and 4 workers), on a few CPU samples: one architecture, fp32 (bfloat16
    autocast takes 10x as long on this CPU), no peak memory to read."""
    gpu_check = benchmark_script("gpu_check")
    result = gpu_check.check_throughput(tmp_path, 2, device="cpu", archs=("preact_resnet18",), amps=(False,))
    assert set(result) == {"preact_resnet18_fp32"}
    for measured in result.values():
        assert min(measured[f"{arm}_samples_per_s"] for arm in ("ce", "store", "teacher")) > 0
        assert measured["store_fixed_s_per_epoch"] > 0 and measured["store_peak_gpu_mib"] is None


def test_the_overhead_check_takes_turns_on_the_cpu(tmp_path):
    """Check 6 as a GPU runs it (train_overhead.py's arms taking turns, 4 workers), on a few
    CPU samples in small batches: every arm measured, the store's parts where its time went."""
    gpu_check = benchmark_script("gpu_check")
    result = gpu_check.check_overhead(tmp_path, 32, 1, device="cpu", archs=("preact_resnet18",), amps=(False,),
                                      epochs=2, batch_size=16)
    measured = result["preact_resnet18_fp32"]
    assert set(measured["paired_median"]) == {"store_over_ce", "store_steps_over_ce", "teacher_over_ce"}
    assert min(measured["samples_per_s"].values()) > 0 and measured["store_fixed_s_per_epoch"] > 0
    parts = measured["parts_ms_per_epoch"]
    assert all(parts["store"][part] > parts["ce"][part] for part in ("set_epoch", "writer_open", "seal"))


def test_the_syncs_check_trains_through_the_real_loop_on_the_cpu(tmp_path, monkeypatch, torch_state_kept):
    """Check 3 calls the training loop's own functions, whose signatures move: it runs here
    on the CPU, with CUDA's synchronisation and its debug mode recorded instead of made."""
    gpu_check = benchmark_script("gpu_check")
    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    result = gpu_check.check_syncs(tmp_path, 1, device="cpu", batch_size=4)
    assert result.pop("ok") is True
    assert set(result) == {f"{aug}{bar}" for aug in ("none", "cutout", "cutmix") for bar in ("", "_progress_bar")}
    assert all(measured == {"syncs_per_step": 0.0, "syncs": 0, "steps": 1, "where": {}} for measured in result.values())
    assert modes == ["warn", "default"] * 6  # around each of the two measured epochs of each augmentation


def test_the_write_time_check_times_every_call_of_every_epoch_on_the_cpu(tmp_path):
    gpu_check = benchmark_script("gpu_check")
    result = gpu_check.check_write_time(tmp_path, device="cpu", samples=640, epochs=2)
    assert set(result) == {"epoch_1", "epoch_2"}
    for measured in result.values():
        assert measured["calls"] == 5 and 0 < measured["median_us"] <= measured["max_us"]
        assert measured["mean_us"] <= measured["max_us"]


def test_a_check_not_there_is_refused_and_a_failed_one_fails_the_run(tmp_path, monkeypatch, torch_state_kept):
    """On a lent GPU a mistyped --checks would run nothing and say nothing; a check that
    failed must show in the exit status, with its traceback in the report written so far."""
    out = tmp_path / "gpu_check.json"
    monkeypatch.setattr(sys, "argv", [str(GPU_CHECK), "--device", "cpu", "--checks", "matrix, rank_drawz"])
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(GPU_CHECK), run_name="__main__")
    assert refused.value.code == 2
    monkeypatch.setattr(sys, "argv", [str(GPU_CHECK), "--device", "cpu", "--checks", "matrix", "--matrix-steps", "1",
                                      "--matrix-batch", "2", "--matrix-workers", "0", "--out", str(out)])
    monkeypatch.setattr("pskd_store.training.build_run", _fails)  # every matrix run fails where it builds
    with pytest.raises(SystemExit, match="gpu_check: matrix failed"):
        runpy.run_path(str(GPU_CHECK), run_name="__main__")
    matrix = json.loads(out.read_text())["matrix"]
    assert not matrix["ok"] and "RuntimeError: a device path broke" in matrix["pskd+none"]["error"]
    assert "Traceback" in matrix["pskd+none"]["error"] and "_fails" in matrix["pskd+none"]["error"]


def _fails(*args, **kwargs):
    raise RuntimeError("a device path broke")
