"""The prediction service: sealed epochs as memory-mapped, uncompressed arrays.

Reading single rows from a compressed Zarr array costs a chunk decode each (milliseconds);
training needs a random batch of rows every step. So once per epoch a sealed teacher epoch
is decoded into a plain ``.npy`` file, and every lookup is a numpy gather on a read-only
memory map of it. All DataLoader workers and all processes on a machine that map the same
file share the operating system's page cache: one copy of the table per machine.

The file name carries the epoch's seal token, so a cached file can never be mistaken for
a later re-seal of the same epoch number (after a rollback). The file is written in slices
of whole chunks (an ImageNet epoch is 2.6 GB), so decoding it takes little memory.

The file is a cache, and a cache can rot: its crc32c is written beside it (``.crc32c``)
and checked every time :meth:`PredictionService.prepare` hands it out for an epoch; a file
that does not match is decoded again from the store, with a warning.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import google_crc32c
import numpy as np
import torch

from .distributed import torchrun_environment
from .errors import StoreError, os_problem
from .integrity import CheckedArray
from .row_encoding import UNREADABLE_ROWS, RowEncoding
from .store import SoftTargetStore
from .store_keys import cache_file_name

_logger = logging.getLogger(__name__)


class PredictionService:
    """Serve ``lookup(epoch, ids)`` from memory maps of sealed epochs of one store.

    The main process calls :meth:`prepare` once per epoch; any process (a forked or
    spawned DataLoader worker included) can then call :meth:`lookup` with the returned
    token. Pickling keeps only paths, so each process maps the file itself.
    """

    def __init__(self, store: SoftTargetStore, cache_dir: str | Path | None = None):
        self.cache_dir = cache_folder(store, cache_dir)
        self.encoding = store.encoding  # what a stored row holds: lookup rebuilds top-k rows
        self._store: SoftTargetStore | None = store
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def prepare(self, epoch: int) -> str:
        """Materialise sealed ``epoch`` (once; again when the cached file fails its
        checksum) and return its seal token for :meth:`lookup`."""
        store = self._require_store()
        store.refresh()  # another store object (a loop's writer, another process) may have sealed it anew
        store.require_sealed(epoch)
        token = store.epoch_info(epoch)["seal_token"]
        path = self.path(epoch, token)
        try:
            if not self._intact(path):
                self._decode(store.teacher_array(epoch), path)
                self._maps.clear()  # a map of the file it replaced still reads that one
            self._drop_stale(store)
        except OSError as err:
            raise StoreError(
                f"cannot write the decoded teacher of epoch {epoch}: {os_problem(err, self.cache_dir)}; "
                "free space there or pass a writable cache_dir (--cache-dir)"
            ) from err
        return token

    def _intact(self, path: Path) -> bool:
        """Whether the cached file exists and matches the checksum written with it."""
        if not path.exists():
            return False
        if cached_file_intact(path):
            return True
        _logger.warning("the cached teacher %s does not match its checksum: decoding it again from the store", path)
        return False

    def _decode(self, teacher: CheckedArray, path: Path) -> None:
        """Write the file beside its final name, then rename: readers see all of it or none."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                checksum = _write_npy(file, teacher, self.encoding)
            _checksum_path(path).write_text(checksum + "\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def path(self, epoch: int, token: str) -> Path:
        return self.cache_dir / cache_file_name(epoch, token)

    def view(self, epoch: int, token: str, prepared: int = 0) -> np.ndarray:
        """The read-only (N, K) memory map of a prepared epoch, opened once per process for
        each ``prepared``: a count of :meth:`prepare` calls, by which another process (a
        persistent DataLoader worker) maps the file again after each, since ``prepare`` may
        have decoded a new file in place of the one that process mapped."""
        key = (epoch, token, prepared)
        view = self._maps.get(key)
        if view is None:
            try:
                # a plain ndarray over the map: np.memmap's Python hooks ran on every batch's take
                view = np.load(self.path(epoch, token), mmap_mode="r").view(np.ndarray)
            except FileNotFoundError as err:
                raise StoreError(
                    f"epoch {epoch} was not prepared under seal token {token} in {self.cache_dir}: call "
                    "prepare(epoch) in the main process and look up with the token it returns "
                    "(SoftTargetDataset.set_epoch does both)") from err
            self._maps = {key: view}  # one epoch mapped at a time per process
        return view

    def lookup(self, epoch: int, token: str, ids: np.ndarray | torch.Tensor, prepared: int = 0) -> torch.Tensor:
        """Predictions of ``ids`` at ``epoch`` as a float32 (B, K) tensor (top-k rows rebuilt);
        ``prepared``: :meth:`view`."""
        rows = self.encoding.expand(self.stored_rows(epoch, token, ids, prepared))
        return torch.from_numpy(rows).float()  # torch widens float16 4x faster than NumPy

    def stored_rows(self, epoch: int, token: str, ids: np.ndarray | torch.Tensor, prepared: int = 0) -> np.ndarray:
        """Rows ``ids`` of a prepared epoch as stored (row_encoding.py); ``prepared``: :meth:`view`."""
        return self.view(epoch, token, prepared).take(np.asarray(ids), axis=0)  # faster than fancy indexing

    def _require_store(self) -> SoftTargetStore:
        if self._store is None:
            raise RuntimeError(
                "prepare() runs in the main process (before iterating the DataLoader), "
                "not in a DataLoader worker"
            )
        return self._store

    def _drop_stale(self, store: SoftTargetStore) -> None:
        """Delete cached files of epochs the store no longer keeps (open maps stay valid)."""
        keep = {
            self.path(e, store.epoch_info(e)["seal_token"]).name for e in store.teacher_epochs
        }
        for cached in self.cache_dir.glob("epoch_*.npy"):
            if cached.name not in keep:
                cached.unlink(missing_ok=True)
                _checksum_path(cached).unlink(missing_ok=True)

    def __getstate__(self) -> dict:
        return {"cache_dir": self.cache_dir, "encoding": self.encoding, "_store": None, "_maps": {}}


def cached_file_intact(path: Path) -> bool:
    """Whether a cached ``.npy`` matches the crc32c written beside it when it was made."""
    checksum = _checksum_path(path)
    return checksum.exists() and checksum.read_text().strip() == _file_crc32c(path)


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".crc32c")


def _file_crc32c(path: Path) -> str:
    """The crc32c of a file as hex, read in 8 MiB blocks (hardware crc32c: GB/s)."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as file:
        while block := file.read(8 << 20):
            checksum.update(block)
    return checksum.hexdigest().decode()


def _write_npy(file: BinaryIO, array: CheckedArray, encoding: RowEncoding) -> str:
    """``array`` as a ``.npy`` file, decoded a chunk at a time; returns the crc32c of the
    bytes written (computed as they are written: the file is not read back). Raises before
    returning when the chunks are not the ones sealed (``CheckedArray.whole``). Rows no
    target can be made of (``encoding.unreadable``) are refused here, once an epoch, so that
    lookups never meet them."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape})
    checksum = google_crc32c.Checksum(header.getvalue())
    file.write(header.getvalue())
    for start, rows in array.whole():
        array.reject(encoding.unreadable(rows), start, UNREADABLE_ROWS)
        checksum.update(rows)  # read-only rows: google_crc32c reads no others
        file.write(rows.data)
    return checksum.hexdigest().decode()


def cache_folder(store: SoftTargetStore, cache_dir: str | Path | None = None) -> Path:
    """Where ``store``'s epochs are decoded. A folder given is shared (by the runs of a
    node, say): each store decodes into its own subfolder, since a store drops every cached
    epoch it no longer keeps."""
    return Path(cache_dir) / _store_folder(store) if cache_dir is not None else default_cache_dir(store)


def _store_folder(store: SoftTargetStore) -> str:
    """A store's own cache subfolder: its id, and where it is (a copied store, a fork of a
    run, keeps the id; its epochs then differ from the original's)."""
    return f"{store.store_id}-{hashlib.sha256(store.location.encode()).hexdigest()[:8]}"


def default_cache_dir(store: SoftTargetStore) -> Path:
    """Beside a local store (``run/store`` -> ``run/store.mmap``) when that can be written
    and every process runs on this machine; else (a remote or read-only store, or a
    torchrun launch spanning several nodes, whose shared run directory would have every
    node decode into one network folder) in the user cache, on each node's own disk."""
    local = store.local_path
    env = torchrun_environment()
    if local is not None and not (env is not None and env.spans_nodes):
        beside = local.with_name(local.name + ".mmap")
        effective = os.access in os.supports_effective_ids
        if os.access(beside if beside.exists() else local.parent, os.W_OK, effective_ids=effective):
            return beside
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "pskd-store" / _store_folder(store)
