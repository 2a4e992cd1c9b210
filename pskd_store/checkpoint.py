"""Atomic checkpoints: model, optimizer, scheduler, epoch and every rank's RNG states —
never the prediction table, which lives in the store."""

from __future__ import annotations

import os
import random
import zipfile
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


def save_checkpoint(path: Path, state: dict[str, Any], *, previous: Path | None = None) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash never leaves half a file.

    ``state`` must include ``epoch`` and ``rng`` (one :func:`rng_state` per rank, in rank
    order). With ``previous``, the checkpoint ``path`` held is kept there (a hard link,
    renamed into place before the new one is), so a crash at any point leaves ``path``
    whole and ``previous`` one epoch older or the same.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
    except RuntimeError as err:  # torch's writer reports a failed write (a full disk) this way
        tmp.unlink(missing_ok=True)
        raise OSError(f"torch.save could not write it, is the disk full? ({str(err).splitlines()[0]})") from err
    if previous is not None and path.exists():
        link_into_place(path, previous)
    os.replace(tmp, path)


def link_into_place(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (a hard link, no copy), atomically."""
    link = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    link.unlink(missing_ok=True)
    os.link(source, link)
    os.replace(link, target)


class CheckpointDamagedError(ValueError):
    """A checkpoint whose bytes are not what torch.save wrote, or that cannot be read."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, after every record of it matched the CRC-32 that
    torch.save wrote beside it in the file (torch.load itself checks none)."""
    if not path.is_file():
        where = (f"{path.parent.parent} is a run directory without {path.parent.name}/{path.name}"
                 if (path.parent.parent / "config.json").is_file() else f"no checkpoint at {path}")
        raise FileNotFoundError(f"{where}: pass a run directory or a .pt file written by train")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointDamagedError(f"{path} {problem}")
    return _written_by_train(torch.load(path, map_location="cpu", weights_only=False), path)


def _written_by_train(state: Any, path: Path) -> dict[str, Any]:
    """``state`` when it is what `pskd-store train` saves; a Lightning ``.ckpt`` or a bare
    state dict is refused in one line, not by a KeyError."""
    if not isinstance(state, dict) or not {"epoch", "config", "model"} <= state.keys():
        keys = f" of {', '.join(map(str, list(state)[:4]))}" if isinstance(state, dict) else ""
        raise CheckpointDamagedError(f"{path} is not a checkpoint written by pskd-store train (a "
                                     f"{type(state).__name__}{keys}): pass a run directory or its checkpoints/last.pt")
    return state


def checkpointed(sealed_epochs: list[int]) -> bool:
    """Whether a run whose store sealed ``sealed_epochs`` wrote a checkpoint: epoch 1's is
    written before epoch 2 is sealed, so a run without one lost it."""
    return bool(sealed_epochs) and sealed_epochs[-1] > 1


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint file at ``path``, or None when it is whole: torch.save
    writes a zip archive whose every record carries a CRC-32, checked here record by record."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = archive.namelist()
    except OSError as err:  # a folder, no permission
        return f"is not a readable checkpoint ({err})"
    except (zipfile.BadZipFile, EOFError) as err:
        with open(path, "rb") as file:
            if file.read(2) not in (b"", b"PK"):  # torch.save writes a zip archive, which starts so
                return "is not a checkpoint: not the zip archive torch.save writes (another kind of file?)"
        return f"is not a readable checkpoint ({err}): it was cut short or damaged"
    if not any(name.endswith("/data.pkl") for name in names):  # an .npz, say, written over it
        return (f"is a zip archive of {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}, not a checkpoint "
                "written by torch.save: another file was written over it, or this is not the checkpoint meant")
    if damaged is not None:
        return f"is damaged: its record {damaged} does not match the CRC-32 torch.save wrote for it (flipped bits)"
    return None


def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint was written after, read without loading its tensors."""
    return checkpoint_seal(path)[0]


def checkpoint_seal(path: Path) -> tuple[int, str | None]:
    """The epoch a checkpoint was written after and the seal token of that epoch it recorded
    (None in a checkpoint from before they were), read without loading its tensors."""
    state = _written_by_train(torch.load(path, map_location="cpu", weights_only=False, mmap=True), path)
    return int(state["epoch"]), state.get("seal_token")
