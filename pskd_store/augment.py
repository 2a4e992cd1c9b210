"""PS-KD combined with Cutout or CutMix, as in the paper's Table 4: within each shuffled
batch, the first half trains on PS-KD targets and the second half on Cutout or CutMix."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

CUTOUT_HOLE = 8  # pixels, the paper's (and DeVries & Taylor's) CIFAR setting


class HalfBatchAugment:
    """Augment the second half of a batch; only the first half's predictions are clean,
    so only those are recorded (the rest carry their last prediction forward)."""

    def __init__(self, kind: str, num_classes: int):
        self.kind = kind
        self.num_classes = num_classes
        self._cutmix = v2.CutMix(num_classes=num_classes, alpha=1.0)

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Return (inputs, targets, clean) where rows ``[:clean]`` kept their PS-KD targets."""
        clean = len(inputs) - len(inputs) // 2
        if clean == len(inputs):
            return inputs, targets, clean
        head_x, tail_x = inputs[:clean], inputs[clean:]
        if self.kind == "cutmix":
            tail_x, tail_t = self._cutmix(tail_x, labels[clean:])
        else:
            tail_x = self._cutout(tail_x)
            tail_t = torch.nn.functional.one_hot(labels[clean:], self.num_classes).float()
        return torch.cat([head_x, tail_x]), torch.cat([targets[:clean], tail_t.to(targets)]), clean

    @staticmethod
    def _cutout(batch: torch.Tensor) -> torch.Tensor:
        """An 8x8 hole per image; a hole of 8 samples per 1-D signal of shape (1, L)
        (torchvision's RandomErasing never erases the full height, so signals get their own)."""
        height, width = batch.shape[-2:]
        if height > 1:
            scale = CUTOUT_HOLE * CUTOUT_HOLE / (height * width)
            erase = v2.RandomErasing(p=1.0, scale=(scale, scale), ratio=(1.0, 1.0), value=0)
            return torch.stack([erase(image) for image in batch])  # a new hole for each image
        starts = torch.randint(0, width - CUTOUT_HOLE + 1, (len(batch), 1), device=batch.device)
        positions = torch.arange(width, device=batch.device)
        hole = (positions >= starts) & (positions < starts + CUTOUT_HOLE)
        return batch.masked_fill(hole[:, None, :], 0)
