"""Cutout and CutMix inside the training step, on the batch's own device.

An augmentation returns what it makes, as timm's ``Mixup`` does: the batch's inputs, their
targets and CS-KD's partners, and whether the inputs are now mixtures of samples. Which
rows a method trains on its own targets and records in the store is the method's decision
(methods.py): with ``--method ce``, ``ls``, ``tfkd`` or ``cskd`` Cutout cuts every image
(DeVries & Taylor 2017) and CutMix mixes a whole batch with probability 0.5 (Yun et al.
2019, the CIFAR setting of their published code: ``--beta 1.0 --cutmix_prob 0.5``); PS-KD
augments the second half of each batch only, always (the paper's split, Sec. 4.1).

CS-KD's same-class partners are augmented with their samples: Cutout cuts them too (as a
transform of CS-KD's data pipeline would), and a mixed batch pastes the same box from the
same neighbours into each partner, so a partner carries exactly its sample's mixed label
and the KL term compares two images of the same class mixture.

Every draw of a step comes from generators seeded by (seed, rank, epoch, step)
(seeding.py): a resumed run repeats an uninterrupted one and every rank draws its own
holes and boxes. Nothing here waits on the device: holes are drawn by a generator on the
batch's device, and CutMix's coin, Beta sample and box on the CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .seeding import STEP, draw_seed

CUTOUT_HOLE = 8  # pixels: the paper's Cutout setting (and DeVries & Taylor's for CIFAR-100; recipe.py: per data set)
CUTMIX_BETA = 1.0  # lambda ~ Beta(1, 1): Yun et al.'s setting on CIFAR and ImageNet


def cutout(batch: Tensor, hole: int = CUTOUT_HOLE, generator: torch.Generator | None = None) -> Tensor:
    """Zero a ``hole``-wide square (images, (B, C, H, W)) or segment (signals, (B, C, L))
    per sample, centred on a uniformly random position and clipped at the border, as
    DeVries & Taylor's Cutout does. One mask for the whole batch, built on its device."""
    spatial = batch.shape[2:]
    inside = torch.ones((len(batch),) + (1,) * len(spatial), dtype=torch.bool, device=batch.device)
    for dim, size in enumerate(spatial):
        centres = torch.randint(size, (len(batch), 1), device=batch.device, generator=generator)
        positions = torch.arange(size, device=batch.device)
        in_hole = (positions >= centres - hole // 2) & (positions < centres + hole // 2)  # (B, size)
        shape = [len(batch)] + [1] * len(spatial)
        shape[1 + dim] = size
        inside = inside & in_hole.view(shape)
    return batch.masked_fill(inside.unsqueeze(1), 0)


class Augmented(NamedTuple):
    """What an augmentation made of a batch. ``targets`` are class indices, or
    probabilities where CutMix mixed labels; ``mixed``: the inputs are mixtures of samples,
    no longer the samples themselves."""

    inputs: Tensor
    targets: Tensor
    partners: Tensor | None
    mixed: bool


class BatchAugment:
    """Cutout or CutMix for one training step. ``cutmix_prob`` is the chance that a batch
    is mixed, unless the call says ``always`` (PS-KD's augmented half)."""

    def __init__(self, kind: str, num_classes: int, *, cutmix_prob: float = 0.5, cutout_hole: int = CUTOUT_HOLE,
                 seed: int = 0, rank: int = 0):
        if kind not in ("cutout", "cutmix"):
            raise ValueError(f"unknown augmentation {kind!r}; choose cutout or cutmix")
        self.kind = kind
        self.num_classes = num_classes
        self.cutmix_prob = cutmix_prob
        self.cutout_hole = cutout_hole
        self.seed = seed
        self.rank = rank
        self._cutmix = None
        if kind == "cutmix":  # torchvision takes seconds to import: only CutMix needs it
            from torchvision.transforms import v2

            self._cutmix = v2.CutMix(num_classes=num_classes, alpha=CUTMIX_BETA)
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, inputs: Tensor, targets: Tensor, labels: Tensor, partners: Tensor | None = None, *,
                 epoch: int, step: int, always: bool = False) -> Augmented:
        seed = draw_seed(STEP, self.seed, self.rank, epoch, step)
        # torchvision's CutMix draws from torch's CPU generator: seeded here, put back after
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self._augment(inputs, targets, labels, partners, self._generator(inputs.device, seed), always)

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        """A generator on the batch's device (Cutout's holes never leave it), seeded per step."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device].manual_seed(seed)

    def _augment(self, inputs: Tensor, targets: Tensor, labels: Tensor, partners: Tensor | None,
                 holes: torch.Generator, always: bool) -> Augmented:
        if self.kind == "cutout":
            cut_partners = None if partners is None else cutout(partners, self.cutout_hole, holes)
            return Augmented(cutout(inputs, self.cutout_hole, holes), targets, cut_partners, mixed=False)
        if not always and torch.rand(()) >= self.cutmix_prob:
            return Augmented(inputs, targets, partners, mixed=False)
        if partners is None:
            return Augmented(*self._cutmix(inputs, labels), None, mixed=True)
        # Stacked along channels, a sample and its partner get one box from one neighbour pair.
        channels = inputs.shape[1]
        mixed, mixed_targets = self._cutmix(torch.cat([inputs, partners], dim=1), labels)
        return Augmented(mixed[:, :channels], mixed_targets, mixed[:, channels:], mixed=True)
