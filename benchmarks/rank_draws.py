"""What each rank draws: run under torchrun, then compare the ranks' inputs; prints JSON.

Every rank trains one epoch of CE + Cutout (a few steps, two DataLoader workers) on a data
set of one 32x32 image repeated, with CIFAR's random crop and flip; a forward pre-hook
keeps each step's input batch, and each rank saves them with its initial weights and
three numbers drawn from its own stream after training. With one image, two ranks'
batches differ only by what they drew: crop, flip and Cutout's holes.

    torchrun --nproc-per-node 2 benchmarks/rank_draws.py OUT [--device cuda]   # each rank saves OUT/rankR.pt
    python benchmarks/rank_draws.py OUT --compare                              # JSON: how the ranks differ
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from pskd_store import training
from pskd_store.data import DataSplits
from pskd_store.recipe import TrainConfig


class OneImage(Dataset):
    """``size`` copies of one random image, through CIFAR's training transforms."""

    def __init__(self, size: int, transform=None):
        self.image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.5  # in [0.5, 1.5)
        self.targets = np.arange(size) % 10
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.image if self.transform is None else self.transform(self.image)
        return image, int(self.targets[index])


def record_rank(out: Path, device: str, steps: int) -> None:
    seen, weights = [], []
    create_model = training.create_model

    def recording(name: str, num_classes: int) -> torch.nn.Module:
        model = create_model(name, num_classes)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]).cpu())
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0].cpu()) if m.training else None)
        return model

    training.create_model = recording  # this script's process only
    # CIFAR's crop and flip, its padding filled with a value the image never takes
    train_set = OneImage(64, T.Compose([T.RandomCrop(32, padding=4, fill=0.25), T.RandomHorizontalFlip()]))
    splits = DataSplits(train=train_set, val=None, test=OneImage(16), num_classes=10,
                        train_labels=train_set.targets, input_kind="32x32")
    config = TrainConfig(dataset="cifar10", arch="preact_resnet18", method="ce", aug="cutout", epochs=1,
                         batch_size=8, workers=2, steps_per_epoch=steps, device=device).resolved()
    training.train(config, out / "run", quiet=True, splits=splits)
    torch.save({"inputs": seen, "weights": weights[0], "after": torch.rand(3)}, out / f"rank{os.environ['RANK']}.pt")


def compare(out: Path) -> dict:
    """How ranks 0 and 1 differ, step by step."""
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]
    holes_differ, crops_differ, rows = 0, 0, 0
    for x0, x1 in zip(ranks[0]["inputs"], ranks[1]["inputs"]):
        holes0, holes1 = x0 == 0, x1 == 0  # neither the image nor the padding is 0: zeros are Cutout's
        holes_differ += int((holes0 != holes1).flatten(1).any(1).sum())
        kept = ~(holes0 | holes1)
        crops_differ += int(((x0 != x1) & kept).flatten(1).any(1).sum())
        rows += len(x0)
    return {
        "steps": [len(rank["inputs"]) for rank in ranks],
        "rows": rows,
        "rows_whose_holes_differ": holes_differ,
        "rows_whose_crop_or_flip_differ": crops_differ,
        "initial_weights_equal": bool(torch.equal(ranks[0]["weights"], ranks[1]["weights"])),
        "own_streams_differ": not torch.equal(ranks[0]["after"], ranks[1]["after"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="compare the saved ranks instead of recording")
    args = parser.parse_args()
    if args.compare:
        print(json.dumps(compare(args.out)))
    else:
        record_rank(args.out, args.device, args.steps)


if __name__ == "__main__":
    main()
