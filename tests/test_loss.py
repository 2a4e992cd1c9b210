"""PS-KD's schedule and every method's loss against values computed by hand."""

import math

import pytest
import torch

from pskd_store.loss import TfKd, alpha_t, soft_target
from pskd_store.methods import METHODS, ProgressiveSelfKd, TeacherFreeKd


def method_loss(name, logits, targets):
    return METHODS[name]().loss(logits, targets)


def test_alpha_schedule_counts_epochs_from_one():
    assert alpha_t(1, 300, 0.8) == pytest.approx(0.8 / 300)
    assert alpha_t(150, 300, 0.8) == pytest.approx(0.4)
    assert alpha_t(300, 300, 0.8) == pytest.approx(0.8)


@pytest.mark.parametrize("args, message", [((1, 10, 1.2), "alpha_T must lie"), ((0, 10, 0.8), "epoch must lie"),
                                           ((11, 10, 0.8), "epoch must lie")])
def test_alpha_schedule_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        alpha_t(*args)


def test_soft_target_and_loss_by_hand():
    past = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    labels = torch.tensor([1, 2])
    given = past.clone()
    target = soft_target(labels, past, 0.25)
    expected = torch.tensor([[0.125, 0.75 + 0.075, 0.05], [0.025, 0.025, 0.75 + 0.2]])
    torch.testing.assert_close(target, expected)
    assert torch.equal(past, given)  # the caller's float32 tensor is not the target
    # float16 rows, as the store serves them: blended in float32, exactly, the rows left as they are
    half = past.half()
    exact = 0.25 * half.float()
    exact[[0, 1], [1, 2]] += 0.75
    assert torch.equal(soft_target(labels, half, 0.25), exact) and torch.equal(half, given.half())
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    lse0 = math.log(math.e + math.e ** 2 + 1)
    log_p0 = [1 - lse0, 2 - lse0, 0 - lse0]
    log_p1 = [-math.log(3)] * 3
    loss0 = -sum(t * lp for t, lp in zip(expected[0].tolist(), log_p0))
    loss1 = -sum(t * lp for t, lp in zip(expected[1].tolist(), log_p1))
    assert ProgressiveSelfKd().loss(logits, target).item() == pytest.approx((loss0 + loss1) / 2, rel=1e-6)


def test_method_losses_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 0.0]], dtype=torch.bfloat16)  # as --amp gives them
    labels = torch.tensor([1, 0])
    log_p = torch.log_softmax(logits.double(), 1)
    ce = -(log_p[0, 1] + log_p[1, 0]).item() / 2
    uniform = -log_p.mean(1).mean().item()  # cross-entropy against the uniform distribution
    assert method_loss("ce", logits, labels).item() == pytest.approx(ce, rel=1e-6)
    assert method_loss("ls", logits, labels).item() == pytest.approx(0.9 * ce + 0.1 * uniform, rel=1e-6)
    assert method_loss("ce", logits, labels).dtype == torch.float32  # computed in fp32
    soft = torch.tensor([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    expected = -(soft * log_p).sum(1).mean().item()
    assert method_loss("pskd", logits, soft).item() == pytest.approx(expected, rel=1e-6)


def tfkd_as_the_authors_wrote_it(outputs, labels, alpha=0.1, T=20.0, multiplier=100.0):
    """yuanli2333/Teacher-free-Knowledge-Distillation, my_loss_function.loss_kd_regularization,
    line by line (on the CPU, in float64)."""
    correct_prob = 0.99
    loss_CE = torch.nn.functional.cross_entropy(outputs, labels)
    K = outputs.size(1)
    teacher_soft = torch.ones_like(outputs)
    teacher_soft = teacher_soft * (1 - correct_prob) / (K - 1)
    for i in range(outputs.shape[0]):
        teacher_soft[i, labels[i]] = correct_prob
    loss_soft_regu = torch.nn.KLDivLoss()(torch.nn.functional.log_softmax(outputs, dim=1),
                                          torch.nn.functional.softmax(teacher_soft / T, dim=1)) * multiplier
    return (1. - alpha) * loss_CE + alpha * loss_soft_regu


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # the authors' nn.KLDivLoss()
@pytest.mark.parametrize("alpha, T, multiplier", [(0.1, 20.0, 100.0), (0.95, 40.0, 1.0), (0.5, 10.0, 50.0)])
def test_tfkd_matches_the_authors_formula(alpha, T, multiplier):
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(4))
    expected = tfkd_as_the_authors_wrote_it(logits, labels, alpha, T, multiplier)
    got = TeacherFreeKd(TfKd(alpha, T, multiplier)).loss(logits.float(), labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert method_loss("tfkd", logits.float(), labels).item() == pytest.approx(
        tfkd_as_the_authors_wrote_it(logits, labels).item(), rel=1e-6)  # the defaults are the authors'


def test_tfkd_teacher_for_mixed_labels():
    tfkd = TfKd()
    onehot = tfkd.teacher(torch.tensor([2]), 4)
    other = 0.01 / 3
    designed = torch.tensor([[other, other, 0.99, other]])
    torch.testing.assert_close(onehot, torch.softmax(designed / 20.0, dim=1))
    mixed = tfkd.teacher(torch.tensor([[0.0, 0.25, 0.75, 0.0]]), 4)  # CutMix: lam 0.75 on class 2, 0.25 on 1
    mixed_designed = 0.75 * designed + 0.25 * torch.tensor([[other, 0.99, other, other]])
    torch.testing.assert_close(mixed, torch.softmax(mixed_designed / 20.0, dim=1))
