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
