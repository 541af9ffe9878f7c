"""Token-level divergences between the student's and the teacher's next-token distributions.

Forward KL is ``kd`` (:mod:`distill.core.losses.response`); this module adds reverse KL, the
generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024) and total variation, over
logits ``[batch, classes]`` or ``[batch, seq, vocab]`` with a mask, from a live teacher or from
cached top-k signals (then over the teacher's top-k tokens plus one bucket for the rest).

Memory: only the rows the mask keeps are gathered, and they are scored ``chunk`` rows at a time
under activation checkpointing, so the float32 softmaxes of both models never exist for the whole
batch × sequence × vocabulary at once (the backward pass recomputes one chunk at a time).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill.core.losses.base import Batch, LossTerm, ModelOutputs, TermParams, register_term, same_shape, upcast
from distill.core.losses.response import _check_rows
from distill.core.signals import TopKLogits

Kind = Literal["forward", "reverse", "jsd", "tv"]
DEFAULT_CHUNK = 2048
"""Rows (token positions) scored at once: 2048 × a 49,152-token vocabulary × 4 bytes is 400 MB
per float32 softmax."""


def _xlogy_diff(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p · (log p − log q) over the last dimension, with 0 · log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def divergence_rows(log_s: Tensor, log_t: Tensor, kind: Kind, beta: float = 0.5) -> Tensor:
    """Per-row divergence between two distributions given as log-probabilities ``[rows, classes]``.

    ``forward``: KL(t ‖ s); ``reverse``: KL(s ‖ t); ``jsd``: β·KL(t ‖ m) + (1 − β)·KL(s ‖ m) with
    m = β·t + (1 − β)·s, which is forward KL at β = 0 and reverse KL at β = 1 (as TRL's GKD computes
    it); ``tv``: ½ Σ |s − t|.
    """
    if kind == "forward" or (kind == "jsd" and beta == 0):
        return _xlogy_diff(log_t, log_s)
    if kind == "reverse" or (kind == "jsd" and beta == 1):
        return _xlogy_diff(log_s, log_t)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
        return beta * _xlogy_diff(log_t, log_m) + (1 - beta) * _xlogy_diff(log_s, log_m)
    if kind == "tv":
        return 0.5 * (log_s.exp() - log_t.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def _bucketed_student_logits(s: Tensor, indices: Tensor) -> Tensor:
    """The student's log-probabilities on the teacher's top-k tokens, then on all the others, in one
    pass over the vocabulary (a log-sum-exp). The tail is the complement of the top-k mass, in
    float64 over ``k`` entries: exact to about 1e-7 of probability, like float32 itself, without
    scattering and reducing a second ``[rows, vocab]`` tensor (benchmarks/lm.py --parts timing)."""
    head = s.gather(-1, indices) - s.logsumexp(-1, keepdim=True)
    if indices.shape[-1] >= s.shape[-1]:  # every token is in the head: the tail is empty
        return torch.cat([head, torch.full_like(head[..., :1], float("-inf"))], dim=-1)
    mass = head.double().logsumexp(-1, keepdim=True)
    tail = (-torch.expm1(mass)).clamp_min(1e-30).log().to(head.dtype)
    return torch.cat([head, tail], dim=-1)


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
    vocab = student_logits.shape[-1]
    keep = mask.bool().reshape(-1) if mask is not None else None
    s_rows = student_logits.reshape(-1, vocab)
    if isinstance(teacher, TopKLogits):
        _check_rows(student_logits, teacher)
        kept = mask.bool() if mask is not None else torch.ones(teacher.values.shape[:-1], dtype=torch.bool)
        rows = teacher.select(kept)  # [kept rows, k]
        t_parts: tuple[Tensor, ...] = (rows.bucket_log_probs(temperature).float(), rows.indices)
    else:
        same_shape(student_logits, teacher)
        t_parts = (teacher.detach().reshape(-1, vocab),)
    if keep is not None:
        s_rows = s_rows[keep]
        if not isinstance(teacher, TopKLogits):
            t_parts = (t_parts[0][keep],)
    if s_rows.shape[0] == 0:
        return student_logits.sum() * 0.0
    per_row = _chunked(_scorer(kind, temperature, beta, isinstance(teacher, TopKLogits)), s_rows, t_parts, chunk)
    scale = 1.0 if kind == "tv" else temperature**2
    return per_row.mean() * scale


def _scorer(kind: Kind, temperature: float, beta: float, cached: bool) -> Callable[..., Tensor]:
    def dense(s: Tensor, t: Tensor) -> Tensor:
        log_s = F.log_softmax(upcast(s) / temperature, dim=-1)
        log_t = F.log_softmax(upcast(t) / temperature, dim=-1)
        return divergence_rows(log_s, log_t, kind, beta)

    def bucketed(s: Tensor, log_t: Tensor, indices: Tensor) -> Tensor:
        return divergence_rows(_bucketed_student_logits(upcast(s) / temperature, indices), log_t, kind, beta)

    return bucketed if cached else dense


def _chunked(score: Callable[..., Tensor], s_rows: Tensor, t_parts: tuple[Tensor, ...], chunk: int) -> Tensor:
    """``score`` over ``chunk`` rows at a time; with gradients, each chunk is checkpointed (its
    softmaxes are recomputed in the backward pass instead of kept)."""
    out = []
    for start in range(0, s_rows.shape[0], chunk):
        pieces = (s_rows[start : start + chunk], *(t[start : start + chunk] for t in t_parts))
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
