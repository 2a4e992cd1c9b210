"""SoftTargetStore and PredictionWriter on a real Zarr store on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pskd_store.store import EpochNotSealedError, SoftTargetStore, StoreError
from store_helpers import epoch_probs, make_labels, write_epoch

N, K = 300, 7


@pytest.fixture
def labels() -> np.ndarray:
    return make_labels(N, K)


@pytest.fixture
def store(tmp_path, labels) -> SoftTargetStore:
    return SoftTargetStore.create(tmp_path / "store", labels, K, chunk_rows=32)


def test_round_trip_float16_and_float32(tmp_path, labels):
    for dtype, tol in (("float16", 1e-3), ("float32", 0.0)):
        store = SoftTargetStore.create(tmp_path / dtype, labels, K, dtype=dtype, chunk_rows=64)
        probs = write_epoch(store, 1)
        back = SoftTargetStore.open(tmp_path / dtype, labels=labels).read_epoch(1)
        assert back.dtype == np.dtype(dtype) and back.shape == (N, K)
        np.testing.assert_allclose(back, probs, atol=tol, rtol=0)


def test_logits_are_stored_as_softmax(store):
    logits = torch.randn(N, K)
    with store.writer(1) as writer:
        writer.write(torch.arange(N), logits)
    store.seal(1)
    np.testing.assert_allclose(store.read_epoch(1), logits.softmax(1).numpy(), atol=1e-3)


def test_low_precision_logits_are_upcast_before_the_softmax(tmp_path, labels):
    # What --amp hands the writer: bfloat16 logits. The teacher is softmax(fp32(logits)),
    # exactly; a softmax taken in bfloat16 would be off by up to ~4e-3 per probability.
    store = SoftTargetStore.create(tmp_path / "f32", labels, K, dtype="float32")
    logits = (torch.randn(N, K) * 6).bfloat16()
    with store.writer(1) as writer:
        writer.write(torch.arange(N), logits)
    store.seal(1)
    np.testing.assert_array_equal(store.read_epoch(1), logits.float().softmax(1).numpy())
    assert not np.array_equal(store.read_epoch(1), logits.softmax(1).float().numpy())


def test_layout_attributes_and_compression(store, labels):
    write_epoch(store, 1)
    root = json.loads((Path(store.url) / "zarr.json").read_text())["attributes"]["pskd_store"]
    assert root["num_samples"] == N and root["num_classes"] == K and root["dtype"] == "float16"
    assert root["sealed"] == [1] and root["fingerprint"]["num_samples"] == N
    teacher = json.loads((Path(store.url) / "teacher/epoch_0001/zarr.json").read_text())
    assert teacher["shape"] == [N, K] and teacher["chunk_grid"]["configuration"]["chunk_shape"] == [32, K]
    assert [c["name"] for c in teacher["codecs"]][-1] == "blosc"
    np.testing.assert_array_equal(store.labels, labels)


def test_trajectory_tier_records_every_epoch(store, labels):
    probs = {e: write_epoch(store, e) for e in (1, 2, 3)}
    traj = store.trajectory()
    assert traj["epochs"].tolist() == [1, 2, 3]
    rows = np.arange(N)
    for i, e in enumerate((1, 2, 3)):
        p16 = probs[e].astype(np.float16)
        np.testing.assert_allclose(traj["true_prob"][i], p16[rows, labels], atol=1e-3)
        np.testing.assert_allclose(traj["max_prob"][i], p16.max(1), atol=1e-3)
        np.testing.assert_array_equal(traj["argmax"][i], p16.argmax(1))


def test_retention_prunes_teachers_but_keeps_trajectories(tmp_path, labels):
    store = SoftTargetStore.create(tmp_path / "s", labels, K, keep_epochs=2, chunk_rows=64)
    for e in (1, 2, 3, 4):
        write_epoch(store, e)
    assert store.sealed_epochs == [1, 2, 3, 4] and store.teacher_epochs == [3, 4]
    assert sorted(os.listdir(tmp_path / "s" / "teacher")) == ["epoch_0003", "epoch_0004", "zarr.json"]
    assert store.trajectory()["true_prob"].shape == (4, N)
    with pytest.raises(EpochNotSealedError, match="pruned"):
        store.read_epoch(2)


def test_duplicate_ids_keep_the_last_write(store):
    first = np.full((N, K), 1.0 / K, dtype=np.float32)
    second = epoch_probs(9, N, K)
    with store.writer(1, from_logits=False) as writer:
        writer.write(torch.arange(N), torch.from_numpy(first))
        writer.write(torch.arange(10), torch.from_numpy(second[:10]))  # padded ids, as DistributedSampler does
    info = store.seal(1)
    assert info["duplicates"] == 10 and info["ids_written"] == N
    back = store.read_epoch(1)
    np.testing.assert_allclose(back[:10], second[:10], atol=1e-3)
    np.testing.assert_allclose(back[10:], first[10:], atol=1e-3)


def test_unwritten_ids_carry_forward_or_get_one_hot(store, labels):
    # epoch 1 skips ids 0-9 (never predicted: one-hot); epoch 2 skips 5-14 (drop_last)
    p1 = write_epoch(store, 1, ids=np.arange(10, N))
    p2 = write_epoch(store, 2, ids=np.concatenate([np.arange(5), np.arange(15, N)]))
    assert store.epoch_info(1)["carried_forward"] == 10 and store.epoch_info(2)["carried_forward"] == 10
    one_hot = np.eye(K, dtype=np.float32)[labels]
    e1, e2 = store.read_epoch(1), store.read_epoch(2)
    np.testing.assert_array_equal(e1[:10], one_hot[:10])
    np.testing.assert_allclose(e2[5:10], one_hot[5:10])          # never predicted yet
    np.testing.assert_allclose(e2[10:15], p1[10:15], atol=1e-3)  # carried from epoch 1
    np.testing.assert_allclose(e2[:5], p2[:5], atol=1e-3)
    np.testing.assert_allclose(e2[15:], p2[15:], atol=1e-3)


def test_several_writer_processes_fill_one_epoch(store, labels):
    """Two real processes write interleaved (disjoint) ids of one epoch at the same time."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pskd_store.store import SoftTargetStore
        from store_helpers import epoch_probs
        rank = int(sys.argv[1])
        store = SoftTargetStore.open({store.url!r})
        probs = epoch_probs(1, store.num_samples, store.num_classes)
        ids = np.random.default_rng(5).permutation(store.num_samples)[rank::2]
        with store.writer(1, rank=rank, from_logits=False) as writer:
            for s in range(0, len(ids), 8):
                writer.write(torch.from_numpy(ids[s:s + 8]), torch.from_numpy(probs[ids[s:s + 8]]))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank)]) for rank in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    info = store.seal(1)
    assert info["ids_written"] == N and info["duplicates"] == 0 and info["carried_forward"] == 0
    np.testing.assert_allclose(store.read_epoch(1), epoch_probs(1, N, K), atol=1e-3)


def test_crash_before_seal_leaves_last_sealed_epoch_intact(store, labels):
    write_epoch(store, 1)
    write_epoch(store, 2)
    before = store.read_epoch(2).copy()
    script = textwrap.dedent(f"""
        import sys, time, numpy as np, torch
        from pskd_store.store import SoftTargetStore
        store = SoftTargetStore.open({store.url!r})
        writer = store.writer(3)
        for step in range(10**6):
            ids = torch.arange(step * 10, step * 10 + 10) % store.num_samples
            writer.write(ids, torch.randn(10, store.num_classes))
            if step == 40:
                print("writing", flush=True)
            time.sleep(0.001)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (Path(store.url) / "staging" / "epoch_0003").exists()  # it did write rows

    reopened = SoftTargetStore.open(store.url, labels=labels)
    assert reopened.sealed_epochs == [1, 2]
    np.testing.assert_array_equal(reopened.read_epoch(2), before)
    with pytest.raises(EpochNotSealedError, match="epoch 3 was never sealed"):
        reopened.read_epoch(3)
    with pytest.raises(StoreError, match="never closed"):
        reopened.seal(3)  # the crashed writer's rows are not sealed by accident
    p3 = write_epoch(reopened, 3)  # rerunning the epoch replaces the crashed rows
    np.testing.assert_allclose(reopened.read_epoch(3), p3, atol=1e-3)


def test_rollback_unseals_later_epochs(store):
    for e in (1, 2, 3):
        write_epoch(store, e)
    assert store.rollback(2) == [3]
    assert store.sealed_epochs == [1, 2]
    p3 = write_epoch(store, 3)
    np.testing.assert_allclose(store.read_epoch(3), p3, atol=1e-3)
    assert store.trajectory()["epochs"].tolist() == [1, 2, 3]


def test_fsspec_url_store(labels):
    url = f"memory://pskd-test-{os.getpid()}-{time.time_ns()}"
    store = SoftTargetStore.create(url, labels, K, chunk_rows=64)
    probs = write_epoch(store, 1)
    np.testing.assert_allclose(SoftTargetStore.open(url, labels=labels).read_epoch(1), probs, atol=1e-3)


# -- bad input: a clear error naming the problem, and nothing sealed is lost -------------------


def test_wrong_number_of_classes(store):
    writer = store.writer(1)
    with pytest.raises(ValueError, match=r"shape \(batch, K=7\)"):
        writer.write(torch.arange(4), torch.randn(4, K + 1))


def test_ids_of_wrong_dtype_or_shape(store):
    writer = store.writer(1)
    with pytest.raises(TypeError, match="ids must be integer dataset indices"):
        writer.write(torch.arange(4).float(), torch.randn(4, K))
    with pytest.raises(ValueError, match=r"ids must have shape \(4,\)"):
        writer.write(torch.arange(3), torch.randn(4, K))


@pytest.mark.parametrize("bad", [[0, 1, N], [-1, 0, 1]])
def test_ids_out_of_range(store, bad):
    write_epoch(store, 1)
    writer = store.writer(2)
    writer.write(torch.tensor(bad), torch.randn(3, K))
    with pytest.raises(ValueError, match=r"ids out of range: \[-?\d+\] not in \[0, N=300\)"):
        writer.close()
    assert store.sealed_epochs == [1] and store.read_epoch(1).shape == (N, K)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_predictions(store, bad):
    logits = torch.randn(4, K)
    logits[1, 2] = bad
    writer = store.writer(1)
    writer.write(torch.arange(4), logits)
    with pytest.raises(ValueError, match="NaN or inf"):
        writer.close()
    with pytest.raises(ValueError, match="NaN or inf"):
        writer.write(torch.arange(4), torch.randn(4, K))  # later calls keep reporting it
    assert store.sealed_epochs == []


def test_writing_a_sealed_epoch_is_refused(store):
    write_epoch(store, 1)
    before = store.read_epoch(1).copy()
    with pytest.raises(StoreError, match="epoch 1 is already sealed"):
        store.writer(1)
    with pytest.raises(StoreError, match="epoch 1 is already sealed"):
        store.seal(1)
    np.testing.assert_array_equal(store.read_epoch(1), before)


def test_reading_an_unsealed_epoch_is_refused(store):
    write_epoch(store, 1)
    write_epoch(store, 2, seal=False)
    with pytest.raises(EpochNotSealedError, match=r"epoch 2 was never sealed .*sealed epochs: \[1\]"):
        store.read_epoch(2)
    with pytest.raises(EpochNotSealedError, match="epoch 5 was never sealed"):
        store.trajectory([5])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda l: l[:-1], "the store holds N=300 samples, the data set has 299"),
        (lambda l: (l + 1) % K, "labels differ"),
    ],
)
def test_store_of_another_data_set_is_refused(store, labels, change, message):
    with pytest.raises(StoreError, match=message):
        SoftTargetStore.open(store.url, labels=change(labels.copy()))


def test_store_with_other_number_of_classes_is_refused(store, labels):
    with pytest.raises(StoreError, match="K=7 classes, the data set has 8"):
        SoftTargetStore.open(store.url, labels=labels, num_classes=K + 1)


def test_read_only_store_refuses_writes(store):
    write_epoch(store, 1)
    ro = SoftTargetStore.open(store.url, read_only=True)
    assert ro.read_epoch(1).shape == (N, K)
    with pytest.raises(StoreError, match="opened read-only"):
        ro.writer(2)
    with pytest.raises(StoreError, match="opened read-only"):
        ro.seal(2)


def test_missing_store_path(tmp_path):
    with pytest.raises(StoreError, match=r"no pskd-store at .*missing.*create one"):
        SoftTargetStore.open(tmp_path / "missing")


def test_create_over_existing_store_is_refused(store, labels):
    write_epoch(store, 1)
    with pytest.raises(StoreError, match="already exists"):
        SoftTargetStore.create(store.url, labels, K)
    assert SoftTargetStore.open(store.url).sealed_epochs == [1]


def test_bad_labels_at_create(tmp_path):
    with pytest.raises(StoreError, match=r"labels must lie in \[0, num_classes=3\)"):
        SoftTargetStore.create(tmp_path / "s", np.array([0, 1, 5]), 3)
