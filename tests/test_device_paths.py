"""The paths that run only on an accelerator, run on the CPU through a stand-in.

``stand_in_accelerator.StandInAccelerator`` registered for the "cpu" device type makes CPU
tensors take every accelerator path: the writer's rows made on the device, copies that
land late on a "stream", events that wait for them, the process's device, the device's
random generator, the process group joined through the accelerator. Each test compares
what the device path stores or restores with what the host path does.
"""

from __future__ import annotations

import random
import socket
import threading
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import lengthen_run
from store_helpers import make_labels

from pskd_store import training
from pskd_store.accelerator import ACCELERATORS, accelerator_for
from pskd_store.checkpoint import rng_state, set_rng_state
from pskd_store.distributed import setup, teardown
from pskd_store.engine import autocast, train_one_epoch
from pskd_store.evaluation import evaluate_checkpoints
from pskd_store.recipe import TrainConfig
from pskd_store.store import SoftTargetStore, StoreError
from pskd_store.training import train

N, K = 300, 7


@contextmanager
def on_the_host():
    """The plain CPU paths, for comparison, while the stand-in waits aside."""
    stand_in = ACCELERATORS.pop("cpu")
    try:
        yield
    finally:
        ACCELERATORS["cpu"] = stand_in


def _write(store: SoftTargetStore, batches: list[tuple[torch.Tensor, torch.Tensor]], **writer_options) -> None:
    with store.writer(1, **writer_options) as writer:
        for ids, outputs in batches:
            writer.write(ids, outputs)
    store.seal(1)


def _batches(outputs: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(outputs), generator=torch.Generator().manual_seed(1))
    bounds = np.cumsum([0, *sizes])
    return [(order[lo:hi], outputs[order[lo:hi]]) for lo, hi in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("dtype, topk", [("float16", None), ("float32", None), ("float16", 3)])
@pytest.mark.slow
def test_rows_made_on_the_device_are_the_rows_made_on_the_host(tmp_path, device, dtype, topk):
    """The same logits through both paths, in batches that straddle chunks of 32 rows:
    the sealed epochs are equal, bit for bit. Copies land late, so a writer that read a
    buffer before its event would store zeros or another chunk's rows."""
    labels = make_labels(N, K)
    logits = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 3
    batches = _batches(logits, [20, 30, 14, 36, 1, 99, 100])

    def stored(path: str) -> np.ndarray:
        store = SoftTargetStore.create(tmp_path / path, labels, K, dtype=dtype, topk=topk, chunk_rows=32)
        _write(store, batches)
        return store.read_epoch(1)

    with on_the_host():
        on_host = stored("host")
    on_device = stored("device")
    # rows and ids of each write into a buffer: the 7 writes fall into 15 pieces of chunks
    # (20 | 12+18 | 14 | 32+4 | 1 | 27+32+32+8 | 24+32+32+12); and the first write's check
    # that the logits do not look like probabilities
    assert device.copies == 2 * 15 + 1
    np.testing.assert_array_equal(on_device, on_host)
    # the writer's thread, which waits for the copies' events, on the outputs' device (CUDA's
    # current device is a thread's: waiting from device 0 would make a context there)
    assert device.devices == [logits.device] and device.threads_setting_devices == ["pskd-writer-1"]


def test_an_empty_write_is_a_no_op_on_every_path(tmp_path, device):
    """A batch whose rows were all mixed records nothing: on an accelerator a reduction of
    zero rows would raise, so nothing of it may reach the device work."""
    labels = make_labels(N, K)
    logits = torch.randn(N, K)
    for path in ("device", "host"):
        with on_the_host() if path == "host" else nullcontext():
            store = SoftTargetStore.create(tmp_path / path, labels, K, dtype="float32")
            copies = device.copies
            with store.writer(1) as writer:
                writer.write(torch.arange(0), logits[:0])
                assert device.copies == copies
                writer.write(torch.arange(N), logits)
                assert device.copies > copies or path == "host"
                copies = device.copies
                writer.write(torch.arange(N)[:0], logits[:0])
                assert device.copies == copies
            store.seal(1)
        np.testing.assert_allclose(store.read_epoch(1), logits.softmax(1).numpy(), atol=1e-6)
        assert store.epoch_info(1)["rows_written"] == N


def test_the_device_path_checks_probability_rows_without_a_sync(tmp_path, device):
    """from_logits=False rows are checked on the device; the flag lands with the rows and
    the background thread refuses them, and logits that look like probabilities."""
    labels = make_labels(N, K)
    store = SoftTargetStore.create(tmp_path / "store", labels, K)
    writer = store.writer(1, from_logits=False)
    good = torch.softmax(torch.randn(N, K), 1)
    writer.write(torch.arange(100), good[:100])
    bad = good[100:200].clone()
    bad[5, 0] += 0.5
    writer.write(torch.arange(100, 200), bad)
    with pytest.raises(StoreError, match="from_logits=False takes probability rows"):
        writer.close()

    second = SoftTargetStore.create(tmp_path / "second", labels, K)
    writer = second.writer(1)
    writer.write(torch.arange(N), good)
    with pytest.raises(StoreError, match="look like probabilities"):
        writer.close()


def test_a_token_writer_waits_for_the_whole_device_before_it_reads_its_counts(tmp_path, device):
    """Each sample's count of targets is written where the logits are, on whichever stream
    was current at that write (a side stream, say); close() reads the counts once an epoch,
    after waiting for the device, not only for the stream current at close."""
    from pskd_store.sequences import token_labels

    tokens, lengths = token_labels([np.array([1, 2, 3]), np.array([4, 5])])
    store = SoftTargetStore.create(tmp_path / "store", tokens, 8, lengths=lengths)
    writer = store.writer(1)
    writer.write(torch.arange(2), torch.randn(2, 4, 8), torch.tensor([[1, 2, 3, -100], [4, 5, -100, -100]]))
    waited = device.synchronizations
    writer.close()
    assert device.synchronizations == waited + 1
    store.seal(1)
    assert store.sealed_epochs == [1]


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_a_run_on_the_accelerator_paths_equals_a_cpu_run(tmp_path, data_dir, device, monkeypatch):
    """The training loop with every accelerator path taken (the device set, pinned
    loaders, rows made on the device and copied late, the device generator checkpointed)
    trains, records and reports exactly what the CPU run does."""
    config = TrainConfig(epochs=2, steps_per_epoch=8, aug="cutout", data_dir=str(data_dir)).resolved()
    trained_in = []  # the precision of float32 convolutions as each epoch trains: not cuDNN's default TF32
    monkeypatch.setattr(training, "train_one_epoch", lambda *args, **kwargs: (
        trained_in.append(torch.backends.cudnn.allow_tf32), train_one_epoch(*args, **kwargs))[1])
    train(config, tmp_path / "device", quiet=True)
    monkeypatch.undo()
    assert trained_in == [False, False] and torch.backends.cudnn.conv.fp32_precision == "tf32"  # put back
    assert device.devices == [torch.device("cpu", 0)] and device.copies > 0  # set with its index
    device_state = torch.load(tmp_path / "device" / "checkpoints" / "last.pt", weights_only=False)["rng"][0]["cpu"]
    assert torch.equal(device_state, device.generator.get_state())
    with on_the_host():
        train(config, tmp_path / "host", quiet=True)
    for run in ("device", "host"):
        assert (tmp_path / run / "metrics.jsonl").is_file()
    strip = [{k: v for k, v in row.items() if k not in ("epoch_seconds", "train")}
             for row in _rows(tmp_path / "device")]
    assert strip == [{k: v for k, v in row.items() if k not in ("epoch_seconds", "train")}
                     for row in _rows(tmp_path / "host")]
    stores = [SoftTargetStore.open(tmp_path / run / "store", read_only=True) for run in ("device", "host")]
    for epoch in (1, 2):
        np.testing.assert_array_equal(stores[0].read_epoch(epoch), stores[1].read_epoch(epoch))
    # eval makes its device the current one too (else the loader's pin thread runs on device 0)
    metrics, _ = evaluate_checkpoints([tmp_path / "device" / "checkpoints" / "last.pt"], device="cpu")
    assert device.devices[-1] == torch.device("cpu", 0) and len(device.devices) == 2
    assert metrics == strip[-1]["test"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_a_resume_on_an_accelerator_says_when_tf32_changes(tmp_path, data_dir, device, caplog):
    """TF32 exists on an accelerator: a resume there that changes --tf32 says that the epochs
    after it compute otherwise, and so does one of a run made before --tf32 (whose config
    lacks it), which trained with cuDNN's TF32 convolutions and resumes in full float32."""
    config = TrainConfig(epochs=1, steps_per_epoch=2, data_dir=str(data_dir)).resolved()
    run = tmp_path / "run"
    train(config, run, quiet=True)
    for epochs, change in ((2, {"tf32": True}), (3, "no tf32 in its config")):
        lengthen_run(run, epochs)
        if change == "no tf32 in its config":
            for checkpoint in (run / "checkpoints").glob("*.pt"):
                state = torch.load(checkpoint, weights_only=False)
                del state["config"]["tf32"]
                torch.save(state, checkpoint)
        resumed = TrainConfig(**{**config.__dict__, "epochs": epochs, **(change if isinstance(change, dict) else {})})
        caplog.clear()
        train(resumed, run, resume=True, quiet=True)
        said = [record.getMessage() for record in caplog.records if "compute otherwise" in record.getMessage()]
        before = "tf32=False" if isinstance(change, dict) else \
            "TF32 convolutions and float32 matrix products, made before --tf32"
        assert said == [f"resuming with tf32={resumed.tf32} (trained with {before}; on GPUs with TF32, Ampere and "
                        "later): the epochs from here compute otherwise than those before"]


def test_a_writer_thread_that_cannot_take_the_device_fails_the_writer(tmp_path, device, monkeypatch):
    """The writer's thread sets the outputs' device before it writes: where that fails, the
    error reaches the training thread, as a write's does, instead of leaving write() waiting
    for buffers that thread never gives back."""
    def unavailable(chosen):
        raise RuntimeError(f"{chosen} is unavailable")

    monkeypatch.setattr(device, "set_device", unavailable)
    store = SoftTargetStore.create(tmp_path / "store", make_labels(N, K), K, chunk_rows=32)
    failed = []

    def write_and_close() -> None:
        writer = store.writer(1, buffers=2)
        try:
            for ids, outputs in _batches(torch.randn(N, K), [100, 100, 100]):
                writer.write(ids, outputs)
            writer.close()
        except StoreError as err:
            failed.append(str(err))

    training = threading.Thread(target=write_and_close, daemon=True)
    training.start()
    training.join(60)
    assert not training.is_alive(), "write() waits for buffers the writer's thread never gives back"
    assert failed == ["the prediction writer of epoch 1 failed: cpu is unavailable"]


def _rows(run) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_device_generator_is_checkpointed_and_restored(device):
    cpu = torch.device("cpu")
    device.generator.manual_seed(5)
    state = rng_state(cpu)
    expected = torch.rand(4, generator=device.generator)
    torch.rand(100, generator=device.generator)
    set_rng_state(state, cpu)
    assert torch.equal(torch.rand(4, generator=device.generator), expected)
    with on_the_host():
        assert "cpu" not in rng_state(cpu)  # host memory: no device generator to keep


def test_the_host_generators_are_checkpointed_and_restored(torch_state_kept):
    """What CutMix's coin, dropout and ShakeDrop draw from (the process's own streams): a
    resumed run draws on where the checkpoint left them."""
    def draws() -> tuple:
        return torch.rand(4).tolist(), random.random(), np.random.rand()

    state = rng_state(torch.device("cpu"))
    expected = draws()
    draws()
    set_rng_state(state, torch.device("cpu"))
    assert draws() == expected


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_setup_sets_the_device_and_joins_the_group_through_the_accelerator(device, monkeypatch):
    _, chosen = setup("cpu", timedelta(seconds=30))  # one process: only the device
    # named with its index: torch.cuda.set_device refuses "cuda" alone (every train() on a GPU did)
    assert chosen == torch.device("cpu", 0) and device.devices == [chosen] and not dist.is_initialized()
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    try:
        env, chosen = setup("cpu", timedelta(seconds=30))
        assert chosen == torch.device("cpu", 0) and device.devices[-1] == chosen  # the device of LOCAL_RANK
        assert device.process_groups == [(chosen, timedelta(seconds=30))] and dist.get_backend() == "gloo"
        assert (env.rank, env.world_size, env.local_world_size, env.spans_nodes) == (0, 1, 1, False)
    finally:
        teardown()


def test_amp_runs_the_model_in_bfloat16_and_the_writer_upcasts(tmp_path):
    model = torch.nn.Linear(8, K)
    inputs = torch.randn(N, 8)
    with autocast(torch.device("cpu"), True):
        logits = model(inputs)
    assert logits.dtype == torch.bfloat16
    with autocast(torch.device("cpu"), False):
        assert model(inputs).dtype == torch.float32
    store = SoftTargetStore.create(tmp_path / "store", make_labels(N, K), K, dtype="float32")
    with store.writer(1) as writer:
        writer.write(torch.arange(N), logits)
    store.seal(1)
    np.testing.assert_array_equal(store.read_epoch(1), logits.detach().float().softmax(1).numpy())


def test_only_the_cuda_device_type_is_an_accelerator_by_default():
    assert accelerator_for("cpu") is None and accelerator_for(torch.device("cuda", 1)) is ACCELERATORS["cuda"]


def test_the_cuda_accelerator_has_no_generator_state_while_cuda_is_unused():
    """Checkpointing on a machine where CUDA was never initialised must not initialise it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    assert ACCELERATORS["cuda"].rng_state() is None
