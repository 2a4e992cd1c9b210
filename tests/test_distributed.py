"""Several processes for real: torchrun with the gloo backend on CPU, real kills.

Training under torchrun is launched by torchrun; the tests of what ranks do together (a
barrier's timeout, two ranks' shards) fork their ranks with torchrun's environment. Each test
stays well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import FORK, PSKD, exit_code, forked, pskd_in_process
from torch.utils.data import DistributedSampler

from pskd_store.distributed import setup, teardown
from pskd_store.metrics import evaluate
from pskd_store.store import SoftTargetStore

pytestmark = pytest.mark.slow  # torchrun, object-store servers, kills: the full suite only

TORCHRUN = shutil.which("torchrun")
# 2,000 MNIST-1D training signals (200 of each class: short epochs) less one held out:
# 1,999 does not divide by 2 ranks.
ODD_TRAIN_SET = ["--train-subset", "2000", "--val-split", "0.0005"]


def torchrun(nproc: int, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), "--no-python", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        errors = "\n".join(line for line in result.stderr.splitlines() if "Error" in line)
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{errors}\n{result.stderr[-3000:]}")
    return result


def gloo_ranks(world_size: int, rank_main, *args,
               ranks_per_node: int | None = None) -> list[multiprocessing.Process]:
    """``rank_main(*args)`` in ``world_size`` children forked from this process, each with the
    environment torchrun gives its ranks (all on one node, or ``ranks_per_node`` to a node):
    real processes in a real gloo group, without torchrun's and each rank's Python start (3-5
    s of CPU each). For tests of what ranks do together; training under torchrun itself is
    launched by torchrun."""
    assert not dist.is_initialized(), "a forked rank would inherit this process's group"
    port = str(_free_port())
    per_node = ranks_per_node or world_size

    def as_rank(rank: int) -> None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank % per_node), WORLD_SIZE=str(world_size),
                          LOCAL_WORLD_SIZE=str(per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        rank_main(*args)

    return [forked(as_rank, rank) for rank in range(world_size)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timings(row: dict) -> dict:
    train = {k: v for k, v in row["train"].items() if k not in ("samples_per_s", "seconds")}
    return {**{k: v for k, v in row.items() if k != "epoch_seconds"}, "train": train}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, data_dir) -> Path:
    """One uninterrupted 2-process run of the offline default, 3 epochs."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(2, PSKD, "train", "--epochs", "3", "--data-dir", str(data_dir), "-o", str(run), "-q", *ODD_TRAIN_SET)
    return run


def test_two_ranks_train_one_run(two_rank_run, data_dir):
    run = two_rank_run
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]  # one metrics.jsonl, one row per epoch
    # the train loss and error are of every rank's samples (1,999 and the padding one), not rank 0's
    assert all(r["train"]["samples"] == 2000 for r in rows(run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "previous.pt"]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    config = json.loads((run / "config.json").read_text())
    assert (config["batch_size"], config["world_size"]) == (64, 2)  # the recipe's 128 in all, which resumes keep
    store = SoftTargetStore.open(run / "store", read_only=True)
    assert store.num_samples == 1999 and store.sealed_epochs == [1, 2, 3]
    for epoch in (1, 2, 3):
        info = store.epoch_info(epoch)
        # DistributedSampler pads 1,999 ids to 2 x 1,000: one id is trained (and written) twice
        assert (info["rows_written"], info["ids_written"], info["duplicates"], info["carried_forward"]) == (
            2000, 1999, 1, 0)
    # metrics of the whole test set, not of one rank's shard, sample by sample in the test
    # set's order: they equal a one-process eval of the final checkpoint
    test = rows(run)[-1]["test"]
    assert test["n"] == 2000
    with np.load(run / "eval" / "test_probs.npz") as trained:
        trained_probs, trained_labels = trained["probs"], trained["labels"]
        assert evaluate(trained_probs, trained_labels, trained["nll"], trained["rank"]) == pytest.approx(test, abs=1e-9)
    evaluated = json.loads(pskd_in_process("eval", str(run)).stdout)
    for key in ("top1_err", "top5_err", "nll", "ece", "aurc", "eaurc"):
        assert evaluated[key] == pytest.approx(test[key], abs=1e-9), key
    with np.load(run / "eval" / "test_probs.npz") as one_process:
        np.testing.assert_array_equal(trained_labels, one_process["labels"])
        np.testing.assert_allclose(trained_probs, one_process["probs"], atol=1e-6)


class _Labeled(torch.utils.data.TensorDataset):
    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        super().__init__(inputs, labels)
        self.targets = labels  # read without loading inputs, as torchvision's


def _images(n: int, seed: int) -> _Labeled:
    """28x28 noise, faintly brighter with the class: what fmnist_cnn's BatchNorm learns on."""
    labels = torch.arange(n) % 10
    noise = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return _Labeled(noise + 0.05 * labels.view(-1, 1, 1, 1), labels)


def _batchnorm_splits():
    from pskd_store.data import DataSplits

    train = _images(256, 0)
    return DataSplits(train, None, _images(128, 1), 10, train.targets.numpy(), "28x28", random_transforms=False)


def _train_a_batchnorm_model(run: Path) -> None:
    """A rank of :func:`gloo_ranks`: ``train`` of fmnist_cnn (BatchNorm) for 2 epochs."""
    from pskd_store.recipe import TrainConfig
    from pskd_store.training import train

    config = TrainConfig(dataset="fashionmnist", arch="fmnist_cnn", epochs=2, batch_size=32, workers=0,
                         device="cpu", data_dir=str(run.parent / "unused")).resolved()
    train(config, run, quiet=True, splits=_batchnorm_splits())


def test_every_rank_evaluates_its_shard_with_the_checkpointed_models_batchnorm_statistics(tmp_path):
    """Each rank's last training batch leaves its own BatchNorm running statistics (DDP
    copies rank 0's only at each training forward): the test set's predictions, which each
    rank makes of its shard, are those of the model checkpointed, rank 0's, on every row."""
    from pskd_store.models import create_model

    run = tmp_path / "run"
    assert [exit_code(rank, timeout=90) for rank in gloo_ranks(2, _train_a_batchnorm_model, run)] == [0, 0]
    network = create_model("fmnist_cnn", 10)
    network.load_state_dict(torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"])
    with torch.no_grad():
        checkpointed = network.eval()(_images(128, 1).tensors[0]).softmax(1).numpy()
    with np.load(run / "eval" / "test_probs.npz") as trained:
        np.testing.assert_allclose(trained["probs"][0::2], checkpointed[0::2], atol=1e-6)  # rank 0's shard
        np.testing.assert_allclose(trained["probs"][1::2], checkpointed[1::2], atol=1e-6)  # rank 1's


def _build_a_run_recording_when_its_data_set_is_read(root: Path, data_dir: Path) -> None:
    """A rank of :func:`gloo_ranks` building its run, with a data set that takes a moment
    to come (a download, an archive unpacked): when each rank began and ended reading it."""
    from pskd_store import training
    from pskd_store.recipe import TrainConfig
    from pskd_store.run_directory import RunDirectory

    read = training.build_datasets

    def downloading(*args, **kwargs):
        began = time.time()
        time.sleep(0.5)
        splits = read(*args, **kwargs)
        (root / f"read_by_{os.environ['RANK']}").write_text(f"{began} {time.time()}")
        return splits

    training.build_datasets = downloading
    env, device = setup("cpu", timedelta(seconds=60))
    try:
        config = TrainConfig(epochs=1, workers=0, device="cpu", data_dir=str(data_dir)).resolved()
        training.build_run(config, RunDirectory(root / "run"), env, device)
    finally:
        teardown()


@pytest.mark.parametrize("ranks_per_node", [2, 1])
def test_one_rank_reads_the_data_set_before_the_others_into_the_same_files(tmp_path, data_dir, ranks_per_node):
    """Every rank would otherwise download a missing CIFAR or unpack Fashion-MNIST into the
    same files at once, each truncating what another is checking or extracting: the ranks of
    one node, and the first ranks of nodes that share the data folder (two "nodes" here)."""
    ranks = gloo_ranks(2, _build_a_run_recording_when_its_data_set_is_read, tmp_path, data_dir,
                       ranks_per_node=ranks_per_node)
    assert [exit_code(rank, timeout=60) for rank in ranks] == [0, 0]
    (began_0, ended_0), (began_1, _) = ([float(t) for t in (tmp_path / f"read_by_{rank}").read_text().split()]
                                        for rank in (0, 1))
    assert began_0 < ended_0 <= began_1


def _write_a_shard(root: Path) -> None:
    """A rank of :func:`gloo_ranks`: writes DistributedSampler's shard of an odd N as training
    does, each row marking the rank that wrote it; rank 0 seals after a barrier."""
    dist.init_process_group("gloo")
    rank, n, k = dist.get_rank(), 1001, 5
    labels = np.arange(n) % k
    if rank == 0:
        SoftTargetStore.create(root / "store", labels, k, dtype="float32", chunk_rows=64)
    dist.barrier()
    store = SoftTargetStore.open(root / "store", labels=labels)
    ids = torch.tensor(list(DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=7)))
    np.save(root / f"ids{rank}.npy", ids.numpy())
    probs = torch.full((len(ids), k), 0.1)
    probs[:, 0] = 0.4 + 0.1 * rank  # which rank wrote it (rows sum to 1)
    probs[:, 1] = 0.3 - 0.1 * rank
    with store.writer(1, rank=rank, from_logits=False) as writer:
        for batch in range(0, len(ids), 32):
            writer.write(ids[batch:batch + 32], probs[batch:batch + 32])
    dist.barrier()
    if rank == 0:
        store.seal(1)
    dist.destroy_process_group()


def test_each_id_keeps_what_the_rank_that_trained_on_it_wrote(tmp_path):
    assert [exit_code(rank, timeout=60) for rank in gloo_ranks(2, _write_a_shard, tmp_path)] == [0, 0]
    teacher = SoftTargetStore.open(tmp_path / "store", read_only=True).read_epoch(1)
    ids = [np.load(tmp_path / f"ids{rank}.npy") for rank in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == 501
    writer_of = np.full(1001, -1)
    writer_of[ids[0]] = 0
    writer_of[ids[1]] = 1  # the padding duplicate: the higher rank's write wins
    assert (writer_of >= 0).all() and len(set(ids[0]) & set(ids[1])) == 1
    np.testing.assert_array_equal(teacher[:, 0], (0.4 + 0.1 * writer_of).astype(np.float32))


def test_a_killed_rank_fails_the_job_and_resume_finishes_it(tmp_path, two_rank_run, data_dir):
    run = tmp_path / "run"
    command = [TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_free_port()), "--no-python", PSKD,
               "train", "--epochs", "3", "--data-dir", str(data_dir), "-o", str(run), "-q", *ODD_TRAIN_SET]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and rows(run)):
        time.sleep(0.02)
    ranks = _children(launcher.pid)
    assert len(ranks) == 2, "torchrun starts one process per rank"
    os.kill(max(ranks), signal.SIGKILL)  # the rank started last: rank 1
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode != 0 and "FAILED" in stderr  # loudly
    done = len(rows(run))
    assert 1 <= done < 3, "killed part-way"
    assert SoftTargetStore.open(run / "store", read_only=True).sealed_epochs[-1] <= done + 1

    torchrun(2, PSKD, "train", "--resume", str(run), "-q")
    assert [without_timings(r) for r in rows(run)] == [without_timings(r) for r in rows(two_rank_run)]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def test_one_process_torchrun_equals_a_plain_run(tmp_path, data_dir):
    plain, launched = tmp_path / "plain", tmp_path / "torchrun"
    args = ["train", "--epochs", "2", "--train-subset", "2000", "--data-dir", str(data_dir), "-q"]
    pskd_in_process(*args, "-o", str(plain), check=True)
    torchrun(1, PSKD, *args, "-o", str(launched))
    assert [without_timings(r) for r in rows(launched)] == [without_timings(r) for r in rows(plain)]
    np.testing.assert_array_equal(SoftTargetStore.open(launched / "store", read_only=True).read_epoch(2),
                                  SoftTargetStore.open(plain / "store", read_only=True).read_epoch(2))


def test_torchrun_needs_an_output_directory(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were the refusal gone, the run would land in ./runs: here, not in the checkout
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)  # what torchrun tells its one process: refused before any rendezvous
    result = pskd_in_process("train", "--epochs", "1", "--data-dir", str(data_dir))
    assert result.returncode != 0 and "under torchrun pass --output" in result.stderr


def test_cskd_under_torchrun_writes_every_id_of_its_shards(tmp_path, data_dir):
    """CS-KD's pair batches sharded over 2 ranks: each rank trains (and writes) the first
    half of its batches, so the sealed epoch holds every id, the padding one twice."""
    run = tmp_path / "run"
    torchrun(2, PSKD, "train", "--method", "cskd", "--epochs", "2", "--data-dir", str(data_dir), "-o", str(run),
             "-q", *ODD_TRAIN_SET)
    store = SoftTargetStore.open(run / "store", read_only=True)
    for epoch in (1, 2):
        info = store.epoch_info(epoch)
        assert (info["rows_written"], info["ids_written"], info["duplicates"], info["carried_forward"]) == (
            2000, 1999, 1, 0)
    assert store.trajectory()["written"].all()
    assert json.loads((run / "config.json").read_text())["method"] == "cskd"


def _wait_at_a_barrier_for_rank_0(timeout_s: float, busy_s: float, outcomes) -> None:
    """A rank of :func:`gloo_ranks`: joins through ``setup`` with ``timeout_s``, rank 0 busy
    for ``busy_s`` (sealing, say) while rank 1 waits for it at a barrier; puts its rank, how
    the barrier ended and how long it waited there."""
    env, _ = setup("cpu", timedelta(seconds=timeout_s))
    if env.rank == 0:
        time.sleep(busy_s)
    started = time.monotonic()
    try:
        dist.barrier()
    except RuntimeError as err:  # gloo's DistBackendError
        outcomes.put((env.rank, str(err), time.monotonic() - started))
        raise SystemExit(1) from None
    outcomes.put((env.rank, "through", time.monotonic() - started))
    teardown()


def test_the_timeout_bounds_how_long_a_rank_waits_for_rank_0():
    outcomes = FORK.Queue()  # read with a timeout: a rank that died before its put fails the test, not hangs it
    patient = gloo_ranks(2, _wait_at_a_barrier_for_rank_0, 30, 2, outcomes)
    assert [exit_code(rank, timeout=60) for rank in patient] == [0, 0]
    assert sorted(outcomes.get(timeout=10)[:2] for _ in patient) == [(0, "through"), (1, "through")]
    impatient = gloo_ranks(2, _wait_at_a_barrier_for_rank_0, 1, 5, outcomes)
    assert [exit_code(rank, timeout=60) for rank in impatient] == [1, 1]  # rank 0 finds rank 1 gone
    ended = {rank: (message, waited) for rank, message, waited in (outcomes.get(timeout=10) for _ in impatient)}
    message, waited = ended[1]
    assert "timed out" in message.lower() and waited < 3, ended  # gave up after 1 s, not after rank 0's 5


def test_two_nodes_decode_into_their_own_caches_and_train_as_one_node_does(tmp_path, two_rank_run, data_dir):
    """Two "nodes" on one machine (two torchrun launches, one rank each, rendezvous on
    127.0.0.1), the run directory shared, each node with its own cache: each decodes every
    teacher into its own disk, none into the shared run directory, and the run equals a
    one-node 2-process run."""
    run, port = tmp_path / "run", str(_free_port())
    nodes = []
    for node in (0, 1):
        command = [TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                   "--master-addr", "127.0.0.1", "--master-port", port, "--no-python", PSKD, "train",
                   "--epochs", "3", "--data-dir", str(data_dir), "-o", str(run), "-q", *ODD_TRAIN_SET]
        # one compute thread per rank, as torchrun gives each of several ranks on one node
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / f"node{node}"), "OMP_NUM_THREADS": "1"}
        nodes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for node in nodes:
        _, stderr = node.communicate(timeout=120)
        assert node.returncode == 0, stderr[-3000:]
    assert [without_timings(r) for r in rows(run)] == [without_timings(r) for r in rows(two_rank_run)]
    assert not (run / "store.mmap").exists()  # nothing decoded into the shared directory
    decoded = [sorted((tmp_path / f"node{node}" / "pskd-store").glob("*/epoch_*.npy")) for node in (0, 1)]
    assert [[path.name for path in files] for files in decoded] == [[f.name for f in decoded[0]]] * 2
    assert decoded[0] and decoded[0][-1].name.startswith("epoch_0002-")  # the last teacher: epoch 2
    np.testing.assert_array_equal(np.load(decoded[0][-1]), np.load(decoded[1][-1]))
