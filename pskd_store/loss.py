"""PS-KD's schedule and loss (Kim et al., ICCV 2021, Eq. 6-7), and the losses of the
baselines it is compared with: label smoothing, TF-KD's hand-designed teacher and CS-KD's
class-wise regulariser."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LABEL_SMOOTHING = 0.1  # the paper's label-smoothing baseline (Szegedy et al.'s epsilon)


@dataclass(frozen=True)
class TfKd:
    """TF-KD's regulariser (Yuan et al., CVPR 2020, "Tf-KD_reg"): a virtual teacher that
    gives the true class ``correct_prob`` and the others the rest evenly, softened by
    ``temperature``. Defaults: yuanli2333/Teacher-free-Knowledge-Distillation,
    ``my_loss_function.py`` (``correct_prob = 0.99``) and the ResNet-18 CIFAR-100 setting
    ``experiments/base_experiments/base_resnet18/params.json`` (``reg_alpha`` 0.1,
    ``reg_temperature`` 20, ``multiplier`` 100)."""

    alpha: float = 0.1
    temperature: float = 20.0
    multiplier: float = 100.0
    correct_prob: float = 0.99

    def teacher(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The virtual teacher's distribution, softmax(p^d / T), for class indices or
        probability targets (CutMix's mixed labels mix p^d the same way, before the softmax)."""
        if targets.ndim == 1:
            targets = F.one_hot(targets, num_classes).float()
        other = (1 - self.correct_prob) / (num_classes - 1)
        designed = other + (self.correct_prob - other) * targets.float()  # p^d(k)
        return F.softmax(designed / self.temperature, dim=1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(1 - alpha)·CE + alpha·multiplier·KL(teacher ‖ student), the KL averaged over
        batch and classes (``nn.KLDivLoss()``'s default reduction, as the authors use it)."""
        logits = logits.float()
        # the mean over batch and classes, written out: torch warns that reduction="mean" will change
        kl = F.kl_div(F.log_softmax(logits, dim=1), self.teacher(targets, logits.shape[1]), reduction="sum")
        kl = kl / logits.numel()
        return (1 - self.alpha) * F.cross_entropy(logits, targets) + self.alpha * self.multiplier * kl


def alpha_t(epoch: int, total_epochs: int, alpha_T: float) -> float:
    """Weight of the past prediction at ``epoch`` (1-based): alpha_T * t / T.

    Counting from 1 matches the authors' code (``epoch + 1`` over a 0-based loop), so the
    last epoch uses exactly alpha_T.
    """
    if not 0.0 <= alpha_T <= 1.0:
        raise ValueError(f"alpha_T must lie in [0, 1], got {alpha_T}")
    for name, value in (("epoch", epoch), ("total_epochs", total_epochs)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be a whole number of epochs (an int; epochs count from 1), got {value!r}: "
                             f"pass int({name})")
    if not 1 <= epoch <= total_epochs:
        raise ValueError(f"epoch must lie in [1, total_epochs={total_epochs}], got {epoch}")
    return alpha_T * epoch / total_epochs


def soft_target(labels: torch.Tensor, past: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha)·onehot(labels) + alpha·past as float32, for one sample (K,) or a batch (B, K).
    ``past`` is left as it is; a float16 batch (as the store serves it) is blended in place in
    its float32 copy: two torch calls where a product, a filled tensor and ``scatter_add_``
    made four, each ~10 µs of a data set's batch once a training step has evicted its caches."""
    target = past.float()
    target = target.mul_(alpha) if target is not past else target * alpha
    return target.scatter_(-1, labels.long().unsqueeze(-1), 1.0 - alpha, reduce="add")


def token_soft_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_probs: torch.Tensor,
    teacher_classes: torch.Tensor,
    alpha: torch.Tensor | float,
    ignore_index: int = -100,
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """PS-KD's loss for a sequence model, averaged over the target positions (labels other
    than ``ignore_index``), as ``cross_entropy(..., ignore_index=...)`` averages; with
    ``num_items``, summed over them and divided by it (the target positions of every
    micro-batch of an accumulated step, as a Hugging Face model's own loss divides by its
    ``num_items_in_batch``).

    The target of a position is (1 - a)·onehot(label) + a·p, p the stored teacher: its
    ``teacher_probs`` (B, L, w) at ``teacher_classes`` (B, L, w) and, when w < V, the rest
    of the mass, 1 - sum(probs), spread evenly over the other V - w classes (as
    ``TopKRows.expand`` rebuilds a row). The cross-entropy is taken against that target
    from the log-softmax, without building the (B, L, V) target; ``alpha`` is a float or
    (B,), as TokenTargetDataset's items carry it; every other tensor has the labels' shape,
    and the teacher's one more dimension, w wide (flattened tokens, (N,) labels, take a float
    or an (N,) ``alpha``). That rest also lands on a class the model masks (a logit of
    -inf) outside the teacher's w, where the model's own softmax put none: the loss is then
    inf, as cross-entropy against that target is (its gradient stays finite); a model that
    masks vocabulary entries trains on a dense store.
    """
    alpha = _per_sample(torch.as_tensor(alpha, dtype=torch.float32, device=logits.device), len(labels))
    _require_token_shapes(logits, labels, teacher_probs, teacher_classes, alpha)
    log_probs = logits.float().log_softmax(dim=-1)
    vocabulary, width = log_probs.shape[-1], teacher_classes.shape[-1]
    targets = labels != ignore_index
    true_class = log_probs.gather(-1, labels.masked_fill(~targets, 0).unsqueeze(-1)).squeeze(-1)
    # A class the target gives no mass adds nothing, also where the model gives it none
    # (a logit of -inf: a masked vocabulary entry), whose 0 · (-inf) would be NaN; so do a
    # teacher weighed 0 (epoch 1) and the positions that are no target.
    at_teacher = log_probs.gather(-1, teacher_classes)
    teacher_probs = teacher_probs.float()
    teacher_term = torch.where(teacher_probs > 0, teacher_probs * at_teacher, 0).sum(dim=-1)
    if width < vocabulary:
        rest = (1 - teacher_probs.sum(dim=-1)).clamp(min=0) / (vocabulary - width)
        # the classes outside the teacher's: its own are zeroed, not subtracted from the whole
        # row's sum, which a masked class among them would make -inf - (-inf), NaN
        outside = log_probs.scatter(-1, teacher_classes, 0.0).sum(dim=-1)
        teacher_term = teacher_term + torch.where(rest > 0, rest * outside, 0)
    alpha = alpha.reshape(alpha.shape + (1,) * (labels.ndim - 1)) if alpha.ndim else alpha
    per_position = -((1 - alpha) * true_class + torch.where(alpha > 0, alpha * teacher_term, 0))
    count = targets.sum().clamp(min=1) if num_items is None else num_items
    return torch.where(targets, per_position, 0).sum() / count


def _per_sample(alpha: torch.Tensor, samples: int) -> torch.Tensor:
    """``alpha`` as one value, (), or one per sample, (B,): a (1,) or (B, 1) tensor is one of those."""
    if alpha.numel() == 1:
        return alpha.reshape(())
    return alpha.reshape(samples) if alpha.shape == (samples, 1) else alpha


def _require_token_shapes(logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor,
                          teacher_classes: torch.Tensor, alpha: torch.Tensor) -> None:
    """Tensors that broadcast against each other in another layout would give a loss of
    other numbers, not an error: flattened logits with the items' (B,) ``alpha`` would
    weigh every position with every sample's a."""
    if (logits.shape[:-1] != labels.shape or teacher_probs.shape != teacher_classes.shape
            or teacher_probs.shape[:-1] != labels.shape):
        raise ValueError(f"token_soft_cross_entropy takes logits and teacher rows of the labels' shape plus one "
                         f"dimension, (V,) and (w,); got labels {tuple(labels.shape)}, logits {tuple(logits.shape)}, "
                         f"teacher {tuple(teacher_probs.shape)} and {tuple(teacher_classes.shape)}")
    shape = tuple(alpha.shape)
    if shape not in ((), tuple(labels.shape[:1])):
        raise ValueError(f"token_soft_cross_entropy takes alpha as a float or one per sample, "
                         f"{tuple(labels.shape[:1])}, got {shape}: flattened tokens take a float, or alpha "
                         "repeated per position")


@dataclass(frozen=True)
class CsKd:
    """CS-KD's class-wise regulariser (Yun et al., CVPR 2020): the KL divergence from the
    temperature-softened prediction of another sample of the same class (no gradient
    through it) to the sample's own, times T², summed over classes and averaged over the
    batch. Defaults: alinlab/cs-kd ``train.py`` (``--temp 4.0``, ``--lamda 1.0``, the
    value its README uses for CIFAR-100); its ``KDLoss`` is what :meth:`regulariser` computes."""

    temperature: float = 4.0
    weight: float = 1.0

    def regulariser(self, logits: torch.Tensor, partner_logits: torch.Tensor) -> torch.Tensor:
        """weight · KL(softmax(partner / T) ‖ softmax(logits / T)) · T² / B."""
        t = self.temperature
        log_p = F.log_softmax(logits.float() / t, dim=1)
        q = F.softmax(partner_logits.detach().float() / t, dim=1)
        return self.weight * F.kl_div(log_p, q, reduction="sum") * t ** 2 / logits.shape[0]
