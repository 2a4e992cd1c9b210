"""Shared fixtures.

Data fixtures write small data sets in the real on-disk formats, so tests take the
same code path as users (torchvision's own parsers included). torch, torchvision and
pskd_store are imported by the fixtures that use them: pytest-xdist's controller loads this
file too, runs no test, and would otherwise spend 5 s importing them before any worker starts.
"""

from __future__ import annotations

import fcntl
import gzip
import importlib.util
import multiprocessing
import os
import pickle
import random
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

# One compute thread per process, the CLI's subprocesses included (they inherit it): README's
# two xdist workers share two cores, and OpenMP's waiting threads of one test's process would
# spin on the core the other needs. A test that measures threads sets its own count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10

    from pskd_store.store import SoftTargetStore

# Temporary files in memory where /dev/shm has room (a TMPDIR the user set is kept): the suite
# creates and deletes tens of thousands of files (zarr chunks, checkpoints, runs), and on an ext4
# disk without a journal (this VM's) each new file steps over every inode deleted in the last
# 30 s: a third of the suite's kernel time. tmp_path, tempfile and the CLI's subprocesses (which
# inherit TMPDIR) all write there; the suite's peak is about 1 GB.
SHARED_MEMORY = Path("/dev/shm")
if ("TMPDIR" not in os.environ and SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK | os.X_OK)
        and shutil.disk_usage(SHARED_MEMORY).free > 8 << 30):
    os.environ["TMPDIR"] = tempfile.tempdir = str(SHARED_MEMORY)

pytest_plugins = ["coverage_check"]  # README's test command also checks what the suite covered

PSKD = shutil.which("pskd-store")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def pskd(*args: str, check: bool = True, timeout: float = 600,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``pskd-store ARGS`` in a subprocess, as a user runs it; with ``check`` a failure
    raises with the command's output."""
    assert PSKD, "pskd-store is not installed: pip install -e ."
    done = subprocess.run([PSKD, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"pskd-store {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def benchmark_script(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` loaded as a module, so that a test calls its functions (or
    replaces one) in this process."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pskd_in_process(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """``pskd-store ARGS`` run by click's ``CliRunner`` in this process: the same command
    without a Python start and a torch import (~4 s of a 2-core VM's CPU per process), for
    the many refusals that never train, the reference runs and resumes, and (through
    :func:`pskd_forked`) the runs a test kills. An exception other than click's exit is
    raised: a traceback where one line was due. With ``check`` a failure raises with the
    command's output."""
    from click.testing import CliRunner

    from pskd_store.cli.main import cli

    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if check and result.exit_code != 0:
        raise AssertionError(f"pskd-store {' '.join(args)} failed in this process:\n{result.stdout}\n{result.stderr}")
    return subprocess.CompletedProcess(["pskd-store", *args], result.exit_code, result.stdout, result.stderr)


FORK = multiprocessing.get_context("fork")
"""What :func:`forked` starts its children with: their Events and Queues come from it too."""


def forked(function, *args, **kwargs) -> multiprocessing.Process:
    """``function(*args, **kwargs)`` started in a child forked from this process: a real
    process (killed for real where a test kills it) without a Python start and the imports of
    torch, Lightning or Transformers (3-11 s of a 2-core VM's CPU each). :func:`exit_code`
    waits for it."""
    child = FORK.Process(target=function, args=args, kwargs=kwargs)
    child.start()
    return child


def exit_code(child: multiprocessing.Process, timeout: float = 120) -> int | None:
    """The exit code of a :func:`forked` child (minus the signal that killed it); None if it
    ran past ``timeout`` seconds, and was killed then."""
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        return None
    return child.exitcode


def pskd_forked(*args: str) -> multiprocessing.Process:
    """``pskd-store ARGS`` as :func:`pskd_in_process` runs it, in a :func:`forked` child that
    leads a session of its own: ``os.killpg(child.pid, SIGKILL)`` kills it and its DataLoader
    workers at once, as a job killed from a shell. Its exit code is the command's."""
    return forked(_in_own_session, *args)


def _in_own_session(*args: str) -> None:
    os.setsid()
    raise SystemExit(pskd_in_process(*args).returncode)


@pytest.fixture
def device():
    """CPU tensors on the accelerator paths (stand_in_accelerator.py), copies landing 2 ms late."""
    from stand_in_accelerator import StandInAccelerator

    from pskd_store.accelerator import ACCELERATORS

    stand_in = StandInAccelerator(delay=0.002)
    ACCELERATORS["cpu"] = stand_in
    try:
        yield stand_in
    finally:
        ACCELERATORS.pop("cpu", None)
        stand_in.stream.shutdown()


@pytest.fixture
def torch_state_kept():
    """Put back what an in-process Lightning or Hugging Face fit changes for the whole
    process (thread count, deterministic algorithms, the global generators that
    ``transformers.set_seed`` seeds): the tests after it compare results to recorded values."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    generators = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.set_rng_state(generators[0])
    np.random.set_state(generators[1])
    random.setstate(generators[2])


@pytest.fixture
def labels(request: pytest.FixtureRequest) -> np.ndarray:
    """Labels of the test module's ``N`` samples and ``K`` classes (seed ``LABEL_SEED``, or 0)."""
    from store_helpers import make_labels

    module = request.module
    return make_labels(module.N, module.K, seed=getattr(module, "LABEL_SEED", 0))


@pytest.fixture
def store(tmp_path: Path, labels: np.ndarray, request: pytest.FixtureRequest) -> SoftTargetStore:
    """An empty store of those labels, in chunks of the module's ``CHUNK_ROWS`` rows (and
    top-k rows when it sets ``TOPK``); a module that needs epochs in it overrides this."""
    from pskd_store.store import SoftTargetStore

    module = request.module
    return SoftTargetStore.create(tmp_path / "store", labels, module.K, chunk_rows=module.CHUNK_ROWS,
                                  topk=getattr(module, "TOPK", None))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MNIST-1D cache for the whole session, like a user's --data-dir: generated once,
    by the first pytest-xdist worker to ask (the others wait for it, then read it)."""
    from pskd_store.data import build_datasets

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's directory, above each worker's own
    data = shared / "mnist1d-data"
    with open(shared / "mnist1d-data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_datasets("mnist1d", data)  # generates the cache the first time, reads it after
    return data


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_batch(rng: np.random.Generator, labels: np.ndarray, label_key: str, batch_label: str) -> dict:
    """One batch as torchvision reads it (``pickle.load(..., encoding="latin1")``).

    The real files are Python 2 pickles whose byte-string keys (b"data" when read
    with encoding="bytes") decode to str under latin1; str keys are the Python 3 equivalent.
    """
    n = len(labels)
    return {
        "batch_label": batch_label,
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: labels.tolist(),
        "filenames": [f"img_{i:05d}.png" for i in range(n)],
    }


def _trust_written_files(monkeypatch: pytest.MonkeyPatch, cls: type[CIFAR10], root: Path) -> None:
    """Make torchvision's md5 check expect the files just written, for this test only.

    The check itself, the loader and the parser stay torchvision's; only the
    reference checksums (class attributes) are swapped, and monkeypatch restores them.
    """
    from torchvision.datasets.utils import calculate_md5

    folder = root / cls.base_folder

    def md5(name: str) -> str:
        return calculate_md5(folder / name)

    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A finished 2-epoch PS-KD run on the offline default, for tests that read it or copy
    it before damaging it (trained in this process: the commands under test run in their own)."""
    from pskd_store.recipe import TrainConfig
    from pskd_store.training import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig(epochs=2, steps_per_epoch=4, workers=0, data_dir=str(data_dir)).resolved(), run, quiet=True)
    return run


def lengthen_run(run: Path, epochs: int) -> None:
    """A finished run made to look like one of ``epochs`` killed after its last: its
    config.json and its checkpoints' configs both say ``epochs`` (a resumed run trains on as
    its checkpoint did)."""
    import json

    import torch

    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "epochs": epochs}))
    for checkpoint in (run / "checkpoints").glob("*.pt"):
        state = torch.load(checkpoint, weights_only=False)
        state["config"]["epochs"] = epochs
        torch.save(state, checkpoint)


@pytest.fixture
def cifar100_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``cifar-100-python/{train,test,meta}``: 200 random training images, two of each of the
    100 classes, and 20 test images (an evaluation of a few batches)."""
    from torchvision.datasets import CIFAR100

    rng = np.random.default_rng(0)
    folder = tmp_path / CIFAR100.base_folder
    folder.mkdir()
    for name, n in (("train", 200), ("test", 20)):
        fine = rng.permutation(np.arange(n) % 100)
        batch = _cifar_batch(rng, fine, "fine_labels", f"{name}ing batch 1 of 1")
        batch["coarse_labels"] = (fine // 5).tolist()
        _dump(folder / name, batch)
    _dump(folder / "meta", {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    })
    _trust_written_files(monkeypatch, CIFAR100, tmp_path)
    return tmp_path


@pytest.fixture
def cifar10_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``cifar-10-batches-py/``: five 20-image training batches and a 20-image test batch."""
    from torchvision.datasets import CIFAR10

    rng = np.random.default_rng(1)
    folder = tmp_path / CIFAR10.base_folder
    folder.mkdir()
    for i in range(1, 6):
        labels = rng.permutation(np.arange(20) % 10)
        _dump(folder / f"data_batch_{i}", _cifar_batch(rng, labels, "labels", f"training batch {i} of 5"))
    labels = rng.permutation(np.arange(20) % 10)
    _dump(folder / "test_batch", _cifar_batch(rng, labels, "labels", "testing batch 1 of 1"))
    _dump(folder / "batches.meta", {
        "num_cases_per_batch": 20,
        "label_names": [f"class_{i}" for i in range(10)],
        "num_vis": 3072,
    })
    _trust_written_files(monkeypatch, CIFAR10, tmp_path)
    return tmp_path


@pytest.fixture
def imagefolder_dir(tmp_path: Path) -> Path:
    """``train/<class>/*.png`` (4 per class) and ``val/<class>/*.png`` (2 per class), 3 classes."""
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, per_class in (("train", 4), ("val", 2)):
        for cls in ("ant", "bee", "cat"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(36, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """A gzipped idx file, the format of MNIST and Fashion-MNIST: magic 0x0801 (labels) or
    0x0803 (images) for unsigned bytes, then each dimension, big-endian."""
    header = struct.pack(">I", 0x800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture
def fashion_mnist_gz(tmp_path: Path) -> Path:
    """The four gzipped idx files as Debian's dataset-fashion-mnist installs them: 120 train
    / 40 test random 28x28 images, every class present."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "fashion-mnist-system-copy"
    folder.mkdir()
    for prefix, n in (("train", 120), ("t10k", 40)):
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.permutation(np.arange(n) % 10))
    return folder
