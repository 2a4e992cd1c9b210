"""`pskd-store train` and `eval` end to end: real subprocesses on the offline default,
in-process (click's runner) where torchvision's CIFAR checksums must be swapped."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import PSKD, exit_code, lengthen_run, pskd, pskd_forked, pskd_in_process
from store_helpers import write_epoch

from pskd_store.augment import CUTOUT_HOLE
from pskd_store.cli.main import cli
from pskd_store.metrics import evaluate
from pskd_store.recipe import TrainConfig
from pskd_store.run_directory import RunDirectory, RunError
from pskd_store.service import PredictionService
from pskd_store.staging import Owner
from pskd_store.store import SoftTargetStore
from pskd_store.training import train
from pskd_store.verify import verify_path


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_in(item)]
    return []


def without_timings(row: dict) -> dict:
    train = {k: v for k, v in row["train"].items() if k not in ("samples_per_s", "seconds")}
    return {**{k: v for k, v in row.items() if k != "epoch_seconds"}, "train": train}


@pytest.mark.slow
def test_a_redirected_log_has_epoch_lines_and_no_progress_frames(tmp_path, data_dir):
    """Progress bars are drawn on a terminal only: `pskd-store train > log` stays readable."""
    result = subprocess.run([PSKD, "train", "--epochs", "1", "--steps-per-epoch", "4", "--data-dir", str(data_dir),
                             "-o", str(tmp_path / "run")], capture_output=True, timeout=300, check=True)
    log = result.stdout + result.stderr  # bytes: a text pipe would turn tqdm's \r into \n
    assert b"train loss" in log and b"\r" not in log and b"it/s" not in log


@pytest.mark.slow
def test_ctrl_c_names_the_command_that_continues_the_run(tmp_path, data_dir):
    run = tmp_path / "run"
    proc = subprocess.Popen([PSKD, "train", "--epochs", "50", "--data-dir", str(data_dir), "-o", str(run), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and f"interrupted: continue the run with pskd-store train --resume {run}" in \
        stderr.decode(), stderr.decode()


def test_ctrl_c_before_the_run_began_says_to_run_the_command_again(tmp_path, data_dir, monkeypatch):
    import pskd_store.training as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # while the data set downloads, say
    monkeypatch.setattr(training, "build_run", interrupted)
    result = CliRunner().invoke(cli, ["train", "--data-dir", str(data_dir), "-o", str(tmp_path / "run")])
    assert result.exit_code == 1 and "interrupted before the run began: run the same command again" in result.output
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow
def test_a_terminal_gets_progress_bars(tmp_path, data_dir):
    """On a terminal (a pseudo-terminal here) each epoch draws its bar, with its running loss,
    error, alpha_t and speed."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a bar needs columns
    proc = subprocess.Popen([PSKD, "train", "--epochs", "2", "--steps-per-epoch", "11", "--data-dir", str(data_dir),
                             "-o", str(tmp_path / "run")], stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    screen = b""
    while True:  # read until the process closes its end
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: no writer left
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    assert b"it/s" in screen and b"train loss" in screen
    assert all(figure in screen for figure in (b"epoch 2/2:", b"alpha_t=0.800", b"loss=", b"err=", b"samples_s="))


@pytest.mark.slow
def test_train_then_eval_on_the_offline_default(tmp_path, data_dir):
    run = tmp_path / "run"
    result = pskd("train", "--epochs", "3", "--data-dir", str(data_dir), "-o", str(run), "-q")
    assert "done:" in result.stdout and "test top-1 err" in result.stdout

    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["alpha_t"] for r in rows] == pytest.approx([0.8 / 3, 1.6 / 3, 0.8])
    for row in rows:
        assert set(row["test"]) >= {"top1_err", "top5_err", "nll", "ece", "aurc", "eaurc"}
        assert 0 <= row["test"]["top1_err"] < 90 and row["train"]["samples_per_s"] > 0
    store = SoftTargetStore.open(run / "store", read_only=True)
    assert store.sealed_epochs == [1, 2, 3] and store.num_samples == 8000
    assert store.dtype == np.float32  # the CLI's default --store-dtype: the authors' precision
    assert store.trajectory()["true_prob"].shape == (3, 8000)

    config = json.loads((run / "config.json").read_text())
    assert not (config["amp"] or config["tf32"] or config["deterministic"])  # fp32, as the paper trains

    summary = json.loads((run / "summary.json").read_text())
    best = min(rows, key=lambda r: r["test"]["top1_err"])
    assert summary["final"] == {"epoch": 3, "test": rows[-1]["test"]}
    assert summary["best"] == {"epoch": best["epoch"], "test": best["test"]}

    # training leaves the final model's test probabilities where inspect reads them
    with np.load(run / "eval" / "test_probs.npz") as trained:
        from_the_file = evaluate(trained["probs"], trained["labels"], trained["nll"], trained["rank"])
        assert from_the_file == pytest.approx(rows[-1]["test"], abs=1e-9)
        assert str(trained["checkpoints"][0]).endswith("last.pt")
    first_look = json.loads(pskd_in_process("inspect", str(run), "--json", "--out", str(tmp_path / "look")).stdout)
    assert first_look["runs"][0]["eval_ece"] == pytest.approx(rows[-1]["test"]["ece"], abs=1e-9)
    assert (tmp_path / "look" / f"reliability_1_{run.name}.png").is_file()

    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == 3 and set(checkpoint) >= {"model", "optimizer", "scheduler", "rng"}
    assert not any(t.shape[:1] == (store.num_samples,) for t in tensors_in(checkpoint))  # no prediction table

    result = pskd_in_process("eval", str(run))
    report = json.loads(result.stdout)
    probs = np.load(run / "eval" / "test_probs.npz")
    assert probs["probs"].shape == (2000, 10) and probs["labels"].shape == (2000,)
    assert report["top1_err"] == pytest.approx(rows[-1]["test"]["top1_err"], abs=1e-6)
    assert report["ece"] == pytest.approx(rows[-1]["test"]["ece"], abs=1e-4)

    ensemble = pskd_in_process("eval", str(run), str(run / "checkpoints" / "last.pt"))
    assert json.loads(ensemble.stdout)["nll"] == pytest.approx(report["nll"], rel=1e-5)
    assert (run / "eval" / "ensemble_test_probs.npz").is_file()

    inspected = json.loads(pskd_in_process("inspect", str(run), "--top", "10", "--json").stdout)
    assert inspected["runs"][0]["epochs"] == 3 and inspected["runs"][0]["plotted"] <= 10
    assert inspected["runs"][0]["eval_ece"] == pytest.approx(report["ece"], abs=1e-3)
    pngs = sorted((run / "inspect").glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


@pytest.mark.parametrize("method, aug", [("pskd", "cutout"), ("tfkd", "cutout"), ("cskd", "cutout")])
@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, data_dir, method, aug):
    # Cutout draws random holes every step (from the seed, epoch and step): the resumed run
    # matches only if the weights, the optimizer, the schedule and the store were restored.
    # The process's own generators are test_randomness.py's.
    args = ["train", "--epochs", "4", "--method", method, "--aug", aug, "--train-subset", "1000",
            "--data-dir", str(data_dir), "-q", "--seed", "3"]
    whole = tmp_path / "whole"
    pskd_in_process(*args, "-o", str(whole), check=True)  # the reference: no process to kill

    broken = tmp_path / "broken"
    killed = pskd_forked(*args, "-o", str(broken))
    deadline = time.time() + 300
    while time.time() < deadline and not (
        (broken / "metrics.jsonl").exists() and len(metrics_rows(broken)) >= 3  # so epoch 2 is checkpointed
    ):
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    assert exit_code(killed, timeout=60) == -signal.SIGKILL
    done = torch.load(broken / "checkpoints" / "last.pt", weights_only=False)["epoch"]
    assert 2 <= done < 4, "the run must be killed part-way"
    store = SoftTargetStore.open(broken / "store")
    if store.latest_sealed == done:  # make it a kill between a seal and its checkpoint
        write_epoch(store, done + 1, seal=True)  # predictions the resumed run must not use
        PredictionService(store).prepare(done + 1)  # and a decoded copy of them in the cache

    pskd_in_process("train", "--resume", str(broken), "-q", check=True)
    assert [without_timings(r) for r in metrics_rows(broken)] == [without_timings(r) for r in metrics_rows(whole)]
    resumed = SoftTargetStore.open(broken / "store", read_only=True)
    np.testing.assert_array_equal(
        resumed.read_epoch(4), SoftTargetStore.open(whole / "store", read_only=True).read_epoch(4)
    )


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, data_dir):
    broken = tmp_path / "broken"
    pskd_in_process("train", "--epochs", "2", "--train-subset", "1000", "--data-dir", str(data_dir), "-q",
                    "-o", str(broken), check=True)
    whole = [without_timings(r) for r in metrics_rows(broken)]  # an uninterrupted run: what the new start repeats
    for checkpoint in ("last.pt", "previous.pt"):
        (broken / "checkpoints" / checkpoint).unlink()
    # no checkpoint, and epoch 2 sealed: the checkpoints were lost, not never written
    refused = pskd_in_process("train", "--resume", str(broken), "-q")
    assert refused.returncode == 1 and "has no checkpoint, but its store has sealed epochs [1, 2]" in refused.stderr
    assert SoftTargetStore.open(broken / "store").sealed_epochs == [1, 2]
    # what a kill in epoch 1 leaves: no checkpoint yet, half-written temporary files, and
    # here epoch 1 already sealed (the seal comes before the checkpoint)
    SoftTargetStore.open(broken / "store").rollback(1)
    leftovers = [broken / "checkpoints" / ".last.pt.123.tmp", broken / "store.mmap" / "tmpab12.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    pskd_in_process("train", "--resume", str(broken), "-q", check=True)
    assert not any(path.exists() for path in leftovers)
    assert [without_timings(r) for r in metrics_rows(broken)] == whole


def test_a_resume_refuses_a_config_edited_since_its_checkpoint(tmp_path, trained_run):
    """Two more epochs and another alpha_T, written into config.json: alpha_t = alpha_T·t/T
    would have changed from the next epoch on, without a word. Where it runs may change."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "epochs": 4, "alpha_T": 0.5, "workers": 1}))
    result = pskd_in_process("train", "--resume", str(run), "-q")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"{run / 'config.json'} differs from the run its checkpoint {run / 'checkpoints' / 'last.pt'} trained: "
            "alpha_T 0.5 (trained with 0.8), epochs 4 (trained with 2); a resumed run trains on as it began") \
        in result.stderr
    assert SoftTargetStore.open(run / "store").sealed_epochs == [1, 2] and len(metrics_rows(run)) == 2


def test_a_resume_refuses_a_store_another_run_sealed_its_checkpoints_epoch_into(tmp_path, trained_run):
    """Two runs given one --store: the other rolled epoch 2 back and sealed its own. Resumed,
    this run would train epoch 3 on the other run's teacher."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    store = SoftTargetStore.open(run / "store")
    store.rollback(1)
    with store.writer(2) as writer:
        writer.write(torch.arange(store.num_samples), torch.zeros(store.num_samples, store.num_classes))
    token = store.seal(2)["seal_token"]
    result = pskd_in_process("train", "--resume", str(run), "-q")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"epoch 2 of {run / 'store'} is not the one this run sealed before its checkpoint "
            f"{run / 'checkpoints' / 'last.pt'} (seal token {token}, the checkpoint's ") in result.stderr
    assert "two runs given one --store?" in result.stderr
    assert SoftTargetStore.open(run / "store").epoch_info(2)["seal_token"] == token and len(metrics_rows(run)) == 2
    report = verify_path(run)
    assert [str(f) for f in report.findings] == [
        f"{run / 'checkpoints' / 'last.pt'}: was written after epoch 2 as this run sealed it, but the store's epoch of "
        "that number was sealed by another (its seal token differs): another run has sealed epochs into this store"]


def test_a_resume_refuses_a_store_that_lost_its_checkpoints_epoch(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    lengthen_run(run, 3)
    SoftTargetStore.open(run / "store").rollback(1)
    result = pskd_in_process("train", "--resume", str(run), "-q")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"{run / 'store'} has sealed epochs [1], but the checkpoint {run / 'checkpoints' / 'last.pt'} was taken "
            "after epoch 2: the store lost epochs this run trained on") in result.stderr
    assert SoftTargetStore.open(run / "store").sealed_epochs == [1] and len(metrics_rows(run)) == 2


def test_a_relative_data_dir_is_kept_absolute_so_a_resume_elsewhere_reads_the_same_data(
        tmp_path, data_dir, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "data").symlink_to(data_dir)
    monkeypatch.chdir(tmp_path / "a")
    args = ["--epochs", "2", "--steps-per-epoch", "2", "--workers", "0", "--data-dir", "data", "-q"]
    assert pskd_in_process("train", "-o", str(tmp_path / "run"), *args).returncode == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(data_dir.resolve())
    lengthen_run(tmp_path / "run", 3)
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    assert pskd_in_process("train", "--resume", str(tmp_path / "run"), "-q").returncode == 0
    assert not (tmp_path / "b" / "data").exists()  # not made again (MNIST-1D generated) where the resume ran


def test_a_rollback_past_the_final_epoch_drops_the_summary_and_probabilities_of_its_model(tmp_path, trained_run):
    """--from-epoch 1 of a finished run, interrupted in epoch 2: summary.json and
    eval/test_probs.npz described the epoch-2 model, which is gone, not the run as it stands."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    directory = RunDirectory(run)
    directory.keep_metrics_through(2)  # nothing dropped: the final model stands
    assert directory.summary.is_file() and directory.eval_probs().is_file()
    directory.keep_metrics_through(1)
    assert not directory.summary.exists() and not directory.eval_probs().exists()
    assert [row["epoch"] for row in metrics_rows(run)] == [1]
    assert "final test    epoch 1" in pskd_in_process("inspect", str(run), "--out", str(tmp_path / "plots")).stdout


def test_a_checkpoint_from_before_seal_tokens_resumes(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    lengthen_run(run, 3)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    del state["seal_token"]
    torch.save(state, run / "checkpoints" / "last.pt")
    result = pskd_in_process("train", "--resume", str(run), "-q")
    assert result.returncode == 0, result.stderr
    assert SoftTargetStore.open(run / "store").sealed_epochs == [1, 2, 3] and len(metrics_rows(run)) == 3


def test_a_run_whose_last_checkpoint_was_deleted_is_not_started_over(tmp_path, trained_run):
    """A checkpoint is renamed into place, never removed: a run whose last one is gone while
    its previous one is there lost it by hand. Starting over would roll its store back past
    the epoch that previous checkpoint holds."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "checkpoints" / "last.pt").unlink()
    result = pskd_in_process("train", "--resume", str(run), "-q")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"{run / 'checkpoints' / 'last.pt'} is gone, but {run / 'checkpoints' / 'previous.pt'} keeps epoch 1: "
            f"resume from it with --resume {run} --from-epoch 1") in result.stderr
    assert SoftTargetStore.open(run / "store").sealed_epochs == [1, 2]
    assert len(metrics_rows(run)) == 2


@pytest.mark.slow
def test_a_live_run_is_locked_and_a_killed_one_is_not(tmp_path, data_dir):
    run = tmp_path / "run"
    first = pskd_forked("train", "--epochs", "40", "--data-dir", str(data_dir), "-o", str(run), "-q")
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "last.pt").exists():
        time.sleep(0.02)
    second = pskd_in_process("train", "--resume", str(run), "-q")
    assert second.returncode != 0 and f"is being trained by process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    os.killpg(first.pid, signal.SIGKILL)
    assert exit_code(first, timeout=60) == -signal.SIGKILL
    log = (run / "train.log").read_text()
    assert log.count("run directory") == 1 and "stopped" not in log  # the refused resume wrote nothing there
    with RunDirectory(run).lock():  # the dead process left no stale lock (the resume takes this lock)
        pass


@pytest.mark.parametrize("lock_says", ["its trainer, ended", "its trainer, in a lock of older runs"])
def test_a_run_held_by_a_process_whose_trainer_ended_says_so(tmp_path, lock_says):
    """What the next `train` says where a process the trainer started holds the run's lock
    itself after the trainer ended: that it ended, and how to find the holder (where the
    lock records what tells it: older runs' locks name the trainer alone)."""
    run = RunDirectory(tmp_path / "run")
    ended = subprocess.Popen(["true"])
    ended.wait()
    trainer = dataclasses.replace(Owner.this_process(), pid=ended.pid)  # a trainer, here, that has ended
    written = f"process {trainer.pid} on {trainer.host}\n"
    if lock_says == "its trainer, ended":
        written += json.dumps({key: value for key, value in dataclasses.asdict(trainer).items() if key != "token"})
        written += "\n"
    fork = multiprocessing.get_context("fork")
    holding, release = fork.Event(), fork.Event()

    def hold() -> None:
        with open(run.path / ".lock", "a+") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            file.write(written)
            file.flush()
            holding.set()
            release.wait(30)

    run.path.mkdir()
    holder = fork.Process(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        refusal = (f"{run.path} is held by a process that process {ended.pid} on {trainer.host} started, which has "
                   f"ended: stop it (`fuser {run.path / '.lock'}` names it)" if lock_says == "its trainer, ended" else
                   f"{run.path} is being trained by process {ended.pid} on {trainer.host}: wait for it to finish or "
                   "stop it")
        with pytest.raises(RunError, match=re.escape(refusal + ", or train into another --output")):
            with run.lock():
                pass
    finally:
        release.set()
        holder.join(30)


def test_a_run_is_refused_in_another_number_of_processes_than_it_trains_in(tmp_path, data_dir):
    """A run killed before its first checkpoint leaves its config.json alone: resumed in
    another number of processes, its batch per process would make another global batch."""
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(epochs=2, data_dir=str(data_dir)).resolved(world_size=2).save(run / "config.json")
    resumed = pskd_in_process("train", "--resume", str(run), "-q")
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr
    assert (f"the run in {run} trains in 2 process(es) with a batch of 64 each (world_size in its config): run it "
            "in as many (torchrun --nproc-per-node 2), not 1, or its batch of 128 would change") in resumed.stderr
    assert not (run / "store").exists() and not (run / "checkpoints").exists()
    with pytest.raises(ValueError, match=re.escape(  # a new run from a config resolved in another process
            "this config was resolved for 2 process(es) (a batch of 64 each), but trains in 1: build and resolve it "
            "in each process (TrainConfig(...).resolved() reads torchrun's environment)")):
        train(TrainConfig(epochs=1, data_dir=str(data_dir)).resolved(world_size=2), tmp_path / "new", quiet=True)


def test_a_process_forked_as_the_lock_is_let_go_does_not_keep_it(tmp_path):
    """A fork from another thread while the trainer lets the run go, once it no longer
    counts the lock as its own, copies the lock's file: letting go unlocks every copy."""
    from pskd_store import run_directory

    run = RunDirectory(tmp_path / "run")
    fork = multiprocessing.get_context("fork")
    working = fork.Event()
    with run.lock():
        run_directory._HELD_LOCKS.clear()  # that moment: no longer counted
        worker = fork.Process(target=lambda: (working.set(), time.sleep(30)))
        worker.start()
        assert working.wait(30)
    try:
        with run.lock():
            pass
    finally:
        worker.kill()
        worker.join()


def test_the_lock_is_counted_before_it_is_taken_and_not_after_it_fails(tmp_path, monkeypatch):
    """Counted first, a process forked while the lock is being taken holds nothing; a file
    system without locks (ENOLCK) is named, and leaves nothing counted that a later fork
    would close."""
    from pskd_store import run_directory

    counted = []

    def no_locks(file, operation) -> None:
        counted.append(file.fileno() in run_directory._HELD_LOCKS)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(RunError, match=re.escape(
            f"cannot lock {tmp_path / 'run' / '.lock'} (No locks available): its file system takes no locks; train "
            "into a directory on one that does (a local disk)")):
        with RunDirectory(tmp_path / "run").lock():
            pass
    assert counted == [True, True] and not run_directory._HELD_LOCKS  # taking it, then letting it go


def test_processes_forked_by_the_trainer_do_not_hold_the_run(tmp_path):
    """DataLoader workers are forked: one that outlives its killed trainer (stuck writing a
    batch into the pipe nobody reads) would keep the run, and every resume refused. The lock
    names its trainer and what tells, on its machine, whether it still runs."""
    run = RunDirectory(tmp_path / "run")
    fork = multiprocessing.get_context("fork")
    working = fork.Event()
    with run.lock():
        holder, record = (run.path / ".lock").read_text().splitlines()
        this_process = Owner.this_process()
        assert holder == f"process {os.getpid()} on {this_process.host}"
        assert json.loads(record) == {key: value for key, value in dataclasses.asdict(this_process).items()
                                      if key != "token"}
        worker = fork.Process(target=lambda: (working.set(), time.sleep(30)))
        worker.start()
        assert working.wait(30)  # forked, and running its own code
    try:
        with run.lock():  # the trainer let go; its worker, alive, holds nothing
            pass
    finally:
        worker.kill()
        worker.join()


@pytest.mark.parametrize("arch, method, aug, recorded_per_step", [
    ("densenet121", "pskd", "none", {8}),
    ("preact_resnet18", "pskd", "cutmix", {4}),   # PS-KD half recorded, the augmented half not
    ("preact_resnet18", "pskd", "cutout", {4}),
    ("preact_resnet18", "ce", "cutout", {8}),    # Cutout on every image: every row is its sample
    ("preact_resnet18", "ce", "cutmix", {0, 8}),  # a mixed batch records nothing
])
@pytest.mark.slow
def test_cifar100_format_run_for_a_few_steps(tmp_path, cifar100_dir, arch, method, aug, recorded_per_step):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "train", "--dataset", "cifar100", "--arch", arch, "--method", method, "--aug", aug,
        "--data-dir", str(cifar100_dir), "--no-download", "--epochs", "2", "--steps-per-epoch", "2",
        "-b", "8", "-j", "0", "-o", str(run), "-q",
    ])
    assert result.exit_code == 0, result.output
    rows = metrics_rows(run)
    assert len(rows) == 2 and rows[-1]["test"]["n"] == 20
    info = SoftTargetStore.open(run / "store", read_only=True).epoch_info(2)
    assert info["ids_written"] in {a + b for a in recorded_per_step for b in recorded_per_step}
    assert info["carried_forward"] == 200 - info["ids_written"]


@pytest.mark.slow
def test_mixed_batches_make_no_empty_writes(tmp_path, cifar100_dir, monkeypatch):
    """CE with CutMix on every batch (ImageNet's probability) records no row: the loop
    hands the writer nothing at all, never a zero-row batch (whose device-side check
    would raise on a GPU)."""
    from pskd_store.writer import PredictionWriter

    sizes = []
    write = PredictionWriter.write
    monkeypatch.setattr(PredictionWriter, "write",
                        lambda self, ids, out: (sizes.append(len(ids)), write(self, ids, out)))
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "train", "--dataset", "cifar100", "--arch", "preact_resnet18", "--method", "ce", "--aug", "cutmix",
        "--cutmix-prob", "1", "--data-dir", str(cifar100_dir), "--no-download", "--epochs", "1",
        "--steps-per-epoch", "3", "-b", "8", "-j", "0", "-o", str(run), "-q",
    ])
    assert result.exit_code == 0, result.output
    assert sizes == []
    assert SoftTargetStore.open(run / "store", read_only=True).epoch_info(1)["ids_written"] == 0


@pytest.mark.slow
def test_folder_data_set_with_a_torchvision_model(tmp_path, imagefolder_dir):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "train", "--dataset", "folder", "--arch", "tv_resnet18", "--data-dir", str(imagefolder_dir),
        "--epochs", "1", "-b", "4", "-j", "0", "--val-split", "0.25", "-o", str(run), "-q",
    ])
    assert result.exit_code == 0, result.output
    assert metrics_rows(run)[0]["test"]["n"] == 6
    # an ensemble of runs on two image trees: refused, unless --data-dir names one for all
    from pskd_store.evaluation import evaluate_checkpoints

    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    other_tree = tmp_path / "other_tree"
    shutil.copytree(imagefolder_dir, other_tree)
    torch.save({**state, "config": {**state["config"], "data_dir": str(other_tree)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="holds the same samples \\(image folders: in the same directory"):
        evaluate_checkpoints([last, tmp_path / "other.pt"])
    assert evaluate_checkpoints([last, tmp_path / "other.pt"], data_dir=str(other_tree))[0]["n"] == 6
    for split in ("train", "val"):  # a fourth class: the model's three classes do not fit it
        shutil.copytree(other_tree / split / "ant", other_tree / split / "dog")
    with pytest.raises(ValueError, match=f"{last} does not fit the 4 classes of the data in {other_tree}"):
        evaluate_checkpoints([last], data_dir=str(other_tree))
    # an image renamed in its class: the same labels, but every later image would get its neighbour's teacher
    assert SoftTargetStore.open(run / "store").fingerprint.names_sha256 is not None
    lengthen_run(run, 2)
    (imagefolder_dir / "train" / "ant" / "0.png").rename(imagefolder_dir / "train" / "ant" / "9.png")
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(run), "-q"])
    assert resumed.exit_code == 1
    assert "was made for another data set: the data set's samples (files) differ" in resumed.output
    # the validation split, drawn from the changed training set by position, would hold trained samples
    with pytest.raises(ValueError, match=f"the training set is not the one {run} trained on .* its validation "
                                         "split would now hold samples the model trained on"):
        evaluate_checkpoints([last], split="val")
    (imagefolder_dir / "train" / "ant" / "9.png").rename(imagefolder_dir / "train" / "ant" / "0.png")
    assert evaluate_checkpoints([last], split="val")[0]["n"] == 3
    (tmp_path / "loose" / "models").mkdir(parents=True)  # a checkpoint in no run: no store to check against
    shutil.copy(last, tmp_path / "loose" / "models" / "best.pt")
    assert evaluate_checkpoints([tmp_path / "loose" / "models" / "best.pt"], split="val")[0]["n"] == 3


@pytest.mark.slow
def test_resume_refuses_new_run_options_and_existing_output_needs_resume(tmp_path, data_dir):
    run = tmp_path / "run"
    pskd_in_process("train", "--epochs", "1", "--steps-per-epoch", "2", "--data-dir", str(data_dir), "-o", str(run),
                    "-q", check=True)
    again = pskd_in_process("train", "--epochs", "1", "--data-dir", str(data_dir), "-o", str(run))
    assert again.returncode != 0 and f"continue it with --resume {run}" in again.stderr
    resumed = pskd_in_process("train", "--resume", str(run), "--lr", "0.3")
    assert resumed.returncode != 0 and "drop --lr" in resumed.stderr
    lengthen_run(run, 2)  # where it computes may change, and a change of its arithmetic is said
    pskd_in_process("train", "--resume", str(run), "--tf32", "-q", check=True)  # no TF32 on a CPU: the same
    assert "compute otherwise" not in (run / "train.log").read_text()
    lengthen_run(run, 3)
    pskd_in_process("train", "--resume", str(run), "--amp", "-q", check=True)
    assert ("resuming with amp=True (trained with amp=False): the epochs from here compute otherwise than those "
            "before") in (run / "train.log").read_text()


@pytest.mark.slow
def test_methods_differ_only_in_their_targets(tmp_path, data_dir):
    # Same seed and data: in epoch 1 PS-KD has no teacher (one-hot targets), so it trains
    # like CE; from epoch 2 it trains on its soft targets while CE keeps the labels.
    rows = {}
    small = dict(train_subset=2000, batch_size=32, data_dir=str(data_dir))  # 200 signals of each class
    for method in ("ce", "pskd", "ls"):
        config = TrainConfig(method=method, epochs=2, **small).resolved()
        train(config, tmp_path / method, quiet=True)
        rows[method] = metrics_rows(tmp_path / method)
    ce, pskd, ls = rows["ce"], rows["pskd"], rows["ls"]
    assert pskd[0]["train"]["loss"] == pytest.approx(ce[0]["train"]["loss"], rel=1e-5)
    assert pskd[0]["test"] == pytest.approx(ce[0]["test"], rel=1e-3, abs=1e-3)
    # a soft target has entropy: PS-KD's loss is well above CE's once alpha_2 = 0.8 weighs in
    assert pskd[1]["train"]["loss"] > ce[1]["train"]["loss"] + 0.1
    assert ls[0]["train"]["loss"] > ce[0]["train"]["loss"] + 0.1  # label smoothing's uniform term
    # TF-KD with its teacher weighted 0 is CE; with the default weight its KL term adds to the loss
    for name, alpha in (("tfkd0", 0.0), ("tfkd", 0.1)):
        train(TrainConfig(method="tfkd", tfkd_alpha=alpha, epochs=2, **small).resolved(),
              tmp_path / name, quiet=True)
    assert metrics_rows(tmp_path / "tfkd0")[1]["train"]["loss"] == pytest.approx(ce[1]["train"]["loss"], rel=1e-5)
    assert metrics_rows(tmp_path / "tfkd")[0]["train"]["loss"] > ce[0]["train"]["loss"] + 0.01
    # CS-KD: the same pair batches with and without the class-wise term (KL >= 0 adds to the loss)
    for name, weight in (("cskd0", 0.0), ("cskd", 1.0)):
        train(TrainConfig(method="cskd", cskd_weight=weight, epochs=1, **small).resolved(),
              tmp_path / name, quiet=True)
    cskd0, cskd = (metrics_rows(tmp_path / name)[0]["train"]["loss"] for name in ("cskd0", "cskd"))
    assert cskd > cskd0 + 0.01, (cskd, cskd0)


def test_cskd_pairs_the_training_subset_and_augments_partners_too(tmp_path, data_dir, monkeypatch):
    """CS-KD with --val-split and Cutout in the real loop: each batch's second half holds
    same-class partners of its first half, by the labels of the training subset read from
    the data set itself, and both forwards of a step (the trained half's, the partners')
    see Cutout's holes."""
    import pskd_store.methods as methods
    from pskd_store.data import build_datasets

    batches: list[list[int]] = []

    class RecordingPairs(methods.ClassPairBatchSampler):
        def __iter__(self):
            for batch in super().__iter__():
                batches.append(list(batch))
                yield batch

    forwards = _training_forwards(monkeypatch)
    monkeypatch.setattr(methods, "ClassPairBatchSampler", RecordingPairs)
    config = TrainConfig(method="cskd", aug="cutout", val_split=0.25, epochs=1, steps_per_epoch=4,
                         batch_size=32, data_dir=str(data_dir)).resolved()
    train(config, tmp_path / "run", quiet=True)

    subset = build_datasets("mnist1d", data_dir, val_split=0.25, seed=0).train
    assert len(batches) >= 4 and all(len(b) == 64 for b in batches[:4])
    for batch in batches[:4]:
        labels = [subset[i][1] for i in batch]
        assert labels[:32] == labels[32:]
    assert len(forwards) == 8  # per step: the trained half, then its partners
    for inputs in forwards:
        assert ((inputs == 0).flatten(1).sum(1) >= CUTOUT_HOLE // 2).all()


def _training_forwards(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The inputs of every training-mode forward of the models `train` builds from now on."""
    import pskd_store.training as training

    forwards: list[torch.Tensor] = []
    create_model = training.create_model

    def recording_model(name: str, num_classes: int) -> torch.nn.Module:
        model = create_model(name, num_classes)
        model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].clone()) if m.training else None)
        return model

    monkeypatch.setattr(training, "create_model", recording_model)
    return forwards


def _hole_sides(model_inputs: list[torch.Tensor]) -> set[int]:
    """The side of each input's Cutout hole: its zeros (a normalised pixel or sample is never
    exactly 0) per channel, as a square's or a segment's."""
    sides = set()
    for inputs in model_inputs:
        zeros = (inputs == 0).flatten(2).sum(2)[:, 0]  # per input, in its first channel
        sides |= {round(math.sqrt(n)) if inputs.ndim == 4 else n for n in zeros.tolist()}
    return sides


@pytest.mark.slow
def test_cutout_cuts_the_hole_of_its_data_set_and_old_runs_keep_theirs(tmp_path, cifar10_dir, data_dir, monkeypatch):
    """DeVries & Taylor's side per data set: 16 on CIFAR-10 (8 on CIFAR-100, the recipe's
    for the rest); a config from before the setting trains on with the 8 it had; a side
    given is the side cut."""
    forwards = _training_forwards(monkeypatch)
    config = TrainConfig(dataset="cifar10", data_dir=str(cifar10_dir), method="ce", aug="cutout", epochs=1,
                         steps_per_epoch=2, batch_size=32, workers=0).resolved()
    assert config.cutout_hole == 16
    train(config, tmp_path / "cifar10", quiet=True)
    assert max(_hole_sides(forwards)) == 16  # clipped at the border: smaller ones too
    forwards.clear()
    before_the_setting = dataclasses.replace(
        TrainConfig(method="ce", aug="cutout", epochs=1, steps_per_epoch=2, data_dir=str(data_dir)).resolved(),
        cutout_hole=None)
    train(before_the_setting, tmp_path / "mnist1d", quiet=True)
    assert max(_hole_sides(forwards)) == CUTOUT_HOLE == 8
    forwards.clear()
    train(dataclasses.replace(before_the_setting, cutout_hole=6), tmp_path / "given", quiet=True)  # --cutout-hole 6
    assert max(_hole_sides(forwards)) == 6


def test_each_epoch_sees_a_new_sample_order_that_a_rerun_repeats(tmp_path, data_dir, monkeypatch):
    """The ids each step hands the (real) writer, in order: a new permutation every epoch
    (the sampler is re-seeded by epoch), the same ones in a second run with the same seed."""
    from pskd_store.writer import PredictionWriter

    seen: dict[str, dict[int, list[int]]] = {}
    write = PredictionWriter.write

    def recording(self, ids, outputs):
        seen[current].setdefault(self.epoch, []).extend(torch.as_tensor(ids).tolist())
        write(self, ids, outputs)

    monkeypatch.setattr(PredictionWriter, "write", recording)
    for current in ("first", "again"):
        seen[current] = {}
        config = TrainConfig(epochs=3, steps_per_epoch=2, workers=0, data_dir=str(data_dir)).resolved()
        train(config, tmp_path / current, quiet=True)
    orders = seen["first"]
    assert len(orders[1]) == 2 * config.batch_size and len(set(orders[1])) == len(orders[1])
    assert orders[1] != orders[2] != orders[3] != orders[1]
    assert seen["again"] == orders


@pytest.mark.parametrize("method", ["tfkd", "cskd"])
@pytest.mark.slow
def test_fashion_mnist_with_self_distillation_and_cutmix_end_to_end(tmp_path, fashion_mnist_gz, method):
    from pskd_store.image_data import _load_fashion_mnist

    data = tmp_path / "data"  # the idx files unpacked where torchvision looks: FashionMNIST/raw/
    _load_fashion_mnist(data, train=True, transform=None, download=False, system_copy=fashion_mnist_gz)
    run = tmp_path / "run"
    pskd_in_process("train", "--dataset", "fashionmnist", "--data-dir", str(data), "--no-download", "--method", method,
                    "--aug", "cutmix", "--epochs", "2", "-b", "32", "-j", "0", "-o", str(run), "-q", check=True)
    rows = metrics_rows(run)
    assert [row["epoch"] for row in rows] == [1, 2] and rows[-1]["test"]["n"] == 40
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "fmnist_cnn" and config["method"] == method and config["aug"] == "cutmix"
    store = SoftTargetStore.open(run / "store")
    assert store.sealed_epochs == [1, 2] and store.num_samples == 120 and store.num_classes == 10


def test_the_learning_rate_decays_after_each_milestone_and_a_resume_across_one_keeps_it(
        tmp_path, data_dir, monkeypatch):
    """lr x0.1 from the epoch after each milestone, as the authors' adjust_learning_rate
    (lr x gamma for each milestone <= their 0-based epoch); a run stopped after epoch 2 and
    resumed crosses milestone 2 with the scheduler it checkpointed."""
    import pskd_store.training as training

    config = TrainConfig(epochs=4, steps_per_epoch=3, lr=0.1, milestones=[2, 3], data_dir=str(data_dir)).resolved()
    train(config, tmp_path / "whole", quiet=True)
    whole = metrics_rows(tmp_path / "whole")
    authors = [0.1 * 0.1 ** sum(epoch >= m for m in (2, 3)) for epoch in range(4)]  # their 0-based epochs
    assert [row["lr"] for row in whole] == pytest.approx(authors, rel=1e-12)

    log_epoch = training._log_epoch

    def stop_after_epoch_2(row, epochs):
        log_epoch(row, epochs)
        if row["epoch"] == 2:
            raise KeyboardInterrupt  # the checkpoint of epoch 2 is written
    monkeypatch.setattr(training, "_log_epoch", stop_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "broken", quiet=True)
    monkeypatch.undo()
    train(config, tmp_path / "broken", resume=True, quiet=True)
    assert [without_timings(r) for r in metrics_rows(tmp_path / "broken")] == [without_timings(r) for r in whole]


def test_a_run_on_a_train_subset_keeps_it_for_its_store_and_its_validation_split(tmp_path, data_dir):
    run = tmp_path / "run"
    trained = CliRunner().invoke(cli, ["train", "--train-subset", "1000", "--val-split", "0.1", "--epochs", "1",
                                       "--steps-per-epoch", "2", "--data-dir", str(data_dir), "-o", str(run), "-q"])
    assert trained.exit_code == 0, trained.output
    assert SoftTargetStore.open(run / "store").num_samples == 900
    evaluated = CliRunner().invoke(cli, ["eval", str(run), "--split", "val", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["n"] == 100 == metrics_rows(run)[0]["val"]["n"]
    assert json.loads(evaluated.output)["nll"] == pytest.approx(metrics_rows(run)[0]["val"]["nll"], abs=1e-9)


def test_eval_of_a_trained_run_repeats_its_final_test_metrics(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # eval rewrites the run's eval/test_probs.npz
    result = CliRunner().invoke(cli, ["eval", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output)
    test = metrics_rows(run)[-1]["test"]
    assert {k: evaluated[k] for k in test} == pytest.approx(test, abs=1e-9)
    assert evaluated["probs"] == str(run / "eval" / "test_probs.npz")
    final = (run / "eval" / "test_probs.npz").read_bytes()
    # the checkpoint before the last: its probabilities beside the final model's, which inspect draws
    result = CliRunner().invoke(cli, ["eval", str(run / "checkpoints" / "previous.pt"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["probs"] == str(run / "eval" / "previous_test_probs.npz")
    assert json.loads(result.output)["nll"] == pytest.approx(metrics_rows(run)[0]["test"]["nll"], abs=1e-9)
    assert (run / "eval" / "test_probs.npz").read_bytes() == final
    # -o onto a file that is no evaluation's probabilities: refused, the file as it was
    np.save(tmp_path / "features.npy", np.zeros(3))
    for precious in (run / "checkpoints" / "last.pt", run / "config.json", tmp_path / "features.npy"):
        before = precious.read_bytes()
        result = CliRunner().invoke(cli, ["eval", str(run), "--device", "cpu", "-o", str(precious)])
        assert result.exit_code == 1 and "holds no evaluation's probabilities: refusing" in result.output
        assert precious.read_bytes() == before
    result = CliRunner().invoke(cli, ["eval", str(run), "--ece-bins", "0"])
    assert result.exit_code == 2 and "Invalid value for '--ece-bins'" in result.output
    (tmp_path / "mine.npz").write_bytes(b"")  # mktemp's: empty
    for _ in range(2):  # then an earlier evaluation's file: each written over
        result = CliRunner().invoke(cli, ["eval", str(run), "--device", "cpu", "-o", str(tmp_path / "mine.npz")])
        assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_a_resume_after_the_last_checkpoint_writes_the_evaluation_a_kill_left_unwritten(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "eval" / "test_probs.npz").unlink()  # killed between the last checkpoint and this file
    pskd_in_process("train", "--resume", str(run), "-q", check=True)
    with np.load(run / "eval" / "test_probs.npz") as again, np.load(trained_run / "eval" / "test_probs.npz") as first:
        for name in ("probs", "labels", "nll"):
            np.testing.assert_array_equal(again[name], first[name])
    written = (run / "eval" / "test_probs.npz").stat().st_mtime_ns
    pskd_in_process("train", "--resume", str(run), "-q", check=True)
    assert (run / "eval" / "test_probs.npz").stat().st_mtime_ns == written  # there: kept as it is

