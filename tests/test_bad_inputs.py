"""The catalogue of bad inputs: every misuse of the API and the CLI this project knows of,
each refused with a message that names the problem (and the fix), and none of them
changing anything sealed.

API cases run against a real store with epoch 1 sealed; CLI cases run `pskd-store` in
real subprocesses against a real run directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import exit_code, forked, lengthen_run, pskd, pskd_in_process
from store_helpers import chunk_file, epoch_probs, make_labels, write_epoch
from torch.utils.data import TensorDataset

from pskd_store import evaluation
from pskd_store.augment import BatchAugment
from pskd_store.checkpoint import checkpoint_problem, load_checkpoint
from pskd_store.cli.main import cli
from pskd_store.data import _split_indices
from pskd_store.dataset import SoftTargetDataset
from pskd_store.engine import predict
from pskd_store.errors import EpochNotSealedError, StoreError
from pskd_store.metrics import evaluate
from pskd_store.models import create_model
from pskd_store.recipe import TrainConfig
from pskd_store.run_directory import RunDirectory, RunError
from pskd_store.sampler import ClassPairBatchSampler
from pskd_store.service import PredictionService
from pskd_store.store import SoftTargetStore
from pskd_store.verify import verify_path

N, K, CHUNK_ROWS = 64, 5, 16


def sealed_snapshot(store_dir: Path) -> str:
    """A digest of everything sealed in a store: the root metadata, the labels and every
    file of the sealed epochs (not the staging area, nor a seal in progress)."""
    sealed = json.loads((store_dir / "zarr.json").read_text())["attributes"]["pskd_store"]["sealed"]
    kept = ("zarr.json", "labels/", *(f"{tier}/epoch_{e:04d}/" for e in sealed for tier in ("teacher", "trajectory")))
    digest = hashlib.sha256()
    for path in sorted(store_dir.rglob("*")):
        relative = path.relative_to(store_dir).as_posix()
        if path.is_file() and (relative == "zarr.json" or relative.startswith(kept[1:])):
            digest.update(relative.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def store(store) -> SoftTargetStore:
    """conftest's store, epoch 1 sealed."""
    write_epoch(store, 1)
    return store


def base(labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.zeros(len(labels), 1), torch.as_tensor(labels))


def write_and_close(store: SoftTargetStore, outputs: torch.Tensor, *, from_logits: bool, epoch: int = 2,
                    ids: torch.Tensor | None = None) -> None:
    writer = store.writer(epoch, from_logits=from_logits)
    try:
        writer.write(torch.arange(len(outputs)) if ids is None else ids, outputs)
        writer.close()
    finally:
        writer.abandon()


def probs(n: int = N) -> torch.Tensor:
    return torch.from_numpy(epoch_probs(2, N, K)[:n])


def one_negative_row(rows: torch.Tensor, row: int = 5) -> torch.Tensor:
    """A row that still sums to 1 but holds a negative value."""
    rows = rows.clone()
    rows[row] = 0.0
    rows[row, 0], rows[row, 1] = 1.25, -0.25
    return rows


def with_targets(data: TensorDataset, targets: np.ndarray) -> TensorDataset:
    data.targets = targets.tolist()  # what torchvision's data sets have: checked without loading inputs
    return data


def first_item(data: TensorDataset, store: SoftTargetStore) -> None:
    wrapped = SoftTargetDataset(data, store, 0.8, 10)
    wrapped.set_epoch(1)
    wrapped[0]


def dataset_set_once(store: SoftTargetStore, labels: np.ndarray) -> None:
    """PS-KD quietly becoming CE: set_epoch called for epoch 1 only, epoch 2 written."""
    data = SoftTargetDataset(base(labels), store, 0.8, 10)
    data.set_epoch(1)
    store.writer(2)


def dataset_on_another_store_object(store: SoftTargetStore, labels: np.ndarray) -> None:
    """The same, with the data set on a store object of its own (opened twice by the loop)."""
    data = SoftTargetDataset(base(labels), SoftTargetStore.open(store.url), 0.8, 10)
    data.set_epoch(1)
    SoftTargetStore.open(Path(store.url).parent / ".." / Path(store.url).parent.name / Path(store.url).name).writer(2)


def file_at(path: Path) -> Path:
    path.write_text("not a store")
    return path


def shortened_below_its_epoch(store: SoftTargetStore, labels: np.ndarray) -> None:
    data = SoftTargetDataset(base(labels), store, 0.8, 10)
    data.set_epoch(2)
    try:
        data.total_epochs = 1  # every next batch, in every worker, would fail
    finally:
        assert data.total_epochs == 10


def run_directory_at(path: Path) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def write_after_close(store: SoftTargetStore) -> None:
    writer = store.writer(2, from_logits=False)
    writer.write(torch.arange(N), probs())
    writer.close()
    try:
        writer.write(torch.arange(N), probs())
    finally:
        store.discard_staging(2, 0)


def seal_empty(store: SoftTargetStore) -> None:
    store.writer(2).close()
    try:
        store.seal(2)
    finally:
        store.discard_staging(2)


def seal_with_scratch(store: SoftTargetStore, scratch: Path) -> None:
    write_epoch(store, 2, seal=False)
    try:
        store.seal(2, scratch_dir=scratch)
    finally:
        store.discard_staging(2, 0)


def second_writer(store: SoftTargetStore) -> None:
    with store.writer(2):
        store.writer(2)


def mixed_outputs(store: SoftTargetStore, second: torch.Tensor) -> None:
    """float16 logits, then ``second``: cast into the first write's buffer, float32 logits
    were rounded to float16 before the softmax; rows made on a device and raw rows would
    share a buffer that is converted one way."""
    logits = torch.randn(N, K)
    with store.writer(2) as writer:
        writer.write(torch.arange(8), logits[:8].half())
        writer.write(torch.arange(8, 16), second)


# (case, action(store, labels, tmp_path), exception, part of the message)
API_CASES: list[tuple[str, Callable, type[Exception], str]] = [
    ("probabilities negative", lambda s, y, t: write_and_close(s, probs() - 0.1, from_logits=False),
     StoreError, "from_logits=False takes probability rows, but 16 of 16 rows written for epoch 2 are not"),
    ("one negative probability in rows summing to 1",
     lambda s, y, t: write_and_close(s, one_negative_row(probs()), from_logits=False),
     StoreError, "but 1 of 16 rows written for epoch 2 are not (one sums to 1, its smallest value is -0.25)"),
    ("probabilities summing to 70", lambda s, y, t: write_and_close(s, probs() * 70, from_logits=False),
     StoreError, "one sums to 70"),
    ("bool outputs", lambda s, y, t: write_and_close(s, torch.ones(N, K, dtype=torch.bool), from_logits=True),
     TypeError, "outputs must be floating-point logits, got dtype torch.bool"),
    ("int outputs", lambda s, y, t: write_and_close(s, torch.ones(N, K, dtype=torch.int64), from_logits=True),
     TypeError, "got dtype torch.int64"),
    ("complex outputs", lambda s, y, t: write_and_close(s, torch.ones(N, K, dtype=torch.complex64), from_logits=False),
     TypeError, "floating-point probabilities, got dtype torch.complex64"),
    ("NaN logits", lambda s, y, t: write_and_close(s, torch.full((N, K), float("nan")), from_logits=True),
     StoreError, "the model diverged"),
    ("probabilities written as logits", lambda s, y, t: write_and_close(s, probs(), from_logits=True),
     StoreError, "look like probabilities (non-negative rows summing to 1), but the writer applies a softmax to "
     "them: pass from_logits=False"),
    ("ids out of range", lambda s, y, t: write_and_close(s, probs(2), from_logits=False, ids=torch.tensor([0, N])),
     StoreError, f"ids out of range: [{N}] not in [0, N={N})"),
    ("float ids", lambda s, y, t: write_and_close(s, probs(2), from_logits=False, ids=torch.tensor([0.0, 1.0])),
     TypeError, "ids must be integer dataset indices"),
    ("wrong K", lambda s, y, t: write_and_close(s, torch.zeros(N, K + 1), from_logits=True),
     ValueError, f"outputs must have shape (batch, K={K})"),
    ("writer of a sealed epoch", lambda s, y, t: s.writer(1), StoreError, "epoch 1 is already sealed"),
    ("writer skipping epochs", lambda s, y, t: s.writer(7), StoreError,
     "epoch 7 cannot follow epoch 1 in"),
    ("seal skipping epochs", lambda s, y, t: s.seal(7), StoreError, "write and seal epoch 2 next"),
    ("seal with nothing written", lambda s, y, t: s.seal(2), StoreError, "nothing was written for epoch 2"),
    ("seal of writers that wrote nothing", lambda s, y, t: seal_empty(s), StoreError,
     "nothing was written for epoch 2: every writer closed empty"),
    ("second writer of a part", lambda s, y, t: second_writer(s), StoreError, "rank 0 of epoch 2 already has a writer"),
    ("dataset set_epoch only once", lambda s, y, t: dataset_set_once(s, y), StoreError,
     "the SoftTargetDataset on this store is set to epoch 1"),
    ("dataset set_epoch only once, on another store object", lambda s, y, t: dataset_on_another_store_object(s, y),
     StoreError, "the SoftTargetDataset on this store is set to epoch 1"),
    ("dataset with other labels (targets attribute)", lambda s, y, t: SoftTargetDataset(
        with_targets(base((y + 1) % K), (y + 1) % K), s, 0.8, 10), StoreError, "sample 0 of the data set has label"),
    ("dataset with other labels (seen per batch)", lambda s, y, t: first_item(base((y + 1) % K), s), StoreError,
     "sample 0 of the data set has label"),
    ("dataset of another length", lambda s, y, t: SoftTargetDataset(base(y[:-1]), s, 0.8, 10), StoreError,
     f"the data set has {N - 1} samples but the store was made for {N}"),
    ("set_epoch before the teacher is sealed",
     lambda s, y, t: SoftTargetDataset(base(y), s, 0.8, 10).set_epoch(3), EpochNotSealedError,
     "epoch 2 was never sealed"),
    ("total_epochs set below the epoch", lambda s, y, t: shortened_below_its_epoch(s, y), ValueError,
     "epoch must lie in [1, total_epochs=1], got 2"),
    ("alpha_T above 1", lambda s, y, t: SoftTargetDataset(base(y), s, 1.5, 10), ValueError,
     "alpha_T must lie in [0, 1]"),
    ("reading an unsealed epoch", lambda s, y, t: s.read_epoch(2), EpochNotSealedError, "epoch 2 was never sealed"),
    ("open with other labels", lambda s, y, t: SoftTargetStore.open(s.url, labels=(y + 1) % K), StoreError,
     "was made for another data set"),
    ("create over an existing store", lambda s, y, t: SoftTargetStore.create(s.url, y, K), StoreError,
     "a store already exists"),
    ("writing a read-only store", lambda s, y, t: SoftTargetStore.open(s.url, read_only=True).writer(2), StoreError,
     "was opened read-only"),
    ("labels outside K", lambda s, y, t: SoftTargetStore.create(t / "other", y, 2), StoreError,
     "labels must lie in [0, num_classes=2)"),
    ("unknown dtype", lambda s, y, t: SoftTargetStore.create(t / "other", y, K, dtype="int8"), StoreError,
     "dtype must be one of"),
    ("no store there", lambda s, y, t: SoftTargetStore.open(t / "nowhere"), StoreError, "no pskd-store at"),
    ("a file for a store", lambda s, y, t: SoftTargetStore.open(file_at(t / "afile")), StoreError,
     "is a file, not a store (a directory)"),
    ("a run directory for a store", lambda s, y, t: SoftTargetStore.open(run_directory_at(t / "run")), StoreError,
     "no pskd-store at"),
    ("an empty directory for a store", lambda s, y, t: SoftTargetStore.open(Path(tempfile.mkdtemp(dir=t))),
     StoreError, "no pskd-store at"),
    ("a fractional number of classes", lambda s, y, t: SoftTargetStore.create(t / "other", y, 10.0), StoreError,
     "num_classes must be an integer, got 10.0"),
    ("negative chunk rows", lambda s, y, t: SoftTargetStore.create(t / "other", y, K, chunk_rows=-5), StoreError,
     "chunk_rows must be at least 1"),
    ("a lookup under an unknown seal token", lambda s, y, t: PredictionService(s).lookup(1, "deadbeef" * 2, [0]),
     StoreError, "epoch 1 was not prepared under seal token deadbeefdeadbeef"),
    ("a Zarr group that is no store", lambda s, y, t: SoftTargetStore.open(zarr.open_group(t / "plain").store.root),
     StoreError, "is a Zarr group but not a pskd-store (no 'pskd_store' attributes): a store whose creation was "
                 "killed before its attributes were written holds nothing yet; delete it"),
    ("open_or_create with other labels", lambda s, y, t: SoftTargetStore.open_or_create(s.url, (y + 1) % K, K),
     StoreError, "was made for another data set"),
    ("labels that are not integers", lambda s, y, t: SoftTargetStore.create(t / "other", y.astype(float), K),
     StoreError, "labels must be a non-empty 1-D array of integer class indices"),
    ("no epoch kept", lambda s, y, t: SoftTargetStore.create(t / "other", y, K, keep_epochs=0), StoreError,
     "keep_epochs must be at least 1"),
    ("unknown compressor", lambda s, y, t: SoftTargetStore.create(t / "other", y, K, blosc={"cname": "nope"}),
     StoreError, "bad Blosc options {'cname': 'nope'}"),
    ("epoch 0", lambda s, y, t: s.writer(0), StoreError, "epochs count from 1, got 0"),
    ("negative rank", lambda s, y, t: s.writer(2, rank=-1), StoreError, "rank must be 0 or more"),
    ("writing after close", lambda s, y, t: write_after_close(s), StoreError, "this writer of epoch 2 is closed"),
    ("no buffers", lambda s, y, t: s.writer(2, buffers=0), ValueError, "buffers must be at least 1"),
    ("outputs of another dtype", lambda s, y, t: mixed_outputs(s, torch.randn(8, K)), TypeError,
     "outputs of torch.float32 on cpu after outputs of torch.float16 on cpu in epoch 2's writes"),
    ("a scratch directory that is not there", lambda s, y, t: seal_with_scratch(s, t / "nowhere"), StoreError,
     "cannot seal epoch 2: No such file or directory"),
]


@pytest.mark.parametrize("action, error, message", [case[1:] for case in API_CASES],
                         ids=[case[0] for case in API_CASES])
@pytest.mark.slow
def test_api_misuse_is_refused_and_nothing_sealed_changes(store, labels, tmp_path, action, error, message):
    before = sealed_snapshot(Path(store.url))
    with pytest.raises(error) as caught:
        action(store, labels, tmp_path)
    assert message in str(caught.value)
    assert sealed_snapshot(Path(store.url)) == before
    del caught  # its traceback holds what the action made: a data set set to another epoch would refuse the writer
    write_epoch(SoftTargetStore.open(store.url), 2)  # the store is still usable: epoch 2 seals


def test_a_data_set_made_anew_replaces_the_one_a_loop_abandoned(store, labels):
    """A loop started again (a notebook cell run twice) makes a new data set on a new store
    object while the old data set, set to a later epoch, is still referenced: the writer
    follows the new one."""
    abandoned = SoftTargetDataset(base(labels), store, 0.8, 10)
    abandoned.set_epoch(2)
    again = SoftTargetStore.open(store.url)
    again.rollback(0)
    data = SoftTargetDataset(base(labels), again, 0.8, 10)
    data.set_epoch(1)
    write_epoch(again, 1)
    assert abandoned.epoch == 2 and again.sealed_epochs == [1]


def _written(store: SoftTargetStore, batches: list[torch.Tensor]) -> None:
    with store.writer(2) as writer:
        for ids in batches:
            writer.write(ids, torch.randn(len(ids), K))


@pytest.mark.parametrize("batches, warned", [
    ([torch.arange(4)] * 4, True),  # batch positions: ids 0-3 four times, the rest never
    ([torch.tensor([0, 1, 2, 3])] * 2 + [torch.tensor([0, 1, 2, 3, 4])], True),
    ([torch.arange(N)] * 3, False),  # every id three times (repeated augmentation)
    ([torch.arange(N // 2)], False),  # half of each batch mixed (CutMix): the rest carried forward
    ([torch.arange(N), torch.arange(2)], False),  # DistributedSampler's padding
])
def test_ids_that_look_like_batch_positions_warn_at_the_seal(store, batches, warned):
    _written(store, batches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.seal(2)
    positions = [w for w in caught if "if the ids written are batch positions or labels" in str(w.message)]
    assert len(positions) == warned and all(w.filename == __file__ for w in positions)


@pytest.mark.filterwarnings("error")
def test_real_logits_and_probabilities_with_rounding_are_taken_without_a_warning(store):
    with store.writer(2) as writer:
        writer.write(torch.arange(N), torch.randn(N, K))
    store.seal(2)
    rounded = probs().to(torch.bfloat16)  # sums off by up to a bf16 epsilon: still probabilities
    with store.writer(3, from_logits=False) as writer:
        writer.write(torch.arange(N), rounded)
    store.seal(3)


# -- the command line ------------------------------------------------------------------------


pskd = partial(pskd, check=False)  # these commands are meant to fail


@pytest.mark.parametrize("args, message", [
    (["--arch", "densenet12"], "Unknown model 'densenet12'. Did you mean: densenet121"),
    (["--alpha-T", "1.5"], "alpha_T must lie in [0, 1]"),
    (["--dataset", "cifar100", "--no-download", "--data-dir", "{tmp}/nowhere"], "CIFAR100 data not found"),
    (["--dataset", "mnist1d", "--arch", "densenet121"], "takes 32x32 inputs"),
    (["--aug", "cutmix"], "needs image data"),
    (["--dataset", "svhn"], "Invalid value for '--dataset'"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--ece-bins", "0"], "--ece-bins must be at least 1"),
    (["--steps-per-epoch", "0"], "--steps-per-epoch must be at least 1"),
    (["--steps-per-epoch", "-3"], "--steps-per-epoch must be at least 1"),
    (["--lr-gamma", "1.5"], "--lr-gamma must lie in (0, 1]"),
    (["--lr-gamma", "0"], "--lr-gamma must lie in (0, 1]"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--dataset", "fashionmnist", "--method", "ce", "--aug", "cutmix", "--cutmix-prob", "1.5"],
     "--cutmix-prob must lie in [0, 1]"),
    (["--dist-timeout", "0"], "--dist-timeout must be a positive number of seconds"),
    (["--train-subset", "65"], "--train-subset must be a positive multiple of the 10 classes"),
    (["--train-subset", "0"], "--train-subset must be a positive multiple of the 10 classes"),
    (["--val-split", "1.0"], "--val-split (val_split) must lie in [0, 1), got 1.0"),
    (["--val-split", "0.9999"], "--val-split 0.9999 leaves 1 training samples for 10 classes: hold out less"),
    (["--method", "tfkd", "--tfkd-temperature", "nan"], "--tfkd-temperature be positive"),
    (["--method", "tfkd", "--tfkd-multiplier", "inf"], "--tfkd-multiplier non-negative"),
    (["--method", "cskd", "--cskd-temperature", "nan"], "--cskd-temperature must be positive"),
    (["--epochs", "3", "--milestones", "2,2"], "list an epoch twice, which multiplies the lr by --lr-gamma twice"),
    (["--method", "ce", "--alpha-T", "0.3"], "--alpha-T is read by --method pskd, not by --method ce --aug none"),
    (["--tfkd-alpha", "0.5"], "--tfkd-alpha is read by --method tfkd, not by --method pskd"),
    (["--method", "tfkd", "--cskd-weight", "3"], "--cskd-weight is read by --method cskd, not by --method tfkd"),
    (["--dataset", "fashionmnist", "--method", "ce", "--cutmix-prob", "0.9"],
     "--cutmix-prob is read by --aug cutmix with --method ce or --method ls or --method tfkd or --method cskd, not "
     "by --method ce --aug none"),
    (["--dataset", "fashionmnist", "--aug", "cutmix", "--cutmix-prob", "0.9"], "not by --method pskd --aug cutmix"),
    (["--store-topk", "10"], "--store-topk (topk) must lie in [1, K=10)"),
    (["--cutout-hole", "4"], "--cutout-hole is read by --aug cutout, not by --method pskd --aug none"),
    (["--aug", "cutout", "--cutout-hole", "1"], "--cutout-hole must be at least 2 pixels"),
    pytest.param(["--device", "cuda:1"], "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_train_arguments_are_refused_before_training(tmp_path, data_dir, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = pskd_in_process("train", *args, "--data-dir", str(data_dir), "-o", str(tmp_path / "run"))
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "run" / "store").exists()  # refused before any training
    assert not (tmp_path / "run" / "config.json").exists()  # the run can be started again, not "already holds a run"


def test_every_train_option_is_taken_from_the_run_or_from_the_command_on_resume():
    """--resume takes what a run computes from its config.json, refusing it given again, and
    where it runs from the command: an option in neither list would be dropped on resume."""
    from pskd_store.cli.train import RUN_OPTIONS, train_command
    from pskd_store.recipe import PLACEMENT_OPTIONS

    options = {param.name for param in train_command.params} - {"resume", "from_epoch", "quiet"}
    assert options == set(RUN_OPTIONS) | set(PLACEMENT_OPTIONS)
    assert not set(RUN_OPTIONS) & set(PLACEMENT_OPTIONS)


@pytest.mark.slow
def test_the_console_script_refuses_in_one_line(tmp_path, data_dir):
    result = pskd("train", "--arch", "densenet12", "--data-dir", str(data_dir), "-o", str(tmp_path / "run"))
    assert result.returncode == 1 and "Did you mean: densenet121" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    """What `eval -o last.pt` once wrote over a checkpoint: a valid zip, not torch.save's."""
    data = io.BytesIO()
    np.savez(data, **arrays)
    return data.getvalue()


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 cut short"),
     "checkpoints/last.pt is not a readable checkpoint"),
    (lambda run: (run / "checkpoints" / "last.pt").write_bytes(b""),
     "checkpoints/last.pt is not a readable checkpoint"),
    (lambda run: (run / "checkpoints" / "last.pt").write_bytes(_npz_bytes(probs=np.zeros(2))),
     "checkpoints/last.pt is a zip archive of probs.npy, not a checkpoint written by torch.save"),
    (lambda run: (run / "config.json").write_bytes(b"\xac\xed\x00"), "config.json is not a config"),
    (lambda run: (run / "checkpoints" / "last.pt").write_text('{"epoch": 2}'),
     "last.pt is not a checkpoint: not the zip archive torch.save writes"),
    (lambda run: (run / "config.json").write_text("{\"dataset\": "), "config.json is not a config"),
    (lambda run: (run / "metrics.jsonl").write_text("{\"epoch\": 1}\n{oops\n"), "line 2 of"),
])
@pytest.mark.slow
def test_damaged_or_unwritable_run_files_are_one_line(tmp_path, trained_run, damage, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    before = sealed_snapshot(run / "store")
    damage(run)
    result = pskd_in_process("train", "--resume", str(run), "-q")
    assert result.returncode != 0 and message in result.stderr
    assert sealed_snapshot(run / "store") == before


@contextlib.contextmanager
def unprivileged():
    """Act as a user whom permission bits stop (they do not stop root): as root, with the
    effective uid of nobody for the block; as anyone else, as that user. The tests take a
    permission from everyone, the owner too, so that both ways are stopped."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def without_write(tree: Path) -> None:
    """Take the write permission of every file and directory under ``tree`` from everyone."""
    for path in [tree, *tree.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)


@pytest.fixture
def shared_dir():
    """A directory outside pytest's private tmp (0700 for root), so that nobody can reach it;
    removed with whatever permissions a test took from it."""
    path = Path(tempfile.mkdtemp(prefix="pskd-perm-"))
    path.chmod(0o755)
    yield path
    path.chmod(0o755)
    for folder, children, _ in os.walk(path):
        for child in children:
            os.chmod(os.path.join(folder, child), 0o755)
    shutil.rmtree(path, ignore_errors=True)


def test_a_run_directory_without_write_permission_is_named(shared_dir):
    run = RunDirectory(shared_dir / "run")
    run.path.mkdir()
    run.path.chmod(0o555)
    with unprivileged(), pytest.raises(RunError, match=f"cannot write to {run.path}.*Permission denied"):
        with run.lock():
            pass


def test_a_read_only_store_still_serves_teachers_from_a_writable_cache(shared_dir, labels, monkeypatch):
    store = SoftTargetStore.create(shared_dir / "store", labels, K, chunk_rows=16)
    write_epoch(store, 1)
    cache_home = shared_dir / "cache"
    cache_home.mkdir(mode=0o777)
    cache_home.chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    before = sealed_snapshot(shared_dir / "store")
    without_write(shared_dir / "store")
    shared_dir.chmod(0o555)  # no cache beside the store either
    with unprivileged():
        read_only = SoftTargetStore.open(shared_dir / "store", read_only=True)
        data = SoftTargetDataset(base(labels), read_only, 0.8, 10)
        data.set_epoch(2)
        _, target, label, _ = data[3]
    past = epoch_probs(1, N, K)[3].astype(np.float16).astype(np.float32)
    expected = 0.8 * 2 / 10 * past
    expected[label] += 1 - 0.8 * 2 / 10
    np.testing.assert_allclose(target.numpy(), expected, rtol=1e-6)
    assert list((cache_home / "pskd-store").glob(f"{read_only.store_id}-*/epoch_0001-*.npy"))
    assert not (shared_dir / "store.mmap").exists()
    assert sealed_snapshot(shared_dir / "store") == before
    with unprivileged(), pytest.raises(StoreError, match="cannot write epoch 2 into the store: .*Permission denied"):
        SoftTargetStore.open(shared_dir / "store").writer(2)


@contextlib.contextmanager
def file_size_limit(limit: int):
    """In this process: no file may grow past ``limit`` bytes, and a write that would fails
    with an error instead of a signal (a full disk), until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _resume_without_room(run: Path, limit: int) -> None:
    """In a :func:`forked` child: ``pskd-store train --resume RUN`` where no file may grow past
    ``limit`` bytes; its stderr kept beside the run."""
    with file_size_limit(limit):
        result = pskd_in_process("train", "--resume", str(run), "-q")
    (run.parent / "stderr.txt").write_text(result.stderr)
    raise SystemExit(result.returncode)


@pytest.mark.parametrize("limit, decoded, message", [
    (64 << 10, False, "cannot write the decoded teacher of epoch 2: File too large ({run}/store.mmap)"),  # 160 KB
    # the teacher decoded beforehand (160 KB), so that the writer's first file past the limit
    # is its part's chunk of rows (160 KB; its ids' chunk, 64 KB, fits)
    (100 << 10, True, "the prediction writer of epoch 3 failed: File too large ({run}/store)"),
    (1500 << 10, False, "cannot write {run}/checkpoints/last.pt: torch.save could not write it, is the disk full?"),
])
@pytest.mark.slow
def test_running_out_of_room_is_one_line_naming_the_path(tmp_path, trained_run, limit, decoded, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    lengthen_run(run, 3)  # one epoch left to train
    if decoded:
        PredictionService(SoftTargetStore.open(run / "store")).prepare(2)
    before = sealed_snapshot(run / "store")
    assert exit_code(forked(_resume_without_room, run, limit)) == 1
    kept = tmp_path / "stderr.txt"
    assert kept.exists(), "the command raised (its traceback is above) where one line was due"
    assert message.format(run=run) in kept.read_text() and "Traceback" not in kept.read_text(), kept.read_text()
    assert SoftTargetStore.open(run / "store").sealed_epochs[:2] == [1, 2]
    if "checkpoint" not in message:  # epoch 3 was never sealed
        assert sealed_snapshot(run / "store") == before


@pytest.mark.slow
def test_a_metrics_row_cut_short_by_a_full_disk_is_dropped_on_resume_not_one_in_the_middle(tmp_path, trained_run):
    """A row is appended before its checkpoint: one cut short is of an epoch that the resume
    trains again. One that is not the last line, or that ends in a newline, was damaged
    otherwise, and stays refused."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    lengthen_run(run, 3)
    rows = (run / "metrics.jsonl").read_text()
    for damaged in (rows + '{"epoch": 3, "alpha_t": 0.8, "lr"\n', rows.replace("}\n", "\n", 1)):
        (run / "metrics.jsonl").write_text(damaged)
        refused = pskd_in_process("train", "--resume", str(run), "-q")
        assert refused.returncode == 1 and "is not valid JSON" in refused.stderr, refused.stderr
    (run / "metrics.jsonl").write_text(rows + '{"epoch": 3, "alpha_t": 0.8, "lr"')
    assert not [finding for finding in verify_path(run).findings if "metrics.jsonl" in str(finding)]
    pskd_in_process("inspect", str(run), "--out", str(tmp_path / "inspected"), check=True)
    pskd_in_process("train", "--resume", str(run), "-q", check=True)
    assert [row["epoch"] for row in RunDirectory(run).metrics_rows()] == [1, 2, 3]


@pytest.mark.slow
def test_a_new_run_into_a_run_directory_is_refused_before_it_writes(tmp_path, trained_run):
    from pskd_store.training import train

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    config = TrainConfig(epochs=1, steps_per_epoch=2, workers=0, lr=0.5).resolved()
    with pytest.raises(ValueError, match=f"{run} already holds a run: continue it with --resume {run}"):
        train(config, run, quiet=True)
    refused = pskd_in_process("train", "--epochs", "1", "-o", str(run), "-q")
    assert refused.returncode == 1 and f"already holds a run: continue it with --resume {run}" in refused.stderr
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize("kept", ["summary.json", "metrics.jsonl", "eval/test_probs.npz", "checkpoints/last.pt"])
def test_a_new_run_into_a_folder_holding_what_a_run_writes_is_refused_keeping_it(tmp_path, data_dir, kept):
    """A user's files under the names a run writes, or a run's whose config.json is gone:
    a new run there would write over them."""
    folder = tmp_path / "mine"
    (folder / kept).parent.mkdir(parents=True)
    (folder / kept).write_text("the user's")
    (folder / "notes.txt").write_text("the user's")
    refused = pskd_in_process("train", "--epochs", "1", "--data-dir", str(data_dir), "-o", str(folder), "-q")
    assert refused.returncode == 1
    assert f"{folder} holds {kept.split('/')[0]} but no run (no config.json): a new run would write over them" in (
        refused.stderr)
    assert (folder / kept).read_text() == "the user's" and not (folder / "store").exists()


@pytest.mark.parametrize("output", [True, False])
def test_a_run_refused_before_it_began_leaves_no_folder(tmp_path, data_dir, monkeypatch, output):
    """A refusal found once the command made the run directory (a model that does not fit
    the data is found as the data set is read) removes what the command made: no folder
    per failed command under runs/, none that inspect then takes for a run."""
    monkeypatch.chdir(tmp_path)
    given = ["-o", str(tmp_path / "run")] if output else []
    refused = pskd_in_process("train", "--arch", "fmnist_cnn", "--data-dir", str(data_dir), *given)
    assert refused.returncode == 1 and "takes 28x28 inputs but mnist1d has mnist1d inputs" in refused.stderr
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("runs/*"))


def test_a_run_refused_by_a_file_system_without_locks_leaves_no_folder(tmp_path, data_dir, monkeypatch):
    def no_locks(file, operation) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("fcntl.flock", no_locks)
    refused = pskd_in_process("train", "--data-dir", str(data_dir), "-o", str(tmp_path / "run"))
    assert refused.returncode == 1 and "its file system takes no locks" in refused.stderr
    assert not (tmp_path / "run").exists()


def _hold_a_run_being_built(path: Path, ready: Path) -> None:
    with RunDirectory(path).lock():
        (path / "store").mkdir()
        (path / "store" / "zarr.json").write_text("{}")  # its store, being made: no config.json yet
        ready.touch()
        time.sleep(60)


def test_a_refused_command_leaves_a_run_that_another_process_holds(tmp_path, data_dir, monkeypatch):
    """Two commands given the same --output at once: this one made the folder, the other took
    the run first, and this one is refused by the run's lock. What it made is the other's run
    now: kept, though it has no config.json yet."""
    import pskd_store.training as training

    run, ready, refuse = tmp_path / "run", tmp_path / "ready", training.refuse_a_new_run_into
    holders = []

    def another_command_takes_the_run(directory):
        refuse(directory)
        holders.append(forked(_hold_a_run_being_built, run, ready))
        while not ready.exists():
            time.sleep(0.02)

    monkeypatch.setattr(training, "refuse_a_new_run_into", another_command_takes_the_run)
    try:
        refused = pskd_in_process("train", "--epochs", "1", "--data-dir", str(data_dir), "-o", str(run), "-q")
        assert refused.returncode == 1 and "is being trained by process" in refused.stderr
        assert (run / "store" / "zarr.json").is_file()
    finally:
        for holder in holders:
            holder.kill()


def test_an_error_that_stops_a_run_goes_into_its_log(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    refused = pskd_in_process("train", "--resume", str(run), "-q")
    assert refused.returncode == 1
    last = (run / "train.log").read_text().splitlines()[-1]
    assert "stopped: " in last and last.split("stopped: ")[1] in refused.stderr


def test_a_new_run_goes_into_a_folder_holding_other_files(tmp_path, data_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's")
    (folder / "download.partial").write_text("the user's")  # a name like the run's temporary files'
    pskd_in_process("train", "--epochs", "1", "--steps-per-epoch", "2", "--data-dir", str(data_dir), "-o",
                    str(folder), "-q", check=True)
    assert (folder / "notes.txt").read_text() == (folder / "download.partial").read_text() == "the user's"
    assert (folder / "config.json").is_file()


@pytest.mark.slow
def test_a_resume_whose_metrics_lost_rows_of_trained_epochs_is_refused_before_anything_changes(tmp_path,
                                                                                                trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    for kept in ("", rows[1]):  # emptied; the first epoch's row deleted
        (run / "metrics.jsonl").write_text(kept)
        refused = pskd_in_process("train", "--resume", str(run), "-q")
        missing = "[1, 2]" if not kept else "[1]"
        assert refused.returncode == 1 and f"lacks the rows of epochs {missing}, which the checkpoint of epoch 2 " \
                                           "trained" in refused.stderr, refused.stderr
        assert SoftTargetStore.open(run / "store").sealed_epochs == [1, 2]


@pytest.mark.slow
def test_a_store_or_a_part_of_one_given_where_a_run_goes_is_named_as_such(tmp_path, trained_run):
    store = trained_run / "store"
    refused = pskd_in_process("train", "--epochs", "1", "-o", str(store), "-q")
    assert refused.returncode == 1 and f"{store} is a store, not a run directory" in refused.stderr
    assert not (store / "train.log").exists()
    for command in ("info", "verify"):
        part = pskd_in_process(command, str(store / "teacher"))
        assert part.returncode != 0 and f"is a part of the store at {store}, not a store: pass {store}" in part.stderr
        assert "delete it" not in part.stderr, part.stderr
    inspected = pskd_in_process("inspect", str(trained_run / "config.json"), "--out", str(tmp_path / "out"))
    assert inspected.returncode == 1 and "config.json is a file, not a run directory" in inspected.stderr


@pytest.mark.slow
def test_both_checkpoints_damaged_after_epochs_past_the_first_name_no_start_over(tmp_path, data_dir):
    """Deleting them would not start the run over: a run with epochs past the first sealed
    and no checkpoint is refused."""
    from pskd_store.training import train

    run = tmp_path / "run"
    train(TrainConfig(epochs=3, steps_per_epoch=2, workers=0, data_dir=str(data_dir)).resolved(), run, quiet=True)
    for name in ("last.pt", "previous.pt"):
        (run / "checkpoints" / name).write_bytes(b"PK\x03\x04 cut short")
    refused = CliRunner().invoke(cli, ["train", "--resume", str(run), "-q"])
    assert refused.exit_code == 1 and "restore it from a backup, or train the run anew into another --output" in \
        refused.output and "delete it" not in refused.output, refused.output


def test_a_full_scratch_disk_during_the_seal_loses_nothing_sealed(tmp_path, monkeypatch):
    """The seal's scratch file (80 KB) cannot grow: a clear error naming where it was, the
    previous teacher intact, and the epoch sealed once there is room."""
    from pskd_store import merge

    monkeypatch.setattr(merge, "BUCKET_BYTES", 1024 * 10 * 2)  # 4 buckets of a chunk: the scratch file in use
    store = SoftTargetStore.create(tmp_path / "store", make_labels(4096, 10), 10, chunk_rows=1024)
    write_epoch(store, 1)
    write_epoch(store, 2, seal=False)
    before = sealed_snapshot(Path(store.url))
    with pytest.raises(StoreError) as caught, file_size_limit(16 << 10):
        SoftTargetStore.open(store.url).seal(2, scratch_dir=tmp_path)
    assert f"cannot seal epoch 2: File too large, writing the seal's scratch file (pass another scratch_dir) " \
           f"({tmp_path}); nothing of it was published" in str(caught.value)
    assert sealed_snapshot(Path(store.url)) == before
    reopened = SoftTargetStore.open(store.url)
    reopened.seal(2)
    assert reopened.sealed_epochs == [1, 2]


def test_verify_of_a_path_that_is_no_store_is_one_line(tmp_path):
    result = pskd_in_process("verify", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "no pskd-store at" in result.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    result = pskd_in_process("verify", str(tmp_path / "run"))
    assert result.returncode == 1 and "not a pskd-store" in result.stderr


# -- refusals of the library's other pieces (in process) --------------------------------------


def _worker_copy(obj):
    """What a DataLoader worker holds: the object after a pickle round trip."""
    return pickle.loads(pickle.dumps(obj))


class _SetsTheEpochWhenRead(torch.utils.data.Dataset):
    def __init__(self, data: SoftTargetDataset):
        self.data = data

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> str:
        try:
            self.data.set_epoch(2)
        except RuntimeError as err:  # handed back as the item: the worker ends as it ends after a batch
            return str(err)
        return "set"


def _set_epoch_in_a_worker(store: SoftTargetStore, labels: np.ndarray) -> None:
    data = _SetsTheEpochWhenRead(SoftTargetDataset(base(labels), store, 0.8, 10))
    loader = torch.utils.data.DataLoader(data, num_workers=1, multiprocessing_context="fork")
    raise RuntimeError(next(iter(loader))[0])


def _prepare_in_a_worker(store: SoftTargetStore) -> None:
    _worker_copy(PredictionService(store)).prepare(1)


def _resolved(**options) -> None:
    TrainConfig(**options).resolved()


# (case, action(store, labels, tmp_path), exception, part of the message)
LIBRARY_CASES: list[tuple[str, Callable, type[Exception], str]] = [
    ("unknown data set in a config", lambda s, y, t: _resolved(dataset="svhn"), ValueError,
     "unknown data set 'svhn'; choose one of mnist1d"),
    ("unknown method in a config", lambda s, y, t: _resolved(method="kd"), ValueError, "unknown method 'kd'"),
    ("unknown augmentation in a config", lambda s, y, t: _resolved(aug="mixup"), ValueError,
     "unknown augmentation 'mixup'"),
    ("no epochs", lambda s, y, t: _resolved(epochs=0), ValueError, "--epochs and --batch-size must be positive"),
    ("momentum of 1", lambda s, y, t: _resolved(momentum=1.0), ValueError, "--momentum must lie in [0, 1)"),
    ("negative weight decay", lambda s, y, t: _resolved(weight_decay=-1e-4), ValueError,
     "--wd must be a non-negative number"),
    ("a milestone after the last epoch", lambda s, y, t: _resolved(epochs=10, milestones=[11]), ValueError,
     "--milestones [11] must lie within the epochs, 1..10"),
    ("TF-KD weight above 1", lambda s, y, t: _resolved(tfkd_alpha=1.5), ValueError, "--tfkd-alpha must lie in [0, 1]"),
    ("CS-KD temperature 0", lambda s, y, t: _resolved(cskd_temperature=0), ValueError,
     "--cskd-temperature must be positive"),
    ("negative workers", lambda s, y, t: _resolved(workers=-1), ValueError, "--workers must be 0 or more"),
    ("unknown augmentation in the step", lambda s, y, t: BatchAugment("mixup", K), ValueError,
     "unknown augmentation 'mixup'; choose cutout or cutmix"),
    ("a model for no classes", lambda s, y, t: create_model("mnist1d_mlp", 0), ValueError,
     "num_classes must be positive, got 0"),
    ("integer probabilities to the metrics", lambda s, y, t: evaluate(
        np.ones((4, K), dtype=np.int64), np.zeros(4, dtype=np.int64)), ValueError, "probs must be a float array"),
    ("pair batches of no samples", lambda s, y, t: ClassPairBatchSampler(y, 0), ValueError,
     "batch_size must be at least 1, got 0"),
    ("a validation split leaving nothing", lambda s, y, t: _split_indices(1, 0.5, 0), ValueError,
     "val_split=0.5 leaves no training samples out of 1"),
    ("no checkpoint there", lambda s, y, t: load_checkpoint(t / "last.pt"), FileNotFoundError, "no checkpoint at"),
    ("a run without its last checkpoint", lambda s, y, t: _load_a_runs_missing_checkpoint(t), FileNotFoundError,
     "run is a run directory without checkpoints/last.pt: pass a run directory or a .pt file"),
    ("a folder for a checkpoint", lambda s, y, t: _raise(checkpoint_problem(_a_folder(t / "folder.pt"))),
     ValueError, "is not a readable checkpoint ([Errno 21] Is a directory"),
    ("set_epoch in a DataLoader worker", lambda s, y, t: _set_epoch_in_a_worker(s, y), RuntimeError,
     "set_epoch() belongs in the main process"),
    ("set_epoch on a pickled copy", lambda s, y, t: _worker_copy(SoftTargetDataset(base(y), s, 0.8, 10)).set_epoch(1),
     RuntimeError, "this SoftTargetDataset is a pickled copy (handed to torch.multiprocessing.spawn, say)"),
    ("a fractional epoch", lambda s, y, t: SoftTargetDataset(base(y), s, 0.8, 10).set_epoch(2.0), ValueError,
     "epoch must be a whole number of epochs (an int; epochs count from 1), got 2.0: pass int(epoch)"),
    ("prepare in a DataLoader worker", lambda s, y, t: _prepare_in_a_worker(s), RuntimeError,
     "prepare() runs in the main process"),
]


def _load_a_runs_missing_checkpoint(tmp: Path) -> dict:
    (tmp / "run").mkdir()
    (tmp / "run" / "config.json").write_text("{}")
    return load_checkpoint(tmp / "run" / "checkpoints" / "last.pt")


def _raise(problem: str | None) -> None:
    raise ValueError(problem)


def _a_folder(path: Path) -> Path:
    """A directory where a file is meant: what `is_file` refuses but a path can name."""
    path.mkdir()
    return path


@pytest.mark.parametrize("action, error, message", [case[1:] for case in LIBRARY_CASES],
                         ids=[case[0] for case in LIBRARY_CASES])
def test_library_misuse_is_refused_naming_the_fix(store, labels, tmp_path, action, error, message):
    before = sealed_snapshot(Path(store.url))
    with pytest.raises(error) as caught:
        action(store, labels, tmp_path)
    assert message in str(caught.value)
    assert sealed_snapshot(Path(store.url)) == before


@pytest.mark.slow
def test_a_checkpoint_of_another_world_size_is_refused(tmp_path, trained_run, data_dir):
    from pskd_store.training import train

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    state["rng"] = state["rng"] * 2  # as two processes would have written it
    torch.save(state, run / "checkpoints" / "last.pt")
    config = TrainConfig.load(run / "config.json")
    with pytest.raises(ValueError, match=r"was checkpointed by 2 process\(es\); resume it with as many"):
        train(config, run, resume=True, quiet=True)


@pytest.mark.slow
def test_an_ensemble_of_other_data_or_a_split_never_held_out_is_refused(tmp_path, trained_run):
    from pskd_store.evaluation import evaluate_checkpoints

    last = trained_run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)

    def variant(name: str, **config) -> Path:
        torch.save({**state, "config": {**state["config"], **config}}, tmp_path / name)
        return tmp_path / name

    # the test split is the data set's own: seeds, hold-outs and training subsets ensemble
    held_out = variant("held_out.pt", val_split=0.1, seed=1, train_subset=4000)
    alone, _ = evaluate_checkpoints([last])
    together, _ = evaluate_checkpoints([last, held_out])
    assert together["top1_err"] == alone["top1_err"] and together["ece"] == pytest.approx(alone["ece"], abs=1e-9)
    with pytest.raises(ValueError, match="on the same data set, whose test split holds the same samples"):
        evaluate_checkpoints([last, variant("other_data.pt", dataset="fashionmnist")])
    with pytest.raises(ValueError, match="on the same data set, whose val split holds the same samples"):
        evaluate_checkpoints([held_out, variant("other_seed.pt", val_split=0.1, seed=2)], split="val")
    with pytest.raises(ValueError, match="these runs held out no validation split"):
        evaluate_checkpoints([last], split="val")


@pytest.mark.slow
def test_eval_takes_the_runs_ece_bins_unless_given(tmp_path, trained_run):
    from pskd_store.evaluation import evaluate_checkpoints
    from pskd_store.metrics import evaluate

    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=False)
    torch.save({**state, "config": {**state["config"], "ece_bins": 15}}, tmp_path / "bins15.pt")
    metrics, predictions = evaluate_checkpoints([tmp_path / "bins15.pt"])
    fifteen, ten = (evaluate(*predictions, n_bins=n)["ece"] for n in (15, 10))
    assert metrics["ece"] == fifteen != ten
    assert evaluate_checkpoints([tmp_path / "bins15.pt"], ece_bins=10)[0]["ece"] == ten


# -- damaged or missing store metadata, checkpoints, permissions ---------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x80  # not UTF-8 any more
    path.write_bytes(bytes(data))


def _set_a_digit(path: Path) -> None:
    """An edit that keeps valid JSON: the first sealed epoch becomes another number."""
    root = json.loads(path.read_text())
    root["attributes"]["pskd_store"]["sealed"][0] = 7
    path.write_text(json.dumps(root))


@pytest.mark.parametrize("damage, message", [
    (_flip_a_byte, "the root metadata of the store at {store} (zarr.json) is damaged"),
    (lambda path: path.write_bytes(b""), "the root metadata of the store at {store} (zarr.json) is damaged"),
    (_set_a_digit, "is damaged (its pskd_store attributes do not match their checksum)"),
    (lambda path: path.unlink(), "{store} holds arrays but no root metadata (zarr.json"),
])
@pytest.mark.parametrize("command", ["info", "inspect", "verify", "resume"])
@pytest.mark.slow
def test_damaged_root_metadata_is_one_line_for_every_command(tmp_path, trained_run, damage, message, command):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damage(run / "store" / "zarr.json")
    args = ["train", "--resume", str(run), "-q"] if command == "resume" else [command, str(run)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message.format(store=run / "store") in errors[0], result.output


@pytest.mark.slow
def test_a_run_whose_store_is_gone_does_not_resume_with_an_empty_one(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "store")
    result = pskd_in_process("train", "--resume", str(run), "-q")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{run} is checkpointed and continues from the teachers of its store, which is gone from " \
           f"{run / 'store'}" in result.stderr
    assert not (run / "store").exists()  # no empty store left behind


def test_a_new_run_is_refused_another_runs_store_before_it_writes_anything(tmp_path, trained_run, data_dir):
    """Its seal would have found the other run's epochs and failed; its run directory, left
    with a config, would then have been resumed, rolling the other run's store back to nothing."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    sealed = SoftTargetStore.open(run / "store").sealed_epochs
    result = pskd_in_process("train", "-o", str(tmp_path / "other"), "--store", str(run / "store"),
                             "--data-dir", str(data_dir), "-q")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"a store already exists at {run / 'store'}, another run's: give this run one of its own" in result.stderr
    assert not (tmp_path / "other" / "config.json").exists()
    assert SoftTargetStore.open(run / "store").sealed_epochs == sealed == [1, 2]
    from types import SimpleNamespace

    from pskd_store.distributed import Distributed
    from pskd_store.errors import StoreExistsError
    from pskd_store.training import _open_store, _refuse_another_runs_store

    new = RunDirectory(tmp_path / "new")
    _refuse_another_runs_store(TrainConfig(store=str(tmp_path / "fresh")), new)  # nothing there: the run may make it
    assert not (tmp_path / "fresh").exists()
    # a store with nothing sealed, left by a run interrupted before it began: the same command again takes it
    labels = SoftTargetStore.open(run / "store").labels
    empty = SoftTargetStore.create(tmp_path / "empty", labels, 10, dtype="float32")  # as train makes it
    config = TrainConfig(store=str(tmp_path / "empty"))
    _refuse_another_runs_store(config, new)
    # a run that began training into it (killed before its first seal), then another run: the first run's
    first = RunDirectory(tmp_path / "first")
    assert empty.claim_run(str(first.path.resolve())) == str(first.path.resolve())
    _refuse_another_runs_store(config, first)  # the same command again
    refused = f"a store already exists at {tmp_path / 'empty'}, the run in {first.path}'s: .* --resume {first.path}"
    with pytest.raises(StoreExistsError, match=refused):
        _refuse_another_runs_store(config, new)
    splits = SimpleNamespace(train_labels=labels, num_classes=10, train_names=None)
    with pytest.raises(StoreExistsError, match=refused):  # two runs started at once: the first claim wins
        _open_store(config, new, splits, Distributed())
    assert _open_store(config, first, splits, Distributed()).run == str(first.path.resolve())


@pytest.mark.slow
def test_a_store_is_its_runs_whether_the_run_moves_or_its_directory_is_made_again(tmp_path, data_dir):
    """A run killed before its first checkpoint, moved, resumes into its store; a new run
    into a directory made again where a run with sealed epochs was is refused up front."""
    store = tmp_path / "store"
    args = ["--store", str(store), "--epochs", "1", "--steps-per-epoch", "2", "--workers", "0",
            "--data-dir", str(data_dir), "-q"]
    assert pskd_in_process("train", "-o", str(tmp_path / "a"), *args).returncode == 0
    shutil.rmtree(tmp_path / "a")  # the run's directory deleted, its store kept (sealed: [1])
    result = pskd_in_process("train", "-o", str(tmp_path / "a"), *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"a store already exists at {store}, the run in {tmp_path / 'a'}'s" in result.stderr
    assert not (tmp_path / "a" / "config.json").exists() and SoftTargetStore.open(store).sealed_epochs == [1]

    assert pskd_in_process("train", "-o", str(tmp_path / "b"), "--store", str(tmp_path / "other"),
                           *args[2:]).returncode == 0
    for checkpoint in (tmp_path / "b" / "checkpoints").glob("*.pt"):  # killed before its first checkpoint
        checkpoint.unlink()
    SoftTargetStore.open(tmp_path / "other").rollback(0)
    (tmp_path / "b" / "metrics.jsonl").unlink()
    shutil.move(tmp_path / "b", tmp_path / "moved")
    result = pskd_in_process("train", "--resume", str(tmp_path / "moved"), "-q")
    assert result.returncode == 0, result.stderr
    assert SoftTargetStore.open(tmp_path / "other").sealed_epochs == [1]


@pytest.mark.slow
def test_a_flipped_bit_in_the_checkpoints_weights_is_one_line_naming_the_command_that_resumes(
        tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    checkpoint = run / "checkpoints" / "last.pt"
    with zipfile.ZipFile(checkpoint) as archive:  # a byte inside a weight tensor's record
        record = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 1000)
    data = bytearray(checkpoint.read_bytes())
    data[record.header_offset + 200] ^= 0x01
    checkpoint.write_bytes(bytes(data))
    before = sealed_snapshot(run / "store")
    result = pskd_in_process("train", "--resume", str(run), "-q")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{checkpoint} is damaged: its record {record.filename} does not match the CRC-32" in result.stderr
    assert f"pskd-store train --resume {run} --from-epoch 1" in result.stderr
    assert sealed_snapshot(run / "store") == before
    findings = json.loads(pskd_in_process("verify", str(run), "--json").stdout)["findings"]
    assert {"part": str(checkpoint), "problem": f"is damaged: its record {record.filename} does not match the "
            "CRC-32 torch.save wrote for it (flipped bits)"} in findings


@pytest.mark.slow
def test_eval_refuses_an_unknown_device_in_one_line(trained_run):
    result = pskd_in_process("eval", str(trained_run), "--device", "bogus")
    assert result.returncode != 0 and "--device must be auto, cpu, cuda or cuda:N, got 'bogus'" in result.stderr


@contextlib.contextmanager
def read_only_mount(path: Path):
    """``path`` as a read-only file system (tmpfs, remounted read-only): needs root."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only file system needs root")
    try:
        yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_a_read_only_file_system_is_one_line_for_eval_and_for_a_writer(tmp_path, trained_run, labels):
    with read_only_mount(tmp_path / "ro") as make_read_only:
        run = tmp_path / "ro" / "run"
        shutil.copytree(trained_run, run)
        store = SoftTargetStore.create(tmp_path / "ro" / "store", labels, K)
        write_epoch(store, 1)
        make_read_only()
        result = pskd_in_process("eval", str(run))
        assert result.returncode != 0
        assert f"cannot write {run / 'eval' / 'test_probs.npz'}: Read-only file system" in result.stderr
        with pytest.raises(StoreError, match="cannot write epoch 2 into the store: Read-only file system"):
            SoftTargetStore.open(store.url).writer(2)


@pytest.mark.parametrize("command", ["info", "inspect"])
def test_a_run_that_cannot_be_read_is_one_line(shared_dir, trained_run, command):
    import importlib

    importlib.import_module(f"pskd_store.cli.{command}")  # its imports read files nobody may not
    run = shared_dir / "run"
    shutil.copytree(trained_run, run)
    (run / "store").chmod(0o000)
    with unprivileged():
        result = CliRunner().invoke(cli, [command, str(run)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Permission denied" in result.output and result.output.strip().count("\n") == 0


def test_info_says_it_read_metadata_only(trained_run):
    result = pskd_in_process("info", str(trained_run))
    assert "metadata only, no chunk read: `pskd-store verify` checks every chunk and row" in result.stdout
    assert json.loads(pskd_in_process("info", str(trained_run), "--json").stdout)["checked"].startswith(
        "metadata only")


def test_numpy_logits_are_written_like_tensors(store):
    logits = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    with store.writer(2) as writer:
        writer.write(np.arange(N), logits)
    store.seal(2)
    np.testing.assert_allclose(store.read_epoch(2), torch.from_numpy(logits).softmax(1).numpy(), atol=1e-3)


@pytest.mark.slow
def test_files_a_kill_left_in_the_store_are_removed_on_resume(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    chunk = chunk_file(run / "store" / "teacher" / "epoch_0002")
    partial = chunk.with_name(f"{chunk.name}.3f2a9c.partial")
    partial.write_bytes(b"half a chunk")
    metrics = run / "metrics.jsonl.3f2a9c0d1e2b4a5c.partial"  # its metrics, rewritten as a kill came
    metrics.write_text("{}")
    pskd_in_process("train", "--resume", str(run), "-q", check=True)
    assert not partial.exists() and not metrics.exists()


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{**{k: v for k, v in row.items() if k != "epoch_seconds"},
             "train": {k: v for k, v in row["train"].items() if k not in ("samples_per_s", "seconds")}}
            for row in rows]


def _train_until_then_damage(config: TrainConfig, run: Path, epoch: int, damaged: str, monkeypatch) -> None:
    """Train ``run`` and stop it after ``epoch``; then flip one bit of its last checkpoint
    (``damaged="checkpoint"``) or of a chunk of that epoch's teacher (``"teacher"``)."""
    import pskd_store.training as training

    log_epoch = training._log_epoch

    def stop_after(row, epochs):
        log_epoch(row, epochs)
        if row["epoch"] == epoch:
            raise KeyboardInterrupt
    monkeypatch.setattr(training, "_log_epoch", stop_after)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, run, quiet=True)
    monkeypatch.undo()
    if damaged == "checkpoint":
        path = run / "checkpoints" / "last.pt"
    else:
        path = chunk_file(run / "store" / "teacher" / f"epoch_{epoch:04d}")
        shutil.rmtree(run / "store.mmap", ignore_errors=True)  # a fresh node: the teacher is decoded again
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["checkpoint", "teacher"])
@pytest.mark.slow
def test_from_epoch_resumes_past_a_damaged_checkpoint_or_teacher_as_if_nothing_happened(
        tmp_path, data_dir, monkeypatch, damaged):
    """A 3-epoch run stopped after epoch 2, then its last checkpoint (epoch 2) or its newest
    teacher (epoch 2) damaged: resume names `--from-epoch 1`, which trains epoch 2 again
    from the kept checkpoint of epoch 1 and ends where an uninterrupted run ends."""
    import pskd_store.training as training

    config = TrainConfig(epochs=3, steps_per_epoch=4, workers=0, data_dir=str(data_dir)).resolved()
    training.train(config, tmp_path / "whole", quiet=True)
    run = tmp_path / "run"
    _train_until_then_damage(config, run, 2, damaged, monkeypatch)

    refused = CliRunner().invoke(cli, ["train", "--resume", str(run), "-q"])
    assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit), refused.output
    assert f"pskd-store train --resume {run} --from-epoch 1" in refused.output, refused.output
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(run), "--from-epoch", "1", "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert _without_timings(RunDirectory(run).metrics_rows()) == _without_timings(
        RunDirectory(tmp_path / "whole").metrics_rows())
    np.testing.assert_array_equal(SoftTargetStore.open(run / "store").read_epoch(3),
                                  SoftTargetStore.open(tmp_path / "whole" / "store").read_epoch(3))


@pytest.mark.slow
def test_from_epoch_names_the_epochs_it_can_resume_from(tmp_path, trained_run):
    result = pskd_in_process("train", "--resume", str(trained_run), "--from-epoch", "7", "-q")
    assert result.returncode != 0 and "--from-epoch 7: " in result.stderr
    assert "keeps intact checkpoints of epochs [1, 2]" in result.stderr
    assert "--from-epoch goes with --resume" in pskd_in_process("train", "--from-epoch", "1").stderr


@pytest.mark.parametrize("damaged, advice", [
    ("checkpoint", "the checkpoint of epoch 1 is intact, but not that epoch's predictions, which resuming from it "
                   "needs (the store keeps [2, 3]): restore it from a backup, or train the run anew"),
    ("teacher", "The checkpoint of epoch 1 is kept, but not that epoch's predictions, which resuming from it needs "
                "(the store keeps [2]): restore the store from a backup, or train the run anew"),
])
def test_damage_after_a_seal_pruned_the_epoch_before_names_no_resume_that_cannot_be(
        tmp_path, data_dir, monkeypatch, damaged, advice):
    """Killed after epoch 3 was sealed (which pruned epoch 1's teacher) and before its
    checkpoint; then the last checkpoint (epoch 2) or epoch 2's teacher is damaged. The
    checkpoint of epoch 1 is intact, but resuming from it would need epoch 1's teacher."""
    from pskd_store.training import train

    append = RunDirectory.append_metrics

    def killed_at_epoch_3(directory, row):
        if row["epoch"] == 3:
            raise KeyboardInterrupt
        append(directory, row)
    monkeypatch.setattr(RunDirectory, "append_metrics", killed_at_epoch_3)
    run = tmp_path / "run"
    config = TrainConfig(epochs=4, steps_per_epoch=2, workers=0, data_dir=str(data_dir)).resolved()
    with pytest.raises(KeyboardInterrupt):
        train(config, run, quiet=True)
    monkeypatch.undo()
    assert SoftTargetStore.open(run / "store").teacher_epochs == [2, 3]
    path = run / "checkpoints" / "last.pt" if damaged == "checkpoint" else chunk_file(run / "store" / "teacher" /
                                                                                     "epoch_0002")
    shutil.rmtree(run / "store.mmap", ignore_errors=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused = CliRunner().invoke(cli, ["train", "--resume", str(run), "-q"])
    assert refused.exit_code == 1 and advice in refused.output and "--from-epoch" not in refused.output, refused.output


@pytest.mark.parametrize("damaged, advice", [
    ("checkpoint", "restore it from a backup, or delete it to train the run again from epoch 1"),
    ("teacher", "No checkpoint of the epoch before it is kept: restore the store from a backup, or train the run anew"),
])
def test_damage_with_no_earlier_checkpoint_says_what_else_to_do(tmp_path, data_dir, monkeypatch, damaged, advice):

    config = TrainConfig(epochs=2, steps_per_epoch=2, workers=0, data_dir=str(data_dir)).resolved()
    run = tmp_path / "run"
    _train_until_then_damage(config, run, 1, damaged, monkeypatch)
    refused = CliRunner().invoke(cli, ["train", "--resume", str(run), "-q"])
    assert refused.exit_code == 1 and advice in refused.output, refused.output


@pytest.mark.slow
def test_files_other_programs_saved_with_torch_are_one_line_in_eval_and_verify(tmp_path, trained_run):
    """A Lightning ``.ckpt`` or a bare state dict is a whole zip archive torch.save wrote:
    refused for what it holds, not by a KeyError, and never verified as a checkpoint."""
    lightning = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, lightning)
    result = pskd_in_process("eval", str(lightning))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"{lightning} is not a checkpoint written by pskd-store train (a dict of state_dict, epoch): pass a run "
            "directory or its checkpoints/last.pt") in result.stderr
    for foreign in ({"state_dict": {}, "epoch": 3}, {"model": {}}):
        run = tmp_path / f"run{len(foreign)}"
        shutil.copytree(trained_run, run)
        torch.save(foreign, run / "checkpoints" / "last.pt")
        result = pskd_in_process("verify", str(run))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"{run / 'checkpoints' / 'last.pt'}: is not a checkpoint written by pskd-store train" in result.stdout


@pytest.mark.slow
def test_eval_writes_beside_a_checkpoint_outside_a_run_and_names_a_run_without_one(tmp_path, trained_run,
                                                                                   monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(trained_run / "checkpoints" / "last.pt", models / "best.pt")
    predicted_in = []  # the precision of float32 convolutions as eval predicts: the run's, not cuDNN's TF32
    monkeypatch.setattr(evaluation, "predict", lambda *args, **kwargs: (
        predicted_in.append(torch.backends.cudnn.allow_tf32), predict(*args, **kwargs))[1])
    result = pskd_in_process("eval", str(models / "best.pt"), check=True)
    assert predicted_in == [False]
    assert json.loads(result.stdout)["probs"] == str(models / "best_test_probs.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no eval/ beside models/
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints")
    result = pskd_in_process("eval", str(run))
    assert result.returncode == 1
    assert f"{run} is a run directory without checkpoints/last.pt: pass a run directory" in result.stderr


def test_verify_of_a_loops_directory_checks_the_store_in_it_alone(tmp_path, labels):
    """A store made through the API, Lightning or Transformers in RUN/store, beside the loop's
    own files: no train checkpoints or metrics are looked for."""
    write_epoch(SoftTargetStore.create(tmp_path / "loop" / "store", labels, K), 1)
    write_epoch(SoftTargetStore.open(tmp_path / "loop" / "store"), 2)
    (tmp_path / "loop" / "checkpoints").mkdir()
    (tmp_path / "loop" / "checkpoints" / "last.ckpt").write_bytes(b"Lightning's")
    result = pskd_in_process("verify", str(tmp_path / "loop"))
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout


@pytest.mark.slow
def test_inspect_of_a_store_whose_labels_are_damaged_is_one_line(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    labels_chunk = chunk_file(run / "store" / "labels")
    data = bytearray(labels_chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    labels_chunk.write_bytes(bytes(data))
    result = pskd_in_process("inspect", str(run), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot read the store of {run}: the labels array" in result.stderr
    result = pskd_in_process("inspect", str(trained_run / "store"))
    assert f"no store in {trained_run / 'store'} (a store: pass the run directory that holds it)" in result.stderr


def test_a_relative_store_and_cache_are_kept_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(store="stores/run", cache_dir="cache").resolved()
    assert (config.store, config.cache_dir) == (str(tmp_path / "stores" / "run"), str(tmp_path / "cache"))
    assert TrainConfig(store="s3://bucket/run/store").resolved().store == "s3://bucket/run/store"


@pytest.mark.slow
def test_the_method_table_reuses_a_finished_run_only_for_the_configuration_it_trained(trained_run, data_dir,
                                                                                      tmp_path):
    from conftest import benchmark_script

    table = benchmark_script("method_table")
    base = dict(epochs=2, steps_per_epoch=4, workers=0, data_dir=str(data_dir))  # trained_run's
    reused = table.run_one(base, {}, 0, trained_run, "test")
    assert reused["top1_err"] == json.loads((trained_run / "summary.json").read_text())["final"]["test"]["top1_err"]
    with pytest.raises(SystemExit, match=f"{trained_run} holds a run of another configuration \\(epochs differ\\): "
                                         "pass another --out"):
        table.run_one({**base, "epochs": 3}, {}, 0, trained_run, "test")
    with pytest.raises(SystemExit, match="\\(alpha_T differ\\)"):
        table.run_one(base, {"alpha_T": 0.5}, 0, trained_run, "test")
    older = tmp_path / "older"  # a run from before a field: it trained that field's default
    shutil.copytree(trained_run, older)
    config = json.loads((older / "config.json").read_text())
    del config["crop_flip"]
    (older / "config.json").write_text(json.dumps(config))
    assert table.run_one(base, {}, 0, older, "test") == reused
