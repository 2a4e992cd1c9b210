"""How a teacher row is stored: all K probabilities, or the k largest with their classes.

Everything that moves rows (staging, the seal's merge, the memory map) treats a stored row
as an opaque row of the store's array; only this module knows what is in it:

- :class:`DenseRows`: (K,) probabilities in the store's dtype.
- :class:`TopKRows`: the k largest probabilities in the store's dtype, then their class
  ids in the smallest unsigned type that holds K, packed into one row of bytes
  (little-endian), so that one array per epoch holds both. A target is rebuilt by
  putting each stored probability at its class and spreading the remaining mass
  1 - sum(top k) evenly over the other K - k classes.

A top-k epoch of ImageNet (K = 1000) with k = 5 takes 20 bytes a row instead of 2,000.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # reading a store needs no torch; only the writer encodes rows
    import torch


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    import torch

    return getattr(torch, dtype.name)


# why rows that encoding.unreadable() flags are refused (a StoreDamagedError's problem)
UNREADABLE_ROWS = "name class ids outside [0, K): their chunks were rewritten with valid checksums"


def rounding_tolerance(*epsilons: float) -> float:
    """How far from 1 rounding a probability row to the coarsest of the dtypes with these
    machine ``epsilons`` may move its sum: at most half an epsilon; twice that, at least 1e-5."""
    return max(1e-5, *(2 * float(eps) for eps in epsilons))


def summation_slack(num_classes: int) -> float:
    """How far float32 arithmetic alone may move the sum of a softmax row of
    ``num_classes`` probabilities from 1: its denominator sums K terms, each addition off
    by up to one unit of roundoff (2^-24). Negligible at K = 100, it outgrows the rounding
    to float32 at a vocabulary's K (at K = 128,000: 1.2e-5 measured, 7.6e-3 the bound)."""
    return num_classes * 2.0**-24


class RowEncoding(ABC):
    """What a stored row holds, and the operations every other module needs on it."""

    topk: int | None = None

    def __init__(self, num_classes: int, dtype: str | np.dtype):
        self.num_classes = num_classes
        self.value_dtype = np.dtype(dtype)

    @property
    @abstractmethod
    def width(self) -> int:
        """Values of ``stored_dtype`` per stored row."""

    @property
    @abstractmethod
    def stored_dtype(self) -> np.dtype:
        """The dtype of the store's teacher array."""

    @abstractmethod
    def describe(self) -> str:
        """A few words for ``info`` and error messages."""

    @abstractmethod
    def encode(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, K) probabilities (any float dtype, any device) -> stored rows, same device."""

    @abstractmethod
    def values(self, rows: np.ndarray) -> np.ndarray:
        """The probabilities a stored row holds (to check that they are finite)."""

    @abstractmethod
    def expand(self, rows: np.ndarray) -> np.ndarray:
        """Stored rows -> (B, K) probabilities: a dense row as stored (it is one), a top-k
        row rebuilt as float32. (Widening float16 is left to the caller: torch does it
        several times faster than NumPy.)"""

    @abstractmethod
    def sparse(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored rows -> (probabilities (B, w) float32, their classes (B, w) int64): what a
        loss rebuilding the target on the device takes (loss.token_soft_cross_entropy)."""

    @abstractmethod
    def onehot(self, labels: np.ndarray) -> np.ndarray:
        """The stored rows of one-hot predictions of ``labels``."""

    @abstractmethod
    def trajectory(self, rows: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """True-class probability, max probability and argmax of each row (a dense row's first
        maximum; a top-k row's first class, which among tied values is torch.topk's choice)."""

    @abstractmethod
    def unreadable(self, rows: np.ndarray) -> np.ndarray:
        """(B,) rows that cannot be turned into a target at all."""

    @abstractmethod
    def valid(self, rows: np.ndarray, tolerance: float) -> np.ndarray:
        """(B,) rows that are probability vectors: finite, non-negative, summing to 1."""


class DenseRows(RowEncoding):
    """All K probabilities of a row."""

    @property
    def width(self) -> int:
        return self.num_classes

    @property
    def stored_dtype(self) -> np.dtype:
        return self.value_dtype

    def describe(self) -> str:
        return f"dense {self.value_dtype}"

    def encode(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.to(_torch_dtype(self.value_dtype))

    def values(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def expand(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def sparse(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return rows.astype(np.float32), np.tile(np.arange(self.num_classes, dtype=np.int64), (len(rows), 1))

    def onehot(self, labels: np.ndarray) -> np.ndarray:
        rows = np.zeros((len(labels), self.num_classes), dtype=self.value_dtype)
        rows[np.arange(len(labels)), labels] = 1
        return rows

    def trajectory(self, rows: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        index = np.arange(len(rows))
        argmax = _argmax(rows)
        return {"argmax": argmax, "max_prob": rows[index, argmax], "true_prob": rows[index, labels]}

    def unreadable(self, rows: np.ndarray) -> np.ndarray:
        """None: any K values can be a target."""
        return np.zeros(len(rows), dtype=bool)

    def valid(self, rows: np.ndarray, tolerance: float) -> np.ndarray:
        finite = np.isfinite(rows).all(axis=1) & (rows >= 0).all(axis=1)
        return finite & (np.abs(rows.sum(axis=1, dtype=np.float32) - 1) <= tolerance)


class TopKRows(RowEncoding):
    """The k largest probabilities of a row and their class ids, packed into bytes."""

    def __init__(self, num_classes: int, dtype: str | np.dtype, topk: int):
        super().__init__(num_classes, dtype)
        if not 1 <= topk < num_classes:
            raise ValueError(f"--store-topk (topk) must lie in [1, K={num_classes}) (K itself is a dense store), "
                             f"got {topk}")
        self.topk = topk
        self.class_dtype = next(np.dtype(t) for t in ("uint8", "uint16", "uint32")
                                if num_classes <= np.iinfo(t).max + 1)
        self._value_bytes = topk * self.value_dtype.itemsize

    @property
    def width(self) -> int:
        return self.topk * (self.value_dtype.itemsize + self.class_dtype.itemsize)

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype("uint8")

    def describe(self) -> str:
        return f"top-{self.topk} {self.value_dtype} with {self.class_dtype} class ids"

    def encode(self, probs: torch.Tensor) -> torch.Tensor:
        import torch

        top, classes = probs.float().topk(self.topk, dim=1)  # sorted, largest first
        values = top.to(_torch_dtype(self.value_dtype)).view(torch.uint8)
        if self.class_dtype == np.uint8:
            ids = classes.to(torch.uint8)
        elif self.class_dtype == np.uint16:  # torch has no general uint16: int16 holds the same bits
            ids = classes.to(torch.int32).to(torch.int16).view(torch.uint8)
        else:
            ids = classes.to(torch.int32).view(torch.uint8)
        return torch.cat([values, ids], dim=1)

    def unpack(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored rows -> (values (B, k), class ids (B, k))."""
        rows = np.ascontiguousarray(rows)
        return rows[:, :self._value_bytes].view(self.value_dtype), rows[:, self._value_bytes:].view(self.class_dtype)

    def pack(self, values: np.ndarray, classes: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=self.value_dtype).view(np.uint8)
        classes = np.ascontiguousarray(classes, dtype=self.class_dtype).view(np.uint8)
        return np.concatenate([values, classes], axis=1)

    def values(self, rows: np.ndarray) -> np.ndarray:
        return self.unpack(rows)[0]

    def expand(self, rows: np.ndarray) -> np.ndarray:
        values, classes = self.unpack(rows)
        values = values.astype(np.float32)
        rest = np.clip(1 - values.sum(axis=1), 0, None) / (self.num_classes - self.topk)
        out = np.repeat(rest[:, None], self.num_classes, axis=1)
        np.put_along_axis(out, classes.astype(np.int64), values, axis=1)
        return out

    def sparse(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, classes = self.unpack(rows)
        return values.astype(np.float32), classes.astype(np.int64)

    def unreadable(self, rows: np.ndarray) -> np.ndarray:
        """(B,) rows naming a class id outside [0, K): no target can put a value there."""
        return (self.unpack(rows)[1] >= self.num_classes).any(axis=1)

    def onehot(self, labels: np.ndarray) -> np.ndarray:
        values = np.zeros((len(labels), self.topk), dtype=self.value_dtype)
        values[:, 0] = 1
        classes = (labels[:, None] + np.arange(self.topk)) % self.num_classes  # distinct; all but one carry 0
        return self.pack(values, classes)

    def trajectory(self, rows: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        values, classes = self.unpack(rows)
        hit = classes == labels[:, None]
        rest = np.clip(1 - values.astype(np.float32).sum(axis=1), 0, None) / (self.num_classes - self.topk)
        true_prob = np.where(hit.any(axis=1), values[np.arange(len(rows)), hit.argmax(axis=1)], rest)
        # torch.topk's first (among tied values, its order, which sealed epochs record and verify expects)
        return {"argmax": classes[:, 0].astype(np.int64), "max_prob": values[:, 0], "true_prob": true_prob}

    def valid(self, rows: np.ndarray, tolerance: float) -> np.ndarray:
        """Values finite, non-negative, largest first, summing to at most 1; classes in
        [0, K) and distinct within the row."""
        values, classes = self.unpack(rows)
        values32 = values.astype(np.float32)
        ok = np.isfinite(values32).all(axis=1) & (values32 >= 0).all(axis=1)
        ok &= (np.diff(values32, axis=1) <= 0).all(axis=1) & (values32.sum(axis=1) <= 1 + tolerance)
        ordered = np.sort(classes, axis=1)
        return ok & ~self.unreadable(rows) & (np.diff(ordered.astype(np.int64), axis=1) > 0).all(axis=1)


def row_encoding(num_classes: int, dtype: str | np.dtype, topk: int | None) -> RowEncoding:
    """The encoding of a store's rows."""
    return DenseRows(num_classes, dtype) if topk is None else TopKRows(num_classes, dtype, topk)


def _argmax(block: np.ndarray) -> np.ndarray:
    """Row-wise argmax. Non-negative float16 values order as their bit patterns, and numpy's
    integer argmax is ~10x faster than its float16 one (same result, first maximum wins)."""
    if block.dtype == np.float16:
        bits = block.view(np.uint16)
        if bits.max() < 0x8000:  # no sign bit set (not even -0.0)
            return bits.argmax(axis=1)
    return block.argmax(axis=1)
