"""Response-based distillation (Hinton, Vinyals & Dean 2015) and the hard-label loss.

Both accept logits ``[batch, classes]`` or ``[batch, seq, vocab]`` with an optional mask,
so the same terms serve image classifiers and language models.
"""

from __future__ import annotations

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
from distill.core.losses.buckets import bucketed_divergence, check_rows
from distill.core.signals import TopKLogits


def soft_target_kl(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over rows ("batchmean").

    A row is one sample (``[batch, classes]``) or one token position
    (``[batch, seq, vocab]``); ``mask`` (``[batch]`` or ``[batch, seq]``) drops rows.
    The T² keeps the gradient scale independent of T, as in the paper. The KL is summed over
    classes and averaged over rows: a plain element-wise mean would shrink it by the number of
    classes, a common bug.

    ``teacher_logits`` may be sparse (:class:`~distill.core.signals.TopKLogits`, e.g. from a cache):
    the KL is then taken over the teacher's top-k classes plus one bucket for all the others, and
    equals the dense value when k covers every class.
    """
    if isinstance(teacher_logits, TopKLogits) and teacher_logits.k < teacher_logits.vocab_size:
        return bucketed_divergence(student_logits, teacher_logits, "forward", temperature, mask)
    if isinstance(teacher_logits, TopKLogits):  # k covers every class: the dense logits, exactly
        check_rows(student_logits, teacher_logits)
        teacher_logits = teacher_logits.to_dense()
    same_shape(student_logits, teacher_logits)
    log_p_student = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(upcast(teacher_logits.detach()) / temperature, dim=-1)
    per_row = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    return masked_mean(per_row, mask) * temperature**2


def hard_label_ce(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    label_smoothing: float = 0.0,
    mix: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Cross-entropy against labels, averaged over labeled rows; label -1 means "no label".

    With ``mix`` (partner labels, own share; mixed images) a row's target is ``share`` of its
    label plus ``1 - share`` of its partner's; a mixed row whose partner has no label is skipped."""
    if mix is not None:
        return _mixed_label_ce(logits, labels, *mix, label_smoothing)
    if mask is not None:
        labels = labels.masked_fill(~mask.bool(), -1)
    flat_logits = upcast(logits.reshape(-1, logits.shape[-1]))
    flat_labels = labels.reshape(-1)
    if not bool((flat_labels >= 0).any()):
        return flat_logits.sum() * 0.0
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=-1, label_smoothing=label_smoothing)


def mixed_rows(labels: Tensor, partner: Tensor, share: Tensor) -> Tensor:
    """The rows a mixed-label loss counts: labeled, and either unmixed or mixed with a labeled image."""
    return (labels >= 0) & ((partner >= 0) | (share >= 1))


def _mixed_label_ce(logits: Tensor, labels: Tensor, partner: Tensor, share: Tensor, label_smoothing: float) -> Tensor:
    counted = mixed_rows(labels, partner, share)
    if not bool(counted.any()):
        return logits.sum() * 0.0
    logits = upcast(logits[counted])
    share = share[counted].to(logits.dtype)
    own = F.cross_entropy(logits, labels[counted], reduction="none", label_smoothing=label_smoothing)
    other = F.cross_entropy(logits, partner[counted].clamp(min=0), reduction="none", label_smoothing=label_smoothing)
    return (share * own + (1 - share) * other).mean()


@register_term("kd")
class SoftTargetKD(LossTerm):
    """Soft-target KD: KL(teacher ‖ student) at temperature T, times T² (Hinton 2015)."""

    summary = "Hinton soft targets: KL(softmax(t/T) || softmax(s/T)) * T^2, batch-mean"
    needs_teacher = True

    class Params(TermParams):
        temperature: float = Field(4.0, gt=0, description="softening temperature T")

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = float(temperature)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        if teacher is None:
            raise ValueError("the kd term needs teacher outputs")
        return soft_target_kl(student.logits, teacher.logits, self.temperature, batch.mask)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@register_term("ce")
class HardLabelCE(LossTerm):
    """Cross-entropy with the ground-truth labels; unlabeled samples (label -1) are skipped."""

    summary = "cross-entropy with ground-truth labels (label -1 = unlabeled, skipped)"
    needs_teacher = False

    class Params(TermParams):
        label_smoothing: float = Field(0.0, ge=0, lt=1)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        if batch.labels is None:
            raise ValueError("the ce term needs labels")
        return hard_label_ce(student.logits, batch.labels, batch.mask, self.label_smoothing, batch.mix)

    def rows(self, batch: Batch) -> int | None:
        """The labeled rows: the mean is over them alone."""
        if batch.labels is None:
            return None
        if batch.mix is not None:
            return int(mixed_rows(batch.labels, *batch.mix).sum())
        labeled = batch.labels >= 0
        if batch.mask is not None:
            labeled = labeled & batch.mask.bool()
        return int(labeled.sum())
