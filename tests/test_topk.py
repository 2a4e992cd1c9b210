"""Top-k stores: the k largest probabilities of each row and their classes, packed; every
reader rebuilds the same (B, K) targets, written out here by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import pskd_in_process
from torch.utils.data import DataLoader, TensorDataset

from pskd_store.dataset import SoftTargetDataset
from pskd_store.errors import StoreError
from pskd_store.service import PredictionService
from pskd_store.store import SoftTargetStore
from pskd_store.verify import verify_path

N, K, TOPK, CHUNK_ROWS = 120, 300, 5, 32


def by_hand(probs: np.ndarray, k: int, value_dtype=np.float16) -> np.ndarray:
    """The target a top-k row stands for: its k largest probabilities (stored rounded to
    ``value_dtype``) at their classes, the remaining mass shared by the other K - k classes."""
    out = np.empty_like(probs, dtype=np.float64)
    for i, row in enumerate(probs):
        top = np.argsort(-row, kind="stable")[:k]
        kept = row[top].astype(value_dtype).astype(np.float64)
        out[i] = max(0.0, 1 - kept.astype(np.float32).sum(dtype=np.float32)) / (len(row) - k)
        out[i, top] = kept
    return out


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 4


def test_a_store_says_what_its_rows_hold(store):
    summary = store.summary()
    assert summary["topk"] == TOPK and summary["rows"] == "top-5 float16 with uint16 class ids"
    teacher_bytes = TOPK * (2 + 2)
    assert store.encoding.width == teacher_bytes
    for classes, dtype in ((256, "uint8"), (257, "uint16"), (65536, "uint16"), (65537, "uint32")):
        made = SoftTargetStore.create(Path(store.url).with_name(f"k{classes}"), np.arange(3), classes, topk=2)
        assert str(made.encoding.class_dtype) == dtype


def test_class_ids_beyond_65536_round_trip_through_uint32(tmp_path):
    """A vocabulary-sized K: class ids above uint16's range keep their values."""
    classes = 70_000
    encoding = SoftTargetStore.create(tmp_path / "store", np.arange(3), classes, topk=3).encoding
    probs = torch.zeros(2, classes)
    probs[0, [69_999, 65_536, 3]] = torch.tensor([0.5, 0.3, 0.2])
    probs[1, [1, 66_000, 2]] = torch.tensor([0.6, 0.3, 0.1])
    values, ids = encoding.unpack(encoding.encode(probs).numpy())
    assert ids.dtype == np.uint32 and ids.tolist() == [[69_999, 65_536, 3], [1, 66_000, 2]]
    np.testing.assert_allclose(values, [[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]], atol=1e-3)


def test_rows_rebuild_exactly_as_defined(store, logits, labels):
    with store.writer(1) as writer:
        writer.write(torch.arange(90), logits[:90])  # ids 90.. are never written: one-hot
    store.seal(1)
    teacher = store.read_epoch(1)
    expected = by_hand(logits[:90].softmax(1).numpy(), TOPK)
    np.testing.assert_allclose(teacher[:90], expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(teacher[90:], np.eye(K, dtype=np.float32)[labels[90:]])
    array = zarr.open_array(Path(store.url) / "teacher/epoch_0001", mode="r")
    assert array.shape == (N, TOPK * 4) and array.dtype == np.uint8
    service = PredictionService(store)
    token = service.prepare(1)
    np.testing.assert_array_equal(service.lookup(1, token, np.arange(N)).numpy(), teacher)


@pytest.mark.parametrize("dtype, k", [("float16", 3), ("float32", 2), ("float32", 3)])
def test_a_chunk_of_one_row_whose_values_are_not_aligned_is_written(tmp_path, logits, labels, dtype, k):
    """k values of ``dtype`` then k one-byte class ids (10 classes): a row whose width is no
    multiple of the value's size, so its values are a view NumPy counts contiguous when it
    is one row and torch refuses. 33 rows: one full chunk of 32, then a chunk of one."""
    classes, logits = 10, logits[:, :10]
    store = SoftTargetStore.create(tmp_path / "store", labels % classes, classes, dtype=dtype,
                                   chunk_rows=CHUNK_ROWS, topk=k)
    assert store.encoding.width % np.dtype(dtype).itemsize
    with store.writer(1) as writer:
        writer.write(torch.arange(33), logits[:33])
    store.seal(1)
    expected = by_hand(logits[:33].softmax(1).numpy(), k, np.dtype(dtype))
    np.testing.assert_allclose(store.read_epoch(1)[:33], expected, rtol=0, atol=1e-7)


def test_carried_rows_and_trajectory(store, logits, labels):
    with store.writer(1) as writer:
        writer.write(torch.arange(N), logits)
    store.seal(1)
    with store.writer(2) as writer:
        writer.write(torch.arange(60), -logits[:60])
    store.seal(2)
    np.testing.assert_array_equal(store.read_epoch(2)[60:], store.read_epoch(1)[60:])  # carried, rows intact
    expected = by_hand(logits.softmax(1).numpy(), TOPK)
    trajectory = store.trajectory()
    rows = np.arange(N)
    np.testing.assert_array_equal(trajectory["argmax"][0], expected.argmax(1))
    np.testing.assert_array_equal(trajectory["max_prob"][0], expected.max(1).astype(np.float16))
    np.testing.assert_array_equal(trajectory["true_prob"][0], expected[rows, labels].astype(np.float16))
    assert np.isnan(trajectory["true_prob"][1, 60:]).all() and trajectory["written"][1].sum() == 60
    assert verify_path(store.url).ok


def test_soft_targets_through_dataloader_workers(store, logits, labels):
    with store.writer(1) as writer:
        writer.write(torch.arange(N), logits)
    store.seal(1)
    base = TensorDataset(torch.zeros(N, 1), torch.as_tensor(labels))
    data = SoftTargetDataset(base, store, 0.8, 10)
    data.set_epoch(2)
    past = by_hand(logits.softmax(1).numpy(), TOPK)
    alpha = 0.8 * 2 / 10
    for _, target, label, index in DataLoader(data, batch_size=16, num_workers=2):
        expected = alpha * past[index.numpy()]
        expected[np.arange(len(index)), label.numpy()] += 1 - alpha
        np.testing.assert_allclose(target.numpy(), expected, rtol=0, atol=1e-6)


def test_verify_finds_invalid_top_k_rows(store, logits):
    with store.writer(1) as writer:
        writer.write(torch.arange(N), logits)
    store.seal(1)
    array = zarr.open_array(Path(store.url) / "teacher/epoch_0001", mode="r+")
    values, classes = store.encoding.unpack(array[7:9])
    classes = classes.copy()
    classes[0, 1] = classes[0, 0]  # a class twice
    values = values.copy()
    values[1] = values[1][::-1]    # not largest first
    array[7:9] = store.encoding.pack(values, classes)  # valid checksums: only verify's value check sees it
    findings = [str(f) for f in verify_path(store.url).findings]
    assert findings[0].startswith("teacher of epoch 1: rows 7-8 are not probability vectors (top-5 float16")


def test_bad_topk_is_refused(tmp_path, labels):
    for topk in (0, K, K + 1):
        with pytest.raises(StoreError, match=rf"\(topk\) must lie in \[1, K={K}\)"):
            SoftTargetStore.create(tmp_path / f"bad{topk}", labels, K, topk=topk)


@pytest.mark.slow
def test_train_with_store_topk_end_to_end(tmp_path, data_dir):
    run = tmp_path / "run"
    pskd_in_process("train", "--store-topk", "3", "--store-dtype", "float16", "--epochs", "2", "--steps-per-epoch",
                    "4", "--workers", "0", "--data-dir", str(data_dir), "-o", str(run), "-q", check=True)
    assert json.loads((run / "config.json").read_text())["store_topk"] == 3
    store = SoftTargetStore.open(run / "store")
    assert store.topk == 3 and store.dtype == np.float16 and store.sealed_epochs == [1, 2]
    info = pskd_in_process("info", str(run))
    assert "top-3 float16 with uint8 class ids rows" in info.stdout
    assert pskd_in_process("verify", str(run)).returncode == 0
    bad = pskd_in_process("train", "--store-topk", "0", "-o", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "--store-topk must be at least 1" in bad.stderr
