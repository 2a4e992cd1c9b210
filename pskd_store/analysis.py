"""What `pskd-store inspect` computes from a run directory (see
:mod:`pskd_store.run_directory`): pure numpy, no plotting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import os_problem
from .metrics import reliability_bins
from .run_directory import RunDirectory, RunError
from .store import SoftTargetStore, StoreError

DEFAULT_ECE_BINS = 10
MIB = 2**20


@dataclass(frozen=True)
class RunRecord:
    """Everything `inspect` needs of one run, read once and read-only."""

    path: Path
    config: dict[str, Any]
    labels: np.ndarray                    # the store's labels: a class per sample, or every target token
    trajectory: dict[str, np.ndarray]     # SoftTargetStore.trajectory(): epochs, (E, N) arrays (N samples)
    metrics: list[dict[str, Any]]         # metrics.jsonl rows, in epoch order
    store_summary: dict[str, Any]
    eval_probs: np.ndarray | None = None  # (N_test, K) from train's last epoch or `pskd-store eval`
    eval_labels: np.ndarray | None = None  # (N_test,)

    @property
    def name(self) -> str:
        """Method/arch from the config (to tell runs apart in plots) and the directory name."""
        method, arch = self.config.get("method"), self.config.get("arch")
        return f"{method}/{arch} ({self.path.name})" if method and arch else self.path.name

    @property
    def num_samples(self) -> int:
        return self.trajectory["written"].shape[1]

    @property
    def num_epochs(self) -> int:
        return len(self.trajectory["epochs"])

    @property
    def ece_bins(self) -> int:
        """The bins training used for its ECE, so eval ECE is comparable with metrics.jsonl."""
        return int(self.config.get("ece_bins", DEFAULT_ECE_BINS))


def load_run(path: str | Path) -> RunRecord:
    """Read a run directory without writing to it: config, trajectory tier, metrics, eval."""
    run = RunDirectory(Path(path))
    if not run.path.is_dir():
        what = "is a file, not a run directory" if run.path.exists() else "does not exist"
        raise RunError(
            f"run directory {run.path} {what}: pass a directory written by "
            "`pskd-store train` (it holds config.json and store/)"
        )
    try:
        return _read_run(run)
    except OSError as err:  # permission denied, say
        raise RunError(f"cannot read {run.path}: {os_problem(err, run.path)}") from err


def _read_run(run: RunDirectory) -> RunRecord:
    if not run.is_run():
        inside = " (a store: pass the run directory that holds it)" if (run.path / "zarr.json").is_file() else ""
        raise RunError(f"no store in {run.path}{inside}: was it made by `pskd-store train`?")
    try:
        store = SoftTargetStore.open(run.store_url(), read_only=True)
        trajectory, labels, summary = store.trajectory(), store.labels, store.summary()
    except StoreError as err:
        raise RunError(f"cannot read the store of {run.path}: {err}") from err
    if len(trajectory["epochs"]) == 0:
        raise RunError(f"the store in {run.path} has no sealed epoch yet: train at least one epoch first")
    eval_probs, eval_labels = run.read_eval_probs()
    return RunRecord(
        path=run.path,
        config=run.read_config(),
        labels=labels,
        trajectory=trajectory,
        metrics=run.metrics_rows(torn_tail=True),  # a row a kill cut short: its epoch is trained again
        store_summary=summary,
        eval_probs=eval_probs,
        eval_labels=eval_labels,
    )


def correct_epochs(traj: dict[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
    """(N,) number of epochs in which each sample was predicted (written, not carried
    forward) and its prediction was its label; a sequence (a sequence store's trajectory)
    counts as right when at least half its target tokens were."""
    right = traj["token_accuracy"] >= 0.5 if "token_accuracy" in traj else traj["argmax"] == np.asarray(labels)[None]
    return np.count_nonzero(traj["written"] & right, axis=0)


def hard_mask(traj: dict[str, np.ndarray], labels: np.ndarray, max_correct_fraction: float = 0.5) -> np.ndarray:
    """(N,) True for samples right in fewer than ``max_correct_fraction`` of the epochs in
    which they were predicted (never for a sample that was never predicted).

    The definition of a hard sample in Figure 2 of the PS-KD paper.
    """
    seen = np.count_nonzero(traj["written"], axis=0)
    return (seen > 0) & (correct_epochs(traj, labels) < max_correct_fraction * seen)


def last_written(traj: dict[str, np.ndarray], field: str) -> np.ndarray:
    """(N,) each sample's ``field`` in the last epoch that predicted it (NaN if none did)."""
    written = traj["written"]
    last = len(written) - 1 - np.argmax(written[::-1], axis=0)
    values = traj[field][last, np.arange(written.shape[1])].astype(np.float64)
    values[~written.any(axis=0)] = np.nan
    return values


def hard_samples(
    traj: dict[str, np.ndarray], labels: np.ndarray, top: int = 100, max_correct_fraction: float = 0.5
) -> np.ndarray:
    """Ids of the ``top`` hardest samples, hardest first.

    Hardest means right in the smallest fraction of the epochs that predicted it (as
    :func:`hard_mask` judges: with ``--aug`` or ``--steps-per-epoch`` samples are predicted
    in different numbers of epochs); ties go to the lower final true-class probability,
    then the lower id, so the choice is deterministic.
    """
    ids = np.flatnonzero(hard_mask(traj, labels, max_correct_fraction))
    final_true = last_written(traj, "true_prob")[ids]
    right = correct_epochs(traj, labels)[ids] / np.count_nonzero(traj["written"][:, ids], axis=0)
    order = np.lexsort((ids, final_true, right))
    return ids[order][:top]


def check_ids(ids: list[int] | np.ndarray, num_samples: int, run: Path) -> np.ndarray:
    """Sample ids chosen by hand, refused when the store has no such sample."""
    ids = np.asarray(ids, dtype=np.int64)
    for sample in ids:
        if not 0 <= sample < num_samples:
            raise RunError(
                f"sample id {sample} is out of range: the store in {run} holds N={num_samples} "
                f"samples, so --ids takes ids 0..{num_samples - 1}"
            )
    return ids


def check_same_samples(first: RunRecord, other: RunRecord) -> None:
    """Refuse to compare runs whose sample ids do not name the same training samples."""
    if other.num_samples != first.num_samples:
        raise RunError(
            f"{other.path} holds N={other.num_samples} samples but {first.path} holds "
            f"N={first.num_samples}: inspect together only runs trained on the same samples (the same data "
            "set, --train-subset and --val-split)"
        )
    if not np.array_equal(other.labels, first.labels):
        raise RunError(
            f"{other.path} and {first.path} hold N={first.num_samples} samples with different "
            "labels: inspect together only runs trained on the same data set and split"
        )
    names = [run.store_summary["fingerprint"].get("names_sha256") for run in (first, other)]
    if None not in names and names[0] != names[1]:  # image trees: the same labels, other files
        raise RunError(
            f"{other.path} and {first.path} were trained on different image files with the same labels: "
            "inspect together only runs trained on the same data set and split"
        )


def metric_series(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of one metric over the rows; NaN where a row lacks it.

    ``keys`` is the path into a row, e.g. ("test", "nll") or ("alpha_t",).
    """
    values = []
    for row in rows:
        value: Any = row
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        values.append(np.nan if value is None else float(value))
    return np.array([row.get("epoch", np.nan) for row in rows], dtype=float), np.array(values, dtype=float)


def eval_ece(run: RunRecord) -> float | None:
    """ECE (percent) of the eval probabilities, or None when `pskd-store eval` was not run."""
    if run.eval_probs is None:
        return None
    return 100.0 * reliability_bins(run.eval_probs, run.eval_labels, n_bins=run.ece_bins).ece


def final_test_metrics(run: RunRecord) -> dict[str, Any] | None:
    """The test metrics of the last epoch that has them, with its epoch number."""
    for row in reversed(run.metrics):
        if isinstance(row.get("test"), dict):
            return {"epoch": row.get("epoch"), **row["test"]}
    return None


def summarize(run: RunRecord, plotted_ids: np.ndarray, max_correct_fraction: float = 0.5) -> dict[str, Any]:
    """The numbers `inspect` prints for one run; ``plotted_ids`` are the samples plotted
    (the hard samples of the first run, or the ids chosen with --ids)."""
    plotted_ids = np.asarray(plotted_ids, dtype=np.int64)
    final_true = last_written(run.trajectory, "true_prob")[plotted_ids]
    epochs = run.store_summary["epochs"]
    stored = [info["nbytes_stored"] for info in epochs.values()]
    kept = run.store_summary["teacher_epochs"]
    return {
        "run": str(run.path),
        "name": run.name,
        "num_samples": run.num_samples,
        "epochs": run.num_epochs,
        "hard_found": int(np.count_nonzero(hard_mask(run.trajectory, run.labels, max_correct_fraction))),
        "max_correct_fraction": max_correct_fraction,
        "plotted": len(plotted_ids),
        "plotted_ids": plotted_ids.tolist(),
        "mean_final_true_prob": float(np.nanmean(final_true)) if np.isfinite(final_true).any() else None,
        "store_mib_per_epoch": float(np.mean(stored)) / MIB if stored else 0.0,
        "store_mib_total": float(np.sum(stored)) / MIB,  # written: the epochs pruned since too
        "store_mib_kept": sum(epochs[epoch]["nbytes_stored"] for epoch in kept) / MIB,
        "teacher_epochs_kept": kept,
        "final_test": final_test_metrics(run),
        "eval_ece": eval_ece(run),
    }
