"""SoftTargetDataset: any (input, label) data set, with PS-KD's soft target per item."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from .batch_transfer import handed_over_by_value
from .data import known_labels
from .loss import alpha_t, soft_target
from .seeding import SAMPLE, Draw, draw_seed, host_generators_kept, seed_host_generators
from .service import PredictionService
from .store import SoftTargetStore, StoreError
from .store_keys import token_from_int, token_to_int


class SoftTargetBatch(Sequence):
    """The items of one batch, ``(input, target, label, id)`` each, for a ``collate_fn`` that
    indexes or iterates them (a sequence, not a ``list``: one that sorts in place takes
    ``list(batch)``); built from batched tensors, which :func:`collate_soft_targets` hands on
    as they are instead of splitting and stacking them again."""

    def __init__(self, inputs: list, targets: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor):
        self.inputs, self.targets, self.labels, self.ids = inputs, targets, labels, ids
        self._items: list[tuple] | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple:
        if self._items is None:  # split once: default_collate reads every item (20x faster than per-item indexing)
            self._items = list(zip(self.inputs, self.targets.unbind(0), self.labels.tolist(), self.ids.tolist()))
        return self._items[i]


class TokenTargetItems(list):
    """The items of one batch of a ``TokenTargetDataset``, as any ``collate_fn`` takes them:
    marked, so that :func:`collate_soft_targets` knows them."""


def collate_soft_targets(batch: SoftTargetBatch | TokenTargetItems | list) -> tuple | list:
    """``collate_fn`` for a DataLoader of a :class:`SoftTargetDataset` (or of a
    ``TokenTargetDataset``): a tuple of the batch's inputs collated as usual and the rest as
    the data set made them (targets, labels, ids; for sequences, collated as usual); in a
    worker process, the rest is handed over by value (batch_transfer.py). Any other batch
    goes to ``default_collate``."""
    if isinstance(batch, SoftTargetBatch):
        collated = (default_collate(batch.inputs), batch.targets, batch.labels, batch.ids)
    elif isinstance(batch, TokenTargetItems):
        collated = tuple(default_collate(batch))
    else:
        return default_collate(batch)
    return handed_over_by_value(collated)


class TeacherEpochDataset(Dataset, ABC):
    """What a data set serving last epoch's predictions needs, whatever its items make of
    them (:class:`SoftTargetDataset`, :class:`TokenTargetDataset`): the epoch, set by
    :meth:`set_epoch` in the main process before iterating each epoch's DataLoader (as with
    ``DistributedSampler.set_epoch``), lives in a shared-memory tensor, so workers started
    earlier (``persistent_workers=True``, fork or spawn) see it too and switch to the new
    teacher on their next item; the teacher is the memory map of the sealed epoch before
    (service.py). Epoch 1 has no teacher. With ``alpha_T`` 0 no teacher is ever read.

    With ``seed``, each item is loaded with the host generators (torch's, Python's,
    NumPy's) seeded by (seed, rank, epoch, id, repeat) (seeding.py): its random transforms
    then depend on where it is drawn, not on which worker or process loads it, so the
    number of workers does not change a run and a resumed run repeats an uninterrupted
    one. Under DDP pass each process its ``rank``: ranks draw differently.
    """

    def __init__(
        self,
        base: Dataset,
        store: SoftTargetStore,
        alpha_T: float,
        total_epochs: int,
        *,
        cache_dir: str | None = None,
        seed: int | None = None,
        rank: int = 0,
    ):
        alpha_t(1, total_epochs, alpha_T)  # validates both
        self._labels = store.labels  # every batch's labels are checked against the store's
        self._require_same_data(base, store)
        self.base = base
        # [alpha_T, total_epochs], shared like the epoch: a loop that sets either reaches the
        # workers started before (persistent_workers=True) at their next batch
        self._schedule = torch.tensor([alpha_T, total_epochs], dtype=torch.float64).share_memory_()
        self.num_classes = store.num_classes
        self.seed = seed
        self.rank = rank
        self.service = PredictionService(store, cache_dir)
        self._store = store
        store.add_reader(self)  # the store's writers refuse an epoch this data set is not set to
        # [epoch, teacher epoch or 0, seal token as int, set_epoch calls]: written by set_epoch,
        # read by workers (the count: a worker maps the teacher again after each, service.py)
        self._state = torch.zeros(4, dtype=torch.int64).share_memory_()

    @abstractmethod
    def _require_same_data(self, base: Dataset, store: SoftTargetStore) -> None:
        """Refuse a base data set that is not the one the store was made for."""

    def __len__(self) -> int:
        return len(self.base)

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def alpha_T(self) -> float:
        return float(self._schedule[0])

    @alpha_T.setter
    def alpha_T(self, value: float) -> None:
        alpha_t(max(self.epoch, 1), self.total_epochs, value)  # validates it
        self._schedule[0] = value

    @property
    def total_epochs(self) -> int:
        return int(self._schedule[1])

    @total_epochs.setter
    def total_epochs(self, value: int) -> None:
        alpha_t(max(self.epoch, 1), value, self.alpha_T)  # the epoch set must lie within it
        self._schedule[1] = value

    def set_epoch(self, epoch: int) -> None:
        """Use the predictions of sealed epoch ``epoch - 1`` (none for epoch 1)."""
        self._alpha(epoch)  # validates the epoch
        if get_worker_info() is not None:  # forked or spawned: its epoch is the main process's
            raise RuntimeError("set_epoch() belongs in the main process, not in a DataLoader worker")
        if self._store is None:  # a pickled copy, whose state is the original's
            raise RuntimeError(
                f"this {type(self).__name__} is a pickled copy (handed to torch.multiprocessing.spawn, say), which "
                "reads no store and shares its epoch with the original: make the data set inside each training "
                "process"
            )
        teacher, token = 0, 0
        if epoch > 1 and self.alpha_T > 0:
            teacher = epoch - 1
            token = token_to_int(self.service.prepare(teacher))
        self._state[1] = teacher
        self._state[2] = token
        self._state[3] += 1
        self._state[0] = epoch

    def __getitem__(self, index: int) -> tuple:
        return self.__getitems__([index])[0]

    def _alpha(self, epoch: int) -> float:
        """a_t, from one read of the shared schedule (two would cost a batch 6 µs)."""
        alpha_T, total_epochs = self._schedule.tolist()
        return alpha_t(epoch, int(total_epochs), alpha_T)

    def _current(self) -> tuple[int, int, int, int]:
        """(epoch, teacher epoch or 0, seal token as int, set_epoch calls), in one read of
        what set_epoch wrote."""
        epoch, teacher, token, prepared = self._state.tolist()
        if epoch == 0:
            raise RuntimeError(f"call set_epoch(epoch) before iterating a {type(self).__name__}")
        return epoch, teacher, token, prepared

    def _load(self, indices: list[int], epoch: int) -> list[tuple]:
        """The base data set's items; with a seed, each drawn from generators seeded by
        where it is drawn. In the main process (``num_workers=0``) the process's own
        streams are put back afterwards, as if a worker had loaded the batch."""
        if self.seed is None:
            return [self.base[int(i)] for i in indices]
        items = []
        with host_generators_kept(get_worker_info() is None):
            for i in indices:
                # a sampler's NumPy or tensor indices have a repeat() method, not a draw's repeat
                repeat = i.repeat if isinstance(i, Draw) else 0
                seed_host_generators(draw_seed(SAMPLE, self.seed, self.rank, epoch, int(i), repeat))
                items.append(self.base[int(i)])
        return items

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None  # workers read memory maps only, never the Zarr store
        return state


def require_pairs(items: list, indices: list) -> None:
    """After a batch failed to unpack or to give its labels: refuse an item that is no
    ``(input, label)`` pair (a dict, a triple), naming the fix, rather than by an error about
    its contents. Run only then: a loop over the items would cost every batch."""
    for index, item in zip(indices, items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(_not_a_pair(item, index))


def _not_a_pair(item: object, index: int) -> str:
    what = f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
    return (f"item {int(index)} of the wrapped data set is {what}, not an (input, label) pair: wrap the data set "
            "so that its items are (input, label), e.g. a Dataset whose __getitem__ returns (x, y)")


class SoftTargetDataset(TeacherEpochDataset):
    """Wrap a map-style data set of ``(input, label)``; items become
    ``(input, target, label, index)`` with target = (1 - a_t)·onehot(label) + a_t·p_{t-1}.

    Epoch 1 has no teacher: one-hot targets. With ``alpha_T`` 0 the targets are always
    one-hot: what a method that trains on its labels wraps its data with, so that its items
    still carry their ids. Epochs, workers, ``seed`` and ``rank``: :class:`TeacherEpochDataset`.

    In the main process (``num_workers=0``, or a loop that blends there), the epoch's
    targets of every sample are blended once, at its first batch, when they take at most
    ``TABLE_BYTES``; each batch then only gathers its rows. Blended per batch, they cost
    the training thread ~0.1 ms after every step, whose work has evicted the caches (2% of
    a small CNN's step on a CPU: benchmarks/train_overhead.py). A worker blends its own
    batches, off that thread. The values are the same, bit for bit (elementwise float32
    arithmetic, whichever rows it runs on).
    """

    TABLE_BYTES = 64 << 20  # CIFAR-100's targets take 20 MB; ImageNet's 5 GB would not be kept
    _table: tuple[tuple, np.ndarray] | None = None  # ((epoch, teacher, token, alpha_T, total_epochs), targets)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_table", None)  # the main process's own: a worker blends its batches
        return state

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._table = None  # blended again from the file prepare() just checked (decoded again if it rotted)

    def _require_same_data(self, base: Dataset, store: SoftTargetStore) -> None:
        if store.token_rows is not None:
            raise StoreError(f"{store.url} is a sequence store (a row per target token): wrap the data set "
                             "with TokenTargetDataset")
        if len(base) != store.num_samples:
            raise StoreError(
                f"the data set has {len(base)} samples but the store was made for "
                f"{store.num_samples}: use the store of this data set"
            )
        self._check_labels(known_labels(base), np.arange(len(base)))

    def __getitems__(self, indices: list[int]) -> SoftTargetBatch:
        """A whole batch at once (the DataLoader calls this): one gather from the memory
        map and one blend for all rows, instead of per-item tensor work."""
        state = self._current()
        items = self._load(indices, state[0])
        ids = np.fromiter(indices, np.int64, len(indices))  # without the draws' repeats
        try:
            inputs, labels = zip(*items, strict=True) if items else ((), ())
            labels = self._checked_labels(labels, ids)
        except (TypeError, ValueError):
            require_pairs(items, indices)
            raise
        return SoftTargetBatch(list(inputs), self._blend(labels, ids, *state), torch.from_numpy(labels),
                               torch.from_numpy(ids))

    def targets(self, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The current epoch's (B, K) float32 targets of samples ``ids`` with ``labels``: what
        items carry, for loops that blend in the main process (``integrations.transformers``)."""
        ids = torch.as_tensor(ids).cpu().numpy()
        return self._blend(self._checked_labels(torch.as_tensor(labels).tolist(), ids), ids, *self._current())

    def _blend(self, labels: np.ndarray, ids: np.ndarray, epoch: int, teacher: int, token: int,
               prepared: int) -> torch.Tensor:
        if teacher == 0:
            return torch.nn.functional.one_hot(torch.from_numpy(labels), self.num_classes).float()
        table = self._targets_table(epoch, teacher, token, prepared)
        if table is not None:
            return torch.from_numpy(table.take(ids, axis=0))
        return self._blended(labels, ids, epoch, teacher, token, prepared)

    def _blended(self, labels: np.ndarray, ids: np.ndarray, epoch: int, teacher: int, token: int,
                 prepared: int) -> torch.Tensor:
        """(1 - a_t)·onehot(labels) + a_t·p_{t-1}(ids), p read from the memory map."""
        past = self.service.lookup(teacher, token_from_int(token), ids, prepared)
        return soft_target(torch.from_numpy(labels), past, self._alpha(epoch))

    def _targets_table(self, epoch: int, teacher: int, token: int, prepared: int) -> np.ndarray | None:
        """Every sample's target at this epoch, blended by the main process once per epoch
        when they take at most ``TABLE_BYTES`` (the class docstring says why); None in a
        worker and for larger ones. Made again when anything the blend reads changes: the
        epoch, the teacher's seal, or ``alpha_T``/``total_epochs`` set by a loop mid-epoch."""
        state = (epoch, teacher, token, *self._schedule.tolist())
        if self._table is not None and self._table[0] == state:
            return self._table[1]
        if get_worker_info() is not None or len(self._labels) * self.num_classes * 4 > self.TABLE_BYTES:
            return None
        self._table = (state, self._blended(self._labels, np.arange(len(self._labels)), epoch, teacher, token,
                                            prepared).numpy())
        return self._table[1]

    def _checked_labels(self, labels: Sequence, ids: np.ndarray) -> np.ndarray:
        """The store's labels of ``ids``, once the items' ``labels`` are found equal to them.
        Compared as lists of ints: after a training step has evicted NumPy's code from the
        caches, that costs two thirds of converting the labels and comparing arrays."""
        labels, expected = list(map(int, labels)), self._labels.take(ids)
        if labels != expected.tolist():
            self._check_labels(np.asarray(labels, dtype=np.int64), ids)  # raises, naming the first that differs
        return expected

    def _check_labels(self, labels: np.ndarray | None, indices: np.ndarray) -> None:
        """A base data set with other labels than the store's would blend each sample's
        teacher row with another class: refuse it, whatever its length."""
        if labels is None:
            return
        wrong = np.flatnonzero(labels != self._labels[indices])
        if len(wrong):
            i = indices[wrong[0]]
            raise StoreError(
                f"sample {i} of the data set has label {labels[wrong[0]]} but the store was made for "
                f"label {self._labels[i]} ({len(wrong)} of {len(indices)} checked samples differ): wrap "
                "the data set the store was created for, in the same order, or create a new store"
            )
