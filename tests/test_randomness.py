"""Where randomness comes from: a sample's augmentation is a function of (seed, rank,
epoch, id, repeat), a step's of (seed, rank, epoch, step) — not of the DataLoader worker
or the process that draws it. So the worker count does not change a run, a run resumed
with new workers repeats an uninterrupted one, and no two ranks draw alike."""

from __future__ import annotations

import json
import os
import random
import runpy
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import exit_code, pskd_forked, pskd_in_process
from store_helpers import write_epoch
from test_distributed import torchrun
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from pskd_store.dataset import SoftTargetDataset
from pskd_store.image_data import _load_fashion_mnist
from pskd_store.sampler import ClassPairBatchSampler
from pskd_store.seeding import Draw
from pskd_store.store import SoftTargetStore

RANK_DRAWS = Path(__file__).resolve().parents[1] / "benchmarks" / "rank_draws.py"
N, K = 64, 4


class Drawing(Dataset):
    """Items that show what they drew: a random crop offset and flip of a fixed image
    (torch's generator), and one number from Python's and one from NumPy's generator."""

    def __init__(self) -> None:
        self.image = torch.arange(16 * 16, dtype=torch.float32).view(1, 16, 16)
        self.transform = T.Compose([T.RandomCrop(16, padding=4), T.RandomHorizontalFlip()])
        self.targets = np.arange(N) % K

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int):
        return (self.transform(self.image), random.random(), np.random.rand()), int(self.targets[index])


def _store(tmp_path: Path) -> SoftTargetStore:
    return SoftTargetStore.create(tmp_path / "store", np.arange(N) % K, K)


def _draws(data: SoftTargetDataset, ids: list[int]) -> list[tuple]:
    return [item[0] for item in data.__getitems__(ids)]


def _same(a: list[tuple], b: list[tuple]) -> list[bool]:
    return [torch.equal(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(a, b)]


def test_an_items_draws_depend_on_seed_rank_epoch_id_and_repeat_alone(tmp_path):
    store = _store(tmp_path)
    data = SoftTargetDataset(Drawing(), store, 0.8, 3, seed=7)
    data.set_epoch(1)
    ids = list(range(12))
    torch.manual_seed(0)
    first = _draws(data, ids)
    after = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(0)
    assert torch.equal(torch.rand(2), after[0])  # in the main process the process's streams are kept
    torch.manual_seed(123)
    random.seed(5)
    assert all(_same(_draws(data, ids[::-1])[::-1], first))  # whatever the generators hold, in any order
    assert len({(x[0].flatten().nonzero()[0].item(), x[1]) for x in first}) > 8  # and the draws vary
    others = [SoftTargetDataset(Drawing(), store, 0.8, 3, seed=8),
              SoftTargetDataset(Drawing(), store, 0.8, 3, seed=7, rank=1)]
    for other in others:
        other.set_epoch(1)
    write_epoch(store, 1)  # a teacher for epoch 2
    data.set_epoch(2)
    for changed in (*(_draws(other, ids) for other in others), _draws(data, ids),
                    _draws(data, [Draw(i, 1) for i in ids])):
        assert not any(_same(changed, first))
    unseeded = SoftTargetDataset(Drawing(), store, 0.8, 3)
    unseeded.set_epoch(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    a = _draws(unseeded, ids)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    assert all(_same(_draws(unseeded, ids), a))  # without a seed: the process's own generators


def test_a_samplers_numpy_or_tensor_indices_draw_as_plain_ids(tmp_path):
    """np.random.permutation, SubsetRandomSampler(np.arange(N)): indices with a repeat()
    method, which is not a draw's repeat; their draws are those of the plain ids."""
    data = SoftTargetDataset(Drawing(), _store(tmp_path), 0.8, 3, seed=7)
    data.set_epoch(1)
    ids = [3, 1, 4, 1]
    plain = _draws(data, ids)
    for indices in (list(np.array(ids)), list(torch.tensor(ids)), list(np.array(ids, dtype=np.int32))):
        assert all(_same(_draws(data, indices), plain))
    loader = DataLoader(data, batch_size=4, sampler=np.array(ids))
    assert next(iter(loader))[3].tolist() == ids


def test_the_worker_count_does_not_change_what_is_drawn(tmp_path):
    store = _store(tmp_path)
    data = SoftTargetDataset(Drawing(), store, 0.8, 3, seed=7)
    loaded = {}
    for workers in (0, 1, 2):
        data.set_epoch(1)
        loader = DataLoader(data, batch_size=8, shuffle=False, num_workers=workers)
        loaded[workers] = [inputs for inputs, *_ in loader]  # (images, Python's draws, NumPy's draws)
    for workers in (1, 2):
        assert len(loaded[workers]) == len(loaded[0]) == N // 8
        for batch, expected in zip(loaded[workers], loaded[0]):
            assert all(torch.equal(a, b) for a, b in zip(batch, expected))


def test_cskd_partners_are_drawn_apart_from_their_samples(tmp_path):
    """A partner may be its sample itself, or a sample drawn elsewhere in the epoch: each
    draw of it is augmented on its own, as the authors' per-item transforms are."""
    labels = np.arange(N) % K
    pairs = ClassPairBatchSampler(labels, 8, seed=1)
    pairs.set_epoch(1)
    batches = list(pairs)
    partners = [draw for batch in batches for draw in batch[8:]]
    assert all(isinstance(p, Draw) for p in partners) and len({p.repeat for p in partners}) == N
    assert all(type(i) is int for batch in batches for i in batch[:8])  # a sample's first draw: plain
    store = _store(tmp_path)
    data = SoftTargetDataset(Drawing(), store, 0.8, 3, seed=7)
    data.set_epoch(1)
    batch = batches[0]
    again = [Draw(int(i), 99) for i in batch[:8]]
    assert not any(_same(_draws(data, again), _draws(data, batch[:8])))
    loader = DataLoader(data, batch_sampler=pairs, num_workers=2)  # Draws cross to workers intact
    pairs.set_epoch(1)
    first = next(iter(loader))
    expected = data.__getitems__(batch)
    assert torch.equal(first[0][0], torch.stack([item[0][0] for item in expected]))
    assert first[3].tolist() == [int(i) for i in batch]


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("epoch_seconds")
        row["train"].pop("samples_per_s")
        row["train"].pop("seconds")
    return rows


@pytest.mark.slow
def test_a_run_resumed_with_new_workers_repeats_an_uninterrupted_one(tmp_path, fashion_mnist_gz):
    """Fashion-MNIST files, random crop and flip in two DataLoader workers, Cutout in the
    step: killed after epoch 2 and resumed (new worker processes), the run equals an
    uninterrupted one bit for bit — and a run without workers equals both."""
    data = tmp_path / "data"
    _load_fashion_mnist(data, train=True, transform=None, download=False, system_copy=fashion_mnist_gz)
    args = ["train", "--dataset", "fashionmnist", "--data-dir", str(data), "--no-download", "--aug", "cutout",
            "--epochs", "6", "-b", "32", "-q"]
    whole, broken, no_workers = tmp_path / "whole", tmp_path / "broken", tmp_path / "no-workers"
    pskd_in_process(*args, "-j", "2", "-o", str(whole), check=True)
    pskd_in_process(*args, "-j", "0", "-o", str(no_workers), check=True)

    killed = pskd_forked(*args, "-j", "2", "-o", str(broken))
    deadline = time.time() + 120
    # epoch 3's row comes after epoch 2's checkpoint
    while time.time() < deadline and not ((broken / "metrics.jsonl").exists() and len(_rows(broken)) >= 3):
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)  # and its workers
    assert exit_code(killed, timeout=60) == -signal.SIGKILL
    done = torch.load(broken / "checkpoints" / "last.pt", weights_only=False)["epoch"]
    assert 2 <= done < 6, "the run must be killed part-way"
    pskd_in_process("train", "--resume", str(broken), "-q", check=True)

    assert _rows(broken) == _rows(whole) == _rows(no_workers)
    final = [SoftTargetStore.open(run / "store", read_only=True).read_epoch(6) for run in (broken, whole, no_workers)]
    np.testing.assert_array_equal(final[0], final[1])
    np.testing.assert_array_equal(final[2], final[1])


@pytest.mark.slow
def test_ranks_draw_their_own_crops_holes_and_streams_from_identical_weights(tmp_path):
    """Two gloo ranks on a data set of one image repeated (benchmarks/rank_draws.py, what
    gpu_check.py runs on two GPUs): at every step nearly every row of the two ranks'
    batches has another crop or flip and another Cutout hole, the ranks' own streams
    differ, and the initial weights are the same."""
    torchrun(2, sys.executable, str(RANK_DRAWS), str(tmp_path), "--steps", "3", timeout=120)
    compared = runpy.run_path(str(RANK_DRAWS))["compare"](tmp_path)  # the script's --compare, in this process
    assert compared["steps"] == [3, 3] and compared["rows"] == 24
    assert compared["rows_whose_holes_differ"] >= 20 and compared["rows_whose_crop_or_flip_differ"] >= 20
    assert compared["initial_weights_equal"] and compared["own_streams_differ"]


def test_starting_the_training_loader_draws_nothing_from_the_process_stream(tmp_path, data_dir):
    """The DataLoader seeds its workers from a generator of its own: a run resumed at epoch 3
    (which starts its loader there) and an uninterrupted one (which started it at epoch 1)
    then leave the same stream to the model's own draws (dropout, ShakeDrop)."""
    from pskd_store.distributed import Distributed
    from pskd_store.recipe import TrainConfig
    from pskd_store.run_directory import RunDirectory
    from pskd_store.training import build_run, train_loader

    config = TrainConfig(epochs=2, workers=0, data_dir=str(data_dir)).resolved()
    run = build_run(config, RunDirectory(tmp_path / "run"), Distributed(), torch.device("cpu"))
    loader, sampler = train_loader(run.method, run.train_data, run.splits, config, Distributed(), torch.device("cpu"))
    run.train_data.set_epoch(1)
    sampler.set_epoch(1)
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_resumed_run_takes_up_the_process_stream_where_its_checkpoint_left_it(tmp_path, data_dir, monkeypatch,
                                                                                 torch_state_kept):
    """Dropout and ShakeDrop draw from the process's generators: a run resumed from epoch 2's
    kept checkpoint starts epoch 3 with the torch, NumPy and Python states the uninterrupted
    run had there, not with those its model's construction left."""
    import pskd_store.training as training
    from pskd_store.recipe import TrainConfig

    at_epoch_start: dict[tuple[str, int], tuple] = {}
    train_epoch = training._train_epoch

    def recording(*args):
        epoch = args[8]
        numpy_state = np.random.get_state()
        at_epoch_start[(phase, epoch)] = (torch.get_rng_state(), (*numpy_state[1], numpy_state[2]), random.getstate())
        torch.rand(1)  # what a model's dropout draws in an epoch
        np.random.rand()  # what a user's data set may draw
        random.random()
        return train_epoch(*args)

    monkeypatch.setattr(training, "_train_epoch", recording)
    config = TrainConfig(epochs=3, steps_per_epoch=2, data_dir=str(data_dir)).resolved()
    phase = "whole"
    training.train(config, tmp_path / "run", quiet=True)
    phase = "resumed"
    random.seed(1)  # the generators as a new process has them: not the checkpoint's
    np.random.seed(1)
    torch.manual_seed(1)
    training.train(config, tmp_path / "run", from_epoch=2, quiet=True)
    assert sorted(at_epoch_start) == [("resumed", 3), ("whole", 1), ("whole", 2), ("whole", 3)]
    whole, resumed = at_epoch_start[("whole", 3)], at_epoch_start[("resumed", 3)]
    before = at_epoch_start[("whole", 2)]  # each stream moved in epoch 2: a restore is needed
    assert not torch.equal(whole[0], before[0]) and whole[1] != before[1] and whole[2] != before[2]
    assert torch.equal(resumed[0], whole[0])
    assert resumed[1] == whole[1] and resumed[2] == whole[2]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_evaluation_draws_nothing_from_the_process_stream(workers):
    """A DataLoader draws its workers' base seed from the process's torch stream unless it
    has a generator of its own: a persistent evaluation loader once a run (again in a
    resumed one), one without workers every epoch, so the stream dropout draws from, and
    the checkpoint keeps, would depend on the resume and the worker count."""
    from torch.utils.data import TensorDataset

    from pskd_store.engine import eval_loader

    loader = eval_loader(TensorDataset(torch.zeros(8, 1), torch.zeros(8)), 4, workers, torch.device("cpu"))
    before = torch.get_rng_state()
    for _ in range(2):  # two epochs' evaluations
        assert len(list(loader)) == 2
    assert torch.equal(torch.get_rng_state(), before)

