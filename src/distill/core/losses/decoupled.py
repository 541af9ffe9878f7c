"""Decoupled knowledge distillation (Zhao et al. 2022): KD split into a target-class term and a
non-target-class term with their own weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distill.core.losses.base import (
    Batch,
    LossTerm,
    ModelOutputs,
    TermParams,
    masked_mean,
    register_term,
    same_shape,
    upcast,
)
from distill.core.signals import dense_logits


def decoupled_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    mask: Tensor | None = None,
) -> Tensor:
    """``alpha * TCKD + beta * NCKD``, each a KL · T² averaged over rows.

    TCKD compares the binary (target vs rest) probabilities; NCKD compares the distributions
    over the non-target classes alone. ``targets`` holds one class per row (``[batch]`` or
    ``[batch, seq]``).
    """
    same_shape(student_logits, teacher_logits)
    s = upcast(student_logits) / temperature
    t = upcast(teacher_logits.detach()) / temperature
    target = F.one_hot(targets, s.shape[-1]).bool()
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    eps = 1e-8
    binary_s = torch.stack([(p_s * target).sum(-1), (p_s * ~target).sum(-1)], dim=-1).clamp_min(eps)
    binary_t = torch.stack([(p_t * target).sum(-1), (p_t * ~target).sum(-1)], dim=-1).clamp_min(eps)
    tckd = (binary_t * (binary_t.log() - binary_s.log())).sum(-1)
    # the target class is pushed out of the softmax to leave the non-target distribution
    log_q_s = F.log_softmax(s.masked_fill(target, -1e4), dim=-1)
    log_q_t = F.log_softmax(t.masked_fill(target, -1e4), dim=-1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1)
    return masked_mean(alpha * tckd + beta * nckd, mask) * temperature**2


@register_term("dkd")
class DecoupledKD(LossTerm):
    """DKD: target-class (alpha) and non-target-class (beta) parts of KD with their own weights.
    Unlabeled samples (label -1) take the teacher's top class as their target."""

    summary = "decoupled KD: alpha * target-class KD + beta * non-target-class KD (Zhao et al. 2022)"

    class Params(TermParams):
        alpha: float = Field(1.0, ge=0, description="weight of the target-class term (TCKD)")
        beta: float = Field(8.0, ge=0, description="weight of the non-target-class term (NCKD)")
        temperature: float = Field(4.0, gt=0)

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        if teacher is None:
            raise ValueError("the dkd term needs teacher outputs")
        teacher_logits = dense_logits(teacher.logits)
        targets = teacher_logits.argmax(-1)
        if batch.labels is not None:
            targets = torch.where(batch.labels >= 0, batch.labels, targets)
        return decoupled_kd(
            student.logits, teacher_logits, targets, self.alpha, self.beta, self.temperature, batch.mask
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"
