"""PS-KD's schedule and loss (Kim et al., ICCV 2021, Eq. 6-7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LABEL_SMOOTHING = 0.1  # the paper's label-smoothing baseline (Szegedy et al.'s epsilon)


def alpha_t(epoch: int, total_epochs: int, alpha_T: float) -> float:
    """Weight of the past prediction at ``epoch`` (1-based): alpha_T * t / T.

    Counting from 1 matches the authors' code (``epoch + 1`` over a 0-based loop), so the
    last epoch uses exactly alpha_T.
    """
    if not 0.0 <= alpha_T <= 1.0:
        raise ValueError(f"alpha_T must lie in [0, 1], got {alpha_T}")
    if not 1 <= epoch <= total_epochs:
        raise ValueError(f"epoch must lie in [1, total_epochs={total_epochs}], got {epoch}")
    return alpha_T * epoch / total_epochs


def soft_target(labels: torch.Tensor, past: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha)·onehot(labels) + alpha·past as float32, for one sample (K,) or a batch (B, K)."""
    target = past.float() * alpha
    target.scatter_add_(-1, labels.long().unsqueeze(-1), torch.full_like(target[..., :1], 1.0 - alpha))
    return target


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-sum_k target_k · log_softmax(logits)_k, averaged over the batch.

    ``F.cross_entropy`` takes probability targets and computes exactly this.
    """
    return F.cross_entropy(logits, target)


def method_loss(method: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss of ``method`` ("ce", "ls" or "pskd") in fp32, against class
    indices or probability targets (PS-KD's soft targets, CutMix's mixed labels):
    ``F.cross_entropy`` takes both; LS adds epsilon 0.1."""
    smoothing = LABEL_SMOOTHING if method == "ls" else 0.0
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
