"""Shared pieces of the store tests: deterministic per-epoch predictions and a writer run.

Kept importable (not in conftest) so that subprocesses and spawned workers can use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from pskd_store.store import SoftTargetStore


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
