"""One object per training method: everything that differs between CE, label smoothing,
PS-KD, TF-KD and CS-KD, so that the training loop asks the method and never compares names.

A method decides how each epoch's batches are drawn (CS-KD: same-class pairs), whether it
reads last epoch's predictions (only PS-KD: the others' data set decodes no teacher), what
a step trains on and with which loss, how an augmentation applies to its batch, and which
rows of the batch the store records: those whose input is the sample itself and which
trained on the method's own targets, so that a teacher is made of the same kind of
predictions as the targets it feeds.

A new method subclasses :class:`Method`, overrides what differs, and registers itself
with :func:`register_method`; ``--method NAME`` (or ``TrainConfig(method=NAME)``) then trains it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .augment import BatchAugment
from .loss import LABEL_SMOOTHING, CsKd, TfKd, alpha_t
from .sampler import ClassPairBatchSampler

if TYPE_CHECKING:
    from .recipe import TrainConfig


@dataclass
class Batch:
    """One step's batch as its method trains on it. ``targets``: class indices or
    probabilities; ``partners``: CS-KD's same-class partner of each sample; ``recorded``:
    how many leading rows the store records."""

    inputs: Tensor
    targets: Tensor
    labels: Tensor
    ids: Tensor
    partners: Tensor | None = None
    recorded: int = 0


class Method:
    """A training method. What this base does is plain cross-entropy with one-hot targets
    (:class:`CrossEntropy`); each method overrides what differs."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line for ``--method``'s help
    settings: ClassVar[tuple[str, ...]] = ()  # the TrainConfig fields from_config reads
    mixes_by_chance: ClassVar[bool] = True  # --aug cutmix mixes a batch with probability --cutmix-prob

    @classmethod
    def from_config(cls, config: TrainConfig) -> Method:
        """The method with its settings from a resolved run configuration."""
        return cls()

    @property
    def alpha_T(self) -> float:
        """The weight of last epoch's predictions in the last epoch's targets; 0: this
        method reads no teacher, and its data set decodes none."""
        return 0.0

    def alpha(self, epoch: int, epochs: int) -> float:
        """The weight of last epoch's predictions in epoch ``epoch``'s targets."""
        return alpha_t(epoch, epochs, self.alpha_T)

    def sampling(self, data: Dataset, labels: np.ndarray, batch_size: int, *, num_replicas: int, rank: int,
                 seed: int) -> tuple[dict[str, Any], Sampler]:
        """The DataLoader's batching arguments for one rank's shard of each epoch, and the
        sampler to ``set_epoch``: shuffled by seed and epoch, so a resumed run sees the same
        batches. DistributedSampler pads the last shard with repeated ids; the store keeps
        one write per id (the higher rank's)."""
        sampler = DistributedSampler(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        return dict(batch_size=batch_size, sampler=sampler), sampler

    def batch(self, inputs: Tensor, targets: Tensor, labels: Tensor, ids: Tensor) -> Batch:
        """The step's batch from the loader's (on the device but ``ids``): trained on the
        labels, every row recorded."""
        return Batch(inputs, labels, labels, ids, recorded=len(inputs))

    def augment(self, augment: BatchAugment, batch: Batch, *, epoch: int, step: int) -> Batch:
        """Augment the whole batch; a batch of mixtures records nothing (its inputs are
        not the samples)."""
        made = augment(batch.inputs, batch.targets, batch.labels, batch.partners, epoch=epoch, step=step)
        return replace(batch, inputs=made.inputs, targets=made.targets, partners=made.partners,
                       recorded=0 if made.mixed else len(made.inputs))

    def loss(self, logits: Tensor, targets: Tensor, partner_logits: Tensor | None = None) -> Tensor:
        """The step's loss in fp32; ``F.cross_entropy`` takes class indices and probability
        targets (CutMix's mixed labels) alike."""
        return F.cross_entropy(logits.float(), targets)


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Make ``cls`` trainable as ``--method cls.name``."""
    METHODS[cls.name] = cls
    return cls


def create_method(config: TrainConfig) -> Method:
    """The method ``config.method`` names, with its settings from ``config``."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[config.method].from_config(config)


@register_method
class CrossEntropy(Method):
    name = "ce"
    description = "cross-entropy with one-hot targets (baseline)"


@register_method
class LabelSmoothing(Method):
    """Szegedy et al.'s label smoothing, epsilon 0.1: the paper's baseline."""

    name = "ls"
    description = "label smoothing, epsilon 0.1"

    def loss(self, logits: Tensor, targets: Tensor, partner_logits: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=LABEL_SMOOTHING)


@register_method
@dataclass(frozen=True)
class ProgressiveSelfKd(Method):
    """PS-KD (Kim et al., ICCV 2021): each sample's target blends its one-hot label with
    the model's prediction of the previous epoch, weighted alpha_t = alpha_T·t/T."""

    name: ClassVar[str] = "pskd"
    description: ClassVar[str] = "progressive self-knowledge distillation: targets blend in last epoch's predictions"
    teacher_weight: float = 0.8

    settings: ClassVar[tuple[str, ...]] = ("alpha_T",)
    mixes_by_chance: ClassVar[bool] = False  # the augmented half of every batch, always

    @classmethod
    def from_config(cls, config: TrainConfig) -> Method:
        return cls(config.alpha_T)

    @property
    def alpha_T(self) -> float:
        return self.teacher_weight

    def batch(self, inputs: Tensor, targets: Tensor, labels: Tensor, ids: Tensor) -> Batch:
        """Trained on the data set's soft targets."""
        return Batch(inputs, targets.to(labels.device, non_blocking=True), labels, ids, recorded=len(inputs))

    def augment(self, augment: BatchAugment, batch: Batch, *, epoch: int, step: int) -> Batch:
        """The paper's split (Sec. 4.1): the first half of the batch trains on PS-KD targets
        and is recorded, the second half is always augmented and trains on its labels (or
        their CutMix mixture)."""
        head = len(batch.inputs) - len(batch.inputs) // 2
        if head == len(batch.inputs):
            return batch
        tail = slice(head, None)
        made = augment(batch.inputs[tail], batch.labels[tail], batch.labels[tail], epoch=epoch, step=step,
                       always=True)
        tail_targets = made.targets
        if not tail_targets.is_floating_point():
            tail_targets = F.one_hot(tail_targets, batch.targets.shape[1])
        return replace(batch, inputs=torch.cat([batch.inputs[:head], made.inputs]),
                       targets=torch.cat([batch.targets[:head], tail_targets.to(batch.targets)]), recorded=head)


@register_method
@dataclass(frozen=True)
class TeacherFreeKd(Method):
    """TF-KD's virtual teacher as a regulariser (loss.TfKd)."""

    name: ClassVar[str] = "tfkd"
    description: ClassVar[str] = ("TF-KD's hand-designed teacher (Yuan et al. 2020): CE plus a KL term to a "
                                  "smoothed label")
    regulariser: TfKd = TfKd()

    settings: ClassVar[tuple[str, ...]] = ("tfkd_alpha", "tfkd_temperature", "tfkd_multiplier")

    @classmethod
    def from_config(cls, config: TrainConfig) -> Method:
        return cls(TfKd(config.tfkd_alpha, config.tfkd_temperature, config.tfkd_multiplier))

    def loss(self, logits: Tensor, targets: Tensor, partner_logits: Tensor | None = None) -> Tensor:
        return self.regulariser.loss(logits, targets)


@register_method
@dataclass(frozen=True)
class ClassWiseKd(Method):
    """CS-KD's class-wise regulariser (loss.CsKd): each batch holds a same-class partner of
    every sample (sampler.ClassPairBatchSampler), predicted without gradient."""

    name: ClassVar[str] = "cskd"
    description: ClassVar[str] = ("CS-KD (Yun et al. 2020): CE plus a KL term to another same-class sample's "
                                  "prediction")
    regulariser: CsKd = CsKd()

    settings: ClassVar[tuple[str, ...]] = ("cskd_temperature", "cskd_weight")

    @classmethod
    def from_config(cls, config: TrainConfig) -> Method:
        return cls(CsKd(config.cskd_temperature, config.cskd_weight))

    def sampling(self, data: Dataset, labels: np.ndarray, batch_size: int, *, num_replicas: int, rank: int,
                 seed: int) -> tuple[dict[str, Any], Sampler]:
        pairs = ClassPairBatchSampler(labels, batch_size, num_replicas=num_replicas, rank=rank, seed=seed)
        return dict(batch_sampler=pairs), pairs

    def batch(self, inputs: Tensor, targets: Tensor, labels: Tensor, ids: Tensor) -> Batch:
        """The loader's second half is a same-class partner of each sample of the first."""
        half = len(labels) // 2
        return Batch(inputs[:half], labels[:half], labels[:half], ids[:half], partners=inputs[half:], recorded=half)

    def loss(self, logits: Tensor, targets: Tensor, partner_logits: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits.float(), targets) + self.regulariser.regulariser(logits, partner_logits)
