"""The trajectory tier's record of one epoch, accumulated by the seal (and by ``verify``,
which recomputes it) a run of rows at a time: per row for an image store, per sample for a
sequence store (sequences.py)."""

from __future__ import annotations

import numpy as np

from .sequences import TokenRows
from .store_keys import SEQUENCE_TRAJECTORY_FIELDS, TRAJECTORY_FIELDS


class RowTrajectory:
    """One record per row: the true-class and largest probabilities, the argmax, written."""

    fields = TRAJECTORY_FIELDS

    def __init__(self, num_rows: int):
        self._values = {name: np.empty(num_rows, dtype) for name, dtype in self.fields.items()}

    def add(self, lo: int, per_row: dict[str, np.ndarray], labels: np.ndarray, written: np.ndarray | None) -> None:
        """Rows ``lo .. lo + len(labels)``: their fields (``RowEncoding.trajectory``) and,
        from the seal, whether each was written this epoch."""
        hi = lo + len(labels)
        for name, values in per_row.items():
            self._values[name][lo:hi] = values
        if written is not None:
            self._values["written"][lo:hi] = written

    def result(self) -> dict[str, np.ndarray]:
        return self._values


class SequenceTrajectory:
    """Per-sample summaries of the per-token trajectory fields, accumulated a run of rows
    at a time. Float16 values are summed in float64, which holds such sums exactly, so the
    result does not depend on how the rows are split (the seal and ``verify`` split them
    differently and must agree bit for bit)."""

    fields = SEQUENCE_TRAJECTORY_FIELDS

    def __init__(self, token_rows: TokenRows):
        self.token_rows = token_rows
        size = token_rows.num_sequences
        self._true = np.zeros(size)
        self._max = np.zeros(size)
        self._correct = np.zeros(size, dtype=np.int64)
        self._written = np.zeros(size, dtype=np.int64)

    def add(self, lo: int, per_row: dict[str, np.ndarray], labels: np.ndarray, written: np.ndarray | None) -> None:
        """Rows ``lo .. lo + len(labels)``: their per-token fields (``RowEncoding.trajectory``),
        labels and, from the seal, whether each was written this epoch."""
        samples = self.token_rows.sample_of(np.arange(lo, lo + len(labels)))  # never empty: a store has rows
        first = samples[0]
        local = samples - first
        size = int(local[-1]) + 1
        at = slice(first, first + size)

        def total(weights: np.ndarray) -> np.ndarray:
            return np.bincount(local, weights=weights, minlength=size)

        self._true[at] += total(per_row["true_prob"].astype(np.float16).astype(np.float64))
        self._max[at] += total(per_row["max_prob"].astype(np.float16).astype(np.float64))
        self._correct[at] += np.bincount(local, weights=per_row["argmax"] == labels, minlength=size).astype(np.int64)
        if written is not None:
            self._written[at] += np.bincount(local, weights=written, minlength=size).astype(np.int64)

    def result(self) -> dict[str, np.ndarray]:
        """The fields, one value per sample; a sample without target positions was never
        predicted (NaN, not written)."""
        lengths = self.token_rows.lengths
        return {"true_prob": self._mean(self._true).astype(np.float16),
                "max_prob": self._mean(self._max).astype(np.float16),
                "token_accuracy": _float16_toward_zero(self._mean(self._correct)),
                "written": (lengths > 0) & (self._written == lengths)}

    def token_accuracy_to_nearest(self) -> np.ndarray:
        """The token accuracy rounded to the nearest float16, as epochs sealed before it was
        rounded down hold it (``verify`` accepts either)."""
        return self._mean(self._correct).astype(np.float16)

    def _mean(self, total: np.ndarray) -> np.ndarray:
        """Per sample, ``total`` over its target positions (float64; NaN without any)."""
        lengths = self.token_rows.lengths
        out = np.full(len(total), np.nan)
        np.divide(total, lengths, out=out, where=lengths > 0)
        return out


def _float16_toward_zero(fractions: np.ndarray) -> np.ndarray:
    """Fractions in [0, 1] as float16 rounded down, not to the nearest: a sequence right at
    just under half its tokens (2,048 of 4,097) then stays under one half, and "at least half
    right" (analysis.py) reads the same from the stored value as from the counts."""
    rounded = fractions.astype(np.float16)
    return np.where(rounded > fractions, np.nextafter(rounded, np.float16(0)), rounded)


def pack_records(values: dict[str, np.ndarray], fields: dict[str, type]) -> np.ndarray:
    """An epoch's trajectory fields as one (rows, :func:`record_bytes`) uint8 array, a row's
    fields' bytes side by side, then zeros: the seal writes one array (a metadata file and a
    chunk) where an array per field made four, and a directory for each."""
    rows = len(next(iter(values.values())))
    records = np.zeros((rows, record_bytes(fields)), dtype=np.uint8)
    at = 0
    for name, dtype in fields.items():
        size = np.dtype(dtype).itemsize
        records[:, at:at + size] = np.ascontiguousarray(values[name], dtype=dtype).view(np.uint8).reshape(rows, size)
        at += size
    return records


def unpack_records(records: np.ndarray, fields: dict[str, type]) -> dict[str, np.ndarray]:
    """The fields of :func:`pack_records`' array, each (rows,) in its own dtype."""
    values, at = {}, 0
    for name, dtype in fields.items():
        size = np.dtype(dtype).itemsize
        values[name] = np.ascontiguousarray(records[:, at:at + size]).view(dtype).reshape(-1)
        at += size
    return values


def record_bytes(fields: dict[str, type]) -> int:
    """The bytes of one row of :func:`pack_records`' array: its fields', padded to a power of
    two. Blosc shuffles (by the record's size) 8- or 16-byte items several times faster than
    7- or 9-byte ones, and the padding's zero bytes compress to nothing."""
    return 1 << (sum(np.dtype(dtype).itemsize for dtype in fields.values()) - 1).bit_length()
