"""Sequence stores: a row per (sample, target position), written from (B, L, V) logits,
served as each position's stored teacher, and PS-KD's loss rebuilt from it on the device."""

from __future__ import annotations

import gzip
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import benchmark_script, pskd_in_process
from torch.utils.data import DataLoader

from pskd_store.analysis import correct_epochs
from pskd_store.dataset import collate_soft_targets
from pskd_store.errors import StoreDamagedError
from pskd_store.loss import soft_target, token_soft_cross_entropy
from pskd_store.row_encoding import row_encoding
from pskd_store.sequences import IGNORE_INDEX, TokenRows, token_labels
from pskd_store.service import PredictionService
from pskd_store.store import SoftTargetStore, StoreError
from pskd_store.token_dataset import TokenTargetDataset
from pskd_store.token_writer import TokenWriter
from pskd_store.trajectory import pack_records, unpack_records
from pskd_store.verify import verify_store

S, L, V = 24, 12, 50  # sequences, positions per padded sequence, vocabulary
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "sequence_pskd.py"


def padded_labels(seed: int = 0) -> np.ndarray:
    """(S, L) labels with the targets at scattered positions (a prompt, padding, gaps) and
    every count from 0 to L present, as real data has."""
    rng = np.random.default_rng(seed)
    labels = np.full((S, L), IGNORE_INDEX)
    for i in range(S):
        count = i % (L + 1)
        positions = np.sort(rng.choice(L, count, replace=False))
        labels[i, positions] = rng.integers(0, V, count)
    return labels


class Sequences(torch.utils.data.Dataset):
    """(input ids, labels) of each padded sequence: what a language-model data set returns."""

    def __init__(self, labels: np.ndarray):
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.labels[i].clamp(min=0), self.labels[i]


def sequence_store(tmp_path, labels: np.ndarray, topk: int | None, name: str = "store") -> SoftTargetStore:
    return sequence_rows_store_on(tmp_path / name, labels, topk)


def sequence_rows_store_on(url, labels: np.ndarray, topk: int | None = 4) -> SoftTargetStore:
    """A sequence store at ``url`` (a path or an s3:// URL) for padded ``labels``."""
    tokens, lengths = token_labels(labels)
    return SoftTargetStore.create(url, tokens, V, topk=topk, lengths=lengths)


def write_tokens(store: SoftTargetStore, epoch: int, logits: torch.Tensor, labels: np.ndarray,
                 ids: np.ndarray | None = None, seed: int = 0) -> None:
    """Write the logits of ``ids`` (default: all, shuffled) in three batches; seal."""
    ids = np.random.default_rng(seed).permutation(len(labels)) if ids is None else ids
    with store.writer(epoch) as writer:
        for batch in np.array_split(ids, 3):
            writer.write(torch.from_numpy(batch), logits[batch], torch.from_numpy(labels[batch]))
    store.seal(epoch)


def expected_rows(logits: torch.Tensor, labels: np.ndarray, topk: int | None) -> np.ndarray:
    """The store's rows made by hand: sample by sample, its target positions in order,
    each the encoded softmax of its logits."""
    encoding = row_encoding(V, "float16", topk)
    rows = [encoding.encode(logits[i, j].float().softmax(dim=0)[None]).numpy()
            for i in range(len(labels)) for j in np.flatnonzero(labels[i] != IGNORE_INDEX)]
    return np.concatenate(rows)


def test_token_rows_put_each_samples_positions_in_order():
    token_rows = TokenRows(np.array([3, 0, 2, 4]))
    assert token_rows.offsets.tolist() == [0, 3, 3, 5, 9] and token_rows.num_rows == 9
    assert token_rows.rows(np.array([2, 0, 1, 3])).tolist() == [3, 4, 0, 1, 2, 5, 6, 7, 8]
    assert token_rows.sample_of(np.arange(9)).tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3]
    tokens, lengths = token_labels([np.array([5, -100, 7]), np.array([-100]), np.array([1, 2])])
    assert tokens.tolist() == [5, 7, 1, 2] and lengths.tolist() == [2, 0, 2]


@pytest.mark.parametrize("topk", [None, 4])
def test_written_tokens_are_the_rows_of_their_target_positions_and_padding_is_never_stored(tmp_path, topk):
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, topk)
    logits = torch.randn(S, L, V, generator=torch.Generator().manual_seed(0)) * 3
    write_tokens(store, 1, logits, labels)
    assert store.num_samples == int((labels != IGNORE_INDEX).sum())  # rows of target positions only
    assert store.epoch_info(1)["carried_forward"] == 0
    stored = store.teacher_array(1)[:]
    np.testing.assert_array_equal(stored, expected_rows(logits, labels, topk))
    assert store.summary()["num_sequences"] == S


def test_a_top_k_writer_buffers_k_wide_rows_not_vocabulary_wide_logits(tmp_path):
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, 4)
    with store.writer(1) as writer:
        writer.write(torch.arange(3), torch.randn(3, L, V), torch.from_numpy(labels[:3]))
        buffered = writer._writer._current.values
        assert buffered.shape == (store.chunk_rows, store.encoding.width) and buffered.dtype == torch.uint8


def test_the_device_path_writes_the_rows_the_host_path_writes(tmp_path, device):
    """Top-k rows made where the logits live, copied through the stand-in's late copies."""
    labels = padded_labels()
    logits = torch.randn(S, L, V, generator=torch.Generator().manual_seed(1)) * 3
    store = sequence_store(tmp_path, labels, 4)
    write_tokens(store, 1, logits, labels)
    assert device.copies > 0
    np.testing.assert_array_equal(store.teacher_array(1)[:], expected_rows(logits, labels, 4))


def test_the_trajectory_tier_holds_per_sample_summaries(tmp_path):
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, 4)
    logits = torch.randn(S, L, V, generator=torch.Generator().manual_seed(2)) * 3
    targets_of_3 = torch.from_numpy(labels[3]).clamp(min=0)
    logits[3, torch.arange(L), targets_of_3] += 20  # sample 3 predicts its every target
    write_tokens(store, 1, logits, labels)
    first_epoch = store.read_epoch(1)
    write_tokens(store, 2, logits + 1, labels, ids=np.delete(np.arange(S), 1))  # sample 1 carried forward
    assert {name: values.shape for name, values in store.trajectory([]).items()} == {
        "epochs": (0,), "true_prob": (0, S), "max_prob": (0, S), "token_accuracy": (0, S), "written": (0, S)}
    rows = SoftTargetStore.create(tmp_path / "images", store.labels, V).trajectory()  # one row per sample
    assert rows["argmax"].shape == rows["written"].shape == (0, store.num_samples)
    trajectory = store.trajectory()
    assert trajectory["true_prob"].shape == (2, S)
    token_rows = store.token_rows
    for i in range(S):
        targets = labels[i][labels[i] != IGNORE_INDEX]
        if not len(targets):
            assert np.isnan(trajectory["true_prob"][0, i]) and not trajectory["written"][0, i]
            continue
        rows = first_epoch[token_rows.rows([i])]  # what the store holds of sample i, rebuilt (V,) rows
        true_prob = rows[np.arange(len(targets)), targets].astype(np.float16).astype(np.float64)
        assert trajectory["true_prob"][0, i] == np.float16(true_prob.mean())
        assert trajectory["max_prob"][0, i] == np.float16(rows.max(axis=1).astype(np.float16).astype(np.float64).mean())
        assert trajectory["token_accuracy"][0, i] == np.float16((rows.argmax(axis=1) == targets).mean())
    assert trajectory["token_accuracy"][0, 3] == 1.0  # every position of sample 3 predicts its target
    assert not trajectory["written"][1, 1] and np.isnan(trajectory["true_prob"][1, 1])
    assert (trajectory["written"][1] == (token_rows.lengths > 0) & (np.arange(S) != 1)).all()
    assert verify_store(store).ok


def test_a_sequence_right_at_just_under_half_its_tokens_is_not_counted_right(tmp_path):
    """2,048 of 4,097 tokens right is under half, though float16's nearest value to it is 0.5:
    the stored token accuracy is rounded down, so "at least half right" reads true counts."""
    length, right = 4097, 2048
    labels = np.zeros((2, length), dtype=np.int64)
    labels[1, 4:] = IGNORE_INDEX  # a second, short sequence: 3 of its 4 tokens right
    tokens, lengths = token_labels(labels)
    store = SoftTargetStore.create(tmp_path / "store", tokens, 3, lengths=lengths)
    logits = torch.zeros(2, length, 3)
    logits[0, :right, 0] = logits[1, :3, 0] = 5  # the label, 0: right
    logits[0, right:, 1] = logits[1, 3:, 1] = 5  # wrong
    with store.writer(1) as writer:
        writer.write(torch.arange(2), logits, torch.from_numpy(labels))
    store.seal(1)
    trajectory = store.trajectory()
    assert trajectory["token_accuracy"][0].tolist() == [np.float16(0.49976), 0.75]
    assert correct_epochs(trajectory, store.labels).tolist() == [0, 1]
    assert verify_store(store).ok


def test_verify_names_the_samples_whose_summaries_disagree_with_their_rows(tmp_path):
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, 4)
    write_tokens(store, 1, torch.randn(S, L, V, generator=torch.Generator().manual_seed(3)), labels)
    array = store._group["trajectory/epoch_0001"]
    values = unpack_records(array[:], store.trajectory_fields)
    accuracy = values["token_accuracy"]
    accuracy[5] = 0.25 if accuracy[5] != 0.25 else 0.5
    array[:] = pack_records(values, store.trajectory_fields)  # rewritten with a valid checksum
    report = verify_store(store)
    assert any(f.part == "trajectory of epoch 1" and "samples 5" in f.problem for f in report.findings), report.findings


def test_verify_passes_token_accuracies_an_earlier_pskd_store_rounded_to_the_nearest(tmp_path, monkeypatch):
    """Epochs sealed before the token accuracy was rounded down hold it rounded to the
    nearest float16 (3 of 5 tokens: 0.6001, not 0.5996): verify takes either rounding."""
    import pskd_store.trajectory

    labels = padded_labels()
    store = sequence_store(tmp_path, labels, 4)
    logits = torch.randn(S, L, V, generator=torch.Generator().manual_seed(3))
    logits.scatter_add_(2, torch.from_numpy(labels).clamp(min=0)[..., None], torch.full((S, L, 1), 2.5))  # many right
    with monkeypatch.context() as earlier:
        earlier.setattr(pskd_store.trajectory, "_float16_toward_zero", lambda fractions: fractions.astype(np.float16))
        write_tokens(store, 1, logits, labels)
    write_tokens(store, 2, logits, labels)
    trajectory = store.trajectory()["token_accuracy"]
    assert (trajectory[0] > trajectory[1]).any()  # some fractions rounded up in epoch 1, down in epoch 2
    assert verify_store(store).ok, verify_store(store).findings


@pytest.mark.parametrize("topk, collate", [(None, None), (4, None), (4, collate_soft_targets)])
def test_items_carry_each_target_positions_stored_teacher(tmp_path, topk, collate):
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, topk)
    logits = torch.randn(S, L, V, generator=torch.Generator().manual_seed(4)) * 3
    data = TokenTargetDataset(Sequences(labels), store, 0.8, 4)
    data.set_epoch(1)
    first = data[7]
    assert first[4] == 0.0 and not first[2].any()  # no teacher in epoch 1
    write_tokens(store, 1, logits, labels)
    data.set_epoch(2)
    loader = DataLoader(data, batch_size=5, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0),
                        collate_fn=collate)
    seen = 0
    encoding = store.encoding
    for batch in loader:
        inputs, batch_labels, probs, classes, alpha, ids = batch
        if collate is not None:  # a tuple, whose teacher tensors the workers handed over by value
            assert type(batch) is tuple and not any(t.untyped_storage().is_shared() for t in batch[1:])
        assert alpha.tolist() == [0.8 * 2 / 4] * len(ids)
        for b, i in enumerate(ids.tolist()):
            targets = torch.from_numpy(labels[i] != IGNORE_INDEX)
            assert torch.equal(batch_labels[b], torch.from_numpy(labels[i]))
            values, stored_classes = encoding.sparse(store.teacher_array(1)[:][store.token_rows.rows([i])])
            np.testing.assert_array_equal(probs[b][targets].numpy(), values)
            np.testing.assert_array_equal(classes[b][targets].numpy(), stored_classes)
            assert not probs[b][~targets].any() and not classes[b][~targets].any()
            seen += 1
    assert seen == S


@pytest.mark.parametrize("topk", [None, 4])
def test_the_loss_is_cross_entropy_against_the_dense_target_built_by_hand(tmp_path, topk):
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, topk)
    write_tokens(store, 1, torch.randn(S, L, V, generator=torch.Generator().manual_seed(5)) * 3, labels)
    data = TokenTargetDataset(Sequences(labels), store, 0.8, 4)
    data.set_epoch(2)
    _, batch_labels, probs, classes, alpha, ids = torch.utils.data.default_collate(data.__getitems__(list(range(S))))
    alpha = alpha * torch.linspace(0.5, 1, S, dtype=alpha.dtype)  # a per-sample alpha reaches its own rows
    student = torch.randn(S, L, V, generator=torch.Generator().manual_seed(6), requires_grad=True)
    loss = token_soft_cross_entropy(student, batch_labels, probs, classes, alpha)

    teacher = torch.from_numpy(store.read_epoch(1)).float()  # (tokens, V): top-k rows rebuilt
    keep = batch_labels != IGNORE_INDEX
    rows = torch.from_numpy(store.token_rows.rows(ids.numpy()))
    per_token_alpha = alpha[:, None].expand(S, L)[keep].float()
    dense = torch.stack([soft_target(y, p, float(a)) for y, p, a in
                         zip(batch_labels[keep], teacher[rows], per_token_alpha)])
    reference = F.cross_entropy(student[keep], dense)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    grad, = torch.autograd.grad(loss, student)
    reference_grad, = torch.autograd.grad(reference, student)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-7)


def test_epoch_one_is_cross_entropy_with_ignore_index(tmp_path):
    labels = torch.from_numpy(padded_labels())
    student = torch.randn(S, L, V, generator=torch.Generator().manual_seed(7))
    zeros = torch.zeros(S, L, 4)
    loss = token_soft_cross_entropy(student, labels, zeros, zeros.long(), 0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(student.reshape(-1, V), labels.reshape(-1)).item(), rel=1e-6)


def test_masked_vocabulary_entries_and_non_finite_padding_leave_the_loss_finite():
    """A logit of -inf (a masked entry) has no probability; the target gives it none in
    epoch 1 (alpha 0) and from a dense teacher that predicted it nowhere: the loss is the
    cross-entropy over the rest, not NaN. A NaN logit at a position that is no target
    changes nothing."""
    labels = torch.from_numpy(padded_labels())
    masked = int(np.flatnonzero(np.bincount(padded_labels()[padded_labels() != IGNORE_INDEX], minlength=V) == 0)[0])
    student = torch.randn(S, L, V, generator=torch.Generator().manual_seed(7))
    student[..., masked] = float("-inf")  # a class no label is
    zeros = torch.zeros(S, L, 4)
    expected = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1)).item()
    epoch_one = token_soft_cross_entropy(student, labels, zeros, zeros.long(), 0.0)
    assert epoch_one.item() == pytest.approx(expected, rel=1e-6)
    teacher = torch.softmax(torch.randn(S, L, V), dim=-1)
    teacher[..., masked] = 0  # the masked entry, as the model's own softmax had it
    teacher = teacher / teacher.sum(dim=-1, keepdim=True)
    classes = torch.arange(V).expand(S, L, V)
    dense = soft_target(labels.clamp(min=0).reshape(-1), teacher.reshape(-1, V), 0.8)
    kept = torch.arange(V) != masked
    by_hand = -(dense[:, kept] * student.log_softmax(-1).reshape(-1, V)[:, kept]).sum(-1)
    target_positions = labels.reshape(-1) != IGNORE_INDEX
    assert token_soft_cross_entropy(student, labels, teacher, classes, 0.8).item() == pytest.approx(
        by_hand[target_positions].mean().item(), rel=1e-6)
    first = [c for c in range(V) if c != masked][:4]  # a top-4 teacher with all its mass on its first class:
    top = torch.zeros(S, L, 4)  # the rest, 0, spread over the other classes, the masked one too
    top[..., 0] = 1
    log_probs = student.log_softmax(-1)
    at_label = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    by_hand = -(0.2 * at_label + 0.8 * log_probs[..., first[0]])
    assert token_soft_cross_entropy(student, labels, top, torch.tensor(first).expand(S, L, 4), 0.8).item() == (
        pytest.approx(by_hand[labels != IGNORE_INDEX].mean().item(), rel=1e-6))
    padding = tuple(np.argwhere(padded_labels() == IGNORE_INDEX)[0])
    student[padding] = float("nan")
    epoch_one = token_soft_cross_entropy(student, labels, zeros, zeros.long(), 0.0)
    assert epoch_one.item() == pytest.approx(expected, rel=1e-6)


def test_a_sample_twice_in_a_batch_is_checked_in_each_copy(tmp_path):
    """Each copy of a sample is checked against its store rows, not one of them: an
    accelerator's scatter keeps an unspecified one of duplicates. A copy with fewer targets
    (its rows would be padding's logits) refuses the epoch, the right copy written after it."""
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, 4)
    logits = torch.randn(S, L, V)
    write_tokens(store, 1, logits, labels)
    shorter = labels[9].copy()
    shorter[np.flatnonzero(shorter != IGNORE_INDEX)[-1]] = IGNORE_INDEX
    twice = torch.from_numpy(np.stack([shorter, labels[9]]))
    writer = store.writer(2)
    writer.write(torch.arange(S), logits, torch.from_numpy(labels))
    writer.write(torch.tensor([9, 9]), logits[[9, 9]], twice)
    with pytest.raises(StoreError, match="sample 9 had another number of target positions .* made with 9 "
                                         r"\(1 samples differ\)"):
        writer.close()
    assert store.sealed_epochs == [1]


def test_a_masked_entry_among_the_teachers_classes_leaves_the_rest_to_the_others():
    """A top-k row may hold a masked class (probability 0, as the model's softmax gave it)
    while the rest of its mass, above 0 after rounding, goes to the classes outside the row:
    the loss is the cross-entropy over those, finite, not NaN. Where a masked class is
    outside the row, the rest lands on it, and the loss is inf, as against that target."""
    labels = torch.from_numpy(padded_labels())
    masked = int(np.flatnonzero(np.bincount(padded_labels()[padded_labels() != IGNORE_INDEX], minlength=V) == 0)[0])
    student = torch.randn(S, L, V, generator=torch.Generator().manual_seed(8))
    student[..., masked] = float("-inf")
    others = [c for c in range(V) if c != masked]
    probs = torch.tensor([0.5, 0.2, 0.1, 0.0]).expand(S, L, 4)  # the rest, 0.2, over the V - 4 classes outside
    inside = torch.tensor(others[:3] + [masked]).expand(S, L, 4)
    dense = torch.zeros(V)
    dense[others[3:]] = 0.2 / (V - 4)
    dense[others[:3]] = torch.tensor([0.5, 0.2, 0.1])
    log_probs = student.log_softmax(-1)
    at_label = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    by_hand = -(0.2 * at_label + 0.8 * (log_probs[..., others] * dense[others]).sum(-1))
    loss = token_soft_cross_entropy(student, labels, probs, inside, 0.8)
    assert loss.item() == pytest.approx(by_hand[labels != IGNORE_INDEX].mean().item(), rel=1e-6)
    outside = torch.tensor(others[:4]).expand(S, L, 4)
    assert token_soft_cross_entropy(student, labels, probs, outside, 0.8).item() == float("inf")


def test_flattened_tokens_give_the_same_loss_and_misplaced_shapes_are_refused():
    """Flattened tokens ((N, V) logits, (N,) labels) are the same positions: the same loss
    with a float alpha. The items' per-sample alpha with flattened tokens, which would
    broadcast into every pair of sample and position, is refused, as are mismatched shapes."""
    labels = torch.from_numpy(padded_labels())
    student = torch.randn(S, L, V, generator=torch.Generator().manual_seed(9))
    probs = torch.softmax(torch.randn(S, L, 4), -1) * 0.9
    classes = torch.randint(0, V, (S, L, 4), generator=torch.Generator().manual_seed(10))
    loss = token_soft_cross_entropy(student, labels, probs, classes, 0.8)
    flat = token_soft_cross_entropy(student.reshape(-1, V), labels.reshape(-1), probs.reshape(-1, 4),
                                    classes.reshape(-1, 4), 0.8)
    assert flat.item() == pytest.approx(loss.item(), rel=1e-6)
    per_position = token_soft_cross_entropy(student.reshape(-1, V), labels.reshape(-1), probs.reshape(-1, 4),
                                            classes.reshape(-1, 4), torch.full((S * L,), 0.8))
    assert per_position.item() == pytest.approx(loss.item(), rel=1e-6)
    per_sample = torch.full((S,), 0.8)
    for alpha in (per_sample, per_sample[:, None], torch.tensor([0.8])):  # (B,), (B, 1), (1,)
        assert token_soft_cross_entropy(student, labels, probs, classes, alpha).item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match=rf"alpha as a float or one per sample, \({S * L},\), got \({S},\)"):
        token_soft_cross_entropy(student.reshape(-1, V), labels.reshape(-1), probs.reshape(-1, 4),
                                 classes.reshape(-1, 4), per_sample)
    with pytest.raises(ValueError, match="logits and teacher rows of the labels' shape plus one dimension"):
        token_soft_cross_entropy(student.reshape(-1, V), labels, probs, classes, 0.8)
    with pytest.raises(ValueError, match="logits and teacher rows of the labels' shape plus one dimension"):
        token_soft_cross_entropy(student, labels, probs.reshape(-1, 4), classes, 0.8)


def test_a_changed_tokenisation_is_refused_and_nothing_of_the_epoch_is_kept(tmp_path):
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, 4)
    logits = torch.randn(S, L, V)
    write_tokens(store, 1, logits, labels)
    longer = labels.copy()
    longer[9, np.flatnonzero(longer[9] == IGNORE_INDEX)[0]] = 3  # one more target in sample 9
    with pytest.raises(StoreError, match="sample 9 had 10 target positions .* made with 9"):
        write_tokens(store, 2, logits, longer)
    assert store.sealed_epochs == [1]
    with pytest.raises(StoreError, match="writer 0 of epoch 2 was never closed"):
        store.seal(2)
    write_tokens(store, 2, logits, labels)  # the epoch written again, as it should be
    with pytest.raises(ValueError, match="sample 11 has 11 target positions in the store but the batch is only 10"):
        store.writer(3).write(torch.tensor([11]), logits[[11], :10], torch.from_numpy(labels[[11], :10]))
    data = TokenTargetDataset(Sequences(longer), store, 0.8, 4)
    data.set_epoch(3)
    with pytest.raises(StoreError, match="sample 9 has 10 target positions .* made with 9"):
        data.__getitems__([2, 9])
    other = labels.copy()
    other[4, np.flatnonzero(other[4] != IGNORE_INDEX)[1]] += 1
    data = TokenTargetDataset(Sequences(other), store, 0.8, 4)
    data.set_epoch(3)
    with pytest.raises(StoreError, match="sample 4 has other target tokens"):
        data.__getitems__([4])


@pytest.mark.parametrize("item, what", [
    (lambda x, y: (x, y, "a path"), "a tuple of 3"),
    (lambda x, y: {"input_ids": x, "labels": y}, "a dict"),
])
def test_items_that_are_no_input_labels_pairs_are_refused_naming_the_fix(tmp_path, item, what):
    labels = padded_labels()

    class Items(Sequences):
        def __getitem__(self, i: int):
            return item(*super().__getitem__(i))

    data = TokenTargetDataset(Items(labels), sequence_store(tmp_path, labels, 4), 0.8, 4)
    data.set_epoch(1)
    with pytest.raises(TypeError, match=f"item 5 of the wrapped data set is {what}, not an \\(input, label\\) pair"):
        data.__getitems__([5, 6])
    data.base = [(torch.zeros(L), ["a label"] * L)] * S  # pairs, whose labels are no numbers: not blamed on the pairs
    with pytest.raises((TypeError, ValueError)) as raised:
        data.__getitems__([5, 6])
    assert "pair" not in str(raised.value)


def test_stores_of_the_other_kind_are_refused_naming_the_fix(tmp_path):
    labels = padded_labels()
    tokens, lengths = token_labels(labels)
    assert len(tokens) == 133  # 0 + 1 + ... + 12, then 0 + ... + 10 target positions
    with pytest.raises(StoreError, match="lengths add up to 133 target positions but there are 134 labels"):
        SoftTargetStore.create(tmp_path / "bad", np.append(tokens, 1), V, lengths=lengths)
    sequences = sequence_store(tmp_path, labels, 4)
    images = SoftTargetStore.create(tmp_path / "images", tokens, V)
    with pytest.raises(StoreError, match="holds a row per sample, not per token: write it with a PredictionWriter"):
        TokenWriter(images, 1)
    with pytest.raises(ValueError, match=r"outputs must have shape \(batch, K=50\)"):  # an image store's writer
        images.writer(1).write(torch.tensor([0]), torch.randn(1, L, V))
    with pytest.raises(StoreError, match="holds a row per sample, not per target token"):
        TokenTargetDataset(Sequences(labels), images, 0.8, 4)
    from pskd_store.dataset import SoftTargetDataset

    with pytest.raises(StoreError, match="is a sequence store .* TokenTargetDataset"):
        SoftTargetDataset(Sequences(labels), sequences, 0.8, 4)
    with pytest.raises(StoreError, match="was made for another data set: .* other numbers of target positions"):
        SoftTargetStore.open(sequences.url, labels=tokens, lengths=np.roll(lengths, 1))
    with pytest.raises(StoreError, match="was made for another data set: one of the store and the data set"):
        SoftTargetStore.open(images.url, labels=tokens, lengths=lengths)
    assert SoftTargetStore.open(sequences.url, labels=tokens, lengths=lengths).token_rows.num_sequences == S


def test_rollback_and_the_memory_map_work_on_token_rows(tmp_path):
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, 4)
    logits = torch.randn(S, L, V, generator=torch.Generator().manual_seed(8))
    write_tokens(store, 1, logits, labels)
    write_tokens(store, 2, logits * 2, labels)
    assert store.rollback(1) == [2]
    write_tokens(store, 2, logits * 3, labels)
    service = PredictionService(store, tmp_path / "cache")
    view = service.view(2, service.prepare(2))
    np.testing.assert_array_equal(view, expected_rows(logits * 3, labels, 4))


@pytest.mark.slow
def test_a_persistent_worker_maps_token_rows_decoded_again_for_the_same_epoch(tmp_path):
    """A cache file damaged in place, read by a persistent worker, then decoded again by the
    next ``set_epoch`` of the same epoch: the worker serves the new file's rows."""
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, None)
    logits = torch.randn(S, L, V, generator=torch.Generator().manual_seed(9))
    write_tokens(store, 1, logits, labels)
    data = TokenTargetDataset(Sequences(labels), store, 0.8, 4)
    loader = DataLoader(data, batch_size=S, num_workers=1, persistent_workers=True, collate_fn=collate_soft_targets,
                        multiprocessing_context="fork")
    targets = torch.from_numpy(labels != IGNORE_INDEX)
    data.set_epoch(2)
    cached = data.service.path(1, store.epoch_info(1)["seal_token"])
    rows = int(targets.sum())
    with open(cached, "r+b") as file:  # in place: the same file, which the worker then maps
        file.seek(-rows * V * 2, 2)
        file.write(bytes(rows * V * 2))
    (_, _, probs, _, _, _), = loader
    assert not probs.any()  # the worker read the damage
    data.set_epoch(2)
    (_, _, probs, _, _, _), = loader
    np.testing.assert_array_equal(probs[targets].numpy(), expected_rows(logits, labels, None))


def test_info_and_verify_commands_read_a_sequence_store(tmp_path):
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, 4)
    write_tokens(store, 1, torch.randn(S, L, V), labels)
    text = pskd_in_process("info", store.url).stdout
    assert f"sequences    {S}, a row per target token: N=133 rows  vocabulary K={V}" in text
    assert json.loads(pskd_in_process("info", "--json", store.url).stdout)["num_sequences"] == S
    assert pskd_in_process("verify", store.url).returncode == 0


def dictd_file(path: Path, pairs: int) -> Path:
    """A dictd data file in dict-de-en's layout (headword, grammar line, translation)."""
    rng = np.random.default_rng(0)
    words = ["der", "die", "das", "Haus", "gehen", "mit", "Wasser", "zu", "schnell"]
    english = ["the", "house", "to go", "with", "water", "fast", "to"]
    lines = ["00-database-short", "     German - English"]
    for _ in range(pairs):
        lines += [" ".join(rng.choice(words, 3)), " {n}", "   " + " ".join(rng.choice(english, 2))]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_the_benchmarks_trainer_loop_feeds_a_causal_lm_the_plain_loops_targets():
    """A causal LM's record holds the whole sequence and its labels at the tokens' own
    positions; shifted by one, as the model and PSKDTrainer shift them, they are the plain
    loop's labels."""
    bench = benchmark_script("sequence_pskd")
    pairs = [("das Haus", "the house"), ("zu gehen", "to go")]
    vocabulary = {c: i + 4 for i, c in enumerate(sorted({c for pair in pairs for side in pair for c in side}))}
    data = bench.PairSequences(pairs, vocabulary, 24)
    for record, labels, (german, english) in zip(bench.causal_records(data), data.labels, pairs):
        ids = [bench.BOS, *(vocabulary[c] for c in german), bench.SEP, *(vocabulary[c] for c in english), bench.EOS]
        assert record["input_ids"][:len(ids)].tolist() == ids and (record["input_ids"][len(ids):] == bench.PAD).all()
        assert record["labels"][0] == IGNORE_INDEX and torch.equal(record["labels"][1:], labels)


@pytest.mark.slow
def test_the_sequence_benchmark_runs_both_modes_and_both_loops(tmp_path, monkeypatch, capsys, torch_state_kept):
    def benchmark(*args: str) -> dict:  # its command line, in this process: no Python start, no imports
        monkeypatch.setattr(sys, "argv", [str(BENCHMARK), *args])
        runpy.run_path(str(BENCHMARK), run_name="__main__")
        return json.loads(capsys.readouterr().out)

    dictionary = dictd_file(tmp_path / "german-english.dict.dz", 300)
    common = ["--dictionary", str(dictionary), "--train-pairs", "96", "--test-pairs", "32", "--epochs", "2",
              "--max-chars", "24", "--threads", "1"]
    table = benchmark("table", *common)
    assert table["data"]["train_pairs"] == 96 and set(table["mean"]) == {"ce", "pskd_top8"}
    assert table["mean"]["ce"]["n"] == table["data"]["test_target_tokens"]
    arms = benchmark("teacher", *common, "--topk", "1", "4")["arms"]
    assert set(arms) == {"frozen_copy", "store_top1", "store_top4"}
    assert arms["store_top1"]["rebuilt_l1_to_dense"] > arms["store_top4"]["rebuilt_l1_to_dense"] > 0
    # through Hugging Face's Trainer: epoch 1 has no teacher (alpha 0), so PSKDTrainer's one epoch
    # is the plain Trainer's, batch for batch (same order, same loss)
    common[common.index("--epochs") + 1] = "1"
    trainer = benchmark("table", "--loop", "trainer", *common)
    assert trainer["mean"]["ce"] == trainer["mean"]["pskd_top8"] and trainer["mean"]["ce"]["nll"] > 0


def test_inspect_finds_the_sequences_the_model_keeps_getting_wrong(tmp_path):
    """A run directory holding a sequence store: hard sequences are those right (at least half
    their target tokens) in fewer than half of the epochs, from the per-sequence summaries."""
    labels = padded_labels()
    store = sequence_store(tmp_path / "run", labels, 4)
    targets = torch.from_numpy(labels).clamp(min=0)
    logits = torch.zeros(S, L, V)
    logits.scatter_(2, targets[..., None], 10.0)  # every target predicted ...
    hard = [4, 9, 17]
    logits[hard] = 0
    logits[hard, :, 0] = 10.0  # ... except in these, which predict token 0
    for epoch in (1, 2, 3):
        write_tokens(store, epoch, logits, labels)
    report = json.loads(pskd_in_process("inspect", str(tmp_path / "run"), "--json", "--out",
                                        str(tmp_path / "look")).stdout)["runs"][0]
    expected = [i for i in hard if np.mean(labels[i][labels[i] != IGNORE_INDEX] == 0) < 0.5]
    assert report["num_samples"] == S and report["epochs"] == 3
    assert sorted(report["plotted_ids"]) == expected and report["hard_found"] == len(expected)
    assert (tmp_path / "look" / "trajectories.png").is_file()


def test_bad_lengths_and_writes_are_refused_naming_the_fix(tmp_path):
    labels = padded_labels()
    tokens, lengths = token_labels(labels)
    for bad, problem in ((lengths[None], "a non-empty 1-D array of integer target counts"),
                         (np.where(np.arange(S) == 2, -1, lengths), "none is negative; got -1")):
        with pytest.raises(StoreError, match=problem):
            SoftTargetStore.create(tmp_path / "bad", tokens, V, lengths=bad)
    with pytest.raises(ValueError, match="a sequence store needs at least one sample"):
        token_labels([])
    store = sequence_store(tmp_path, labels, 4)
    with pytest.raises(StoreError, match=f"the data set has {S - 1} sequences but the store was made for {S}"):
        TokenTargetDataset(Sequences(labels[1:]), store, 0.8, 4)
    logits = torch.randn(S, L, V)
    with pytest.raises(RuntimeError, match="a failed step"):  # the with block abandons the part ...
        with store.writer(1) as writer:
            with pytest.raises(ValueError, match=r"logits must be \(batch, length, vocabulary\) and labels"):
                writer.write(torch.arange(2), logits[:2, 0], torch.from_numpy(labels[:2]))
            with pytest.raises(ValueError, match=r"ids must have shape \(2,\) to match the logits"):
                writer.write(torch.arange(3), logits[:2], torch.from_numpy(labels[:2]))
            with pytest.raises(ValueError, match=rf"ids must be sample indices in \[0, {S}\), got \[23, 24\]"):
                writer.write(torch.tensor([23, 24]), logits[:2], torch.from_numpy(labels[:2]))
            writer.write(torch.arange(S), logits, torch.from_numpy(labels))
            raise RuntimeError("a failed step")
    write_tokens(store, 1, logits, labels)  # ... so that the epoch can be written again
    np.testing.assert_array_equal(store.teacher_array(1)[:], expected_rows(logits, labels, 4))


def test_a_damaged_lengths_array_is_refused_before_any_row_is_placed(tmp_path):
    labels = padded_labels()
    store = sequence_store(tmp_path, labels, 4)
    write_tokens(store, 1, torch.randn(S, L, V), labels)
    store._group["lengths"][:] = np.roll(store.token_rows.lengths, 1)  # rewritten with a valid checksum
    reopened = SoftTargetStore.open(store.url)
    with pytest.raises(StoreDamagedError, match="the lengths array in .* is damaged"):
        reopened.writer(2)
    findings = verify_store(reopened).findings  # the walk goes on past the damage: the teacher is checked too
    assert [f.part for f in findings] == ["labels"] and "the lengths array" in findings[0].problem
