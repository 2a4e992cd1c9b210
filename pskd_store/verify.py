"""`pskd-store verify`: everything a run or a store holds, read back and checked.

Training, `inspect` and `info` stop at the first damaged byte they read; `verify` reads
everything and reports every problem by what it is (epoch, array) and row range:

- the sealed list: epochs 1..E in order, each with its statistics and seal token;
- the labels, against the store's fingerprint;
- every chunk of every kept teacher epoch and of the whole trajectory tier: present and
  matching its crc32c checksum;
- the values: every teacher row finite, non-negative and summing to 1 (within the
  storage dtype's rounding and float32's sum of K terms; a top-k row: largest first, at most 1, distinct classes in
  [0, K)), and the trajectory record equal to what the teacher row says (true-class
  probability, max probability, argmax);
- the memory-map cache: each file against its checksum and, for kept epochs, against the
  decoded teacher;
- in a run directory, also the checkpoint (readable, and its epoch sealed in the store),
  ``config.json`` and ``metrics.jsonl``.

It writes nothing. A damaged cache file is reported, but is no loss: training decodes it
again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import EpochNotSealedError, StoreDamagedError, StoreError
from .integrity import DamagedChunk, row_ranges
from .row_encoding import rounding_tolerance, summation_slack
from .run_directory import RunDirectory, RunError
from .store import SoftTargetStore
from .store_keys import TRAJECTORY_FIELDS, cache_file_name, slice_rows
from .trajectory import SequenceTrajectory

MAX_RANGES = 5          # row ranges named per problem; the rest are counted


@dataclass(frozen=True)
class Finding:
    """One problem: where (``part``) and what."""

    part: str
    problem: str

    def __str__(self) -> str:
        return f"{self.part}: {self.problem}"


@dataclass
class Report:
    """What `verify` checked, what it found, what it could not check (epochs another process
    pruned, rolled back or sealed again while they were read: no damage), and how long it took."""

    target: str
    checked: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, part: str, problem: str) -> None:
        self.findings.append(Finding(part, problem))

    def as_dict(self) -> dict:
        return {"target": self.target, "ok": self.ok, "checked": self.checked, "skipped": self.skipped,
                "seconds": self.seconds, "findings": [{"part": f.part, "problem": f.problem} for f in self.findings]}


def verify_path(path: str | Path, *, progress: bool = False) -> Report:
    """Verify a run directory (its store, cache, checkpoint and files) or a store."""
    run = RunDirectory(Path(path))
    if "://" not in str(path) and run.is_run():
        return verify_run(run, progress=progress)
    store = SoftTargetStore.open(path, read_only=True)
    return verify_store(store, progress=progress)


def verify_run(run: RunDirectory, *, progress: bool = False) -> Report:
    """Everything :func:`verify_store` checks, plus the run's checkpoint and files."""
    started = time.perf_counter()
    store = SoftTargetStore.open(run.store_url(), read_only=True)
    config = _run_config(run)
    cache_dir = config.get("cache_dir") or None
    report = verify_store(store, cache_dir=cache_dir, progress=progress, target=str(run.path))
    # train's run; a loop's store in RUN/store (its own checkpoints beside it, if any) is checked alone
    if run.config.is_file() or run.checkpoint.is_file() or run.previous_checkpoint.is_file():
        _check_run_files(run, store, report)
    report.seconds = time.perf_counter() - started
    return report


def verify_store(store: SoftTargetStore, *, cache_dir: str | Path | None = None, progress: bool = False,
                 target: str | None = None) -> Report:
    """Check every part of ``store`` (and its memory-map cache); writes nothing."""
    from .service import cache_folder  # imports torch; only the cache check needs it

    started = time.perf_counter()
    report = Report(target or store.url)
    labels = _check_sealed_list_and_labels(store, report)
    cache = _cache_files(cache_folder(store, cache_dir or None), store, report)
    bar = tqdm(store.sealed_epochs, desc="verify", unit="epoch", disable=None if progress else True, leave=False)
    for epoch in bar:  # a bar on a terminal only (disable=None)
        try:
            trajectory = _check_trajectory(store, epoch, report)
            _check_digest(store, epoch, "trajectory", report)
            if epoch in store.teacher_epochs:
                _check_teacher(store, epoch, labels, trajectory, cache.pop(epoch, None), report)
                _check_digest(store, epoch, "teacher", report)
        except EpochNotSealedError as moved:  # a training run moved the store on: not damage (integrity.py)
            report.skipped.append(f"epoch {epoch}: {moved}")
    report.seconds = time.perf_counter() - started
    return report


def _check_digest(store: SoftTargetStore, epoch: int, tier: str, report: Report) -> None:
    """The tier's stored chunks against the digest the seal recorded: any chunk rewritten
    after the seal, with a valid checksum or not, changes it."""
    recorded = store.sealed_digest(epoch, tier)
    if recorded is None:
        report.checked.append(f"{tier} of epoch {epoch}: no digest recorded (sealed by an earlier pskd-store)")
        return
    try:
        stored = store.stored_digest(epoch, tier)
    except StoreError:
        return  # the damaged chunks are reported by the tier's own check
    report.checked.append(f"{tier} digest of epoch {epoch}")
    if stored != recorded:
        report.add(f"{tier} of epoch {epoch}", "its stored chunks are not the ones sealed (their digest differs "
                                               "from the one recorded at the seal): they were rewritten after it")


# -- the store ---------------------------------------------------------------------------------


def _check_sealed_list_and_labels(store: SoftTargetStore, report: Report) -> np.ndarray | None:
    sealed = store.sealed_epochs
    report.checked.append(f"sealed list ({len(sealed)} epochs)")
    if sealed != list(range(1, len(sealed) + 1)):
        report.add("sealed list", f"epochs {sealed} are not 1..{len(sealed)} in order: the root metadata was edited")
    infos = store.summary()["epochs"]
    for epoch in sealed:
        info = infos.get(epoch)
        if not info or not isinstance(info.get("seal_token"), str):
            report.add(f"epoch {epoch}", "is sealed but has no statistics or seal token: the root metadata was edited")
    if set(infos) - set(sealed):
        report.add("sealed list", f"statistics for epochs {sorted(set(infos) - set(sealed))} that are not sealed")
    report.checked.append("labels")
    try:
        if store.token_rows is not None:  # reading a sequence store's lengths checks them
            report.checked.append("lengths")
        return store.labels
    except StoreError as err:
        report.add("labels", _problem(err))
        return None


def _check_trajectory(store: SoftTargetStore, epoch: int, report: Report) -> dict[str, np.ndarray] | None:
    """Every chunk of the epoch's trajectory record; returns its fields when all are readable."""
    part = f"trajectory of epoch {epoch}"
    report.checked.append(part)
    try:
        arrays = store.trajectory_arrays(epoch)
    except StoreDamagedError as err:
        report.add(part, _problem(err))
        return None
    damaged = [chunk for array in arrays for chunk in array.damaged_chunks()]
    _report_chunks(report, part, damaged)
    return None if damaged else store.trajectory_values(arrays)


def _statistics(store: SoftTargetStore, epoch: int) -> dict:
    """What the seal recorded of ``epoch``; {} when the statistics are lost (reported apart)."""
    try:
        return store.epoch_info(epoch)
    except KeyError:
        return {}


def _sum_tolerance(store: SoftTargetStore, epoch: int) -> float:
    """How far from 1 a stored row may sum: the rounding to the store's dtype, plus how far
    the probability rows given were allowed (the seal records it), or for logits float32's
    summation of K terms in the writer's softmax."""
    given = _statistics(store, epoch).get("sum_tolerance")
    return rounding_tolerance(np.finfo(store.dtype).eps) + (summation_slack(store.num_classes) if given is None
                                                            else given)


def _check_teacher(store: SoftTargetStore, epoch: int, labels: np.ndarray | None,
                   trajectory: dict[str, np.ndarray] | None, cached: np.ndarray | None, report: Report) -> None:
    """Every chunk of the epoch's teacher: checksum, values, its trajectory record, its cache."""
    part = f"teacher of epoch {epoch}"
    try:
        teacher = store.teacher_array(epoch)
    except StoreDamagedError as err:
        report.add(part, _problem(err))
        return
    report.checked.append(part)
    bad_values: list[tuple[int, int]] = []
    mismatched: list[tuple[int, int]] = []
    cache_differs: list[tuple[int, int]] = []
    encoding = store.encoding
    row_bytes = encoding.width * encoding.stored_dtype.itemsize
    step = slice_rows(teacher.chunks[0], row_bytes)
    tolerance = _sum_tolerance(store, epoch)
    sequences = None  # a sequence store's summaries, recomputed (its lengths were read with the labels)
    if labels is not None and trajectory is not None and store.token_rows is not None:
        sequences = SequenceTrajectory(store.token_rows)
    for lo in range(0, len(teacher), step):
        hi = min(len(teacher), lo + step)
        try:
            block = teacher[lo:hi]
        except StoreDamagedError:
            _report_chunks(report, part, list(teacher.damaged_chunks(lo, hi)))
            continue
        bad_values += _rows(lo, ~encoding.valid(block, tolerance))
        if labels is not None and trajectory is not None:
            recorded = encoding.trajectory(block, labels[lo:hi])
            if sequences is not None:
                sequences.add(lo, recorded, labels[lo:hi], None)
            else:
                mismatched += _rows(lo, ~np.logical_and.reduce(
                    [recorded[name].astype(TRAJECTORY_FIELDS[name]) == trajectory[name][lo:hi] for name in recorded]))
        if cached is not None:
            cache_differs += _rows(lo, (cached[lo:hi] != block).any(axis=1))
    if sequences is not None and labels is not None and trajectory is not None:
        disagreeing = _disagreeing_samples(sequences, trajectory)
        if disagreeing:
            report.add(f"trajectory of epoch {epoch}", f"samples {_limited(disagreeing)} disagree with their "
                                                       "teacher rows")
    if bad_values:
        report.add(part, f"rows {_limited(bad_values)} are not probability vectors ({encoding.describe()} rows: "
                         "NaN, negative, or not summing to 1): their chunks were rewritten with valid checksums")
    if mismatched:
        report.add(f"trajectory of epoch {epoch}", f"rows {_limited(mismatched)} disagree with the teacher rows")
    if cache_differs:
        report.add(f"memory-map cache of epoch {epoch}", f"rows {_limited(cache_differs)} differ from the store "
                                                         "(a cache: it is decoded again when deleted)")


def _disagreeing_samples(sequences: SequenceTrajectory, stored: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """Sample ranges of a sequence store whose stored summaries are not the ones their rows give
    (NaN, for a sample without target positions, equals NaN; a token accuracy may be rounded
    to the nearest, as epochs sealed before it was rounded down hold it)."""
    recomputed = sequences.result()
    same = [(recomputed[name] == stored[name]) | (np.isnan(recomputed[name]) & np.isnan(stored[name]))
            for name in recomputed if name not in ("written", "token_accuracy")]
    same.append((recomputed["token_accuracy"] == stored["token_accuracy"])
                | (sequences.token_accuracy_to_nearest() == stored["token_accuracy"])
                | np.isnan(stored["token_accuracy"]) & np.isnan(recomputed["token_accuracy"]))
    return _rows(0, ~np.logical_and.reduce(same))


# -- the cache -----------------------------------------------------------------------------------


def _cache_files(cache_dir: Path, store: SoftTargetStore, report: Report) -> dict[int, np.ndarray]:
    """Memory maps of the cached files of kept epochs whose checksum is right, by epoch;
    reports the files whose checksum is wrong."""
    from .service import cached_file_intact

    if not cache_dir.is_dir():
        return {}
    infos = store.summary()["epochs"]
    tokens = {cache_file_name(epoch, infos[epoch]["seal_token"]): epoch
              for epoch in store.teacher_epochs if epoch in infos}
    maps = {}
    for path in sorted(cache_dir.glob("epoch_*.npy")):
        report.checked.append(f"cache file {path.name}")
        if not cached_file_intact(path):
            report.add(f"memory-map cache {path}", "does not match its checksum (a cache: it is decoded "
                                                   "again on the next epoch; deleting it is safe)")
        elif path.name in tokens:
            view = np.load(path, mmap_mode="r")
            if view.shape == (store.num_samples, store.encoding.width) and view.dtype == store.encoding.stored_dtype:
                maps[tokens[path.name]] = view
            else:
                report.add(f"memory-map cache {path}", f"holds a {view.dtype} array of shape {view.shape}")
    return maps


# -- the run directory ---------------------------------------------------------------------------


def _run_config(run: RunDirectory) -> dict:
    try:
        return run.read_config()
    except RunError:
        return {}  # reported by _check_run_files


def _check_run_files(run: RunDirectory, store: SoftTargetStore, report: Report) -> None:
    from .checkpoint import CheckpointDamagedError, checkpoint_problem, checkpoint_seal, checkpointed  # imports torch

    report.checked.append("config.json")
    try:
        run.read_config()
    except RunError as err:
        report.add(str(run.config), str(err).removeprefix(f"{run.config} "))
    if not run.config.is_file() and run.checkpoint.is_file():  # made by train, which writes it first
        report.add(str(run.config), "is missing: restore it from a backup")
    if not run.checkpoint.is_file() and checkpointed(store.sealed_epochs):
        report.add(str(run.checkpoint), f"is missing, but the store has sealed epochs {store.sealed_epochs}: "
                                        "the run cannot be resumed; restore its checkpoints from a backup")
    report.checked.append("metrics.jsonl")
    try:
        run.metrics_rows(torn_tail=True)  # a row a kill cut short is no damage: the resume trains its epoch again
    except RunError as err:
        report.add(str(run.metrics), str(err))
    for checkpoint in (run.checkpoint, run.previous_checkpoint):
        if not checkpoint.is_file():
            continue
        report.checked.append(checkpoint.name)
        problem = checkpoint_problem(checkpoint)
        if problem:
            report.add(str(checkpoint), problem)
            continue
        try:
            epoch, token = checkpoint_seal(checkpoint)
        except CheckpointDamagedError as err:  # another program's file in its place
            report.add(str(checkpoint), str(err).removeprefix(f"{checkpoint} "))
            continue
        if checkpoint == run.checkpoint:  # read after it: an epoch a run still training sealed since is listed
            store.refresh()
        if checkpoint == run.checkpoint and epoch not in store.sealed_epochs:
            report.add(str(checkpoint), f"was written after epoch {epoch}, which the store has not sealed "
                                        f"(sealed: {store.sealed_epochs}): the store lost epochs the model trained on")
        elif (checkpoint == run.checkpoint and token is not None
              and _statistics(store, epoch).get("seal_token") not in (None, token)):
            report.add(str(checkpoint), f"was written after epoch {epoch} as this run sealed it, but the store's "
                                        "epoch of that number was sealed by another (its seal token differs): "
                                        "another run has sealed epochs into this store")
        try:
            missing = run.missing_metrics(epoch) if checkpoint == run.checkpoint else []
        except RunError:  # a damaged line: reported above
            missing = []
        if missing:
            report.add(str(run.metrics), f"lacks the rows of epochs {missing}, which the checkpoint of epoch "
                                         f"{epoch} trained: restore it from a backup")


# -- reporting -----------------------------------------------------------------------------------


def _report_chunks(report: Report, part: str, damaged: list[DamagedChunk]) -> None:
    by_problem: dict[str, list[tuple[int, int]]] = {}
    for chunk in damaged:
        by_problem.setdefault(chunk.problem, []).append(chunk.rows)
    for problem, rows in by_problem.items():
        report.add(part, f"rows {_limited(rows)} {problem}")


def _rows(offset: int, mask: np.ndarray) -> list[tuple[int, int]]:
    """The runs of True in ``mask`` as [start, end) row ranges, shifted by ``offset``."""
    rows = np.flatnonzero(mask)
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) > 1)
    starts, ends = rows[np.r_[0, breaks + 1]], rows[np.r_[breaks, len(rows) - 1]] + 1
    return [(offset + int(a), offset + int(b)) for a, b in zip(starts, ends)]


def _limited(rows: list[tuple[int, int]]) -> str:
    ranges = row_ranges(rows)
    if len(ranges) <= MAX_RANGES:
        return ", ".join(ranges)
    return f"{', '.join(ranges[:MAX_RANGES])} and {len(ranges) - MAX_RANGES} more ranges"


def _problem(err: Exception) -> str:
    """A store error's message without the `verify` hint (verify is what is running)."""
    return str(err).split(". None of its values were used")[0]
