"""CS-KD's class-wise pair batches: real DataLoader workers, every partner of the same
class, every id once per epoch, the same batches for the same (seed, epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pskd_store.loss import CsKd
from pskd_store.sampler import ClassPairBatchSampler

LABELS = np.random.default_rng(0).integers(0, 7, 203)


def batches(sampler: ClassPairBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_every_partner_is_of_the_same_class_and_every_id_comes_once():
    sampler = ClassPairBatchSampler(LABELS, 16, seed=3)
    epoch = batches(sampler, 1)
    assert len(epoch) == len(sampler) == 13 and all(len(b) == 32 for b in epoch[:-1]) and len(epoch[-1]) == 22
    firsts = [i for b in epoch for i in b[:len(b) // 2]]
    partners = [i for b in epoch for i in b[len(b) // 2:]]
    assert sorted(firsts) == list(range(len(LABELS)))
    assert (LABELS[firsts] == LABELS[partners]).all()
    assert np.mean(np.asarray(firsts) == np.asarray(partners)) < 0.3  # mostly another sample


def test_a_partner_is_drawn_uniformly_from_the_whole_class_the_sample_itself_included():
    """The authors' rule (random.choice over the class's ids): a class of one pairs its sample
    with itself; in a class of four, a sample is its own partner a quarter of the time and
    every member is drawn alike."""
    labels = np.array([0, 1, 1, 1, 1, 2, 2])  # class 0 has one sample, class 1 four
    sampler = ClassPairBatchSampler(labels, 7, seed=0)
    drawn = np.array([batches(sampler, epoch)[0] for epoch in range(1, 2001)])  # one batch of 7 + 7 an epoch
    firsts, partners = drawn[:, :7], drawn[:, 7:]
    assert (partners[firsts == 0] == 0).all()
    of_class_1 = labels[firsts] == 1
    rate = np.mean(firsts[of_class_1] == partners[of_class_1])  # 8,000 draws: 0.25 +- 0.005 (one sigma)
    assert 0.235 < rate < 0.265
    counts = np.bincount(partners[of_class_1], minlength=5)[1:]
    assert counts.min() > 0.94 * counts.mean()


def test_batches_follow_seed_and_epoch():
    sampler = ClassPairBatchSampler(LABELS, 16, seed=3)
    assert batches(sampler, 2) == batches(ClassPairBatchSampler(LABELS, 16, seed=3), 2)
    assert batches(sampler, 2) != batches(sampler, 3)
    assert batches(sampler, 2) != batches(ClassPairBatchSampler(LABELS, 16, seed=4), 2)


def test_ranks_share_an_epoch_like_distributed_sampler():
    shards = [batches(ClassPairBatchSampler(LABELS, 16, num_replicas=2, rank=r, seed=1), 5) for r in (0, 1)]
    firsts = [[i for b in shard for i in b[:len(b) // 2]] for shard in shards]
    assert len(firsts[0]) == len(firsts[1]) == 102  # 203 padded to 204
    assert set(firsts[0]) | set(firsts[1]) == set(range(len(LABELS))) and len(set(firsts[0]) & set(firsts[1])) == 1


def test_dataloader_workers_get_the_pairs():
    data = TensorDataset(torch.arange(len(LABELS)), torch.as_tensor(LABELS))
    sampler = ClassPairBatchSampler(LABELS, 16, seed=2)
    sampler.set_epoch(1)
    expected = list(sampler)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2)
    for batch, (ids, labels) in zip(expected, loader):
        assert ids.tolist() == batch
        half = len(batch) // 2
        assert labels[:half].tolist() == labels[half:].tolist()


class KDLoss(torch.nn.Module):
    """alinlab/cs-kd, train.py, as written there."""

    def __init__(self, temp_factor):
        super(KDLoss, self).__init__()
        self.temp_factor = temp_factor
        self.kl_div = torch.nn.KLDivLoss(reduction="sum")

    def forward(self, input, target):
        log_p = torch.log_softmax(input / self.temp_factor, dim=1)
        q = torch.softmax(target / self.temp_factor, dim=1)
        loss = self.kl_div(log_p, q) * (self.temp_factor ** 2) / input.size(0)
        return loss


@pytest.mark.parametrize("temperature, weight", [(4.0, 1.0), (2.0, 3.0)])
def test_cskd_regulariser_is_the_authors_kdloss(temperature, weight):
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    partner = torch.randn(8, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    expected = weight * KDLoss(temperature)(logits, partner)
    got = CsKd(temperature, weight).regulariser(logits.float(), partner.float())
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert CsKd().regulariser(logits.float(), partner.float()).item() == pytest.approx(
        KDLoss(4.0)(logits, partner).item(), rel=1e-6)  # the defaults: temp 4, lamda 1


def test_a_cskd_step_is_the_authors_train_step(tmp_path):
    """One step of ``train_one_epoch`` with CS-KD on a pair batch against the authors' loop
    (alinlab/cs-kd, train.py, ``--cls``): CE on the first half; the second half forwarded
    after it, in train mode, without gradient; lamda times KDLoss of the first half's logits
    against it. Same weights and batch-norm statistics after the step."""
    import copy

    from pskd_store.engine import train_one_epoch
    from pskd_store.methods import ClassWiseKd
    from pskd_store.store import SoftTargetStore

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    authors = copy.deepcopy(model)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    inputs = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))  # 6 samples, then their partners
    ids = torch.arange(12) % 6
    store = SoftTargetStore.create(tmp_path / "store", labels.numpy(), 5)
    method = ClassWiseKd(CsKd(4.0, 2.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with store.writer(1) as writer:
        train_one_epoch(model, method, [(inputs, labels.repeat(2), labels.repeat(2), ids)], optimizer, writer,
                        torch.device("cpu"), epoch=1, epochs=1, steps=1, augment=None, amp=False,
                        channels_last=False, quiet=True)

    optimizer = torch.optim.SGD(authors.parameters(), lr=0.5)
    batch_size, targets = 12, labels.repeat(2)
    outputs = authors(inputs[:batch_size // 2])
    loss = torch.mean(torch.nn.CrossEntropyLoss(reduction="none")(outputs, targets[:batch_size // 2]))
    with torch.no_grad():
        outputs_cls = authors(inputs[batch_size // 2:])
    loss += 2.0 * KDLoss(4.0)(outputs[:batch_size // 2], outputs_cls.detach())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for (name, got), want in zip(model.state_dict().items(), authors.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
