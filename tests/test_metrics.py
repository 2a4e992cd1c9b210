"""Metrics checked against values worked out by hand on tiny inputs."""

import math

import numpy as np
import pytest
import torch

from pskd_store.metrics import ReliabilityBins, evaluate, reliability_bins

# Five samples, three classes. Confidences (max prob) avoid bin edges so the
# hand binning is unambiguous.
#   sample  probs               label  pred  correct  conf  p_true
#   0       [.95, .03, .02]     0      0     yes      .95   .95
#   1       [.05, .85, .10]     1      1     yes      .85   .85
#   2       [.30, .65, .05]     0      1     no       .65   .30
#   3       [.20, .25, .55]     2      2     yes      .55   .55
#   4       [.45, .35, .20]     2      0     no       .45   .20
PROBS = np.array(
    [
        [0.95, 0.03, 0.02],
        [0.05, 0.85, 0.10],
        [0.30, 0.65, 0.05],
        [0.20, 0.25, 0.55],
        [0.45, 0.35, 0.20],
    ]
)
LABELS = np.array([0, 1, 0, 2, 2])


@pytest.fixture(scope="module")
def res():
    return evaluate(PROBS, LABELS)


def test_top1_and_top5(res):
    # 2 of 5 wrong at top-1; with K=3 "top-5" is top-3, which always contains the label.
    assert res["top1_err"] == pytest.approx(100 * 2 / 5)
    assert res["top5_err"] == pytest.approx(0.0)
    assert res["n"] == 5


def test_nll(res):
    # Mean of -ln p_true over the five samples.
    expected = -(math.log(0.95) + math.log(0.85) + math.log(0.30) + math.log(0.55) + math.log(0.20)) / 5
    assert res["nll"] == pytest.approx(expected)


def test_ece_ten_bins(res):
    # Each sample sits alone in its bin (.95->(.9,1], .85->(.8,.9], .65->(.6,.7],
    # .55->(.5,.6], .45->(.4,.5]), so ECE = mean |correct - conf|.
    expected = (abs(1 - 0.95) + abs(1 - 0.85) + abs(0 - 0.65) + abs(1 - 0.55) + abs(0 - 0.45)) / 5
    assert res["ece"] == pytest.approx(100 * expected)  # = 35 %


def test_ece_depends_on_n_bins():
    # 2 bins: (0, .5] holds sample 4 (conf .45, acc 0);
    #         (.5, 1] holds 0-3: mean conf (.95+.85+.65+.55)/4 = .75, acc 3/4 = .75 -> gap 0.
    ece2 = abs(0 - 0.45) * 1 / 5 + abs(3 / 4 - (0.95 + 0.85 + 0.65 + 0.55) / 4) * 4 / 5  # = 9 %
    # 3 bins: (1/3, 2/3] holds samples 2,3,4: conf (.65+.55+.45)/3 = .55, acc 1/3;
    #         (2/3, 1]   holds samples 0,1:   conf (.95+.85)/2 = .9,      acc 1.
    ece3 = abs(1 / 3 - (0.65 + 0.55 + 0.45) / 3) * 3 / 5 + abs(1 - (0.95 + 0.85) / 2) * 2 / 5  # = 17 %
    assert evaluate(PROBS, LABELS, n_bins=2)["ece"] == pytest.approx(100 * ece2)
    assert evaluate(PROBS, LABELS, n_bins=3)["ece"] == pytest.approx(100 * ece3)
    assert ece2 != pytest.approx(ece3)


def test_aurc_eaurc(res):
    # Sorted by conf descending: 0(ok) 1(ok) 2(err) 3(ok) 4(err)
    # cumulative errors 0,0,1,1,2 -> risks 0/1, 0/2, 1/3, 1/4, 2/5.
    aurc = (0 / 1 + 0 / 2 + 1 / 3 + 1 / 4 + 2 / 5) / 5  # = 59/300
    # Optimal ranking of 5 predictions with 2 errors: both errors last, risks
    # 0, 0, 0, 1/4, 2/5 -> (1/4 + 2/5) / 5 = 0.13 (the authors' finite sum, not r + (1-r)ln(1-r)).
    optimal = (1 / 4 + 2 / 5) / 5
    assert res["aurc"] == pytest.approx(1e3 * aurc, abs=1e-12)
    assert res["eaurc"] == pytest.approx(1e3 * (aurc - optimal), abs=1e-12)


def _authors_ece_aurc_eaurc(probs: np.ndarray, labels: np.ndarray, bin_size: float = 0.1):
    """The PS-KD authors' utils/metric.py formulas, written out with Python loops
    (np.float there is float64 here): what our vectorised metrics must equal."""
    predictions, max_confs = np.argmax(probs, axis=1), np.amax(probs, axis=1)
    total, ces = len(probs), []
    for upper in np.arange(bin_size, 1 + bin_size, bin_size):
        lower = upper - bin_size
        members = [(p, t, c) for p, t, c in zip(predictions, labels, max_confs) if lower < c <= upper]
        if members:
            accuracy = sum(p == t for p, t, _ in members) / len(members)
            average = sum(c for _, _, c in members) / len(members)
            ces.append(abs(accuracy - average) * len(members))
    order = np.argsort(max_confs)[::-1]
    wrong = labels[order] != predictions[order]
    n, n_wrong = len(labels), int(wrong.sum())
    aurc = np.mean(np.cumsum(wrong).astype(np.float64) / np.arange(1, n + 1))
    ranks = np.arange(1, n_wrong + 1).astype(np.float64)
    optimal = (1.0 / n) * np.sum(ranks / (n - n_wrong + ranks))
    return 100 * sum(ces) / total, 1000 * aurc, 1000 * (aurc - optimal)


@pytest.mark.parametrize("seed, n, k, temperature, n_bins", [
    (0, 200, 10, 1.0, 10), (1, 1000, 100, 0.3, 10), (2, 500, 5, 3.0, 15), (3, 37, 3, 1.0, 20), (4, 300, 10, 0.05, 10),
])
def test_ece_aurc_eaurc_equal_the_authors_formulas(seed, n, k, temperature, n_bins):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) / temperature
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float32), 1).numpy()  # float32, as a model gives
    probs[: n // 10] = probs[n // 10: 2 * (n // 10)]  # tied confidences: the sort order must match theirs
    labels = rng.integers(0, k, n)
    labels[: n // 4] = probs[: n // 4].argmax(1)  # some right, some wrong
    ece, aurc, eaurc = _authors_ece_aurc_eaurc(probs.astype(np.float64), labels, bin_size=1 / n_bins)
    got = evaluate(probs, labels, n_bins=n_bins)
    assert abs(got["ece"] - ece) < 1e-9
    assert abs(got["aurc"] - aurc) < 1e-9
    assert abs(got["eaurc"] - eaurc) < 1e-9


def test_ece_bins_are_the_authors_float_bounds():
    # At 10 bins the authors' third bin is (0.20000000000000004, 0.30000000000000004]: a
    # confidence of exactly 0.30000000000000004 belongs to it (equal-width linspace edges
    # would put it in the fourth), and one just above 0.2 falls between two bins.
    high, gap = 0.30000000000000004, float(np.nextafter(0.2, 1.0))
    probs = np.array([
        [high, 0.3, 0.2, 0.1, 1 - high - 0.6],    # confidence `high`
        [gap, 0.2, 0.2, 0.2, 1 - gap - 0.6],      # confidence `gap`
        [0.7, 0.2, 0.1, 0.0, 0.0],                # confidence 0.7: the seventh bin
    ])
    bins = reliability_bins(probs, np.array([0, 0, 0]), n_bins=10)
    assert bins.count.tolist() == [0, 0, 1, 0, 0, 0, 1, 0, 0, 0]  # the `gap` row is in none
    assert bins.ece == pytest.approx((abs(1 - high) + abs(1 - 0.7)) / 3)
    assert bins.upper[2] == high and bins.lower[3] == high


@pytest.mark.parametrize("n_bins", [6, 10, 14, 49])
def test_a_confidence_of_one_is_in_the_last_bin_at_any_count(n_bins):
    # arange's last bound is 0.9999999999999999 at 6 and 14 bins, and it adds one past 1.0 at 49
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)  # a margin of > 17
    bins = reliability_bins(probs, np.array([0, 1, 1, 0]), n_bins=n_bins)
    assert bins.count.tolist() == [0] * (n_bins - 1) + [4] and bins.upper[-1] == 1.0
    assert evaluate(probs, np.array([0, 1, 1, 0]), n_bins=n_bins)["ece"] == 50.0


def test_reliability_bins_by_hand():
    bins = reliability_bins(PROBS, LABELS, n_bins=4)
    assert isinstance(bins, ReliabilityBins)
    np.testing.assert_allclose(bins.edges, [0, 0.25, 0.5, 0.75, 1])
    # (0,.25]: none; (.25,.5]: sample 4; (.5,.75]: samples 2,3; (.75,1]: samples 0,1
    np.testing.assert_array_equal(bins.count, [0, 1, 2, 2])
    np.testing.assert_allclose(bins.confidence[1:], [0.45, (0.65 + 0.55) / 2, (0.95 + 0.85) / 2])
    np.testing.assert_allclose(bins.accuracy[1:], [0, 1 / 2, 1])
    assert np.isnan(bins.confidence[0]) and np.isnan(bins.accuracy[0])  # empty bin
    expected = (0.45 * 1 + abs(0.5 - 0.6) * 2 + abs(1 - 0.9) * 2) / 5
    assert bins.ece == pytest.approx(expected)
    assert evaluate(PROBS, LABELS, n_bins=4)["ece"] == pytest.approx(100 * bins.ece)


def test_perfect_confident_classifier():
    labels = np.array([0, 2, 1, 2])
    probs = np.eye(3)[labels]
    res = evaluate(probs, labels)
    for key in ("top1_err", "top5_err", "ece", "aurc", "eaurc", "nll"):
        assert res[key] == pytest.approx(0.0, abs=1e-9), key


def test_all_wrong_gives_finite_eaurc():
    # r = 1: every risk is 1, AURC = 1 and the oracle AURC is also 1 (limit of (1-r)ln(1-r) is 0).
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    res = evaluate(probs, np.array([1, 0]))
    assert res["aurc"] == pytest.approx(1e3)
    assert res["eaurc"] == pytest.approx(0.0)


def test_zero_probability_nll_is_finite():
    """Probabilities without logits (an ensemble's average): one that is 0 is floored."""
    res = evaluate(np.array([[1.0, 0.0]]), np.array([1]))
    assert res["nll"] == pytest.approx(-math.log(1e-12))


def test_a_models_nll_is_the_cross_entropy_of_its_logits_as_the_authors_take_it():
    """The authors' NLL is ``nn.CrossEntropyLoss`` of the logits. A confident mistake by a
    gap of 40 or 120 nats has a float32 softmax of 4e-18 or 0 for its label: from the
    probabilities, -log p_true is 40.0 for the first and floored at 27.6 for the second.
    ``engine.predict`` keeps each sample's cross-entropy, and ``evaluate`` averages it."""
    from torch.utils.data import DataLoader, TensorDataset

    from pskd_store.engine import predict

    logits = torch.tensor([[0.0, 40.0, 0.0], [120.0, 0.0, 0.0], [2.0, 1.0, 0.5], [0.1, 0.2, 3.0]])
    labels = torch.tensor([0, 1, 0, 2])
    loader = DataLoader(TensorDataset(logits, labels), batch_size=3)  # two batches
    predictions = predict(torch.nn.Identity(), loader, torch.device("cpu"), amp=False, channels_last=False)
    assert predictions.probs[1, 1] == 0  # underflowed
    authors = torch.nn.CrossEntropyLoss()(logits, labels).item()  # 41.56...
    assert evaluate(*predictions)["nll"] == pytest.approx(authors, rel=1e-6)
    assert evaluate(predictions.probs, predictions.labels)["nll"] < authors - 20  # what the floor made of it


def test_top5_ranks_the_logits_as_the_authors_accuracy_does():
    """The authors' top-1/top-5 count ``output.topk`` of the logits. Behind a logit of 200,
    every other class's float32 probability underflows to 0, and zeros tie: ranked by its
    probability, label 5 (the second logit of six) comes after classes 1-4, out of the top
    five. ``engine.predict`` keeps each sample's rank among its logits."""
    from torch.utils.data import DataLoader, TensorDataset

    from pskd_store.engine import predict

    logits = torch.tensor([[200.0, 10.0, 20.0, 30.0, 40.0, 50.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    labels = torch.tensor([5, 1])
    predictions = predict(torch.nn.Identity(), DataLoader(TensorDataset(logits, labels)), torch.device("cpu"),
                          amp=False, channels_last=False)
    _, top5 = logits.topk(5, 1, True, True)  # the authors' accuracy()
    authors = 100.0 - 100.0 * top5.eq(labels[:, None]).any(dim=1).float().mean().item()
    assert evaluate(*predictions)["top5_err"] == authors == 50.0
    assert evaluate(predictions.probs, predictions.labels)["top5_err"] == 100.0  # ranked by probability
    assert evaluate(*predictions)["top1_err"] == 100.0


@pytest.mark.parametrize("name", ["sample_nll", "sample_rank"])
def test_per_sample_values_of_another_length_are_refused(name):
    with pytest.raises(ValueError, match=rf"{name} must have shape \(5,\), one per label, got \(4,\)"):
        evaluate(PROBS, LABELS, **{name: np.zeros(4)})


def test_top5_differs_from_top1():
    row = [0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05]  # 7 classes, sorted descending
    probs = np.array([row, row, row])
    # label 5 is 6th most likely (outside top-5); label 2 is 3rd (in top-5 only); label 0 is top-1.
    res = evaluate(probs, np.array([5, 2, 0]))
    assert res["top1_err"] == pytest.approx(100 * 2 / 3)
    assert res["top5_err"] == pytest.approx(100 * 1 / 3)


def test_ties_follow_argmax():
    # Equal top probabilities: argmax picks the lowest index, so label 1 is a top-1 miss.
    res = evaluate(np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]), np.array([0, 1]))
    assert res["top1_err"] == pytest.approx(50.0)


def test_torch_and_numpy_agree():
    ref = evaluate(PROBS, LABELS, n_bins=3)
    for dtype in (torch.float64, torch.float32):
        got = evaluate(torch.tensor(PROBS, dtype=dtype), torch.tensor(LABELS), n_bins=3)
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5), (dtype, key)
    got32 = evaluate(PROBS.astype(np.float32), LABELS.astype(np.int32), n_bins=3)
    assert got32["ece"] == pytest.approx(ref["ece"], rel=1e-5)


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.array([0.5, 0.5]), np.array([0]), "2-D"),
        (np.ones((2, 2, 2)) / 2, np.array([0, 1]), "2-D"),
        (PROBS, LABELS[:4], "shape mismatch"),
        (PROBS, LABELS[:, None], "1-D"),
        (PROBS, np.array([0, 1, 0, 2, 3]), "out of range"),
        (PROBS, np.array([0, 1, 0, 2, -1]), "out of range"),
        (np.where(np.eye(5, 3) == 1, np.nan, PROBS), LABELS, "NaN"),
        (PROBS * 10, LABELS, r"\[0, 1\]"),
        (PROBS, LABELS.astype(float), "integers"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "non-empty"),
    ],
)
def test_bad_input_raises(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        evaluate(probs, labels)
    with pytest.raises(ValueError, match=match):
        reliability_bins(probs, labels)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5])
def test_bad_n_bins_raises(n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        evaluate(PROBS, LABELS, n_bins=n_bins)


def test_default_ece_has_the_papers_ten_bins():
    rng = np.random.default_rng(9)
    probs = torch.softmax(torch.tensor(rng.normal(size=(500, 10)) * 2), 1).numpy()
    # right exactly when under 0.5 confident: a bin that straddles 0.5 (15 bins have one,
    # 10 do not) mixes right and wrong samples and changes the ECE
    wrong = (probs.argmax(1) + 1) % 10
    labels = np.where(probs.max(1) < 0.5, probs.argmax(1), wrong)
    ten, _, _ = _authors_ece_aurc_eaurc(probs, labels, bin_size=0.1)
    fifteen, _, _ = _authors_ece_aurc_eaurc(probs, labels, bin_size=1 / 15)
    assert abs(ten - fifteen) > 0.1  # the data tell the two apart
    assert evaluate(probs, labels)["ece"] == pytest.approx(ten, abs=1e-9)
