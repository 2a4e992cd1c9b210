"""The staging area: the rows of an epoch in progress, one part per writer, until the seal.

Layout, under the store's root::

    staging/epoch_0008/writer_0003/ids       (capacity,) int64     ┐ the rows in write order,
    staging/epoch_0008/writer_0003/encoded   (capacity, width)     ┘ uncompressed, encoded as
                                                                    the store's rows (row_encoding.py)
    staging/epoch_0008/writer_0003         attributes: owner, closed, world_size, rows (set by close)
    staging/epoch_0008/owners/writer_0003.2   claim 2 on that part: its owner, as JSON

Staged rows live only until the seal, so they are stored uncompressed (with a crc32c
checksum, like every array of the store): writers spend no CPU on compression and the
seal compresses the epoch once.

**Ownership.** A part (epoch, rank) has one owner: the writer holding its latest claim.
A writer claims a part by creating claim n+1 (0 when there is none) with the store's
create-if-absent and reading it back; whoever's record is there owns the part, unless
another claim on it is held by a writer that may still run (a writer whose listing was older
made a lower number meanwhile): then the claim is withdrawn and refused. A claim is
refused while the part is closed (its rows wait for the seal: only
:meth:`EpochStaging.discard` writes it again) or while the latest claim's owner lives.
An owner is gone when it released its claim (a writer that was abandoned or failed) or
when its process no longer runs on this machine: the record holds the pid, the process's
start time (so a reused pid is not taken for the owner), the boot id and the pid
namespace. An owner on another machine cannot be checked; it is refused, and the message
names ``discard_staging`` as the fix once that process is known to be gone.

What the claim guarantees depends on the backend. On a local disk a claim is a temporary
file moved into place with a hard link (store_io.py), atomic on POSIX file systems. On S3
(s3fs) a claim is one PUT with ``If-None-Match: *``, which the server refuses when the
object exists: atomic on AWS S3 and on servers that honour conditional writes (MinIO, moto;
a server that ignores the header falls back to the guarantee below). In both cases two
writers racing for one part never both win. Other fsspec backends (``gs://``, ``az://``, ``memory://``) get zarr's
check-then-write, so two writers started within one round trip of each other could both
believe they won; the read-back catches all but the closest races. A launcher that gives
every process its own rank never races.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import socket
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr

from . import store_io
from .array_files import (
    ChunkFiles,
    create_array,
    create_group,
    delete_node,
    group_attributes,
    open_array,
    require_groups,
    set_group_attributes,
)
from .errors import StoreError
from .integrity import CheckedArray
from .store_io import get as _store_get
from .store_io import put_if_absent as _store_set_if_absent  # the claim's create-if-absent (module doc)
from .store_keys import epoch_key

STAGING = "staging"
_EPOCH = re.compile(r"epoch_(\d+)")  # an epoch's name in staging/
_PART = re.compile(r"writer_(\d+)")  # a part's name in the epoch's staging
_CLAIM = re.compile(r"writer_(\d+)\.(\d+)")  # a claim's name in owners/ (a store's temporary files are not)
_SEAL_CLAIM = re.compile(r"seal\.(\d+)")  # a seal's claim in owners/
# this process's open writers by their claims' tokens: a writer dropped unclosed (its loop
# failed and made a new one) is gone with its object, and its part may be claimed again
_LIVE_CLAIMS: weakref.WeakValueDictionary[str, PartWriter | _Sealing] = weakref.WeakValueDictionary()


def part_name(rank: int) -> str:
    return f"writer_{rank:04d}"


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: enough to tell, on the same machine, whether it still runs."""

    pid: int
    host: str
    machine: str         # host name, boot id and pid namespace: where ``pid`` means something
    started: str | None  # the process's start time in clock ticks since boot (Linux)
    token: str           # this claim, among the claims of one process

    @classmethod
    def this_process(cls) -> Owner:
        pid = os.getpid()
        return cls(pid, socket.gethostname(), _machine(), _process_start(pid), secrets.token_hex(8))

    def state(self) -> str:
        """``alive``, ``gone``, or ``unknown`` (another machine: it cannot be checked)."""
        if self.machine != _machine():
            return "unknown"
        if self.pid == os.getpid() and self.started == _process_start(self.pid):
            return "alive" if self.token in _LIVE_CLAIMS else "gone"
        return "alive" if _running(self.pid, self.started) else "gone"

    def __str__(self) -> str:
        here = self.pid == os.getpid() and self.machine == _machine()
        return f"process {self.pid} on {self.host}{' (this process)' if here else ''}"


@functools.cache  # a process's machine and pid namespace stay its own
def _machine() -> str:
    boot = Path("/proc/sys/kernel/random/boot_id")
    namespace = Path("/proc/self/ns/pid")
    return "|".join((
        socket.gethostname(),
        boot.read_text().strip() if boot.exists() else "",
        os.readlink(namespace) if namespace.exists() else "",
    ))


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name), or None without that process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _running(pid: int, started: str | None) -> bool:
    if started is not None:  # Linux: the process must be the same one, and not a zombie
        fields = _proc_stat(pid)
        return fields is not None and fields[0] not in "ZX" and fields[19] == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class StagedPart:
    """A closed part, as the seal reads it: ``rows`` rows of ``ids`` and ``encoded`` rows."""

    rank: int
    rows: int
    ids: CheckedArray
    encoded: CheckedArray
    world_size: int | None  # the number of writers its writer counted (None: not known)
    sum_tolerance: float | None  # how far from 1 its probability rows' sums were allowed (None: logits)


class EpochStaging:
    """The staging of one unsealed epoch: claiming parts, listing them, discarding them."""

    def __init__(self, root: zarr.Group, epoch: int, url: str = ""):
        self.root = root
        self.epoch = epoch
        self.url = url
        self.path = f"{STAGING}/{epoch_key(epoch)}"

    @classmethod
    def all_epochs(cls, root: zarr.Group, url: str = "") -> list[EpochStaging]:
        """Every epoch with staged rows in the store."""
        matches = (_EPOCH.fullmatch(name) for name in store_io.list_dir(root.store, STAGING))
        return [cls(root, epoch, url) for epoch in sorted(int(m[1]) for m in matches if m)]

    # -- writers ---------------------------------------------------------------------------

    def claim(self, rank: int) -> PartWriter:
        """Take ownership of part ``rank``, or raise :class:`StoreError` naming the fix."""
        if rank < 0:
            raise StoreError(f"rank must be 0 or more (one per writer process), got {rank}")
        self._refuse_closed(rank)
        claims = self._claims(rank)
        if claims:
            self._refuse_live(rank, self._owner(rank, claims[-1]))
        me = Owner.this_process()
        number = claims[-1] + 1 if claims else 0
        key = self._claim_key(rank, number)
        require_groups(self.root, self.path)  # owners/ holds plain keys, which zarr never opens: no group document
        _store_set_if_absent(self.root.store, key, json.dumps(asdict(me)).encode())
        winner = self._owner(rank, number)
        if winner != me:
            raise StoreError(
                f"another writer{f' ({winner})' if winner else ''} claimed rank {rank} of epoch "
                f"{self.epoch} at the same moment as this one: give each writer process its own rank"
            )
        try:
            self._clear_other_claims(rank, number)
            self._refuse_closed(rank)  # closed by its owner between the first check and the claim
        except StoreError:
            store_io.delete(self.root.store, key)
            raise
        part = _LIVE_CLAIMS[me.token] = PartWriter(self, rank, me, key)
        return part

    def _clear_other_claims(self, rank: int, number: int) -> None:
        """Delete the part's other claims, whose owners are gone, or lose to one that may run.

        A writer that stalled between listing the claims and making its own can make it after
        another writer claimed a number the listing did not show (a released number is made
        again). Whichever of two such claims is checked second sees the other; refusing then
        leaves at most one owner, however the two interleave.
        """
        for other in self._claims(rank):
            owner = None if other == number else self._owner(rank, other)
            if owner is not None and owner.state() != "gone":
                raise StoreError(
                    f"{owner} claimed rank {rank} of epoch {self.epoch} while this writer did "
                    f"(claims {other} and {number}): give each writer process its own rank"
                )
            if other != number:
                store_io.delete(self.root.store, self._claim_key(rank, other))

    def _refuse_closed(self, rank: int) -> None:
        attrs = self._part_attrs(rank)
        if attrs.get("closed"):
            raise StoreError(
                f"rank {rank} of epoch {self.epoch} already closed its staging part ({attrs['rows']} rows, "
                f"written by {Owner(**attrs['owner'])}): seal the epoch, or discard those rows with "
                f"store.discard_staging({self.epoch}, rank={rank}) to write the part again"
            )

    def _refuse_live(self, rank: int, owner: Owner | None) -> None:
        state = "gone" if owner is None else owner.state()
        if state == "alive":
            raise StoreError(
                f"rank {rank} of epoch {self.epoch} already has a writer: {owner} is writing it now. "
                "Give this writer another rank (one per DDP process), or close that writer first (its "
                "close(), or abandon() to give its rows up)"
            )
        if state == "unknown":
            raise StoreError(
                f"rank {rank} of epoch {self.epoch} is held by {owner}, which cannot be checked from "
                f"{socket.gethostname()}: if it still runs, give this writer another rank; if it is gone, "
                f"remove its stale part with store.discard_staging({self.epoch}, rank={rank})"
            )

    # -- the seal's side -------------------------------------------------------------------

    @contextlib.contextmanager
    def sealing(self) -> Iterator[None]:
        """Hold the epoch's seal for this process while it runs. A second seal of the epoch
        at the same time (each rank of a hand-written loop sealing, say) is refused before it
        writes anything: its arrays would replace the ones the first published. A claim whose
        owner is gone (a seal killed, or one of this process that failed) is removed; of two
        claims made at once, whichever is checked second refuses, as a part's claims do. A
        seal that succeeds removes the staging, its claim with it."""
        me = Owner.this_process()
        hold = _Sealing()  # _LIVE_CLAIMS holds it weakly: alive while this frame holds it
        _LIVE_CLAIMS[me.token] = hold
        key = None
        try:
            number = max(self._seal_claims(), default=-1) + 1
            _store_set_if_absent(self.root.store, self._seal_key(number), json.dumps(asdict(me)).encode())
            key = self._seal_key(number)
            for other in self._seal_claims():
                owner = None if other == number else self._seal_owner(other)
                if owner is not None and owner.state() != "gone":
                    raise StoreError(
                        f"epoch {self.epoch} is being sealed by {owner} at the same time: seal each epoch in one "
                        "process (rank 0 of a DDP loop, once every rank closed its writer)"
                        + ("" if owner.state() == "alive" else
                           f"; if that process is gone, delete {self.url}/{self._seal_key(other)}"))
                if other != number:
                    store_io.delete(self.root.store, self._seal_key(other))
            # read back last: a claim made under this number by another at the same moment, or
            # this one deleted by a seal that took it for a gone owner's, and this seal holds nothing
            if self._seal_owner(number) != me:
                raise StoreError(f"another process claimed the seal of epoch {self.epoch} at the same moment as this "
                                 "one: seal each epoch in one process (rank 0 of a DDP loop)")
            yield
        except BaseException:
            with contextlib.suppress(OSError):  # left, it reads as gone once this process ends
                if key is not None and self._seal_owner(number) == me:  # ours, not a claim made under its number
                    store_io.delete(self.root.store, key)
            raise
        finally:
            _LIVE_CLAIMS.pop(me.token, None)
            del hold

    def sealing_by(self) -> Owner | None:
        """The owner of a seal of the epoch that runs now on this machine. One on another
        machine cannot be checked: like a part's owner there, it does not stop a discard (a
        resume elsewhere after a seal was killed rolls its epoch back)."""
        owners = (self._seal_owner(number) for number in self._seal_claims())
        return next((owner for owner in owners if owner is not None and owner.state() == "alive"), None)

    def _seal_key(self, number: int) -> str:
        return f"{self.path}/owners/seal.{number}"

    def _seal_claims(self) -> list[int]:
        names = store_io.list_dir(self.root.store, f"{self.path}/owners")
        return sorted(int(m[1]) for m in map(_SEAL_CLAIM.fullmatch, names) if m)

    def _seal_owner(self, number: int) -> Owner | None:
        return self._owner_at(self._seal_key(number))

    def parts(self) -> list[StagedPart]:
        """Every part, by rank; refuses an epoch with a part that was never closed (a part
        whose writer was killed while making it included)."""
        parts = []
        for rank in self._ranks():
            attrs = self._part_attrs(rank)
            if not attrs.get("closed"):
                raise StoreError(
                    f"writer {rank} of epoch {self.epoch} was never closed (it crashed or is still "
                    "running): close every writer before sealing, or rerun the epoch; the part of a writer "
                    f"that is gone stays until store.discard_staging({self.epoch}, rank={rank}) removes it"
                )
            what = f"the staged rows of writer {rank}, epoch {self.epoch},"
            path = f"{self.path}/{part_name(rank)}"
            ids, encoded = (CheckedArray(open_array(self.root, f"{path}/{name}"), what, self.url)
                            for name in ("ids", "encoded"))
            parts.append(StagedPart(rank, int(attrs["rows"]), ids, encoded, attrs.get("world_size"),
                                    attrs.get("sum_tolerance")))
        return parts

    def remove(self) -> None:
        """Delete every staged row of the epoch (after its seal)."""
        delete_node(self.root, self.path)

    def abandoned(self) -> bool:
        """Whether every part and claim of the epoch was left by a writer that is gone: none
        closed (rows waiting for their seal), none of an owner alive or on another machine."""
        for rank in sorted(set(self._ranks()) | set(self._claimed_ranks())):
            claims = self._claims(rank)
            owner = self._owner(rank, claims[-1]) if claims else None
            if self._part_attrs(rank).get("closed") or (owner is not None and owner.state() != "gone"):
                return False
        return True

    def discard(self, rank: int | None = None) -> None:
        """Forget part ``rank`` (every part when None) so that it can be written again.

        Refused while an owner on this machine is still writing a part.
        """
        ranks = sorted(set(self._ranks()) | set(self._claimed_ranks())) if rank is None else [rank]
        if (sealer := self.sealing_by()) is not None:
            raise StoreError(f"cannot discard epoch {self.epoch}'s rows: the epoch is being sealed by {sealer}; wait "
                             "for its seal, or stop it first")
        for r in ranks:
            claims = self._claims(r)
            if claims and not self._part_attrs(r).get("closed"):
                owner = self._owner(r, claims[-1])
                if owner is not None and owner.state() == "alive":
                    raise StoreError(
                        f"cannot discard rank {r} of epoch {self.epoch}: {owner} is writing it now; "
                        "close or stop that writer first"
                    )
        if rank is None:
            self.remove()
            return
        delete_node(self.root, f"{self.path}/{part_name(rank)}")
        for number in self._claims(rank):
            store_io.delete(self.root.store, self._claim_key(rank, number))

    # -- internals ---------------------------------------------------------------------------

    def has_parts(self) -> bool:
        """Whether a writer made a part of the epoch (a claim alone wrote no rows)."""
        return bool(self._ranks())

    def _ranks(self) -> list[int]:
        """The ranks with a part (a claim alone has written no rows)."""
        matches = (_PART.fullmatch(name) for name in store_io.list_dir(self.root.store, self.path))
        return sorted(int(m[1]) for m in matches if m)

    def _claimed_ranks(self) -> list[int]:
        return [rank for rank, _ in self._all_claims()]

    def _part_attrs(self, rank: int) -> dict:
        """The attributes of part ``rank`` (owner, closed, rows); {} when there is none."""
        return group_attributes(self.root.store, f"{self.path}/{part_name(rank)}") or {}

    def _claim_key(self, rank: int, number: int) -> str:
        return f"{self.path}/owners/{part_name(rank)}.{number}"

    def _claims(self, rank: int) -> list[int]:
        """The numbers of the claims on part ``rank``, in order (the last one owns it)."""
        return sorted(number for r, number in self._all_claims() if r == rank)

    def _all_claims(self) -> list[tuple[int, int]]:
        """(rank, claim number) of every claim of the epoch."""
        matches = (_CLAIM.fullmatch(name) for name in store_io.list_dir(self.root.store, f"{self.path}/owners"))
        return [(int(m[1]), int(m[2])) for m in matches if m]

    def _owner(self, rank: int, number: int) -> Owner | None:
        """The owner claim ``number`` names; None once it was released."""
        return self._owner_at(self._claim_key(rank, number))

    def _owner_at(self, key: str) -> Owner | None:
        data = _store_get(self.root.store, key)
        return None if data is None else Owner(**json.loads(data))


class _Sealing:
    """A seal's hold on its epoch: its claim is alive while this is referenced (Owner.state)."""


class PartWriter:
    """The owner's handle on its part: make the arrays, append rows, then close or release."""

    def __init__(self, staging: EpochStaging, rank: int, owner: Owner, claim_key: str):
        self.rank = rank
        self.rows = 0
        self.closed = False
        self._held = True  # the claim is ours until released (its number may then be reused)
        self._staging = staging
        self._owner = owner
        self._claim_key = claim_key
        self._path = f"{staging.path}/{part_name(rank)}"

    def create(self, num_samples: int, width: int, chunk_rows: int, dtype: np.dtype,
               world_size: int | None = None) -> None:
        """Make the part's arrays (replacing what a gone owner left), room for N stored rows
        of ``width`` values each (row_encoding.py), and record the epoch's ``world_size``."""
        root = self._staging.root
        require_groups(root, self._staging.path)
        self._world_size = world_size
        group = create_group(root, self._path, attributes=self._attributes(closed=False))
        self._group = group
        self._ids = create_array(group, "ids", shape=(num_samples,), chunks=(chunk_rows,), dtype=np.int64,
                                 compressor=None)
        self._encoded = create_array(group, "encoded", shape=(num_samples, width), chunks=(chunk_rows, width),
                                     dtype=dtype, compressor=None)
        self._chunk_files = [ChunkFiles(self._ids), ChunkFiles(self._encoded)]

    def append(self, ids: np.ndarray, encoded: np.ndarray) -> None:
        """Add rows after the ones already there. Up to one chunk from a chunk's start is
        stored as zarr stores it — its bytes, then their crc32c — with one write and none of
        zarr's per-chunk machinery; other appends go through zarr."""
        end = self.rows + len(ids)
        if end > self._ids.shape[0]:  # more rows than samples: duplicates; grow the part
            capacity = max(end, 2 * self._ids.shape[0])
            self._ids.resize((capacity,))
            self._encoded.resize((capacity, self._encoded.shape[1]))
        chunk, offset = divmod(self.rows, self._ids.chunks[0])
        if offset or len(ids) > self._ids.chunks[0]:
            self._ids[self.rows:end] = ids
            self._encoded[self.rows:end] = encoded
        else:  # one chunk from its start: what the writer's chunk-sized buffers hand over
            for files, values in zip(self._chunk_files, (ids, encoded)):
                files.write(chunk, values)
        self.rows = end

    def close(self, sum_tolerance: float | None = None) -> None:
        """Mark the part complete: the seal takes it, and no writer may claim it again.
        ``sum_tolerance``: how far from 1 the sums of the probability rows written were allowed."""
        if not self._held:  # given up: another writer may hold the part now
            raise StoreError(f"{self._path} was given up by this writer; a new writer writes it again")
        set_group_attributes(self._group, {**self._attributes(closed=True), "rows": self.rows,
                                           "sum_tolerance": sum_tolerance})
        self.closed = True
        _LIVE_CLAIMS.pop(self._owner.token, None)

    def _attributes(self, closed: bool) -> dict:
        return {"owner": asdict(self._owner), "closed": closed, "world_size": self._world_size}

    def release(self) -> None:
        """Give the part up unclosed: its rows are never sealed, and a new writer may claim it."""
        if self._held:
            self._held = False
            _LIVE_CLAIMS.pop(self._owner.token, None)
            store_io.delete(self._staging.root.store, self._claim_key)
