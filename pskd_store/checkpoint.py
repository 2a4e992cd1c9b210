"""Atomic checkpoints: model, optimizer, scheduler, epoch and every rank's RNG states —
never the prediction table, which lives in the store."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .accelerator import accelerator_for


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators: Python, NumPy, torch's CPU one and, on an accelerator,
    the generator of the current device only (a checkpoint must resume on a node with
    fewer GPUs, or on another GPU index), under the device type's name."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    accelerator = accelerator_for(device)
    device_state = accelerator.rng_state() if accelerator is not None else None
    if device_state is not None:
        state[device.type] = device_state
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    accelerator = accelerator_for(device)
    if accelerator is not None and device.type in state:
        accelerator.set_rng_state(state[device.type])


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash never leaves half a file.

    ``state`` must include ``rng``: one :func:`rng_state` per rank, in rank order.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
    except RuntimeError as err:  # torch's writer reports a failed write (a full disk) this way
        tmp.unlink(missing_ok=True)
        raise OSError(f"torch.save could not write it, is the disk full? ({str(err).splitlines()[0]})") from err
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a run directory or a .pt file written by train")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"{path} is not a readable checkpoint ({err}): it was cut short or damaged; "
            "delete it to resume the run from epoch 1, or restore it from a backup"
        ) from err
