"""Shared pieces of the store tests: deterministic per-epoch predictions and a writer run.

Kept importable (not in conftest) so that subprocesses and spawned workers can use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from pskd_store.array_files import ChunkFiles, create_array, create_group
from pskd_store.integrity import CheckedArray
from pskd_store.store import SoftTargetStore
from pskd_store.store_keys import epoch_key


def epoch_probs(epoch: int, num_samples: int, num_classes: int) -> np.ndarray:
    """The (N, K) probabilities a fake model 'predicts' in ``epoch``: different every epoch."""
    rng = np.random.default_rng(1000 + epoch)
    return rng.dirichlet(np.ones(num_classes), size=num_samples).astype(np.float32)


def write_epoch(
    store: SoftTargetStore, epoch: int, ids: np.ndarray | None = None, batch: int = 16, seal: bool = True
) -> np.ndarray:
    """Write ``epoch_probs`` of ``ids`` (default: all, shuffled) batch by batch; seal."""
    probs = epoch_probs(epoch, store.num_samples, store.num_classes)
    if ids is None:
        ids = np.random.default_rng(epoch).permutation(store.num_samples)
    writer = store.writer(epoch, from_logits=False)
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        writer.write(torch.from_numpy(chunk), torch.from_numpy(probs[chunk]))
    writer.close()
    if seal:
        store.seal(epoch)
    return probs


def make_labels(num_samples: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, num_samples)


def chunk_file(array_dir: Path, index: int = 0) -> Path:
    """The file of chunk ``index`` (along the first axis) of the array at ``array_dir``,
    named as its metadata says (``c.2.0``, or ``c/2/0`` in arrays made by zarr's default)."""
    array = zarr.open_array(zarr.storage.LocalStore(array_dir, read_only=True))
    return array_dir / array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))


def chunk_files(array_dir: Path) -> dict[str, bytes]:
    """Every chunk file of the array at ``array_dir``: its key -> its bytes."""
    return {path.relative_to(array_dir).as_posix(): path.read_bytes() for path in array_dir.rglob("*")
            if path.is_file() and path.name != "zarr.json"}


def write_trajectory_per_field(store: SoftTargetStore, epoch: int, values: dict[str, np.ndarray]) -> list[CheckedArray]:
    """How a schema 2 store's seal wrote an epoch's trajectory record: a group of an (N,)
    array per field (``SoftTargetStore._write_trajectory`` stands in for it in a test)."""
    group = create_group(store._group, f"trajectory/{epoch_key(epoch)}")
    arrays = []
    for field, dtype in store.trajectory_fields.items():
        rows = len(values[field])
        array = create_array(group, field, shape=(rows,), dtype=dtype, chunks=(rows,), compressor=store.codec)
        ChunkFiles(array).write(0, values[field].astype(dtype))
        arrays.append(CheckedArray(array, store._trajectory_what(epoch, field), store.url))
    return arrays
