"""Randomness that depends on where a draw sits in the run, not on who makes it.

A training sample's augmentation (crop, flip, Cutout's hole, CutMix's box) is drawn from
generators seeded by (seed, rank, epoch, sample id, repeat) or (seed, rank, epoch, step):
never from a stream that a DataLoader worker or a process carries along. So the number of
workers does not change a run, a resumed run repeats an uninterrupted one (new worker
processes draw what the old ones would have), and every rank draws its own numbers.

Seeds are BLAKE2b digests of the key, one domain per kind of draw; 64 bits each.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

SAMPLE = b"sample"  # a data set item: the transforms of its base data set
STEP = b"step"      # a training step: Cutout and CutMix on the batch
RANK = b"rank"      # a process's own generators: dropout and the like in the model


class Draw(int):
    """A sample id (an ``int`` everywhere) that says it is drawn again in this epoch.

    A sampler that yields one id twice in an epoch (CS-KD's partners) yields the later
    draws as ``Draw(id, repeat)`` with distinct ``repeat`` > 0, so that each draw gets
    augmentation of its own; a plain id is ``repeat`` 0.
    """

    repeat: int

    def __new__(cls, sample: int, repeat: int) -> Draw:
        draw = super().__new__(cls, sample)
        draw.repeat = repeat
        return draw

    def __reduce__(self):  # to DataLoader workers with its repeat
        return Draw, (int(self), self.repeat)


def draw_seed(domain: bytes, *key: int) -> int:
    """A 64-bit seed that is a function of ``domain`` and the integers of ``key`` alone."""
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *key), digest_size=8, person=domain).digest()
    return int.from_bytes(digest, "little")


def seed_host_generators(seed: int) -> None:
    """Seed what data transforms draw from: torch's CPU generator (torchvision's
    transforms), Python's ``random`` and NumPy's global generator."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)  # NumPy's global generator takes 32 bits


def seed_process(seed: int, rank: int) -> None:
    """This rank's own streams (every device's torch generator, Python's, NumPy's), for
    what the model draws (dropout, ShakeDrop): the same on no two ranks."""
    rank_seed = draw_seed(RANK, seed, rank)
    torch.manual_seed(rank_seed)
    seed_host_generators(rank_seed)


@contextmanager
def host_generators_kept(keep: bool = True) -> Iterator[None]:
    """Put the host generators back as they were afterwards (``keep``): draws seeded
    inside leave the process's own streams untouched."""
    if not keep:
        yield
        return
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
