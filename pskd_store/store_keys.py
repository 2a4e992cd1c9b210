"""The names inside a store and its cache, the seal token's one representation, and the
slice size every module that streams an epoch uses: one home, so that the writer, the
seal, the service and ``verify`` cannot disagree."""

from __future__ import annotations

import secrets

import numpy as np

# a trajectory tier array per field and epoch: what `inspect` reads, kept for every epoch
TRAJECTORY_FIELDS = {"true_prob": np.float16, "max_prob": np.float16, "argmax": np.int32, "written": np.bool_}
# a sequence store's trajectory tier: per sample, over its target positions
SEQUENCE_TRAJECTORY_FIELDS = {
    "true_prob": np.float16,       # mean probability of the true token
    "max_prob": np.float16,        # mean largest probability
    "token_accuracy": np.float16,  # fraction of positions whose largest probability is the true token
    "written": np.bool_,           # it has target positions and every one was written this epoch
}
SLICE_BYTES = 32 << 20  # rows held at a time while an epoch is merged, decoded or verified
RUN_KEY = "run.json"  # which run trains into the store (SoftTargetStore.claim_run): a plain key zarr never reads


def epoch_key(epoch: int) -> str:
    """An epoch's name in the store (``teacher/epoch_0007``) and in its cache."""
    return f"epoch_{epoch:04d}"


def cache_file_name(epoch: int, token: str) -> str:
    """The decoded teacher's file: named by the seal, so a stale file is never mistaken for it."""
    return f"{epoch_key(epoch)}-{token}.npy"


def slice_rows(chunk_rows: int, row_bytes: int) -> int:
    """Rows streamed at a time: whole chunks, about ``SLICE_BYTES``."""
    return max(1, SLICE_BYTES // (chunk_rows * row_bytes)) * chunk_rows


def new_seal_token() -> str:
    """16 hex digits of 63 random bits: a str in the store, an int64 in shared memory."""
    return f"{secrets.randbits(63):016x}"


def token_to_int(token: str) -> int:
    return int(token, 16)


def token_from_int(value: int) -> str:
    return f"{value:016x}"
