"""Training configuration: the paper's defaults per data set, every one overridable."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models import input_kind

METHODS = {
    "ce": "cross-entropy with one-hot targets (baseline)",
    "ls": "label smoothing, epsilon 0.1",
    "pskd": "progressive self-knowledge distillation: targets blend in last epoch's predictions",
}
AUGMENTATIONS = {
    "none": "the data set's own augmentation only",
    "cutout": "Cutout (8x8 hole; 8 samples of a 1-D signal) on half of each batch, PS-KD targets on the other half",
    "cutmix": "CutMix (Beta(1,1)) on half of each batch, PS-KD targets on the other half",
}

# The paper's recipes (Kim et al. 2021, Sec. 4; the authors' code): SGD with Nesterov
# momentum 0.9 and a step schedule. Default milestones are fractions of the epochs (CIFAR:
# 150 and 225 of 300; ImageNet: 30 and 60 of 90), so a shorter run keeps the schedule's shape. The offline default trains a small MLP that
# over-fits MNIST-1D within minutes on a CPU.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist1d": dict(arch="mnist1d_mlp", epochs=40, batch_size=128, lr=0.05, weight_decay=0.0,
                    milestones=[], workers=0),
    "cifar10": dict(arch="preact_resnet18", epochs=300, batch_size=128, lr=0.1, weight_decay=5e-4,
                    milestones=[0.5, 0.75], workers=4),
    "cifar100": dict(arch="preact_resnet18", epochs=300, batch_size=128, lr=0.1, weight_decay=5e-4,
                     milestones=[0.5, 0.75], workers=4),
    "imagenet": dict(arch="tv_resnet152", epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4,
                     milestones=[1 / 3, 2 / 3], workers=8),
    "folder": dict(arch="tv_resnet50", epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4,
                   milestones=[1 / 3, 2 / 3], workers=8),
}
# PyramidNet on CIFAR (the paper, after Han et al.): smaller batch, larger lr, lighter decay.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "pyramidnet200": dict(batch_size=64, lr=0.25, weight_decay=1e-4),
}


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` in the run directory."""

    dataset: str = "mnist1d"
    data_dir: str = "data"
    download: bool = True
    arch: str | None = None
    method: str = "pskd"
    alpha_T: float = 0.8
    aug: str = "none"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None
    milestones: list[int] | None = None
    lr_gamma: float = 0.1
    val_split: float = 0.0
    seed: int = 0
    workers: int | None = None
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    steps_per_epoch: int | None = None
    store_dtype: str = "float16"
    ece_bins: int = 10

    def resolved(self) -> TrainConfig:
        """Fill every unset value from the data set's and the architecture's defaults."""
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(f"unknown data set {self.dataset!r}; choose one of {', '.join(DATASET_DEFAULTS)}")
        defaults = dict(DATASET_DEFAULTS[self.dataset])
        arch = self.arch or defaults["arch"]
        defaults.update(ARCH_DEFAULTS.get(arch, {}))
        values = {k: (defaults[k] if getattr(self, k) is None and k in defaults else getattr(self, k))
                  for k in (f.name for f in dataclasses.fields(self))}
        values["arch"] = arch
        if self.milestones is None:
            values["milestones"] = sorted({max(1, round(f * values["epochs"])) for f in defaults["milestones"]})
        config = TrainConfig(**values)
        config.validate()
        return config

    def validate(self) -> None:
        input_kind(self.arch)  # an unknown architecture fails here, naming close matches
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.aug not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.aug!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if not 0.0 <= self.alpha_T <= 1.0:
            raise ValueError(f"alpha_T must lie in [0, 1] (the paper uses 0.8), got {self.alpha_T}")
        if self.aug != "none" and self.method != "pskd":
            raise ValueError(f"--aug {self.aug} is PS-KD's combination (half the batch each); use --method pskd")
        if self.aug == "cutmix" and self.dataset == "mnist1d":
            raise ValueError(f"--aug cutmix needs image data; {self.dataset} holds 1-D signals (use cutout)")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch size and learning rate must be positive")
        if any(m < 1 or m > self.epochs for m in self.milestones):
            raise ValueError(f"lr milestones {self.milestones} must lie within 1..{self.epochs}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls(**json.loads(path.read_text()))
