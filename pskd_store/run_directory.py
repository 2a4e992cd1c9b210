"""The files of one training run: where `train` writes them, `eval` and `inspect` read them.

    RUN/config.json            the resolved training config
    RUN/store/                 the SoftTargetStore (RUN/store.mmap/: its decoded teacher, a cache),
                               unless config.json names another place (``--store s3://...``)
    RUN/checkpoints/last.pt    model, optimizer, scheduler, epoch, every rank's RNG states
    RUN/metrics.jsonl          one JSON object per epoch (train, test and val metrics)
    RUN/summary.json           the last and the best epoch's metrics, the store's summary
    RUN/eval/test_probs.npz    test probabilities of the final model (train writes them,
                               `pskd-store eval` overwrites them)
    RUN/train.log              the log of rank 0
    RUN/.lock                  held by the one process that trains the run
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .local_store import write_atomically
from .staging import Owner


class RunError(ValueError):
    """A run directory that cannot be read: the message names the problem and the fix."""


class RunHeldError(RunError):
    """A run another process holds (trains, or resumes) now."""


_HELD_LOCKS: set[int] = set()  # the file descriptors of the run locks this process holds


def _release_inherited_locks() -> None:
    """In a forked child: let go of the run locks it inherited. An flock belongs to the open
    file, which a child shares; a DataLoader worker that outlives its killed trainer (stuck
    writing a batch into a pipe nobody reads) would hold the run, and every `--resume` be
    refused, for good. /dev/null takes each descriptor's place: the child's copy of the
    lock's file object closes it harmlessly, should it ever close it."""
    if _HELD_LOCKS:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in _HELD_LOCKS:
            os.dup2(null, fd)
        os.close(null)
        _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_release_inherited_locks)


def _held_by(written: str, lock: Path) -> str:
    """The refusal of a run that another process holds, from what its trainer wrote into the lock."""
    holder, _, record = written.partition("\n")
    if _ended(record):
        return (f"{lock.parent} is held by a process that {holder} started, which has ended: stop it "
                f"(`fuser {lock}` names it), or train into another --output")
    return (f"{lock.parent} is being trained by {holder or 'another process'}: wait for it to finish or stop it, "
            "or train into another --output")


def _ended(record: str) -> bool:
    """Whether the trainer that a lock's record names has ended: known on its machine alone
    (host, boot and pid namespace), and for a lock written with the record."""
    try:
        owner = Owner(**json.loads(record), token="")
    except (ValueError, TypeError):
        return False
    return owner.pid != os.getpid() and owner.state() == "gone"


@contextlib.contextmanager
def writing(path: Path, then: str = "--resume the run") -> Iterator[None]:
    """Turn a failed write (permission denied, read-only file system, full disk) into one
    RunError naming ``path``, which a write to an open file does not carry, and what to
    do ``then``."""
    try:
        yield
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}; free space or make it writable, "
                       f"then {then}") from err


@dataclass(frozen=True)
class RunDirectory:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def store(self) -> Path:
        return self.path / "store"

    def store_url(self) -> str:
        """Where the run's store is: ``store`` in config.json (``--store``), else RUN/store."""
        try:
            location = self.read_config().get("store")
        except RunError:
            location = None  # a damaged config is reported by whoever reads it in full
        return str(location) if location else str(self.store)

    def read_config(self) -> dict[str, Any]:
        """config.json as a dict, {} when there is none (a run made by hand may lack one)."""
        if not self.config.is_file():
            return {}
        try:
            config = json.loads(self.config.read_text())
        except ValueError as err:  # not JSON, or not text (UnicodeDecodeError)
            raise RunError(f"{self.config} is not valid JSON ({err}): restore it from a backup") from err
        if not isinstance(config, dict):
            raise RunError(f"{self.config} holds a JSON {type(config).__name__}, not a config's object: restore "
                           "it from a backup")
        return config

    def missing_metrics(self, epoch: int) -> list[int]:
        """The epochs up to ``epoch`` (a checkpoint's) whose metrics.jsonl rows are gone."""
        kept = {row.get("epoch") for row in self.metrics_rows(torn_tail=True)}
        return [e for e in range(1, epoch + 1) if e not in kept]

    def is_run(self) -> bool:
        """A directory written by `pskd-store train`: a config.json, or a store inside."""
        return self.config.is_file() or (self.store / "zarr.json").is_file()

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def previous_checkpoint(self) -> Path:
        """The checkpoint ``last.pt`` replaced: one epoch older, to resume from when the
        last one or the newest teacher is damaged."""
        return self.path / "checkpoints" / "previous.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for this process: a second `train` or `--resume` of a live run is
        refused, naming the process. The operating system releases the lock when the
        process ends, however it ends (no stale lock after a SIGKILL): processes it forks
        (DataLoader workers) do not hold it (:func:`_release_inherited_locks`)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            file = open(self.path / ".lock", "a+")
        except OSError as err:
            raise RunError(f"cannot write to {self.path} ({err.strerror}): make it writable, or train "
                           "into another --output") from err
        with file:
            _HELD_LOCKS.add(file.fileno())  # before the lock: a process forked from here on never holds it
            try:
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    file.seek(0)
                    raise RunHeldError(_held_by(file.read().strip(), self.path / ".lock")) from None
                except OSError as err:  # ENOLCK, EOPNOTSUPP: a network or FUSE file system without locks
                    raise RunError(f"cannot lock {self.path / '.lock'} ({err.strerror}): its file system takes no "
                                   "locks; train into a directory on one that does (a local disk)") from err
                file.truncate(0)
                owner = asdict(Owner.this_process())  # and what tells, on this machine, whether it still runs
                del owner["token"]  # a claim's, among one process's claims
                file.write(f"process {owner['pid']} on {owner['host']}\n{json.dumps(owner)}\n")
                file.flush()
                yield
            finally:
                with contextlib.suppress(OSError):  # a file system without locks: none to let go
                    fcntl.flock(file, fcntl.LOCK_UN)  # also from the copies a fork made while it was released
                _HELD_LOCKS.discard(file.fileno())

    def remove_temporary_files(self) -> list[Path]:
        """Half-written files a killed process left behind (checkpoints, decoded teachers
        and zarr's chunks in the run's store are written to a temporary name, then renamed)."""
        leftovers = [*self.checkpoint.parent.glob(".*.tmp"), *self.path.glob("store.mmap/*.tmp"),
                     *self.path.glob(f"{self.metrics.name}.*.partial"), *self.path.glob("eval/*.partial"),
                     *self.store.rglob("*.partial")]  # the run's own names: a user's files beside them stay
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

    def eval_probs(self, split: str = "test", ensemble: bool = False) -> Path:
        return self.path / "eval" / f"{'ensemble_' if ensemble else ''}{split}_probs.npz"

    # -- metrics.jsonl ---------------------------------------------------------------------

    def metrics_rows(self, *, torn_tail: bool = False) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl ([] when training has not written any). ``torn_tail``
        skips a last line that an append cut short (no newline, not JSON)."""
        if not self.metrics.is_file():
            return []
        text = self.metrics.read_text()
        lines = text.splitlines()
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if torn_tail and number == len(lines) and not text.endswith("\n"):
                    break
                raise RunError(
                    f"line {number} of {self.metrics} is not valid JSON ({err}): fix or delete that line"
                ) from err
        return rows

    def append_metrics(self, row: dict[str, Any]) -> None:
        with writing(self.metrics), open(self.metrics, "a") as file:
            file.write(json.dumps(row) + "\n")

    def keep_metrics_through(self, epoch: int) -> None:
        """Drop the rows of epochs after ``epoch`` (what a resumed run redoes), a last row
        cut short by a kill or a full disk included: a row is appended before its epoch's
        checkpoint is written, so a torn one is never of an epoch resumed after. When rows
        of later epochs go, so do ``summary.json`` and the final model's probabilities in
        ``eval/``: that model is gone (the run writes them again when it ends)."""
        every = self.metrics_rows(torn_tail=True)
        rows = [row for row in every if row["epoch"] <= epoch]
        with writing(self.metrics):  # renamed into place: a kill or a full disk leaves the old rows whole
            write_atomically(self.metrics, "".join(json.dumps(row) + "\n" for row in rows).encode())
        if len(rows) < len(every):
            for result in (self.summary, self.eval_probs("test"), self.eval_probs("val")):
                result.unlink(missing_ok=True)

    def write_summary(self, summary: dict[str, Any]) -> None:
        with writing(self.summary):
            self.summary.write_text(json.dumps(summary, indent=2) + "\n")

    # -- per-sample probabilities ------------------------------------------------------------

    def write_eval_probs(self, probs: np.ndarray, labels: np.ndarray, sample_nll: np.ndarray | None = None,
                         sample_rank: np.ndarray | None = None, *, sources: list[str],
                         path: Path | None = None) -> Path:
        """Save per-sample probabilities where `inspect` reads them (``eval/test_probs.npz``
        unless ``path`` says otherwise), with each sample's cross-entropy of its logits and
        its true class's rank among them when there are logits (``nll``, ``rank``; none for
        an ensemble); ``sources`` names the checkpoints they came from."""
        path = path if path is not None else self.eval_probs()
        self.require_room_for_probabilities(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {name: values for name, values in (("nll", sample_nll), ("rank", sample_rank)) if values is not None}
        data = io.BytesIO()  # a file object: NumPy adds no .npz to the name given
        np.savez_compressed(data, probs=probs, labels=labels, checkpoints=np.array(sources), **extra)
        write_atomically(path, data.getvalue())  # renamed into place: never half a file
        return path

    def require_room_for_probabilities(self, path: Path) -> None:
        """Refuse ``path`` for probabilities when it holds something else (a checkpoint, a
        config); the run's eval/ files, an empty file or an earlier evaluation's are written over."""
        if path.exists() and path.parent != self.eval_probs().parent and not _may_write_over(path):
            raise RunError(f"{path} exists and holds no evaluation's probabilities: refusing to write over it; "
                           "pass another --output")

    def read_eval_probs(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Test probabilities and labels written by training or `pskd-store eval`, or (None, None)."""
        path = self.eval_probs()
        if not path.is_file():
            return None, None
        try:
            with np.load(path) as data:
                arrays = {name: data[name] for name in ("probs", "labels") if name in data.files}
        except (ValueError, EOFError, zipfile.BadZipFile) as err:  # not an .npz, or half of one
            raise RunError(f"{path} cannot be read ({err}): rerun `pskd-store eval {self.path}`") from err
        problem = _eval_probs_problem(**arrays)
        if problem:
            raise RunError(f"{path} {problem}: rerun `pskd-store eval {self.path}`")
        return arrays["probs"], arrays["labels"]


def _eval_probs_problem(probs: np.ndarray | None = None, labels: np.ndarray | None = None) -> str | None:
    """What makes an evaluation's file no (samples, K) probabilities with a label each."""
    if probs is None or labels is None:
        return f"lacks {[name for name, array in (('probs', probs), ('labels', labels)) if array is None]}"
    if probs.ndim != 2 or not np.issubdtype(probs.dtype, np.floating):
        return f"holds {probs.dtype} probabilities of shape {probs.shape}, not (samples, classes) floats"
    if labels.shape != (len(probs),) or not np.issubdtype(labels.dtype, np.integer):
        return f"holds {labels.dtype} labels of shape {labels.shape} for {len(probs)} samples"
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        return f"holds labels outside [0, {probs.shape[1]})"
    return None


def _may_write_over(path: Path) -> bool:
    """Whether ``path`` is an empty file or an earlier evaluation's probabilities (an .npz
    with ``probs``)."""
    if path.is_file() and path.stat().st_size == 0:  # mktemp's, say
        return True
    try:
        data = np.load(path, mmap_mode="r")  # an .npy is mapped, not read
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False
    if not isinstance(data, np.lib.npyio.NpzFile):
        return False
    with data:
        return "probs" in data.files

