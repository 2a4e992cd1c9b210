"""pskd-store: PS-KD's past predictions in a chunked, compressed Zarr store.

The names a custom training loop needs::

    from pskd_store import (SoftTargetStore, PredictionWriter, PredictionService,
                            SoftTargetDataset, alpha_t, soft_target, StoreError)

They are imported on first use, so ``import pskd_store`` (and ``pskd-store info``) does
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "SoftTargetStore": ".store",
    "StoreError": ".store",
    "EpochNotSealedError": ".store",
    "PredictionWriter": ".writer",
    "PredictionService": ".service",
    "SoftTargetDataset": ".dataset",
    "collate_soft_targets": ".dataset",
    "TokenTargetDataset": ".token_dataset",
    "TokenWriter": ".token_writer",
    "token_labels": ".sequences",
    "token_soft_cross_entropy": ".loss",
    "alpha_t": ".loss",
    "soft_target": ".loss",
    "Method": ".methods",
    "register_method": ".methods",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pskd_store' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
