"""Cutout and CutMix in the training step: hole sizes and positions, and which rows each
mode augments, trains on mixed labels and records."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pskd_store.augment import CUTOUT_HOLE, BatchAugment, cutout
from pskd_store.methods import ClassWiseKd, CrossEntropy, ProgressiveSelfKd


def _hole_bounds(centre: int, size: int) -> tuple[int, int]:
    """DeVries & Taylor's Cutout: rows clip(c - 4, 0, size) .. clip(c + 4, 0, size)."""
    return max(centre - CUTOUT_HOLE // 2, 0), min(centre + CUTOUT_HOLE // 2, size)


def test_image_holes_are_8x8_squares_clipped_at_the_border():
    torch.manual_seed(0)
    batch = torch.randn(512, 3, 32, 32) + 10  # never zero outside a hole
    out = cutout(batch)
    zero = out == 0
    assert torch.equal(zero.all(1), zero.any(1))  # the same hole in every channel
    zero = zero[:, 0]
    sides, touching = [], 0
    for image in zero:
        rows = image.any(1).nonzero().flatten()
        cols = image.any(0).nonzero().flatten()
        top, bottom, left, right = rows[0].item(), rows[-1].item() + 1, cols[0].item(), cols[-1].item() + 1
        assert image[top:bottom, left:right].all() and image.sum() == (bottom - top) * (right - left)  # a rectangle
        for low, high in ((top, bottom), (left, right)):
            # the only centres giving these bounds: an 8-wide hole, cut only where it meets the border
            assert any(_hole_bounds(c, 32) == (low, high) for c in range(32)), (low, high)
        sides += [bottom - top, right - left]
        touching += top == 0 or left == 0 or bottom == 32 or right == 32
    assert max(sides) == CUTOUT_HOLE and min(sides) == CUTOUT_HOLE // 2  # centre on the edge: half a hole
    # Centres uniform over all 32 positions: a side is whole for centres 4..28 (25 of 32), and
    # a hole meets the border with probability 1 - (23/32)^2 (holes kept inside would never be cut).
    assert abs(sides.count(CUTOUT_HOLE) / len(sides) - 25 / 32) < 0.05
    assert abs(touching / len(zero) - (1 - (23 / 32) ** 2)) < 0.07
    assert torch.equal(out[~(out == 0)], batch[~(out == 0)])  # nothing else changed


def test_every_position_can_be_cut():
    torch.manual_seed(1)
    out = cutout(torch.ones(2000, 1, 32, 32))
    assert (out == 0).any(0).all()  # corners included


def test_signal_holes_are_8_samples_clipped_at_the_ends():
    torch.manual_seed(2)
    out = cutout(torch.ones(1000, 1, 40))
    widths = (out == 0).sum(-1).flatten()
    assert widths.max() == CUTOUT_HOLE and widths.min() == CUTOUT_HOLE // 2
    assert (out[:, 0, 0] == 0).any() and (out[:, 0, -1] == 0).any()


def test_each_image_gets_its_own_hole():
    torch.manual_seed(3)
    holes = (cutout(torch.ones(64, 3, 32, 32)) == 0)[:, 0]
    assert len({tuple(h.flatten().nonzero().flatten().tolist()) for h in holes}) > 50


def _batch(n: int = 16, k: int = 10):
    torch.manual_seed(4)
    inputs = torch.randn(n, 3, 32, 32) + 10
    labels = torch.arange(n) % k
    soft = torch.full((n, k), 0.5 / (k - 1)).scatter_(1, labels[:, None], 0.5)  # stand-in PS-KD targets
    return inputs, soft, labels


def _augmented(method, augment, inputs, soft, labels, *, step=0, **kwargs):
    """``method``'s batch of the loader's (inputs, soft targets, labels), augmented."""
    batch = method.batch(inputs, soft, labels, torch.arange(len(labels)))
    return method.augment(augment, batch, epoch=1, step=step, **kwargs)


def test_ce_cutout_cuts_every_image_keeps_labels_and_records_every_row():
    inputs, soft, labels = _batch()
    batch = _augmented(CrossEntropy(), BatchAugment("cutout", 10), inputs, soft, labels)
    assert ((batch.inputs == 0).flatten(1).any(1)).all()
    assert batch.targets is labels and batch.recorded == len(inputs) and batch.partners is None


@pytest.mark.parametrize("probability", [0.5, 1.0])  # CutMix's authors: CIFAR, ImageNet
def test_ce_cutmix_mixes_a_whole_batch_with_the_recipes_probability(probability):
    inputs, soft, labels = _batch()
    augment = BatchAugment("cutmix", 10, cutmix_prob=probability)
    mixed = 0
    for step in range(400):
        batch = _augmented(CrossEntropy(), augment, inputs, soft, labels, step=step)
        if batch.recorded == 0:
            mixed += 1
            assert batch.targets.shape == (16, 10) and torch.allclose(batch.targets.sum(1), torch.ones(16))
            # each row keeps lam of its label and gets 1 - lam of its neighbour's: one lam per batch
            lam = batch.targets[torch.arange(16), labels]
            assert torch.allclose(lam, lam[0].expand(16)) and 0 <= lam[0] <= 1
            assert (batch.inputs != inputs).any()
        else:
            assert batch.recorded == 16 and batch.targets is labels and torch.equal(batch.inputs, inputs)
    assert abs(mixed / 400 - probability) < 0.08  # binomial sd 0.025 at 0.5; exactly 400 at 1.0
    assert probability < 1 or mixed == 400


@pytest.mark.parametrize("kind", ["cutout", "cutmix"])
def test_pskd_splits_each_batch_in_half_and_always_augments_the_second(kind):
    inputs, soft, labels = _batch()
    for step in range(20):  # a batch-mixing chance of 0 does not spare PS-KD's augmented half
        batch = _augmented(ProgressiveSelfKd(), BatchAugment(kind, 10, cutmix_prob=0.0), inputs, soft, labels,
                           step=step)
        assert batch.recorded == 8
        assert torch.equal(batch.inputs[:8], inputs[:8]) and torch.equal(batch.targets[:8], soft[:8])  # untouched
        assert (batch.inputs[8:] != inputs[8:]).flatten(1).any(1).any()
        if kind == "cutout":
            assert torch.equal(batch.targets[8:], F.one_hot(labels[8:], 10).float())
            assert ((batch.inputs[8:] == 0).flatten(1).any(1)).all()
        else:
            assert torch.allclose(batch.targets[8:].sum(1), torch.ones(8))
            assert not torch.equal(batch.targets[8:], F.one_hot(labels[8:], 10).float())


def test_odd_batches_give_the_extra_row_to_pskd():
    inputs, soft, labels = _batch(n=5)
    assert _augmented(ProgressiveSelfKd(), BatchAugment("cutout", 10), inputs, soft, labels).recorded == 3
    batch = _augmented(ProgressiveSelfKd(), BatchAugment("cutmix", 10), inputs[:1], soft[:1], labels[:1])
    assert batch.recorded == 1 and torch.equal(batch.inputs, inputs[:1])  # a batch of one is all PS-KD's
    assert torch.equal(batch.targets, soft[:1])


def test_cskd_partners_get_their_samples_box_and_neighbours():
    """A mixed CS-KD batch: each partner gets the box its sample got, filled from the
    partner of the sample's neighbour, so it carries exactly the sample's mixed label."""
    inputs, soft, labels = _batch()
    partners = torch.randn_like(inputs) - 10  # other images of the same classes
    augment = BatchAugment("cutmix", 10)
    outcomes = set()
    for step in range(40):
        # the loader's batch: the samples, then a same-class partner of each
        batch = _augmented(ClassWiseKd(), augment, torch.cat([inputs, partners]), torch.cat([soft, soft]),
                           torch.cat([labels, labels]), step=step)
        if batch.recorded:
            assert batch.recorded == 16 and torch.equal(batch.targets, labels)
            assert torch.equal(batch.inputs, inputs) and torch.equal(batch.partners, partners)
            outcomes.add("kept")
            continue
        outcomes.add("mixed")
        box = batch.inputs != inputs
        assert box.any() and torch.equal(box, batch.partners != partners)  # the same box everywhere
        assert torch.equal(batch.inputs[box], inputs.roll(1, 0)[box])  # pasted from the neighbour ...
        assert torch.equal(batch.partners[box], partners.roll(1, 0)[box])  # ... and its partner
        lam = 1 - box[0].float().mean()
        expected = lam * F.one_hot(labels, 10) + (1 - lam) * F.one_hot(labels.roll(1, 0), 10)
        assert torch.allclose(batch.targets, expected)
    assert outcomes == {"kept", "mixed"}


def test_cskd_cutout_cuts_samples_and_partners_independently():
    inputs, soft, labels = _batch()
    made = BatchAugment("cutout", 10)(inputs, labels, labels, inputs.clone(), epoch=1, step=0)
    assert made.targets is labels and not made.mixed
    assert (made.inputs == 0).flatten(1).any(1).all() and (made.partners == 0).flatten(1).any(1).all()
    assert not torch.equal(made.inputs == 0, made.partners == 0)


@pytest.mark.parametrize("kind", ["cutout", "cutmix"])
def test_a_steps_draws_depend_on_seed_rank_epoch_and_step_alone(kind):
    """Holes and boxes are a function of (seed, rank, epoch, step): the same key draws the
    same whatever the process's generators hold, another rank or step draws otherwise,
    and the process's own stream is left as it was (a resumed run repeats them all)."""
    inputs, soft, labels = _batch()

    def draw(seed=0, rank=0, epoch=1, step=0):
        batch = ProgressiveSelfKd().batch(inputs, soft, labels, torch.arange(len(labels)))
        return ProgressiveSelfKd().augment(BatchAugment(kind, 10, seed=seed, rank=rank), batch, epoch=epoch,
                                           step=step).inputs

    torch.manual_seed(123)
    first = draw()
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after)  # the process's stream did not move
    torch.manual_seed(999)
    assert torch.equal(draw(), first)  # whatever the global generator holds
    for other in (dict(rank=1), dict(seed=1), dict(epoch=2), dict(step=1)):
        assert not torch.equal(draw(**other), first), other
