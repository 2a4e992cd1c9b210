"""Cutout and CutMix inside the training step, on the batch's own device.

The paper's Table 2 and Table 4 use them two ways, and so does ``--aug``:

* with ``--method ce`` or ``ls``, as those methods are normally used: Cutout on every
  image (DeVries & Taylor 2017), CutMix on a whole batch with probability 0.5
  (Yun et al. 2019, the CIFAR setting of their published code: ``--beta 1.0
  --cutmix_prob 0.5``);
* with ``--method pskd``, the paper's split (Sec. 4.1): within each shuffled batch the
  first half trains on PS-KD targets, the second half on Cutout or CutMix.

CS-KD's same-class partners (``--method cskd``) are augmented with their samples: Cutout
cuts them too (as a transform of CS-KD's data pipeline would), and a mixed batch pastes
the same box from the same neighbours into each partner, so a partner carries exactly its
sample's mixed label and the KL term compares two images of the same class mixture.

Every draw of a step comes from generators seeded by (seed, rank, epoch, step)
(seeding.py): a resumed run repeats an uninterrupted one and every rank draws its own
holes and boxes. Nothing here waits on the device: holes are drawn by a generator on the
batch's device, and CutMix's coin, Beta sample and box on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

from .seeding import STEP, draw_seed

CUTOUT_HOLE = 8  # pixels: the paper's Cutout setting (and DeVries & Taylor's for CIFAR-100)
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


class BatchAugment:
    """Cutout or CutMix for one training step; see the module doc for the two modes.

    ``__call__`` returns ``(inputs, targets, recorded, partners)``: the (possibly)
    augmented batch, its targets (class indices, or probabilities where CutMix mixed
    labels), how many leading rows the store records and CS-KD's partners augmented the
    same way (None without partners). Mixed rows are never recorded (their input is not
    the sample), and under PS-KD only the PS-KD half is, so the teacher is made of the
    same kind of predictions as the targets it feeds. ``cutmix_prob`` is the chance that a
    whole batch is mixed (CE/LS/TF-KD/CS-KD; PS-KD's half is always mixed).
    """

    def __init__(self, kind: str, num_classes: int, *, half_batch: bool, cutmix_prob: float = 0.5,
                 seed: int = 0, rank: int = 0):
        if kind not in ("cutout", "cutmix"):
            raise ValueError(f"unknown augmentation {kind!r}; choose cutout or cutmix")
        self.kind = kind
        self.num_classes = num_classes
        self.half_batch = half_batch
        self.cutmix_prob = cutmix_prob
        self.seed = seed
        self.rank = rank
        self._cutmix = v2.CutMix(num_classes=num_classes, alpha=CUTMIX_BETA)
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, inputs: Tensor, targets: Tensor, labels: Tensor, partners: Tensor | None = None, *,
                 epoch: int, step: int) -> tuple[Tensor, Tensor, int, Tensor | None]:
        seed = draw_seed(STEP, self.seed, self.rank, epoch, step)
        # torchvision's CutMix draws from torch's CPU generator: seeded here, put back after
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self._augment(inputs, targets, labels, partners, self._generator(inputs.device, seed))

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        """A generator on the batch's device (Cutout's holes never leave it), seeded per step."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device].manual_seed(seed)

    def _augment(self, inputs: Tensor, targets: Tensor, labels: Tensor, partners: Tensor | None,
                 holes: torch.Generator) -> tuple[Tensor, Tensor, int, Tensor | None]:
        if self.half_batch:
            if partners is not None:
                raise ValueError("PS-KD's half-batch augmentation takes no CS-KD partners")
            return *self._half_batch(inputs, targets, labels, holes), None
        if self.kind == "cutout":
            cut_partners = None if partners is None else cutout(partners, generator=holes)
            return cutout(inputs, generator=holes), targets, len(inputs), cut_partners
        if torch.rand(()) >= self.cutmix_prob:
            return inputs, targets, len(inputs), partners
        if partners is None:
            mixed, mixed_targets = self._cutmix(inputs, labels)
            return mixed, mixed_targets, 0, None
        # Stacked along channels, a sample and its partner get one box from one neighbour pair.
        channels = inputs.shape[1]
        mixed, mixed_targets = self._cutmix(torch.cat([inputs, partners], dim=1), labels)
        return mixed[:, :channels], mixed_targets, 0, mixed[:, channels:]

    def _half_batch(self, inputs: Tensor, targets: Tensor, labels: Tensor,
                    holes: torch.Generator) -> tuple[Tensor, Tensor, int]:
        """PS-KD targets on the first half (recorded), Cutout/CutMix on the second."""
        head = len(inputs) - len(inputs) // 2
        if head == len(inputs):
            return inputs, targets, head
        tail = slice(head, None)
        if self.kind == "cutmix":
            tail_x, tail_t = self._cutmix(inputs[tail], labels[tail])
        else:
            tail_x = cutout(inputs[tail], generator=holes)
            tail_t = torch.nn.functional.one_hot(labels[tail], self.num_classes)
        return torch.cat([inputs[:head], tail_x]), torch.cat([targets[:head], tail_t.to(targets)]), head
