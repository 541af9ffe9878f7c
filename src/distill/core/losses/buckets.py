"""Distributions over a teacher's top-k tokens plus one bucket for all the others: how a student
is compared with cached teacher signals (:class:`~distill.core.signals.TopKLogits`), for images
and language models alike, with any of the divergences.

The teacher's side is :meth:`TopKLogits.bucket_log_probs`; the student's side is one autograd
function with a hand-written backward (:class:`_StudentBuckets`), which makes a step from the cache
cost about what the plain cross-entropy step costs (benchmarks/lm.py --parts timing).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.core.losses.base import upcast
from distill.core.signals import TopKLogits

Kind = Literal["forward", "reverse", "jsd", "tv"]
DEFAULT_CHUNK = 2048
"""Rows (token positions) scored at once: 2048 × a 49,152-token vocabulary × 4 bytes is 400 MB
per float32 softmax."""
AUTOGRAD_BELOW = 32_768
"""Kept rows × classes below which plain autograd is used instead: on small logits (an image
batch's ``[128, 10]``) the hand-written function's fixed cost outweighs what it saves
(benchmarks/buckets.py)."""
DEEP = 1e-20
"""A student's tail mass below which it is computed in log space: a float32 sum of probabilities
that small loses its precision, and ``g_tail / Q`` may overflow."""


def _xlogy_diff(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p · (log p − log q) over the last dimension, with 0 · log 0 = 0: both logs are floored at
    -10⁴ (e^-10⁴ is 0 in every float type), so an empty bucket gives 0, not 0 · ∞."""
    return (log_p.exp() * (log_p.clamp_min(-1e4) - log_q.clamp_min(-1e4))).sum(-1)


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
        floored = (log_t.clamp_min(-1e4) + math.log(beta), log_s.clamp_min(-1e4) + math.log(1 - beta))
        log_m = torch.logsumexp(torch.stack(floored), dim=0)  # finite, so its gradient is too
        return beta * _xlogy_diff(log_t, log_m) + (1 - beta) * _xlogy_diff(log_s, log_m)
    if kind == "tv":
        return 0.5 * (log_s.exp() - log_t.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


class _StudentBuckets(torch.autograd.Function):
    """The student's log-probabilities ``[rows, k + 1]`` on the teacher's top-k tokens, then on all
    the others as one bucket, with a hand-written backward.

    Why by hand: through autograd, log-softmax, gather, the tail's log-sum-exp and the masked-row
    copy each keep or rebuild a ``[rows, vocab]`` tensor, which made a cached-KD step 1.29× a
    language-modelling step. Here the forward is one log-softmax per chunk of rows (gathered, then
    exponentiated in place and summed outside the top-k for the tail's mass: no 1 − Σ head
    cancellation) and the backward one softmax per chunk, scaled in place: with ``g`` the incoming
    gradient over the ``k + 1`` buckets, ``q`` the student's softmax and ``Q`` its tail mass, a
    top-k token ``i_j`` gets ``g_j − q_{i_j} · Σ g`` and every other token
    ``g_tail · q_i / Q − q_i · Σ g``. Rows whose tail mass is below :data:`DEEP` (a confident
    student) take the tail in log space instead, as autograd through a log-sum-exp would. A row's
    indices must be distinct (``topk``'s are): the backward scatters, it does not accumulate."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor | None, indices: Tensor, temperature: float, chunk: int) -> Tensor:
        empty_tail = indices.shape[-1] >= logits.shape[-1]  # every token is in the head
        any_deep, parts = False, []
        for start in range(0, indices.shape[0], chunk):
            part, top = slice(start, start + chunk), indices[start : start + chunk]
            z = _scaled_rows(logits, rows, part, temperature)
            log_q = F.log_softmax(z, dim=-1)
            head = log_q.gather(-1, top)
            if empty_tail:
                tail = torch.full_like(head[:, :1], float("-inf"))
            else:
                mass = log_q.exp_().scatter_(-1, top, 0.0).sum(-1, keepdim=True)
                tail = mass.log()
                deep = mass.squeeze(-1) < DEEP
                if bool(deep.any()):
                    any_deep = True
                    tail[deep] = _log_tail(z[deep], top[deep])
            parts.append(torch.cat([head, tail], dim=-1))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        ctx.save_for_backward(logits, rows, indices, out[:, -1:])
        ctx.temperature, ctx.chunk, ctx.empty_tail, ctx.any_deep = temperature, chunk, empty_tail, any_deep
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        logits, rows, indices, tail = ctx.saved_tensors
        g_head, g_tail = grad[:, :-1], grad[:, -1:]
        total = (g_head if ctx.empty_tail else grad).sum(-1, keepdim=True)  # an empty tail is a constant
        deep = None
        if ctx.empty_tail:
            every = -total  # the factor on q outside the head (there is no outside)
        elif ctx.any_deep:
            mass = tail.exp()
            shallow = mass >= DEEP
            every = torch.where(shallow, g_tail / mass.clamp_min(DEEP), 0.0) - total
            deep = (~shallow & tail.isfinite() & (g_tail != 0)).squeeze(-1)
        else:
            every = g_tail / tail.exp() - total
        single = rows is None and indices.shape[0] <= ctx.chunk  # the gradient is the one chunk's
        out = None if single else torch.zeros_like(logits) if rows is not None else torch.empty_like(logits)
        for start in range(0, indices.shape[0], ctx.chunk):
            part, top = slice(start, start + ctx.chunk), indices[start : start + ctx.chunk]
            z = _scaled_rows(logits, rows, part, ctx.temperature)
            q = F.softmax(z, dim=-1)
            head_q = q.gather(-1, top)
            # the tail's tokens and the head's are set apart, so that a large g_tail / Q never
            # cancels against itself
            q.scatter_(-1, top, 0.0).mul_(every[part])
            q.scatter_(-1, top, g_head[part] - head_q * total[part])
            if deep is not None and bool(deep[part].any()):
                d = deep[part]
                share = (F.log_softmax(z[d], dim=-1) - tail[part][d]).exp().scatter_(-1, top[d], 0.0)
                q[d] += g_tail[part][d] * share
            if ctx.temperature != 1.0:
                q.div_(ctx.temperature)
            if out is None:
                return q.to(logits.dtype), None, None, None, None
            if rows is None:
                out[part] = q
            else:
                out.index_copy_(0, rows[part], q.to(out.dtype))
        return out, None, None, None, None


def _autograd_buckets(logits: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """What :class:`_StudentBuckets` computes, through autograd (the tail as a log-sum-exp)."""
    z = upcast(logits)
    log_q = F.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
    head = log_q.gather(-1, indices)
    if indices.shape[-1] >= logits.shape[-1]:
        return torch.cat([head, torch.full_like(head[:, :1], float("-inf"))], dim=-1)
    return torch.cat([head, log_q.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)], dim=-1)


def _log_tail(z: Tensor, top: Tensor) -> Tensor:
    """log Σ softmax(z) outside ``top``, in log space (for rows whose tail underflows)."""
    return F.log_softmax(z, dim=-1).scatter(-1, top, float("-inf")).logsumexp(-1, keepdim=True)


def _scaled_rows(logits: Tensor, rows: Tensor | None, part: slice, temperature: float) -> Tensor:
    """Rows ``part`` of the kept rows (all rows when ``rows`` is None), upcast, divided by T."""
    z = upcast(logits[part] if rows is None else logits.index_select(0, rows[part]))
    return z / temperature if temperature != 1.0 else z


def student_bucket_log_probs(
    logits: Tensor, indices: Tensor, temperature: float = 1.0, rows: Tensor | None = None, chunk: int = DEFAULT_CHUNK
) -> Tensor:
    """The student's log-probabilities at ``temperature`` on each row's cached top-k tokens, then
    on the rest as one bucket: ``[len(rows), k + 1]`` from ``logits`` ``[N, vocab]`` (``rows``: the
    kept row numbers, in the order of ``indices``; None keeps every row)."""
    return _StudentBuckets.apply(logits, rows, indices, float(temperature), int(chunk))


def bucketed_divergence(
    student_logits: Tensor,
    teacher: TopKLogits,
    kind: Kind = "forward",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    beta: float = 0.5,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """The mean over kept rows of :func:`divergence_rows` between the student's and the teacher's
    bucket distributions at ``temperature``, times T² for the KL-type divergences. Exact when k
    covers every class; a lower bound of the full divergence otherwise. An empty selection gives 0
    with a gradient path."""
    check_rows(student_logits, teacher)
    vocab = student_logits.shape[-1]
    shape = teacher.values.shape[:-1]
    keep = mask.bool().reshape(shape) if mask is not None else None
    if keep is not None and bool(keep.all()):
        keep = None
    signals = teacher.select(keep) if keep is not None else teacher.flat()
    if signals.values.shape[0] == 0:
        return student_logits.sum() * 0.0
    flat = student_logits.reshape(-1, vocab)
    if signals.values.shape[0] * vocab < AUTOGRAD_BELOW:
        log_s = _autograd_buckets(flat[keep.reshape(-1)] if keep is not None else flat, signals.indices, temperature)
    else:
        rows = keep.reshape(-1).nonzero().squeeze(1) if keep is not None else None
        log_s = student_bucket_log_probs(flat, signals.indices, temperature, rows, chunk)
    log_t = signals.bucket_log_probs(temperature).to(log_s.dtype)
    scale = 1.0 if kind == "tv" else temperature**2
    per_row = divergence_rows(log_s, log_t, kind, beta)
    return per_row.mean() * scale if scale != 1.0 else per_row.mean()


def check_rows(student_logits: Tensor, teacher: TopKLogits) -> None:
    if student_logits.shape[-1] != teacher.vocab_size or student_logits.shape[:-1] != teacher.values.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} do not match the teacher's top-k signals "
            f"({tuple(teacher.values.shape[:-1])} rows over {teacher.vocab_size} classes)"
        )
