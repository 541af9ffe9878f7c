"""Token-level divergences between the student's and the teacher's next-token distributions.

Forward KL is ``kd`` (:mod:`distill.core.losses.response`); this module adds reverse KL, the
generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024) and total variation, over
logits ``[batch, classes]`` or ``[batch, seq, vocab]`` with a mask, from a live teacher or from
cached top-k signals (then over the teacher's top-k tokens plus one bucket for the rest).

Memory: only the rows the mask keeps are scored, ``chunk`` rows at a time, so the float32 softmaxes
of both models never exist for the whole batch × sequence × vocabulary at once. From a live teacher
each chunk is checkpointed (the backward pass recomputes it); from the cache,
:mod:`distill.core.losses.buckets` scores the student with a hand-written backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill.core.losses.base import Batch, LossTerm, ModelOutputs, TermParams, register_term, same_shape, upcast
from distill.core.losses.buckets import DEFAULT_CHUNK, Kind, bucketed_divergence, divergence_rows
from distill.core.signals import TopKLogits

__all__ = ["DEFAULT_CHUNK", "divergence_rows", "token_divergence"]


def token_divergence(
    student_logits: Tensor,
    teacher: Tensor | TopKLogits,
    kind: Kind,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    beta: float = 0.5,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """The mean over kept rows of :func:`divergence_rows` between ``softmax(s / T)`` and
    ``softmax(t / T)``; KL-type divergences are multiplied by T² (as Hinton's KD), total variation
    is not (it is bounded by 1). An empty selection gives 0 with a gradient path."""
    if isinstance(teacher, TopKLogits):
        return bucketed_divergence(student_logits, teacher, kind, temperature, mask, beta, chunk)
    same_shape(student_logits, teacher)
    vocab = student_logits.shape[-1]
    s_rows, t_rows = student_logits.reshape(-1, vocab), teacher.detach().reshape(-1, vocab)
    if mask is not None and not bool(mask.bool().all()):  # every row kept: no copy
        keep = mask.bool().reshape(-1)
        s_rows, t_rows = s_rows[keep], t_rows[keep]
    if s_rows.shape[0] == 0:
        return student_logits.sum() * 0.0
    scale = 1.0 if kind == "tv" else temperature**2
    return _chunked(_dense_scorer(kind, temperature, beta), s_rows, t_rows, chunk).mean() * scale


def _dense_scorer(kind: Kind, temperature: float, beta: float) -> Callable[[Tensor, Tensor], Tensor]:
    def dense(s: Tensor, t: Tensor) -> Tensor:
        log_s = F.log_softmax(upcast(s) / temperature, dim=-1)
        log_t = F.log_softmax(upcast(t) / temperature, dim=-1)
        return divergence_rows(log_s, log_t, kind, beta)

    return dense


def _chunked(score: Callable[[Tensor, Tensor], Tensor], s_rows: Tensor, t_rows: Tensor, chunk: int) -> Tensor:
    """``score`` over ``chunk`` rows at a time; with gradients, each chunk is checkpointed (its
    softmaxes are recomputed in the backward pass instead of kept)."""
    out = []
    for start in range(0, s_rows.shape[0], chunk):
        pieces = (s_rows[start : start + chunk], t_rows[start : start + chunk])
        if torch.is_grad_enabled() and s_rows.requires_grad and s_rows.shape[0] > chunk:
            out.append(checkpoint(score, *pieces, use_reentrant=False))
        else:
            out.append(score(*pieces))
    return torch.cat(out)


class DivergenceParams(TermParams):
    temperature: float = Field(1.0, gt=0, description="softening temperature T (1: the distributions as they are)")
    chunk: int = Field(DEFAULT_CHUNK, gt=0, description="token positions scored at once (bounds peak memory)")


class _Divergence(LossTerm):
    kind: Kind = "forward"
    Params = DivergenceParams

    def __init__(self, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK, beta: float = 0.5) -> None:
        super().__init__()
        self.temperature, self.chunk, self.beta = float(temperature), int(chunk), float(beta)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        if teacher is None or teacher.logits is None:
            raise ValueError(f"the {self.name} term needs the teacher's logits")
        return token_divergence(
            student.logits, teacher.logits, self.kind, self.temperature, batch.mask, self.beta, self.chunk
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}" + (f", beta={self.beta}" if self.kind == "jsd" else "")


@register_term("forward_kl")
class ForwardKL(_Divergence):
    """KL(teacher ‖ student): mass-covering; ``kd`` with T = 1 by default and chunked rows."""

    summary = "KL(teacher || student) per token, chunked over positions (kd for language models)"
    kind = "forward"


@register_term("reverse_kl")
class ReverseKL(_Divergence):
    """KL(student ‖ teacher): mode-seeking; the student may ignore teacher modes it cannot fit."""

    summary = "KL(student || teacher) per token: mode-seeking (MiniLLM)"
    kind = "reverse"


class JSDParams(DivergenceParams):
    beta: float = Field(0.5, ge=0, le=1, description="0: forward KL, 1: reverse KL, between: the mixture JSD")


@register_term("jsd")
class GeneralisedJSD(_Divergence):
    """β·KL(t ‖ m) + (1 − β)·KL(s ‖ m), m = β·t + (1 − β)·s (GKD, Agarwal et al. 2024)."""

    summary = "generalised Jensen-Shannon divergence with beta (GKD): 0 forward KL, 1 reverse KL"
    kind = "jsd"
    Params = JSDParams


@register_term("tv")
class TotalVariation(_Divergence):
    """½ Σ |s − t| per token: bounded, symmetric, never blows up on rare tokens."""

    summary = "total variation distance between next-token distributions (not scaled by T^2)"
    kind = "tv"
