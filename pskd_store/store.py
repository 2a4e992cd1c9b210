"""The soft-target store: past predictions of a training run, per epoch, in a Zarr v3 group.

Layout (all under one group, a local path or any fsspec URL zarr accepts)::

    zarr.json                         attributes["pskd_store"]: schema, N, K, dtype,
                                      fingerprint, sealed epochs and their statistics
    labels                            (N,) int64 — the one-hot half of every target
    teacher/epoch_0007                (N, K) predictions of epoch 7, chunked along N
    trajectory/epoch_0007             (N, 16) uint8, one chunk: a record per row, kept for
                                      every epoch: the true class's probability and the
                                      largest (float16 each), the predicted class (int32),
                                      written this epoch or carried forward (bool; see
                                      ``seal``), zero padding — trajectory.pack_records.
                                      Schema 2 stores made a group of an (N,) array per
                                      field instead, read alike.

With ``topk=k`` a teacher row holds the k largest probabilities and their class ids,
packed into bytes (row_encoding.py): the array is (N, k * (value bytes + id bytes)) uint8.
    staging/epoch_0008/               rows of an epoch in progress, one part per writer
                                      (the layout and its ownership: staging.py)

An epoch exists for readers only once its number is in the root attributes' ``sealed``
list. That list is written by :meth:`SoftTargetStore.seal` after every array of the epoch
is complete, in one atomic write of the root metadata, so a crash at any point leaves the
previous sealed epoch as the teacher. The seal streams (merge.py): it never holds a whole
epoch in memory.

Every array carries a crc32c checksum and every chunk is written, so reading damaged bytes
or a deleted chunk raises :class:`StoreDamagedError` (integrity.py); `pskd-store verify`
(verify.py) checks a whole store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
import zarr.codecs
import zarr.storage

from . import store_io
from .array_files import (
    ARRAY_CONFIG,
    CHUNK_KEYS,
    ChunkFiles,
    codecs_with_checksum,
    create_array,
    delete_node,
    group_attributes,
    set_group_attributes,
)
from .errors import EpochNotSealedError, StoreDamagedError, StoreError, StoreExistsError, StoreNotFoundError, os_problem
from .integrity import CheckedArray, stored_digest
from .local_store import LocalStore
from .merge import Merged, merge_epoch
from .row_encoding import UNREADABLE_ROWS, RowEncoding, row_encoding
from .sequences import TokenRows
from .staging import EpochStaging, StagedPart
from .store_keys import RUN_KEY, SEQUENCE_TRAJECTORY_FIELDS, TRAJECTORY_FIELDS, epoch_key, new_seal_token
from .trajectory import RowTrajectory, SequenceTrajectory, pack_records, record_bytes, unpack_records

if TYPE_CHECKING:
    from .token_writer import TokenWriter
    from .writer import PredictionWriter

SCHEMA_VERSION = 3  # 2: crc32c on every array, every chunk written, trajectory "written"; 3: one trajectory array
READABLE_SCHEMAS = (2, 3)  # a schema 2 store's next seal makes it schema 3 (its older epochs read as they are)
ATTRS_KEY = "pskd_store"
DTYPES = ("float16", "float32")
CHUNK_BYTES = 1 << 20  # ~1 MiB of uncompressed rows per chunk
META_CHECKSUM = "crc32c"  # the attributes' own checksum, of all the others


def _sha256(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """What makes two data sets interchangeable for a store: N, K and the labels (and, for
    a sequence store, how its rows divide into samples; for samples with names, such as an
    image tree's files, their names in order, which labels alone do not tell apart)."""

    num_samples: int
    num_classes: int
    labels_sha256: str
    lengths_sha256: str | None = None
    names_sha256: str | None = None

    @classmethod
    def of(cls, labels: np.ndarray, num_classes: int, lengths: np.ndarray | None = None,
           names: list[str] | None = None) -> Fingerprint:
        return cls(len(labels), int(num_classes), _sha256(labels), None if lengths is None else _sha256(lengths),
                   None if names is None else hashlib.sha256("\n".join(names).encode()).hexdigest())

    def mismatch(self, other: Fingerprint) -> str | None:
        """A sentence describing how ``other`` differs, or None when they agree."""
        if self.num_samples != other.num_samples:
            return f"the store holds N={self.num_samples} samples, the data set has {other.num_samples}"
        if self.num_classes != other.num_classes:
            return f"the store holds K={self.num_classes} classes, the data set has {other.num_classes}"
        if self.labels_sha256 != other.labels_sha256:
            return "the data set's labels differ from the ones the store was made for"
        if self.lengths_sha256 != other.lengths_sha256:
            if self.lengths_sha256 is None or other.lengths_sha256 is None:
                return ("one of the store and the data set holds sequences (a row per target position), "
                        "the other a row per sample")
            return "the data set's samples have other numbers of target positions than the store's"
        if None not in (self.names_sha256, other.names_sha256) and self.names_sha256 != other.names_sha256:
            return ("the data set's samples (files) differ from the ones the store was made for, in the same classes "
                    "(an image renamed, added or replaced): each position's teacher would be another sample's")
        return None


def _require_lengths(lengths: np.ndarray, num_rows: int) -> None:
    """A sequence store's lengths must divide its rows (the labels) into samples."""
    try:
        token_rows = TokenRows(lengths)
    except ValueError as err:
        raise StoreError(str(err)) from err
    if token_rows.num_rows != num_rows:
        raise StoreError(
            f"lengths add up to {token_rows.num_rows} target positions but there are {num_rows} labels: pass "
            "every sample's target tokens in order as labels (sequences.token_labels makes both)"
        )


def default_chunk_rows(row_bytes: int, num_rows: int) -> int:
    """Rows per chunk so that one chunk is about 1 MiB uncompressed (a power of two), or
    all ``num_rows`` when they take less: a chunk is written whole, so a larger one would
    write, checksum and compress its padding every epoch (4x the rows at N = 8,000, K = 10)."""
    rows = max(1, CHUNK_BYTES // row_bytes)
    return min(1 << (rows.bit_length() - 1), num_rows)


# Blosc/zstd with bit-shuffle: probabilities compress well at little CPU cost.
DEFAULT_BLOSC = {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"}
# the newest data set reading each store in this process, by (store id, location): a loop
# that opens the store twice (its data set on one object, its writer on another) is checked
# too, and a data set made anew (a loop started again) replaces the one it abandoned
_READERS: dict[tuple[str, str], weakref.ref] = {}


def _open_root(zstore: zarr.abc.store.Store, url: str, read_only: bool) -> zarr.Group:
    """The store's root group; a missing or unreadable root metadata file is named."""
    try:
        return zarr.open_group(zstore, mode="r" if read_only else "r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as err:
        if _STORE_ENTRIES.intersection(store_io.list_dir(zstore, "")):  # a store's arrays, not any folder's files
            raise StoreDamagedError(
                f"{url} holds arrays but no root metadata (zarr.json, which lists the sealed epochs): "
                "restore it from a backup; without it no teacher there can be trusted"
            ) from err
        raise StoreNotFoundError(
            f"no pskd-store at {url}: check the path (pskd-store train makes one in RUN/store; "
            "SoftTargetStore.create in Python)"
        ) from err
    except (ValueError, TypeError, KeyError) as err:  # a zarr.json that is not JSON, or not zarr's
        raise StoreDamagedError(_root_damaged(url, f"{type(err).__name__}: {str(err)[:120]}")) from err


def _root_damaged(url: str, problem: str) -> str:
    return (f"the root metadata of the store at {url} (zarr.json) is damaged ({problem}): restore it from a "
            "backup; it lists the sealed epochs, and without it no teacher there can be trusted")


def _with_checksum(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with the crc32c of everything else in it, so that an edit of the root
    metadata that stays valid JSON (a digit of N, an epoch of the sealed list) is caught."""
    rest = {key: value for key, value in meta.items() if key != META_CHECKSUM}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
    return {**rest, META_CHECKSUM: google_crc32c.Checksum(canonical).hexdigest().decode()}


# what a store holds at its top level (a half-made one included): a store is made, or made
# anew (overwrite=True empties the folder or prefix), only where nothing else is
_STORE_ENTRIES = frozenset({"zarr.json", "labels", "lengths", "teacher", "trajectory", "staging", RUN_KEY})


def _entries(zstore: zarr.abc.store.Store, url: str) -> set[str]:
    """The names at ``url``: a store's entries, hidden files (.DS_Store) and a publication's
    leftovers; anything else is refused, named."""
    names = set(store_io.list_dir(zstore, ""))
    if "" in names and store_io.is_object(zstore):  # else a folder marker, as a hidden file is
        raise StoreError(f"{url} is an object, not a prefix: give the store a path of its own")
    others = sorted(name for name in names - _STORE_ENTRIES
                    if name and not name.startswith(".") and not name.endswith(".partial"))
    if others:
        raise StoreError(
            f"{url} holds {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}, which is no part of a "
            "pskd-store: give the store a path of its own, new or empty (pskd-store train keeps it in RUN/store); "
            "SoftTargetStore.create(..., overwrite=True) deletes only a store, not these"
        )
    return names


def _bucket_root(url: str) -> bool:
    """Whether ``url`` names an object store's bucket itself (``s3://bucket``), no prefix in it
    (fsspec's file systems without buckets: a folder, which an overwrite may empty)."""
    scheme, _, rest = url.partition("://")
    return bool(rest) and scheme not in ("file", "local", "memory") and "/" not in rest.strip("/")


def _enclosing_store(url: str) -> Path | None:
    """The local pskd-store that a path lies inside (its teacher/ or trajectory/ folder, say)."""
    if "://" in url:  # an object store's: no local folder
        return None
    for parent in Path(url).absolute().parents:
        try:
            root = json.loads((parent / "zarr.json").read_text())
        except (OSError, ValueError):
            continue
        if ATTRS_KEY in root.get("attributes", {}):
            return parent
    return None


def _loosest_sum_tolerance(parts: list[StagedPart], carried: float | None = None) -> dict[str, float]:
    """``sum_tolerance``: how far from 1 the sums of the probability rows written were
    allowed (bfloat16 probabilities: 2·2⁻⁷), and those of the rows ``carried`` forward, for
    verify; nothing when all were logits."""
    tolerances = [part.sum_tolerance for part in parts if part.sum_tolerance is not None]
    tolerances += [] if carried is None else [carried]
    return {"sum_tolerance": max(tolerances)} if tolerances else {}


def _pruned_through(meta: dict[str, Any], keep_epochs: int) -> int:
    """The latest epoch whose teacher is pruned (0: none): the sealed epochs before the last
    ``keep_epochs``, or those a rollback recorded, which it left among the last ones."""
    expired = meta["sealed"][:-keep_epochs]
    return max(meta.get("pruned_through", 0), expired[-1] if expired else 0)


def _require_every_rank(epoch: int, parts: list[StagedPart], merged: Merged) -> None:
    """Parts that counted ``world_size`` writers, some rank's missing, and ids that nobody
    wrote: that rank's process died before it made its writer, and its ids would be carried
    forward. (One process writing every rank's rows, gathered, leaves no id unwritten.)"""
    world_size = parts[0].world_size
    missing = sorted(set(range(world_size or 0)) - {part.rank for part in parts})
    if missing and merged.carried_forward:
        raise StoreError(
            f"epoch {epoch} was written by {world_size} writers, but ranks {missing} staged nothing and "
            f"{merged.carried_forward} ids were not written (their processes stopped before making their "
            "writers?): nothing was sealed; rerun the epoch on every rank, or discard the staged rows with "
            f"store.discard_staging({epoch}) and write it again (a loop whose one process writes every rank's "
            "rows makes its writer with world_size=1)"
        )


def _warn_if_ids_look_like_positions(epoch: int, merged: Merged, rows: int) -> None:
    """Most rows written for a few ids, most ids never written: what a loop writing batch
    positions (or labels) instead of the data set's ids does, which no single write shows
    (positions are valid ids). Warned, not refused: a sampler may repeat a subset by design."""
    if 2 * merged.ids_written < merged.rows_written and merged.carried_forward > merged.ids_written:
        warnings.warn(
            f"epoch {epoch}: {merged.rows_written} rows were written for only {merged.ids_written} of the {rows} "
            f"ids, and {merged.carried_forward} ids carry an earlier prediction forward: if the ids written are batch "
            "positions or labels, pass the data set's ids instead (the last item of SoftTargetDataset's batches)",
            RuntimeWarning, stacklevel=5,
        )


def _open_zarr_store(url: str | Path, read_only: bool, storage_options: dict | None, *, must_exist: bool = False):
    text = str(url)
    if "://" in text:
        try:
            return zarr.storage.FsspecStore.from_url(text, storage_options=storage_options, read_only=read_only)
        except (ImportError, ValueError) as err:  # fsspec's: a protocol it does not know, or whose package is absent
            raise StoreError(f"cannot open {text}: {err} (s3:// takes pip install -e \".[s3]\"; another "
                             "protocol, the fsspec package that implements it)") from err
    if Path(text).exists() and not Path(text).is_dir():
        raise StoreError(f"{text} is a file, not a store (a directory): pass the store's directory")
    if must_exist and not Path(text).exists():  # a writable LocalStore would create the directory
        raise StoreNotFoundError(f"no pskd-store at {text}: check the path (pskd-store train makes one in "
                                 "RUN/store; SoftTargetStore.create in Python)")
    return LocalStore(Path(text), read_only=read_only)


@contextlib.contextmanager
def _client_errors(url: str) -> Iterator[None]:
    """An object store client's error (botocore's: no credentials, an endpoint it cannot
    reach) as one line naming where the client reads them; the file system's own errors
    (OSError, which s3fs makes of a refused request) stay their callers'."""
    try:
        yield
    except Exception as err:
        if not type(err).__module__.startswith(("botocore", "aiobotocore")):
            raise
        raise StoreError(
            f"cannot reach the store at {url} ({type(err).__name__}: {err}): give the object store's client its "
            "credentials and endpoint where it reads them (AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL for a server other than AWS), or pass storage_options"
        ) from err


class SoftTargetStore:
    """Past predictions of one training run, one (N, K) array per sealed epoch.

    Use :meth:`create` for a new run and :meth:`open` to come back to one; pass the data
    set's ``labels`` to ``open`` so that a store made for other data is refused.
    """

    def __init__(self, group: zarr.Group, url: str, storage_options: dict | None = None):
        self._group = group
        self.url = url
        self.storage_options = storage_options
        meta = group.attrs.get(ATTRS_KEY)
        if meta is None:
            enclosing = _enclosing_store(url)
            if enclosing is not None:
                raise StoreError(f"{url} is a part of the store at {enclosing}, not a store: pass {enclosing}")
            raise StoreError(f"{url} is a Zarr group but not a pskd-store (no '{ATTRS_KEY}' attributes): a store "
                             "whose creation was killed before its attributes were written holds nothing yet; "
                             "delete it and start again (SoftTargetStore.create with overwrite=True replaces it)")
        meta = self._checked(meta)
        if meta.get("schema_version") not in READABLE_SCHEMAS:
            raise StoreError(
                f"{url} has store schema {meta.get('schema_version')}, this pskd-store reads "
                f"schemas {', '.join(map(str, READABLE_SCHEMAS))}: upgrade pskd-store or start a new store"
            )
        self._meta = meta
        self._labels: np.ndarray | None = None
        self._token_rows: TokenRows | None = None

    # -- creating and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        url: str | Path,
        labels: np.ndarray,
        num_classes: int,
        *,
        dtype: str = "float16",
        chunk_rows: int | None = None,
        blosc: dict[str, Any] | None = None,
        keep_epochs: int = 2,
        topk: int | None = None,
        lengths: np.ndarray | None = None,
        names: list[str] | None = None,
        overwrite: bool = False,
        storage_options: dict | None = None,
    ) -> SoftTargetStore:
        """Make a new, empty store for a data set with these labels (and, with ``names``,
        these samples' names in order: an image tree's files, which open() then checks).

        ``blosc`` holds Blosc options (cname, clevel, shuffle; default zstd level 3 with
        bit-shuffle); Blosc's type size follows each array's dtype. ``keep_epochs`` teacher
        epochs are kept (the trajectory tier keeps all): 2 lets a run that crashed between
        sealing epoch t and checkpointing it redo epoch t. ``topk`` keeps only the k largest
        probabilities of each row and their classes (row_encoding.py); None keeps all K.

        With ``lengths`` it is a sequence store (sequences.py): sample i has ``lengths[i]``
        target positions, each a row, and ``labels`` are the target tokens in sample and
        position order (``sequences.token_labels`` makes both from per-sample labels).
        """
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise StoreError("labels must be a non-empty 1-D array of integer class indices")
        for name, value in (("num_classes", num_classes), ("chunk_rows", chunk_rows), ("keep_epochs", keep_epochs),
                            ("topk", topk)):
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
                raise StoreError(f"{name} must be an integer, got {value!r}")
        # Python ints from here on (labels.max() + 1 is NumPy's): they go into the JSON attributes
        num_classes, keep_epochs = int(num_classes), int(keep_epochs)
        chunk_rows, topk = (None if value is None else int(value) for value in (chunk_rows, topk))
        if chunk_rows is not None and chunk_rows < 1:
            raise StoreError(f"chunk_rows must be at least 1 (or None for ~1 MiB chunks), got {chunk_rows}")
        if num_classes < 1 or labels.min() < 0 or labels.max() >= num_classes:
            raise StoreError(
                f"labels must lie in [0, num_classes={num_classes}); got [{labels.min()}, {labels.max()}]"
            )
        if dtype not in DTYPES:
            raise StoreError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if keep_epochs < 1:
            raise StoreError("keep_epochs must be at least 1: training reads the previous epoch")
        if lengths is not None:
            _require_lengths(lengths, len(labels))
        try:
            encoding = row_encoding(num_classes, dtype, topk)
        except ValueError as err:
            raise StoreError(str(err)) from err
        rows = chunk_rows or default_chunk_rows(encoding.width * encoding.stored_dtype.itemsize, len(labels))
        blosc = dict(DEFAULT_BLOSC if blosc is None else blosc)
        try:  # before anything is written: a refused store leaves nothing behind
            codec = zarr.codecs.BloscCodec(**blosc)
        except (TypeError, ValueError) as err:
            raise StoreError(f"bad Blosc options {blosc}: {err}") from err
        built_in = numcodecs.blosc.list_compressors()  # zarr takes other names, and any level, till it compresses
        if codec.cname.value not in built_in or not 0 <= codec.clevel <= 9:
            raise StoreError(f"bad Blosc options {blosc}: cname must be one of {', '.join(built_in)} (this Blosc's) "
                             f"and clevel lie in 0..9, got {codec.cname.value!r} and {codec.clevel}")
        if overwrite and _bucket_root(str(url)):
            raise StoreError(f"{url} is the root of a bucket: overwriting a store there would delete the bucket "
                             "(and, versioned, every version in it); keep the store under a prefix, e.g. "
                             f"{str(url).rstrip('/')}/run/store")
        zstore = _open_zarr_store(url, read_only=False, storage_options=storage_options)
        with _client_errors(str(url)):
            entries = _entries(zstore, str(url))
        # zarr's "w-" refuses a folder that holds anything: beside hidden files alone, "a" makes the group
        mode = "w" if overwrite else "a" if entries and not entries & _STORE_ENTRIES else "w-"
        try:
            group = zarr.open_group(zstore, mode=mode)
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as err:
            raise StoreExistsError(
                f"a store already exists at {url}: open it with SoftTargetStore.open, "
                "or pass overwrite=True to start over"
            ) from err
        group.create_array(
            "labels", data=labels.astype(np.int64), chunks=(len(labels),),
            compressors=codecs_with_checksum(codec), chunk_key_encoding=CHUNK_KEYS, config=ARRAY_CONFIG,
        )
        if lengths is not None:
            group.create_array(
                "lengths", data=np.asarray(lengths, dtype=np.int64), chunks=(len(lengths),),
                compressors=codecs_with_checksum(codec), chunk_key_encoding=CHUNK_KEYS, config=ARRAY_CONFIG,
            )
        fingerprint = Fingerprint.of(labels, num_classes, lengths, names)
        group.attrs[ATTRS_KEY] = _with_checksum({
            "schema_version": SCHEMA_VERSION,
            "store_id": secrets.token_hex(8),
            "num_samples": fingerprint.num_samples,
            "num_classes": fingerprint.num_classes,
            "dtype": dtype,
            "chunk_rows": rows,
            "blosc": blosc,
            "keep_epochs": keep_epochs,
            "topk": topk,
            "num_sequences": None if lengths is None else len(lengths),
            "fingerprint": fingerprint.__dict__,
            "sealed": [],
            "epochs": {},
        })
        return cls(group, str(url), storage_options)

    @classmethod
    def open(
        cls,
        url: str | Path,
        *,
        labels: np.ndarray | None = None,
        num_classes: int | None = None,
        lengths: np.ndarray | None = None,
        names: list[str] | None = None,
        read_only: bool = False,
        storage_options: dict | None = None,
    ) -> SoftTargetStore:
        """Open an existing store; with ``labels`` (and ``num_classes``, a sequence store's
        ``lengths``, the samples' ``names`` when the store recorded them), refuse other data."""
        zstore = _open_zarr_store(url, read_only=read_only, storage_options=storage_options, must_exist=True)
        with _client_errors(str(url)):
            store = cls(_open_root(zstore, str(url), read_only), str(url), storage_options)
        if labels is not None:
            expected = Fingerprint.of(labels, num_classes if num_classes is not None else store.num_classes, lengths,
                                      names)
            problem = store.fingerprint.mismatch(expected)
            if problem:
                raise StoreError(
                    f"the store at {url} was made for another data set: {problem}. "
                    "Use a new store path (or a new run directory) for this data set"
                )
        return store

    @classmethod
    def open_or_create(
        cls, url: str | Path, labels: np.ndarray, num_classes: int, **create_kwargs: Any
    ) -> SoftTargetStore:
        """Open the store at ``url`` if one is there (checking the fingerprint, and that it keeps
        rows as ``create_kwargs`` ask: dtype, top-k, epochs kept, chunks), else create it."""
        try:
            store = cls.open(
                url, labels=labels, num_classes=num_classes, lengths=create_kwargs.get("lengths"),
                names=create_kwargs.get("names"), storage_options=create_kwargs.get("storage_options"),
            )
        except StoreNotFoundError:
            return cls.create(url, labels, num_classes, **create_kwargs)
        kept = {"dtype": str(store.dtype), "topk": store.topk, "keep_epochs": store.keep_epochs,
                "chunk_rows": store.chunk_rows}
        asked = {name: create_kwargs[name] for name in kept  # chunk_rows=None: whatever create() would choose
                 if name in create_kwargs and (name != "chunk_rows" or create_kwargs[name] is not None)}
        different = [f"{name}={asked[name]!r} (it has {kept[name]!r})" for name in asked if asked[name] != kept[name]]
        if different:
            raise StoreError(f"the store at {url} keeps its rows otherwise than asked: {', '.join(different)}; "
                             "ask for what it keeps, or use a new store path")
        return store

    # -- what the store is ----------------------------------------------------------------

    @property
    def run(self) -> str | None:
        """The run that trains into this store, as :meth:`claim_run` recorded it; None when
        none did (a store made through the API, or before runs were recorded)."""
        data = store_io.get(self._group.store, RUN_KEY)
        return None if data is None else json.loads(data)["run"]

    def claim_run(self, run: str) -> str:
        """Record ``run`` (``pskd-store train``'s run directory) as the one training into this
        store, unless one is recorded already; returns the one recorded. Two runs given one
        ``--store`` would roll each other's epochs back and train on each other's teachers."""
        self._require_writable("record its run")
        store_io.put_if_absent(self._group.store, RUN_KEY, json.dumps({"run": run}).encode())
        return self.run

    @property
    def num_samples(self) -> int:
        return int(self._meta["num_samples"])

    @property
    def num_classes(self) -> int:
        return int(self._meta["num_classes"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._meta["dtype"])

    @property
    def chunk_rows(self) -> int:
        return int(self._meta["chunk_rows"])

    @property
    def keep_epochs(self) -> int:
        return int(self._meta["keep_epochs"])

    @property
    def topk(self) -> int | None:
        """k of a top-k store; None for a dense one."""
        return self._meta["topk"]

    @property
    def encoding(self) -> RowEncoding:
        """What a stored teacher row holds (row_encoding.py)."""
        return row_encoding(self.num_classes, self.dtype, self.topk)

    @property
    def store_id(self) -> str:
        return self._meta["store_id"]

    @property
    def read_only(self) -> bool:
        return self._group.read_only

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(**self._meta["fingerprint"])

    @property
    def labels(self) -> np.ndarray:
        """The (N,) labels the store was made for, checked against its fingerprint."""
        if self._labels is None:
            labels = CheckedArray.open(
                self._group, "labels", "the labels array", self.url, shape=(self.num_samples,), dtype=np.int64
            )[:]
            if _sha256(labels) != self.fingerprint.labels_sha256:
                raise StoreDamagedError(
                    f"the labels array in {self.url} is damaged: it no longer matches the store's "
                    f"fingerprint. None of its values were used; `pskd-store verify {self.url}` "
                    "lists everything that is damaged"
                )
            self._labels = labels
        return self._labels

    @property
    def token_rows(self) -> TokenRows | None:
        """A sequence store's (sample, position) -> row map (sequences.py); None for a store
        of one row per sample."""
        if self._num_sequences is None:
            return None
        if self._token_rows is None:
            lengths = CheckedArray.open(
                self._group, "lengths", "the lengths array", self.url, shape=(self._num_sequences,),
                dtype=np.int64,
            )[:]
            if _sha256(lengths) != self.fingerprint.lengths_sha256:
                raise StoreDamagedError(
                    f"the lengths array in {self.url} is damaged: it no longer matches the store's "
                    f"fingerprint. None of its values were used; `pskd-store verify {self.url}` "
                    "lists everything that is damaged"
                )
            self._token_rows = TokenRows(lengths)
        return self._token_rows

    @property
    def _num_sequences(self) -> int | None:
        """A sequence store's number of samples; None for a store of a row per sample (and
        for stores made before sequence stores)."""
        return self._meta.get("num_sequences")

    @property
    def trajectory_fields(self) -> dict[str, type]:
        """The trajectory tier's fields: per row, or per sample of a sequence store."""
        return TRAJECTORY_FIELDS if self._num_sequences is None else SEQUENCE_TRAJECTORY_FIELDS

    def _trajectory_record(self) -> RowTrajectory | SequenceTrajectory:
        token_rows = self.token_rows
        return RowTrajectory(self.num_samples) if token_rows is None else SequenceTrajectory(token_rows)

    @property
    def local_path(self) -> Path | None:
        """The store's directory when it is on the local file system."""
        return None if "://" in self.url else Path(self.url)

    @property
    def location(self) -> str:
        """Where the store is, one string for every way of naming it (a resolved local path,
        or the URL): with ``store_id``, what tells this store from a copy of it elsewhere."""
        return str(self.local_path.resolve()) if self.local_path is not None else self.url.rstrip("/")

    def refresh(self) -> None:
        """Re-read the attributes, to see epochs sealed by another process."""
        meta = self._root_attributes()
        if meta is None:  # not the document the store wrote: zarr's open names what is wrong with it
            self._group = _open_root(self._group.store, self.url, self.read_only)
            meta = self._group.attrs.get(ATTRS_KEY)
            if meta is None:
                raise StoreDamagedError(_root_damaged(self.url, f"its '{ATTRS_KEY}' attributes are gone"))
        if meta != self._meta:  # equal ones were checked when read or written: checking again
            meta = self._checked(meta)  # serialises them all: 0.6 of 1.2 ms at 300 sealed epochs
            if meta.get("store_id") != self._meta.get("store_id"):  # its labels, caches, readers: another's
                raise StoreError(f"the store at {self.url} was made anew (overwrite=True) since this process opened "
                                 "it: open it again, and train the run that made it anew, or restore this one")
            self._meta = meta

    def _root_attributes(self) -> dict[str, Any] | None:
        """The attributes read straight from the root document, twice a training epoch
        (zarr's ``open_group`` costs several times more); None for a document that is not
        the store's, which zarr's open then names."""
        try:
            attributes = group_attributes(self._group.store, "")
        except ValueError:  # not JSON
            return None
        return None if attributes is None else attributes.get(ATTRS_KEY)

    def _checked(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The store's attributes, refused when they fail their checksum. Schema 2 stores made
        before the checksum have none; every schema 3 store was written with one, so there
        a missing checksum is an edit that took it out with whatever else it changed."""
        if META_CHECKSUM not in meta:
            if meta.get("schema_version", 0) >= 3:
                raise StoreDamagedError(_root_damaged(self.url, "its pskd_store attributes lost their checksum"))
        elif _with_checksum(meta)[META_CHECKSUM] != meta[META_CHECKSUM]:
            raise StoreDamagedError(_root_damaged(self.url, "its pskd_store attributes do not match their checksum"))
        return meta

    @property
    def sealed_epochs(self) -> list[int]:
        return list(self._meta["sealed"])

    @property
    def teacher_epochs(self) -> list[int]:
        """Sealed epochs whose full predictions are still kept (the rest were pruned; after a
        rollback fewer than ``keep_epochs`` until the next seals)."""
        return [e for e in self.sealed_epochs[-self.keep_epochs:] if e > self._meta.get("pruned_through", 0)]

    @property
    def latest_sealed(self) -> int | None:
        sealed = self._meta["sealed"]
        return sealed[-1] if sealed else None

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        """Statistics recorded when ``epoch`` was sealed (coverage, bytes, seal token)."""
        self.require_sealed(epoch, teacher=False)
        return dict(self._meta["epochs"][str(epoch)])

    def require_sealed(self, epoch: int, *, teacher: bool = True) -> None:
        """Raise :class:`EpochNotSealedError` unless ``epoch`` is sealed (and its teacher kept)."""
        if epoch not in self._meta["sealed"]:
            self.refresh()
        sealed = self._meta["sealed"]
        if epoch not in sealed:
            raise EpochNotSealedError(
                f"epoch {epoch} was never sealed in {self.url} (sealed epochs: {sealed or 'none'}); "
                "close that epoch's writers and seal it with store.seal(epoch) before reading it"
            )
        if teacher and epoch not in self.teacher_epochs:
            raise EpochNotSealedError(
                f"the predictions of epoch {epoch} were pruned from {self.url}: only the last "
                f"{self.keep_epochs} epochs are kept ({self.teacher_epochs}); its trajectory is still there"
            )

    # -- reading ----------------------------------------------------------------------------

    def teacher_array(self, epoch: int) -> CheckedArray:
        """The predictions of a sealed epoch, read in row slices (whole chunks, not single
        rows: each chunk is decompressed and its checksum checked)."""
        self.require_sealed(epoch)
        return self._teacher(epoch)

    def trajectory_arrays(self, epoch: int) -> list[CheckedArray]:
        """The stored arrays of a sealed epoch's trajectory record: one (schema 3), or one
        per field (an epoch sealed by schema 2); :meth:`trajectory_values` reads them."""
        self.require_sealed(epoch, teacher=False)
        return self._trajectory(epoch)

    def trajectory_values(self, arrays: list[CheckedArray]) -> dict[str, np.ndarray]:
        """Each field of a trajectory record (:meth:`trajectory_arrays`), (records,) in its dtype."""
        if len(arrays[0].shape) == 2:  # schema 3's one (records, bytes) array
            return unpack_records(arrays[0][:], self.trajectory_fields)
        return {field: array[:] for field, array in zip(self.trajectory_fields, arrays)}

    def stored_digest(self, epoch: int, tier: str) -> str:
        """The digest of the stored chunks of an epoch's ``tier`` ("teacher" or "trajectory"),
        each chunk read back and checked against its crc32c (integrity.stored_digest): what
        the seal records in the epoch's statistics and `verify` compares."""
        if tier == "teacher":
            return stored_digest([self._teacher(epoch)])
        return stored_digest(self._trajectory(epoch))

    def _teacher(self, epoch: int) -> CheckedArray:
        return CheckedArray.open(
            self._group, f"teacher/{epoch_key(epoch)}", self._teacher_what(epoch), self.url,
            shape=(self.num_samples, self.encoding.width), dtype=self.encoding.stored_dtype, chunk_rows=self.chunk_rows,
            sealed_digest=self.sealed_digest(epoch, "teacher"), moved_on=self._moved_on(epoch, teacher=True),
        )

    def _moved_on(self, epoch: int, *, teacher: bool) -> Callable[[], str | None]:
        """What a reader of ``epoch`` (its teacher, or its trajectory) asks when its rows
        cannot be read as sealed: a message when another process has since pruned the epoch,
        rolled it back or sealed it again (the rows it reads are then gone, not damaged)."""
        token = (self._meta["epochs"].get(str(epoch)) or {}).get("seal_token")

        def moved_on() -> str | None:
            self.refresh()
            kept = self.teacher_epochs if teacher else self.sealed_epochs
            if epoch in kept and self._meta["epochs"].get(str(epoch), {}).get("seal_token") == token:
                return None
            return (f"epoch {epoch} of {self.url} was pruned, rolled back or sealed again by another process "
                    f"while this one read its {'teacher' if teacher else 'trajectory'}: read it again "
                    f"(sealed epochs now: {self.sealed_epochs or 'none'}; teachers kept: {self.teacher_epochs})")

        return moved_on

    def sealed_digest(self, epoch: int, tier: str) -> str | None:
        """The digest of ``tier``'s chunks recorded at ``epoch``'s seal; None for an epoch
        sealed before digests were (or whose statistics are gone, which `verify` reports)."""
        return (self._meta["epochs"].get(str(epoch), {}).get("digests") or {}).get(tier)

    @property
    def _trajectory_rows(self) -> int:
        """Records per epoch in the trajectory tier: a row's each, or a sequence's."""
        return self._num_sequences or self.num_samples

    def _trajectory(self, epoch: int) -> list[CheckedArray]:
        path = f"trajectory/{epoch_key(epoch)}"
        moved_on = self._moved_on(epoch, teacher=False)
        try:
            return [CheckedArray.open(self._group, path, self._trajectory_what(epoch), self.url,
                                      shape=(self._trajectory_rows, record_bytes(self.trajectory_fields)),
                                      dtype=np.uint8, moved_on=moved_on)]
        except StoreDamagedError:
            if group_attributes(self._group.store, path) is None:  # damage, not the layout before
                raise
        # sealed by schema 2: a group of an array per field (looked for only when no array is there)
        return [CheckedArray.open(self._group, f"{path}/{field}", self._trajectory_what(epoch, field), self.url,
                                  shape=(self._trajectory_rows,), dtype=dtype, moved_on=moved_on)
                for field, dtype in self.trajectory_fields.items()]

    @staticmethod
    def _teacher_what(epoch: int) -> str:
        return f"the teacher of epoch {epoch}"

    @staticmethod
    def _trajectory_what(epoch: int, field: str | None = None) -> str:
        return f"the trajectory{f' ({field})' if field else ''} of epoch {epoch}"

    def read_epoch(self, epoch: int) -> np.ndarray:
        """All (N, K) predictions of a sealed epoch, decoded into memory (in the store's
        dtype; a top-k store's rows rebuilt as float32)."""
        teacher = self.teacher_array(epoch)
        rows = np.empty(teacher.shape, dtype=teacher.dtype)
        for start, chunk in teacher.whole():  # every chunk, then the seal's digest
            teacher.reject(self.encoding.unreadable(chunk), start, UNREADABLE_ROWS)
            rows[start:start + len(chunk)] = chunk
        return self.encoding.expand(rows)

    def trajectory(self, epochs: list[int] | None = None) -> dict[str, np.ndarray]:
        """The trajectory tier as arrays of shape (E, N), plus ``epochs`` (E,); a sequence
        store's (E, number of samples), per sample (sequences.py).

        Only rows written in an epoch are predictions of that epoch: in the others (carried
        forward by the seal) the probabilities are NaN and ``argmax`` is -1;
        ``written`` tells them apart. Reads only the compact per-epoch records.
        """
        epochs = self.sealed_epochs if epochs is None else list(epochs)
        for epoch in epochs:
            self.require_sealed(epoch, teacher=False)
        out: dict[str, np.ndarray] = {"epochs": np.asarray(epochs, dtype=np.int64)}
        records = [self.trajectory_values(self.trajectory_arrays(e)) for e in epochs]
        for field, dtype in self.trajectory_fields.items():
            rows = [record[field] for record in records]
            out[field] = np.stack(rows) if rows else np.empty((0, self._trajectory_rows), dtype)
        carried = ~out["written"]
        for field in self.trajectory_fields:
            if field != "written":
                out[field][carried] = -1 if field == "argmax" else np.nan
        return out

    def summary(self) -> dict[str, Any]:
        """What `pskd-store info` prints: shape, dtype, codec, epochs and bytes on disk."""
        epochs = {int(k): v for k, v in self._meta["epochs"].items()}
        return {
            "url": self.url,
            "schema_version": self._meta["schema_version"],
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "dtype": str(self.dtype),
            "chunk_rows": self.chunk_rows,
            "blosc": self._meta["blosc"],
            "keep_epochs": self.keep_epochs,
            "fingerprint": self._meta["fingerprint"],
            "rows": self.encoding.describe(),
            "topk": self.topk,
            "num_sequences": self._num_sequences,
            "sealed_epochs": self.sealed_epochs,
            "teacher_epochs": self.teacher_epochs,
            "epochs": epochs,
        }

    # -- writing ------------------------------------------------------------------------------

    def _require_writable(self, what: str) -> None:
        if self.read_only:
            raise StoreError(
                f"cannot {what}: the store at {self.url} was opened read-only; "
                "open it with read_only=False on a writable path"
            )

    def staging(self, epoch: int) -> EpochStaging:
        """Where the writers of the next ``epoch`` put their rows, one part each."""
        self._require_writable(f"write epoch {epoch}")
        self.require_next(epoch)
        return EpochStaging(self._group, epoch, self.url)

    def discard_staging(self, epoch: int, rank: int | None = None) -> None:
        """Forget the staged rows of unsealed ``epoch`` (of one ``rank``, or all), so that
        they can be written again: the deliberate reset after a writer that closed its part
        (or died on another machine) left rows that must not be sealed."""
        self.staging(epoch).discard(rank)

    def require_next(self, epoch: int) -> None:
        """Refuse to write or seal any epoch but the one after the latest sealed: a sealed
        epoch is never overwritten, and a skipped one would leave a gap in the teachers."""
        if epoch < 1:
            raise StoreError(f"epochs count from 1, got {epoch}")
        self.refresh()
        latest = self.latest_sealed
        if latest is not None and epoch <= latest:
            raise StoreError(
                f"epoch {epoch} is already sealed in {self.url} (latest sealed: {latest}); "
                "sealed epochs are never overwritten — write epoch "
                f"{latest + 1}, or call rollback({epoch - 1}) to redo it deliberately"
            )
        expected = (latest or 0) + 1
        if epoch != expected:
            raise StoreError(
                f"epoch {epoch} cannot follow {f'epoch {latest}' if latest else 'an empty store'} in "
                f"{self.url}: epochs are sealed in order, so write and seal epoch {expected} next"
            )

    def writer(self, epoch: int, **kwargs: Any) -> PredictionWriter | TokenWriter:
        """A :class:`~pskd_store.writer.PredictionWriter` for ``epoch`` (see its options); for a
        sequence store, a :class:`~pskd_store.token_writer.TokenWriter`.

        Refused while the newest :class:`SoftTargetDataset` of this process reading this
        store (through this store object or another one) is set to another epoch: the
        predictions of epoch t must come from the steps that trained on epoch t's targets
        (call ``dataset.set_epoch(epoch)`` first).
        """
        # imported here: the writer imports torch, reading a store does not
        from .token_writer import TokenWriter
        from .writer import PredictionWriter

        reader = _READERS.get((self.store_id, self.location))
        dataset = None if reader is None else reader()
        if dataset is not None and dataset.epoch != epoch:
            raise StoreError(
                f"cannot write epoch {epoch}: the SoftTargetDataset on this store is set to "
                f"{f'epoch {dataset.epoch}' if dataset.epoch else 'no epoch'}, so its targets are not "
                f"epoch {epoch}'s. Call dataset.set_epoch({epoch}) before training the epoch"
            )
        try:
            return (PredictionWriter if self.token_rows is None else TokenWriter)(self, epoch, **kwargs)
        except OSError as err:  # claiming the part writes to the store: a read-only file system, say
            raise StoreError(f"cannot write epoch {epoch} into the store: {os_problem(err, self.url)}; make it "
                             "writable, or keep the store elsewhere (--store)") from err

    def add_reader(self, dataset: Any) -> None:
        """Register the data set whose epoch every new writer of this store must match (see
        :meth:`writer`), whichever store object of this process makes the writer; it
        replaces the data set registered before."""
        _READERS[(self.store_id, self.location)] = weakref.ref(dataset)

    def seal(self, epoch: int, *, scratch_dir: str | Path | None = None, allow_empty: bool = False,
             schedule: dict[str, float] | None = None) -> dict[str, Any]:
        """Merge every writer's rows of ``epoch`` and publish it atomically.

        Coverage rules: an id written more than once keeps the value written last by its
        writer (several writers: the one with the higher rank); an id never written carries
        forward its prediction from the latest sealed epoch, or its one-hot label if it has
        none. Writers that all closed without a row are refused (a loop that forgot to
        write), unless ``allow_empty``: a method that recorded nothing this epoch (every
        batch CutMix-mixed) then carries every id forward. Returns the epoch's statistics.

        Memory stays a few hundred MiB whatever the epoch's size; the merge needs up to one
        uncompressed epoch of free disk in ``scratch_dir`` (default: the temporary directory,
        ``$TMPDIR``), which should be a local disk, not a RAM-backed tmpfs.

        ``schedule`` (e.g. alpha_T and the number of epochs) is kept in the epoch's
        statistics, so that a loop resuming after it can refuse another schedule.
        """
        self._require_writable(f"seal epoch {epoch}")
        try:
            return self._seal(epoch, scratch_dir, allow_empty, schedule)
        except OSError as err:
            raise StoreError(
                f"cannot seal epoch {epoch}: {os_problem(err, self.url)}; nothing of it was published "
                "(the previous sealed epoch is still the teacher), seal again once that is fixed"
            ) from err

    def _seal(self, epoch: int, scratch_dir: str | Path | None, allow_empty: bool,
              schedule: dict[str, float] | None) -> dict[str, Any]:
        staging = self.staging(epoch)  # refused before anything is written: a sealed epoch, one out of order
        if not staging.has_parts():
            raise self._nothing_written(epoch)
        with staging.sealing():
            self.require_next(epoch)  # sealed by another process before this one held the epoch
            return self._seal_held(epoch, staging, scratch_dir, allow_empty, schedule)

    def _seal_held(self, epoch: int, staging: EpochStaging, scratch_dir: str | Path | None, allow_empty: bool,
                   schedule: dict[str, float] | None) -> dict[str, Any]:
        parts = staging.parts()
        if not parts:  # discarded by another process since this seal first looked
            raise self._nothing_written(epoch)
        if not allow_empty and not any(part.rows for part in parts):
            raise StoreError(f"nothing was written for epoch {epoch}: every writer closed empty")
        if len({part.world_size for part in parts}) > 1:
            counted = ", ".join(f"rank {part.rank} of {part.world_size or 'an unknown number of'}" for part in parts)
            raise StoreError(
                f"the staged parts of epoch {epoch} were written by writers that counted different numbers of "
                f"writers ({counted}): some are left from an earlier try of the epoch. Nothing was sealed; "
                f"discard them with store.discard_staging({epoch}) (or rank=...) and write the epoch again"
            )
        latest = self.latest_sealed
        teacher = create_array(
            self._group, f"teacher/{epoch_key(epoch)}", shape=(self.num_samples, self.encoding.width),
            dtype=self.encoding.stored_dtype, chunks=(self.chunk_rows, self.encoding.width),
            compressor=self._teacher_codec(),
        )
        merged = merge_epoch(
            parts, teacher, None if latest is None else self.teacher_array(latest), self.labels, self.encoding,
            self._trajectory_record(), scratch_dir
        )
        _require_every_rank(epoch, parts, merged)  # before anything is published
        _warn_if_ids_look_like_positions(epoch, merged, self.num_samples)
        trajectory = self._write_trajectory(epoch, merged.trajectory)
        # every chunk read back as stored before the epoch is published: a chunk lost or
        # damaged while sealing (an object store's, say) stops the seal, not the next epoch
        digests = {"teacher": stored_digest([CheckedArray(teacher, self._teacher_what(epoch), self.url)]),
                   "trajectory": stored_digest(trajectory)}
        info = {
            "seal_token": new_seal_token(),
            "rows_written": merged.rows_written,
            "ids_written": merged.ids_written,
            "duplicates": merged.rows_written - merged.ids_written,
            "carried_forward": merged.carried_forward,
            "nbytes": int(teacher.nbytes),
            "nbytes_stored": store_io.size_prefix(teacher.store, teacher.path),
            "digests": digests,
            **({} if schedule is None else {"schedule": dict(schedule)}),
            # rows carried forward keep their sums: the loosest allowance of them too
            **_loosest_sum_tolerance(parts, self._meta["epochs"].get(str(latest), {}).get("sum_tolerance")
                                     if merged.carried_forward else None),
        }
        meta = dict(self._meta)
        meta["schema_version"] = SCHEMA_VERSION  # the epoch's trajectory: a schema 2 store is now 3
        meta["sealed"] = meta["sealed"] + [epoch]
        meta["epochs"] = {**meta["epochs"], str(epoch): info}
        self._require_unchanged(epoch)
        self._publish(meta)  # the seal
        try:
            self._remove_what_sealed_epochs_left()
        except OSError as err:  # sealed all the same: what failed leaves files behind, never a wrong row
            warnings.warn(
                f"epoch {epoch} is sealed, but removing what it no longer needs failed: {os_problem(err, self.url)}. "
                f"Training can go on; delete {self.url}/{staging.path} (and any teacher/ epoch not among "
                f"{self.teacher_epochs}) by hand to reclaim the space", RuntimeWarning, stacklevel=4,
            )
        return info

    def _nothing_written(self, epoch: int) -> StoreError:
        return StoreError(f"nothing was written for epoch {epoch}: no writer staged rows in {self.url}")

    def rollback(self, last_kept: int) -> list[int]:
        """Unseal every epoch after ``last_kept`` (to resume from an earlier checkpoint),
        and discard their staged rows, so that those epochs can be written again.

        Returns the sealed epochs dropped. Refused when it would drop the last kept teacher.
        """
        self._require_writable("roll back")
        try:
            return self._rollback(last_kept)
        except OSError as err:  # a full disk: a write to an open file names no file
            raise StoreError(
                f"cannot roll the store back to epoch {last_kept}: {os_problem(err, self.url)}; free space or make "
                "it writable, then resume again (each step of a rollback leaves the store consistent)"
            ) from err

    def _rollback(self, last_kept: int) -> list[int]:
        self.refresh()
        dropped = [e for e in self.sealed_epochs if e > last_kept]
        remaining = [e for e in self.sealed_epochs if e <= last_kept]
        pruned_through = _pruned_through(self._meta, self.keep_epochs)  # stays pruned once fewer are sealed
        if remaining and remaining[-1] <= pruned_through:
            raise StoreError(
                f"cannot roll back to epoch {last_kept}: its predictions were pruned "
                f"(kept: {self.teacher_epochs}); resume from a later checkpoint"
            )
        for staging in EpochStaging.all_epochs(self._group, self.url):
            if staging.epoch > last_kept:
                staging.discard()
        if not dropped:
            return []
        meta = dict(self._meta)
        meta["sealed"] = remaining
        meta["epochs"] = {k: v for k, v in meta["epochs"].items() if int(k) <= last_kept}
        # epochs sealed again later get teachers of their own: pruned are only those kept epochs' before
        meta["pruned_through"] = pruned_through if remaining else 0
        self._publish(meta)
        for epoch in dropped:
            for path in (f"teacher/{epoch_key(epoch)}", f"trajectory/{epoch_key(epoch)}"):
                delete_node(self._group, path)
        return dropped

    # -- internals ---------------------------------------------------------------------------

    @property
    def codec(self) -> zarr.codecs.BloscCodec:
        """The compressor every array of this store uses (Blosc's type size follows each
        array's dtype)."""
        return zarr.codecs.BloscCodec(**self._meta["blosc"])

    def _teacher_codec(self) -> zarr.codecs.BloscCodec:
        if self.topk is None:
            return self.codec
        # packed top-k rows are bytes: shuffle by the value type's size, not byte by byte
        return self._codec_of_items(self.dtype.itemsize)

    def _codec_of_items(self, typesize: int) -> zarr.codecs.BloscCodec:
        """The store's compressor for an array of bytes that shuffles items of ``typesize`` bytes."""
        return zarr.codecs.BloscCodec(**{**self._meta["blosc"], "typesize": typesize})

    def _write_trajectory(self, epoch: int, values: dict[str, np.ndarray]) -> list[CheckedArray]:
        """The epoch's trajectory record, one array of one chunk (``trajectory.pack_records``)."""
        records = pack_records(values, self.trajectory_fields)
        # a record's bytes are its fields': shuffled by the record's size, each field's bytes compress together
        array = create_array(self._group, f"trajectory/{epoch_key(epoch)}", shape=records.shape, dtype=np.uint8,
                             chunks=records.shape, compressor=self._codec_of_items(records.shape[1]))
        ChunkFiles(array).write(0, records)
        return [CheckedArray(array, self._trajectory_what(epoch), self.url)]

    def _require_unchanged(self, epoch: int) -> None:
        """Refuse to publish ``epoch`` when another process changed the store since this seal
        began (a rollback, a seal of its own): the epoch was merged onto what the store held
        then, and publishing would bring back the epochs a rollback dropped. Nothing of the
        epoch is published; what remains is the window between this read and the write."""
        current = self._root_attributes()
        if current != self._meta:
            now = "unreadable" if current is None else current.get("sealed")
            raise StoreError(
                f"the store at {self.url} changed while epoch {epoch} was being sealed (sealed epochs "
                f"{self._meta['sealed']} then, {now} now: another process rolled it back or sealed): epoch {epoch} "
                "was not published; open the store again, and write and seal the epoch the store expects next"
            )

    def _publish(self, meta: dict[str, Any]) -> None:
        """Write the store's attributes (with their checksum): one atomic write of the root
        metadata, which is what makes an epoch sealed or unsealed for every reader. Compact:
        it lists every sealed epoch's statistics and is written again at every seal."""
        meta = _with_checksum(meta)
        self._group = set_group_attributes(self._group, {**self._group.attrs, ATTRS_KEY: meta}, compact=True)
        self._meta = meta

    def _remove_what_sealed_epochs_left(self) -> None:
        """Remove the staged rows of sealed epochs and the teachers beyond ``keep_epochs``:
        the newly sealed epoch's, and what a seal killed after its publication left."""
        sealed = set(self.sealed_epochs)
        for staging in EpochStaging.all_epochs(self._group, self.url):
            if staging.epoch in sealed:
                staging.remove()
        pruned = {epoch_key(epoch) for epoch in sealed.difference(self.teacher_epochs)}
        for name in pruned.intersection(store_io.list_dir(self._group.store, "teacher")):
            delete_node(self._group, f"teacher/{name}")
