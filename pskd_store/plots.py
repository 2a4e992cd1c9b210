"""The figures of `pskd-store inspect`, written as PNG files.

Built on :class:`matplotlib.figure.Figure` directly (rendered by Agg when saved), so
nothing touches pyplot's global state and no display is needed.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .analysis import RunRecord, metric_series
from .metrics import reliability_bins

DPI = 110

# (trajectory field, y label): one row of panels per field in the trajectory figure.
TRAJECTORY_PANELS = (
    ("true_prob", "probability of the true class"),
    ("max_prob", "max probability"),
)

# (title, path into a metrics.jsonl row): the panels of the training-curves figure.
CURVE_PANELS = (
    ("alpha_t", ("alpha_t",)),
    ("train loss", ("train", "loss")),
    ("test top-1 error (%)", ("test", "top1_err")),
    ("test NLL", ("test", "nll")),
    ("test ECE (%)", ("test", "ece")),
)


def fit_title(text: str, inches: float) -> str:
    """``text`` wrapped to lines that fit ``inches`` of a title (about 9 characters of the
    default 12-point title font per inch): run directory names are long by default."""
    return "\n".join(textwrap.fill(line, width=max(12, int(9 * inches))) for line in text.splitlines())


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _draw_samples(ax: Axes, epochs: np.ndarray, values: np.ndarray) -> None:
    """One thin line per sample (columns of ``values``) and their mean in bold. Epochs in
    which a sample was not predicted (NaN: carried forward) are gaps, left out of the mean;
    every point is marked, so that an epoch predicted between two gaps (half of each batch
    under --aug) is seen, and the x axis spans every epoch of the run."""
    alpha = float(np.clip(8 / values.shape[1], 0.08, 0.6))
    ax.plot(epochs, values, color="tab:blue", linewidth=0.6, alpha=alpha, marker=".", markersize=3)
    seen = np.isfinite(values).sum(axis=1)
    mean = np.where(seen > 0, np.nansum(values, axis=1) / np.maximum(seen, 1), np.nan)
    ax.plot(epochs, mean, color="black", linewidth=2.5, marker="o", markersize=4, label="mean")
    ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)


def plot_trajectories(runs: list[RunRecord], ids: np.ndarray, path: Path, title: str) -> Path:
    """Per run a column: true-class and max probability of samples ``ids`` over epochs.

    The y axis is shared, so the same samples can be compared across runs at a glance.
    """
    fig = Figure(figsize=(1 + 4 * len(runs), 6.5), layout="constrained")
    axes = fig.subplots(len(TRAJECTORY_PANELS), len(runs), sharey=True, squeeze=False)
    for column, run in enumerate(runs):
        epochs = run.trajectory["epochs"]
        for row, (field, _) in enumerate(TRAJECTORY_PANELS):
            _draw_samples(axes[row, column], epochs, run.trajectory[field][:, ids].astype(np.float32))
        axes[0, column].set_title(fit_title(run.name, 3.6))
        axes[-1, column].set_xlabel("epoch")
    for row, (_, ylabel) in enumerate(TRAJECTORY_PANELS):
        axes[row, 0].set_ylabel(ylabel)
    axes[0, 0].set_ylim(0, 1.02)
    axes[0, 0].legend(loc="upper left")
    fig.suptitle(fit_title(title, fig.get_figwidth()))
    return _save(fig, path)


def plot_reliability(run: RunRecord, path: Path) -> Path:
    """Reliability diagram of the run's eval probabilities, with bin counts below.

    Bars are the accuracy per confidence bin; the shaded part of each bin is its gap to
    the bin's mean confidence, the quantity ECE averages.
    """
    bins = reliability_bins(run.eval_probs, run.eval_labels, n_bins=run.ece_bins)
    left, width = bins.edges[:-1], np.diff(bins.edges)
    filled = bins.count > 0
    accuracy, confidence = bins.accuracy[filled], bins.confidence[filled]

    fig = Figure(figsize=(4.8, 5.8), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(left[filled], accuracy, width=width[filled], align="edge",
            color="tab:blue", edgecolor="black", label="accuracy")
    top.bar(left[filled], np.abs(confidence - accuracy), bottom=np.minimum(confidence, accuracy),
            width=width[filled], align="edge", color="tab:red", alpha=0.3, hatch="//", label="gap")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    top.set_title(fit_title(f"{run.name}\nECE = {100 * bins.ece:.2f}%", 4.2))
    top.legend(loc="upper left")
    bottom.bar(left, bins.count, width=width, align="edge", color="gray", edgecolor="black")
    bottom.set(xlabel="confidence (max probability)", ylabel="samples")
    return _save(fig, path)


def _draw_curve(ax: Axes, run: RunRecord, keys: tuple[str, ...]) -> None:
    """One run's metric over epochs (gaps where a row lacks it)."""
    epochs, values = metric_series(run.metrics, keys)
    ax.plot(epochs, values, marker="." if len(epochs) <= 30 else None, label=run.name)


def plot_training_curves(runs: list[RunRecord], path: Path) -> Path:
    """alpha_t, train loss and test error, NLL and ECE over epochs, the runs overlaid."""
    fig = Figure(figsize=(3.4 * len(CURVE_PANELS), 3.8), layout="constrained")
    axes = fig.subplots(1, len(CURVE_PANELS))
    for ax, (title, keys) in zip(axes, CURVE_PANELS):
        for run in runs:
            _draw_curve(ax, run, keys)
        ax.set(title=title, xlabel="epoch")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(runs), 4))
    return _save(fig, path)
