"""Evaluation metrics reported in the PS-KD paper (Kim et al., ICCV 2021, Sec. 4).

All metrics are returned in the paper's units: error rates and ECE in percent,
AURC and E-AURC multiplied by 10^3. ECE, AURC and E-AURC compute exactly what the
PS-KD authors' code computes (``metric_ece_aurc_eaurc``, ``compute_bin`` and
``calc_aurc`` in ``utils/metric.py`` of lgcnsai/PS-KD-Pytorch), bin edges and
sort included, so numbers are comparable with the paper's tables. (Their CIFAR test
loader shuffles, so the order of exactly tied confidences in AURC is random there and the
data set's order here: a difference only where many samples share one confidence.)

Definitions: ECE is Naeini et al. (AAAI 2015) as used by Guo et al. (ICML 2017);
AURC and E-AURC are Geifman et al., "Bias-Reduced Uncertainty Estimation for Deep
Neural Classifiers" (ICLR 2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

# Floor for the true-class probability in the NLL of probabilities alone (an ensemble's
# average), so a probability of exactly zero yields a large finite loss instead of inf.
NLL_EPS = 1e-12


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram.

    Bin ``i`` holds samples with ``lower[i] < confidence <= upper[i]``.
    ``confidence`` and ``accuracy`` are NaN for empty bins so a plot shows a
    gap rather than a misleading zero.
    """

    lower: np.ndarray  # (n_bins,) exclusive lower bounds
    upper: np.ndarray  # (n_bins,) inclusive upper bounds
    confidence: np.ndarray  # (n_bins,) mean max-probability in each bin
    accuracy: np.ndarray  # (n_bins,) fraction of top-1 correct in each bin
    count: np.ndarray  # (n_bins,) number of samples in each bin
    n_samples: int  # all samples, including any with confidence 0 (unbinned)

    @property
    def edges(self) -> np.ndarray:
        """(n_bins + 1,) boundaries for plotting: the lower bounds, then the last upper one."""
        return np.append(self.lower, self.upper[-1])

    @property
    def ece(self) -> float:
        """Expected calibration error as a fraction: sum |acc - conf| * bin share.

        The share divides by all samples (not just binned ones), as the
        authors' code does.
        """
        filled = self.count > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(gaps * self.count[filled]) / self.n_samples)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """Convert a tensor (any device/dtype, incl. bfloat16) or array to numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.to(torch.float64)  # numpy has no bfloat16
        return x.numpy()
    return np.asarray(x)


def _prepare(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate inputs once and return float64 probs (N, K) and int64 labels (N,).

    Metrics silently computed on malformed input (e.g. logits, NaNs, shifted
    labels) produce plausible-looking but wrong numbers, so fail loudly instead.
    """
    p = _to_numpy(probs)
    y = _to_numpy(labels)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, K), got shape {p.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {y.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(
            f"shape mismatch: probs has {p.shape[0]} rows but labels has {y.shape[0]} entries"
        )
    n, k = p.shape
    if n == 0 or k == 0:
        raise ValueError(f"probs must be non-empty, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"probs must be a float array, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if np.isnan(p).any():
        raise ValueError("probs contains NaN")
    if not ((p >= 0.0) & (p <= 1.0)).all():
        raise ValueError("probs must lie in [0, 1] (pass probabilities, not logits)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(
            f"labels out of range: must be in [0, {k}), got min {y.min()} and max {y.max()}"
        )
    return p, y


def true_class_rank(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0-based rank of the true class per sample among ``scores`` (logits or
    probabilities, (N, K)), ties going to the lower index.

    The tie rule matches ``argmax`` (first maximum wins), so rank 0 is exactly
    "top-1 prediction is correct" and top-1 and top-k agree with each other.
    """
    true = scores[np.arange(len(y)), y][:, None]
    classes = np.arange(scores.shape[1])[None, :]
    higher = scores > true
    tied_before = (scores == true) & (classes < y[:, None])
    return np.sum(higher | tied_before, axis=1)


def _per_sample(values: ArrayLike, y: np.ndarray, name: str) -> np.ndarray:
    values = _to_numpy(values)
    if values.shape != y.shape:
        raise ValueError(f"{name} must have shape {y.shape}, one per label, got {values.shape}")
    return values


def _bin_bounds(n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' bins: upper bounds ``np.arange(w, 1 + w, w)`` and lower bounds
    ``upper - w`` for width ``w = 1 / n_bins``.

    These are not ``linspace`` edges: float rounding makes some lower bounds a hair
    above the previous upper bound (0.30000000000000004 against 0.3 at 10 bins), and
    their code bins exactly so. Their code takes 10 bins, whose last bound is 1.0. At
    other counts arange's rounding can add a bound past 1.0 (dropped: it would make an
    extra bin) or end at 0.9999999999999999 (6, 14, 24 bins...), which would leave a
    confidence of exactly 1.0, a float32 softmax's for any margin above ~17, in no bin:
    the last bound is 1.0 whatever the count.
    """
    width = 1.0 / n_bins
    upper = np.arange(width, 1.0 + width, width)[:n_bins]
    upper[-1] = 1.0
    return upper - width, upper


def _reliability(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> ReliabilityBins:
    """Bin samples by confidence into ``n_bins`` (lower, upper] bins, as ``compute_bin`` does."""
    lower, upper = _bin_bounds(n_bins)
    inside = (conf[None, :] > lower[:, None]) & (conf[None, :] <= upper[:, None])  # (n_bins, N)
    count = inside.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = (inside * conf).sum(axis=1) / count
        accuracy = (inside & correct).sum(axis=1) / count
    return ReliabilityBins(lower, upper, confidence, accuracy, count, n_samples=len(conf))


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def reliability_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = 10) -> ReliabilityBins:
    """Per-bin confidence/accuracy/count: the data behind a reliability diagram.

    Confidence is the max probability; correctness is top-1 correctness.
    """
    _check_n_bins(n_bins)
    p, y = _prepare(probs, labels)
    return _reliability(p.max(axis=1), true_class_rank(p, y) == 0, n_bins)


def _aurc_eaurc(conf: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """AURC and E-AURC as fractions, exactly as the authors' ``calc_aurc``.

    Samples are taken most-confident first (``np.argsort(conf)`` reversed, as the authors
    sort; equal confidences then depend on the samples' order, which is the data set's here
    and random in the authors' shuffled CIFAR test loader); the risk at coverage i/N is the error rate
    among those first i samples, and AURC is the mean of these risks. E-AURC subtracts
    the AURC of the optimal ranking of the same predictions (every error last), the
    finite sum ``(1/N) sum_{i=1..E} i / (N - E + i)`` over the E errors.
    """
    n = len(conf)
    errors = ~correct[np.argsort(conf)[::-1]]
    aurc = float(np.mean(np.cumsum(errors) / np.arange(1, n + 1)))
    wrong_ranks = np.arange(1, int(errors.sum()) + 1, dtype=np.float64)
    optimal = float(np.sum(wrong_ranks / (n - len(wrong_ranks) + wrong_ranks)) / n)
    return aurc, aurc - optimal


def evaluate(probs: ArrayLike, labels: ArrayLike, sample_nll: ArrayLike | None = None,
             sample_rank: ArrayLike | None = None, n_bins: int = 10) -> dict[str, float]:
    """Compute the PS-KD paper's metrics for predicted probabilities.

    Returns ``top1_err`` and ``top5_err`` (percent; top-5 uses min(5, K)
    classes), ``nll`` (mean, nats), ``ece`` (percent, ``n_bins`` bins),
    ``aurc`` and ``eaurc`` (x 10^3) and ``n`` (sample count).

    ``sample_nll``: each sample's cross-entropy of its logits (``engine.predict``), whose
    mean is the authors' NLL (``nn.CrossEntropyLoss`` on the logits). Without it (an
    ensemble's averaged probabilities, which have no logits) the NLL is the mean of
    -log p_true with p_true floored at ``NLL_EPS``: a float32 probability can underflow to 0.

    ``sample_rank``: each sample's true-class rank among its logits (``engine.predict``),
    which top-1 and top-5 count, as the authors' ``accuracy()`` ranks ``output.topk`` of the
    logits; without it the probabilities are ranked. The two differ only where probabilities
    underflow to 0 and tie. ECE and AURC take the probabilities' argmax, as the authors' do.
    """
    _check_n_bins(n_bins)
    p, y = _prepare(probs, labels)
    if sample_nll is not None:
        sample_nll = _per_sample(sample_nll, y, "sample_nll")
    n, k = p.shape
    rank_of_probs = true_class_rank(p, y)
    correct = rank_of_probs == 0  # the probabilities' argmax, which ECE and AURC take
    rank = rank_of_probs if sample_rank is None else _per_sample(sample_rank, y, "sample_rank")
    conf = p.max(axis=1)
    p_true = p[np.arange(n), y]
    aurc, eaurc = _aurc_eaurc(conf, correct)
    return {
        "top1_err": 100.0 * float(np.mean(rank != 0)),
        "top5_err": 100.0 * float(np.mean(rank >= min(5, k))),
        "nll": float(np.mean(sample_nll, dtype=np.float64) if sample_nll is not None
                     else -np.mean(np.log(np.clip(p_true, NLL_EPS, 1.0)))),
        "ece": 100.0 * _reliability(conf, correct, n_bins).ece,
        "aurc": 1e3 * aurc,
        "eaurc": 1e3 * eaurc,
        "n": float(n),
    }
