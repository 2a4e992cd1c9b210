"""Training configuration: the paper's defaults per data set, every one overridable."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .augment import CUTOUT_HOLE
from .distributed import torchrun_environment
from .loss import CsKd, TfKd
from .methods import METHODS
from .models import input_kind

AUGMENTATIONS = {
    "none": "the data set's own augmentation only",
    "cutout": "Cutout, one 8x8 hole (16x16 on cifar10, 8 samples of a 1-D signal): on every image with ce/ls/tfkd "
              "(cskd: and every partner); on half of each batch with pskd (PS-KD targets on the other half)",
    "cutmix": "CutMix, Beta(1,1): on a whole batch with probability --cutmix-prob with ce/ls/tfkd (cskd: partners "
              "get their samples' box and mixed label); on half of each batch with pskd",
}


def default_workers() -> int:
    """min(4, the CPUs this process may use): enough to feed one GPU on CIFAR, and never
    more workers than CPUs (which makes the DataLoader warn on a small machine)."""
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


# Settings that say where and how fast a run computes, not what: a resumed run may change them.
PLACEMENT_OPTIONS = ("workers", "device", "cache_dir", "amp", "tf32", "channels_last", "dist_timeout")


# The paper's recipes, each value with its source. "Paper" is Kim et al., ICCV 2021,
# Sec. 4 (implementation details); "authors" is their code (lgcnsai/PS-KD-Pytorch,
# main.py's argument defaults). Milestones are fractions of the epochs (CIFAR: 150 and 225
# of 300; ImageNet: 30 and 60 of 90), so a shorter run keeps the schedule's shape.
#
# CutMix's chance of mixing a batch (CE/LS/TF-KD/CS-KD): clovaai/CutMix-PyTorch's README
# commands, --cutmix_prob 0.5 for CIFAR and 1.0 for ImageNet (both --beta 1.0). The
# offline sets take CIFAR's value, ImageFolder trees ImageNet's.
#
# Cutout's hole: DeVries & Taylor's side per data set (uoguelph-mlrg/Cutout: 16 for
# CIFAR-10, 8 for CIFAR-100, the PS-KD paper's); the rest take CIFAR-100's (CUTOUT_HOLE).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # Offline default (this project's, not the paper's): a small MLP that over-fits
    # MNIST-1D within minutes on a CPU; in-memory tensors, so no worker processes.
    "mnist1d": dict(arch="mnist1d_mlp", epochs=40, batch_size=128, lr=0.05, weight_decay=0.0,
                    milestones=[], workers=0, cutmix_prob=0.5),
    # Fashion-MNIST (this project's real-image offline set): the CIFAR recipe's optimizer
    # and schedule shape, shortened for a CPU.
    "fashionmnist": dict(arch="fmnist_cnn", epochs=15, batch_size=128, lr=0.05, weight_decay=5e-4,
                         milestones=[0.5, 0.75], cutmix_prob=0.5),
    # CIFAR: paper and authors (--end_epoch 300, --batch_size 128, --lr 0.1,
    # --weight_decay 5e-4, --lr_decay_schedule 150 225, --lr_decay_rate 0.1).
    # Default arch: the authors' --classifier_type ResNet18 (PreAct ResNet-18).
    "cifar10": dict(arch="preact_resnet18", epochs=300, batch_size=128, lr=0.1, weight_decay=5e-4,
                    milestones=[0.5, 0.75], cutmix_prob=0.5, cutout_hole=16),
    "cifar100": dict(arch="preact_resnet18", epochs=300, batch_size=128, lr=0.1, weight_decay=5e-4,
                     milestones=[0.5, 0.75], cutmix_prob=0.5),
    # ImageNet: paper (ResNet-152, 90 epochs, batch 256, lr 0.1 x0.1 at 30 and 60, weight
    # decay 1e-4: the standard torchvision ResNet recipe it follows).
    "imagenet": dict(arch="tv_resnet152", epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4,
                     milestones=[1 / 3, 2 / 3], cutmix_prob=1.0, img_size=224),
    # Any ImageFolder tree: the ImageNet recipe with a smaller default model (this project's).
    "folder": dict(arch="tv_resnet50", epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4,
                   milestones=[1 / 3, 2 / 3], cutmix_prob=1.0, img_size=224),
}
# TF-KD's Tf-KD_reg (Yuan et al., CVPR 2020) per architecture, from the authors'
# yuanli2333/Teacher-free-Knowledge-Distillation, experiments/base_experiments/<name>/params.json
# ("reg_alpha", "reg_temperature", "multiplier"). Their ResNet-18 setting (base_resnet18,
# loss.TfKd's defaults) serves every architecture they published none for (ResNet-101,
# PyramidNet, the offline sets' models, ImageNet: their ImageNet code does not ship its loss).
TFKD_DEFAULTS: dict[str, Any] = dict(tfkd_alpha=TfKd.alpha, tfkd_temperature=TfKd.temperature,
                                     tfkd_multiplier=TfKd.multiplier)
# base_densenet121 and base_resnext29 give no "multiplier" (the authors' loss reads
# params.multiplier, so their own --regularization run of these files stops with an
# AttributeError): 1, the neutral value, which their loss_kd_self calls "1.0 in most cases".
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "densenet121": dict(tfkd_alpha=0.1, tfkd_temperature=40.0, tfkd_multiplier=1.0),  # base_densenet121
    "resnext29_8x64d": dict(tfkd_alpha=0.5, tfkd_temperature=40.0, tfkd_multiplier=1.0),  # base_resnext29
    # PyramidNet on CIFAR: paper (after Han et al. 2017 and Yun et al. 2019's CutMix
    # setting): batch 64, lr 0.25, weight decay 1e-4.
    **{name: dict(batch_size=64, lr=0.25, weight_decay=1e-4) for name in ("pyramidnet200", "pyramidnet200_shakedrop")},
}
# How long a rank waits at a collective (seconds) before the run is declared dead. The
# longest wait is at an epoch's end, while rank 0 seals the epoch and each node's local
# rank 0 decodes it: a dense ImageNet epoch (1.28M x 1000, 2.6 GB in float16, twice that in
# float32) seals in about half a minute in float16 and decodes in about ten seconds on a
# local disk, and an object store or a
# busy network file system can be ten to a hundred times slower. NCCL's default (10 min)
# would kill such a healthy run; an hour does not, and still ends one whose rank 0 died.
DIST_TIMEOUT_S = 3600.0


def absolute_if_local(path: str | None) -> str | None:
    """A local path made absolute (an object store's URL as it is): a resume, ``info`` or
    ``verify`` run from another directory then reads the run's data, store and cache, not
    whatever lies at that relative path there."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _split_batch(batch: int, world_size: int) -> int:
    if batch % world_size:
        raise ValueError(f"the recipe's batch of {batch} does not split evenly among {world_size} processes: "
                         "pass --batch-size, the batch of each process")
    return batch // world_size


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` in the run directory."""

    dataset: str = "mnist1d"
    data_dir: str = "data"
    download: bool = True
    arch: str | None = None
    method: str = "pskd"
    alpha_T: float = 0.8  # paper Sec. 4.1 (CIFAR-100) and the authors' --alpha_T default
    aug: str = "none"
    epochs: int | None = None
    batch_size: int | None = None  # per process
    world_size: int | None = None  # the processes it trains in (resolved() sets it): a resume needs as many
    lr: float | None = None
    momentum: float = 0.9  # paper; authors: SGD(momentum=0.9, nesterov=True)
    nesterov: bool = True  # authors' SGD(nesterov=True)
    weight_decay: float | None = None
    milestones: list[int] | None = None
    lr_gamma: float = 0.1  # authors' --lr_decay_rate
    val_split: float = 0.0
    train_subset: int | None = None  # None: the whole training set; n: n samples, n/K of each class
    crop_flip: bool = True  # the data set's random crop and flip; False (opt-in): the images as they are
    seed: int = 0
    workers: int | None = None  # None: default_workers(), or the data set's own default
    device: str = "auto"
    cache_dir: str | None = None  # the decoded teacher's node-local cache; None: beside a local store
    amp: bool = False  # the paper trains in fp32; bfloat16 autocast is opt-in (--amp)
    tf32: bool = False  # the paper's fp32 has no TensorFloat-32; opt-in (--tf32) on Ampere and later GPUs
    channels_last: bool = True  # memory layout of image batches: faster convolutions, the same network
    deterministic: bool = False  # False: cudnn.benchmark, as the authors' main.py sets
    steps_per_epoch: int | None = None
    store_dtype: str = "float32"  # the authors keep float32 predictions; float16 (opt-in) halves the store
    store_topk: int | None = None  # None: all K probabilities; k: the k largest and their classes
    store: str | None = None  # the store's URL (e.g. s3://bucket/run/store); None: RUN/store
    cutmix_prob: float | None = None  # None: per data set (DATASET_DEFAULTS)
    # Cutout's side; None: per data set (DATASET_DEFAULTS), and in a config from before the field
    # the CUTOUT_HOLE it trained with
    cutout_hole: int | None = None
    img_size: int | None = None  # imagenet/folder: the crop's side (timm's --img-size); None: 224
    dist_timeout: float = DIST_TIMEOUT_S
    # TF-KD (loss.TfKd); None: per architecture (TFKD_DEFAULTS, ARCH_DEFAULTS)
    tfkd_alpha: float | None = None
    tfkd_temperature: float | None = None
    tfkd_multiplier: float | None = None
    # CS-KD (Yun et al., CVPR 2020): the authors' values, with their source, in loss.CsKd
    cskd_temperature: float = CsKd.temperature
    cskd_weight: float = CsKd.weight
    ece_bins: int = 10  # the authors' metric_ece_aurc_eaurc(bin_size=0.1)

    def resolved(self, world_size: int | None = None) -> TrainConfig:
        """Fill every unset value from the data set's and the architecture's defaults. The
        recipe's batch is the global batch, split among ``world_size`` processes (default:
        torchrun's) as the authors' main.py splits it among its GPUs; a batch size given is
        per process."""
        if world_size is None:
            env = torchrun_environment()
            world_size = env.world_size if env else 1
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(f"unknown data set {self.dataset!r}; choose one of {', '.join(DATASET_DEFAULTS)}")
        defaults = {**TFKD_DEFAULTS, "cutout_hole": CUTOUT_HOLE, **DATASET_DEFAULTS[self.dataset]}
        arch = self.arch or defaults["arch"]
        defaults.update(ARCH_DEFAULTS.get(arch, {}))
        values = {k: (defaults[k] if getattr(self, k) is None and k in defaults else getattr(self, k))
                  for k in (f.name for f in dataclasses.fields(self))}
        values["arch"] = arch
        if self.batch_size is None:
            values["batch_size"] = _split_batch(defaults["batch_size"], world_size)
        values["world_size"] = world_size
        for name in ("data_dir", "store", "cache_dir"):
            values[name] = absolute_if_local(values[name])
        if values["workers"] is None:
            values["workers"] = default_workers()
        if self.milestones is None:
            values["milestones"] = sorted({max(1, round(f * values["epochs"])) for f in defaults["milestones"]})
        config = TrainConfig(**values)
        config.validate()
        return config

    def validate(self) -> None:
        input_kind(self.arch)  # an unknown architecture fails here, naming close matches
        if self.img_size is not None and "img_size" not in DATASET_DEFAULTS[self.dataset]:
            raise ValueError(f"--img-size sets the crop of imagenet and folder images; {self.dataset}'s inputs "
                             "have a fixed size: leave it out")
        if self.img_size is not None and self.img_size < 8:
            raise ValueError(f"--img-size must be at least 8 pixels (224 for ImageNet), got {self.img_size}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.aug not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.aug!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if not 0.0 <= self.alpha_T <= 1.0:
            raise ValueError(f"alpha_T must lie in [0, 1] (the paper uses 0.8), got {self.alpha_T}")
        if self.aug == "cutmix" and self.dataset == "mnist1d":
            raise ValueError(f"--aug cutmix needs image data; {self.dataset} holds 1-D signals (use cutout)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"--epochs and --batch-size must be positive, got {self.epochs} and {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number (the paper uses 0.1), got {self.lr}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ValueError(f"--lr-gamma must lie in (0, 1] (the paper uses 0.1), got {self.lr_gamma}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"--momentum must lie in [0, 1) (the paper uses 0.9), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--wd must be a non-negative number, got {self.weight_decay}")
        if any(m < 1 or m > self.epochs for m in self.milestones):
            raise ValueError(f"--milestones {self.milestones} must lie within the epochs, 1..{self.epochs}")
        if len(set(self.milestones)) < len(self.milestones):  # MultiStepLR multiplies once per listing
            raise ValueError(f"--milestones {self.milestones} list an epoch twice, which multiplies the lr by "
                             "--lr-gamma twice there: give each epoch once")
        if self.ece_bins < 1:
            raise ValueError(f"--ece-bins must be at least 1 (the paper uses 10), got {self.ece_bins}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"--steps-per-epoch must be at least 1, got {self.steps_per_epoch}")
        if not (0.0 <= self.tfkd_alpha <= 1.0 and 0 < self.tfkd_temperature < math.inf
                and 0 <= self.tfkd_multiplier < math.inf):  # NaN fails each comparison
            raise ValueError(
                f"--tfkd-alpha must lie in [0, 1], --tfkd-temperature be positive and --tfkd-multiplier "
                f"non-negative (defaults {TfKd.alpha:g}, {TfKd.temperature:g}, {TfKd.multiplier:g}), got "
                f"{self.tfkd_alpha}, {self.tfkd_temperature}, {self.tfkd_multiplier}"
            )
        if not (0 < self.cskd_temperature < math.inf and 0 <= self.cskd_weight < math.inf):
            raise ValueError(f"--cskd-temperature must be positive and --cskd-weight non-negative (defaults "
                             f"{CsKd.temperature:g} and {CsKd.weight:g}), got {self.cskd_temperature} and "
                             f"{self.cskd_weight}")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise ValueError(f"--cutmix-prob must lie in [0, 1] (CIFAR 0.5, ImageNet 1.0), got {self.cutmix_prob}")
        if self.cutout_hole is not None and self.cutout_hole < 2:  # a side of 1 cuts hole // 2 = 0 each way
            raise ValueError(f"--cutout-hole must be at least 2 pixels (CIFAR-100 8, CIFAR-10 16), got "
                             f"{self.cutout_hole}")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise ValueError(f"--dist-timeout must be a positive number of seconds (default "
                             f"{DIST_TIMEOUT_S:.0f}), got {self.dist_timeout}")
        if self.store_topk is not None and self.store_topk < 1:
            raise ValueError(f"--store-topk must be at least 1 (or left out for dense rows), got {self.store_topk}")
        if self.workers < 0:
            raise ValueError(f"--workers must be 0 or more, got {self.workers}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as err:  # not JSON, not text, or not a config's fields
            raise ValueError(f"{path} is not a config written by pskd-store train ({err}): restore it "
                             "from a backup, or start a new run") from err
