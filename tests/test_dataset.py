"""SoftTargetDataset and the prediction service, with real DataLoader worker processes."""

from __future__ import annotations

import io
import multiprocessing as mp
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from store_helpers import epoch_probs, write_epoch
from torch.utils.data import DataLoader, TensorDataset

from pskd_store.dataset import SoftTargetDataset, collate_soft_targets
from pskd_store.service import PredictionService
from pskd_store.store import EpochNotSealedError, SoftTargetStore, StoreError

N, K, T, ALPHA_T = 96, 5, 3, 0.8
LABEL_SEED, CHUNK_ROWS = 3, 16


def base_dataset(labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.arange(len(labels), dtype=torch.float32)[:, None], torch.as_tensor(labels))


def expected_target(epoch: int, index: int, label: int) -> np.ndarray:
    """Eq. 6 written out by hand: (1 - a_t)·onehot + a_t·p_{t-1}, a_t = alpha_T·t/T."""
    onehot = np.zeros(K)
    onehot[label] = 1.0
    if epoch == 1:
        return onehot
    a = ALPHA_T * epoch / T
    past = epoch_probs(epoch - 1, N, K)[index].astype(np.float16).astype(np.float64)
    return (1 - a) * onehot + a * past


def test_blended_target_matches_eq6(store, labels):
    data = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    for epoch in (1, 2, 3):
        data.set_epoch(epoch)
        for index in (0, 17, N - 1):
            x, target, label, idx = data[index]
            assert idx == index and int(label) == labels[index] and x.item() == index
            assert target.dtype == torch.float32 and target.shape == (K,)
            np.testing.assert_allclose(target.numpy(), expected_target(epoch, index, labels[index]), atol=1e-6)
            assert target.sum().item() == pytest.approx(1.0, abs=2e-3)
        write_epoch(store, epoch)


def test_the_main_process_blends_each_epoch_once_into_the_same_targets_bit_for_bit(store, labels, monkeypatch):
    """Its table of every sample's target gives each batch what the per-batch blend (a
    worker's, or a table too large to keep) gives, bit for bit, epoch after epoch."""
    tabled = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    per_batch = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    per_batch.TABLE_BYTES = N * K * 4 - 1  # one byte short of this data set's table
    ids = [7, 0, 95, 7, 40]
    for epoch in (1, 2, 3):
        for data in (tabled, per_batch):
            data.set_epoch(epoch)
        targets = tabled.__getitems__(ids).targets
        assert torch.equal(targets, per_batch.__getitems__(ids).targets)
        assert (tabled._table is None) == (epoch == 1) and per_batch._table is None  # epoch 1: one-hot
        if epoch > 1:
            np.testing.assert_allclose(targets.numpy(), [expected_target(epoch, i, labels[i]) for i in ids], atol=1e-6)
            assert tabled._table[0][:2] == (epoch, epoch - 1)  # blended for this epoch, from the one before
            tabled.__getitems__(ids).targets[0] = 0  # each batch's targets are its own
            assert tabled.__getitems__(ids).targets[0].sum() == pytest.approx(1.0, abs=2e-3)
        write_epoch(store, epoch)
    assert pickle.loads(pickle.dumps(tabled))._table is None  # not sent to a worker
    in_a_worker = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    in_a_worker.set_epoch(3)
    monkeypatch.setattr("pskd_store.dataset.get_worker_info", lambda: object())
    assert torch.equal(in_a_worker.__getitems__(ids).targets, targets)
    assert in_a_worker._table is None  # a worker blends its own batches


@pytest.mark.parametrize("own_store_object", [False, True])
def test_the_main_process_blends_again_after_the_teacher_epoch_is_sealed_anew(store, labels, own_store_object):
    """Same epoch, same teacher epoch, another seal of it: the table is made again, also when
    the data set reads the store through a store object of its own, which the loop's seal
    did not update (the decode of the first seal, cached under its token, is not served)."""
    data = SoftTargetDataset(base_dataset(labels), SoftTargetStore.open(store.url) if own_store_object else store,
                             ALPHA_T, T)
    for epoch in (1, 2):
        data.set_epoch(epoch)
        write_epoch(store, epoch)
    data.set_epoch(3)
    before = data.__getitems__([0, 1]).targets
    store.rollback(1)
    data.set_epoch(2)
    with store.writer(2, from_logits=False) as writer:
        writer.write(torch.arange(N), torch.full((N, K), 1.0 / K))
    store.seal(2)
    data.set_epoch(3)
    after = data.__getitems__([0, 1]).targets
    uniform = np.stack([(1 - ALPHA_T) * np.eye(K)[labels[i]] + ALPHA_T * float(np.float16(1 / K)) for i in (0, 1)])
    np.testing.assert_allclose(after.numpy(), uniform, atol=1e-6)
    assert not torch.equal(before, after)


def test_the_main_process_blends_again_when_the_loop_changes_alpha_mid_epoch(store, labels):
    """A loop that sets ``alpha_T`` (or ``total_epochs``) between batches gets targets of
    the new a_t at its next batch, as the per-batch blend gives them, not the epoch's table."""
    data = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    per_batch = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    per_batch.TABLE_BYTES = 0
    for epoch in (1, 2, 3):
        data.set_epoch(epoch)
        per_batch.set_epoch(epoch)
        if epoch < 3:
            write_epoch(store, epoch)
    ids = [0, 5, 95]
    before = data.__getitems__(ids).targets
    for name, value in (("alpha_T", 0.3), ("total_epochs", 2 * T)):
        setattr(data, name, value)
        setattr(per_batch, name, value)
        changed = data.__getitems__(ids).targets
        assert torch.equal(changed, per_batch.__getitems__(ids).targets)
        assert not torch.equal(changed, before)
        before = changed
    a = 0.3 * 3 / (2 * T)
    expected = [(1 - a) * np.eye(K)[labels[i]] + a * epoch_probs(2, N, K)[i].astype(np.float16).astype(np.float64)
                for i in ids]
    np.testing.assert_allclose(before.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.slow
def test_persistent_workers_follow_the_teacher_epoch(store, labels, start_method):
    """2 persistent workers, started in epoch 1, must use epoch t-1's predictions in epoch t."""
    data = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    loader = DataLoader(
        data, batch_size=8, shuffle=True, num_workers=2, persistent_workers=True,
        multiprocessing_context=mp.get_context(start_method),
    )
    for epoch in (1, 2, 3):
        data.set_epoch(epoch)
        seen = 0
        for _, target, label, index in loader:
            expected = np.stack([expected_target(epoch, int(i), int(y)) for i, y in zip(index, label)])
            np.testing.assert_allclose(target.numpy(), expected, atol=1e-6)
            seen += len(index)
        assert seen == N
        write_epoch(store, epoch)
    data.alpha_T, data.total_epochs = 0.3, 2 * T  # set in the main process: the workers' next batches follow
    data.set_epoch(4)
    a = 0.3 * 4 / (2 * T)
    for _, target, label, index in loader:
        expected = [(1 - a) * np.eye(K)[int(y)] + a * epoch_probs(3, N, K)[int(i)].astype(np.float16).astype(float)
                    for i, y in zip(index, label)]
        np.testing.assert_allclose(target.numpy(), np.stack(expected), atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_hands_on_the_batch_the_items_make(store, labels, workers):
    """collate_soft_targets passes the targets, labels and ids __getitems__ made as they are:
    the batch equals default collation of the items one by one, in the loader's order."""
    data = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    data.set_epoch(1)
    write_epoch(store, 1)
    data.set_epoch(2)
    loader = DataLoader(data, batch_size=8, sampler=torch.randperm(N, generator=torch.Generator().manual_seed(0)),
                        num_workers=workers, collate_fn=collate_soft_targets)
    seen = 0
    for batch in loader:
        assert type(batch) is tuple
        inputs, targets, batch_labels, ids = batch
        expected = torch.utils.data.default_collate([data[int(i)] for i in ids])
        for got, want in zip((inputs, targets, batch_labels, ids), expected):
            assert torch.equal(got, want) and got.dtype == want.dtype
        assert torch.equal(inputs[:, 0].long(), ids)  # each input is its own id: rows stay with their ids
        # from a worker the inputs come through shared memory, the small rest by value (batch_transfer.py)
        assert inputs.untyped_storage().is_shared() == bool(workers)
        assert not any(t.untyped_storage().is_shared() for t in (targets, batch_labels, ids))
        torch.save(batch, io.BytesIO())  # a batch from a worker is saved like any other
        seen += len(ids)
    assert seen == N
    assert collate_soft_targets([(torch.zeros(2), 1), (torch.ones(2), 0)])[1].tolist() == [1, 0]  # any other batch


def _mapped_in_child(service: PredictionService, token: str, ids: list[int]) -> tuple[list, bool, bool]:
    rows = service.lookup(2, token, np.asarray(ids)).tolist()
    view = service.view(2, token)
    maps = Path("/proc/self/maps").read_text()
    return rows, isinstance(view.base, np.memmap) and not view.flags.writeable, str(service.path(2, token)) in maps


@pytest.mark.slow
def test_service_lookup_is_a_shared_memory_map(store):
    for epoch in (1, 2):
        write_epoch(store, epoch)
    service = PredictionService(store)
    token = service.prepare(2)
    ids = [5, 0, 95, 5]
    expected = store.read_epoch(2)[ids].astype(np.float32)
    looked_up = service.lookup(2, token, np.asarray(ids))
    assert looked_up.dtype == torch.float32  # what lookup promises, whatever the store's dtype
    np.testing.assert_array_equal(looked_up.numpy(), expected)
    with mp.get_context("spawn").Pool(1) as pool:  # a fresh process maps the same file
        rows, read_only_map, mapped = pool.apply(_mapped_in_child, (service, token, ids))
    np.testing.assert_array_equal(np.asarray(rows, dtype=np.float32), expected)
    assert read_only_map and mapped


def test_service_never_serves_a_stale_epoch_after_rollback(store):
    for epoch in (1, 2):
        write_epoch(store, epoch)
    service = PredictionService(store)
    old = service.prepare(2)
    np.testing.assert_array_equal(service.lookup(2, old, np.arange(3)).numpy(),  # mapped in this process
                                  store.read_epoch(2)[:3].astype(np.float32))
    store.rollback(1)
    with store.writer(2, from_logits=False) as writer:
        writer.write(torch.arange(N), torch.full((N, K), 1.0 / K))
    store.seal(2)
    new = service.prepare(2)
    assert new != old and not service.path(2, old).exists()
    np.testing.assert_allclose(service.lookup(2, new, np.arange(3)).numpy(), 1.0 / K, atol=1e-3)


def test_set_epoch_needs_the_previous_epoch_sealed(store, labels):
    data = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    data.set_epoch(1)
    write_epoch(store, 1, seal=False)
    with pytest.raises(EpochNotSealedError, match="epoch 1 was never sealed"):
        data.set_epoch(2)


def test_items_before_set_epoch_are_refused(store, labels):
    data = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    with pytest.raises(RuntimeError, match="call set_epoch"):
        data[0]


def test_bad_arguments(store, labels):
    with pytest.raises(StoreError, match="95 samples but the store was made for 96"):
        SoftTargetDataset(base_dataset(labels[:-1]), store, ALPHA_T, T)
    with pytest.raises(ValueError, match=r"alpha_T must lie in \[0, 1\]"):
        SoftTargetDataset(base_dataset(labels), store, 1.5, T)
    data = SoftTargetDataset(base_dataset(labels), store, ALPHA_T, T)
    with pytest.raises(ValueError, match=r"epoch must lie in \[1, total_epochs=3\]"):
        data.set_epoch(4)


class _WithTargets(TensorDataset):
    """A data set that exposes its labels, as torchvision's do (``.targets``)."""

    @property
    def targets(self) -> list[int]:
        return self.tensors[1].tolist()


def test_a_base_data_set_with_other_labels_is_refused(store, labels):
    other = labels.copy()
    other[[7, 40]] = (other[[7, 40]] + 1) % K  # same length, two labels differ
    with pytest.raises(StoreError, match=r"sample 7 of the data set has label .* \(2 of 96 checked samples differ"):
        SoftTargetDataset(_WithTargets(*base_dataset(other).tensors), store, ALPHA_T, T)
    # without a labels attribute the check runs on every batch, in the workers too
    data = SoftTargetDataset(base_dataset(other), store, ALPHA_T, T)
    data.set_epoch(1)
    assert len(data.__getitems__(list(range(7)))) == 7
    with pytest.raises(StoreError, match="sample 40 of the data set"):
        data.__getitems__([39, 40])
    with pytest.raises(StoreError, match="sample 7 of the data set"):
        list(DataLoader(data, batch_size=16, num_workers=1))


@pytest.mark.parametrize("item, what", [
    (lambda x, y: (x, y, "a path"), "a tuple of 3"),
    (lambda x, y: {"x": x, "label": y}, "a dict"),
])
def test_items_that_are_no_input_label_pairs_are_refused_naming_the_fix(store, labels, item, what):
    class Items(torch.utils.data.Dataset):
        targets = labels

        def __len__(self):
            return N

        def __getitem__(self, index):
            return item(torch.zeros(2), int(labels[index]))

    data = SoftTargetDataset(Items(), store, ALPHA_T, T)
    data.set_epoch(1)
    with pytest.raises(TypeError, match=f"item 5 of the wrapped data set is {what}, not an \\(input, label\\) pair"):
        next(iter(DataLoader(data, batch_size=4, sampler=[5, 6, 7, 8])))
    mixed = SoftTargetDataset(TensorDataset(torch.zeros(N, 2), torch.from_numpy(labels)), store, ALPHA_T, T)
    mixed.set_epoch(1)
    mixed.base = type("Mixed", (), {"__getitem__": lambda self, i: mixed_items[i], "__len__": lambda self: N})()
    mixed_items = {i: (torch.zeros(2), int(labels[i])) for i in range(N)} | {7: item(torch.zeros(2), int(labels[7]))}
    with pytest.raises(TypeError, match=f"item 7 of the wrapped data set is {what}"):
        mixed.__getitems__([5, 6, 7, 8])

