"""Compact teacher signals: the top-k logits of each row plus what is needed to account for
the probability mass outside them.

This is the format an offline teacher cache stores (issue 4). It is temperature-free: raw logits
of the k largest classes (or vocabulary entries), their indices, and the row's log-sum-exp at
T = 1, from which the mass outside the top-k follows exactly. Losses see a teacher either as dense
logits or as ``TopKLogits``; :func:`distill.core.losses.soft_target_kl` takes both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

ValueDtype = Literal["float32", "float16", "bfloat16", "int8"]


@dataclass
class TopKLogits:
    """``values`` and ``indices`` are ``[..., k]``; ``logsumexp`` (over the full row at T = 1) and
    ``tail`` (log of the probability outside the top-k at T = 1, −inf when k covers the row) are
    ``[...]``; ``vocab_size`` is the full row length. ``tail`` is stored, not derived from the
    values, so that rounding the values to a compact dtype cannot distort the tail mass."""

    values: Tensor
    indices: Tensor
    logsumexp: Tensor
    tail: Tensor
    vocab_size: int

    @classmethod
    def from_dense(cls, logits: Tensor, k: int) -> TopKLogits:
        logits = logits.detach().float()
        k = min(k, logits.shape[-1])
        values, indices = logits.topk(k, dim=-1)
        logsumexp = logits.logsumexp(-1)
        if k < logits.shape[-1]:
            # the log-sum-exp of the other logits, not log(1 - head mass): exact even when the tail
            # is far below float32's resolution next to 1 (a confident row)
            tail = logits.scatter(-1, indices, float("-inf")).logsumexp(-1) - logsumexp
        else:
            tail = torch.full_like(logsumexp, float("-inf"))
        return cls(values, indices, logsumexp, tail, logits.shape[-1])

    def select(self, keep: Tensor) -> TopKLogits:
        """The rows where boolean ``keep`` (the leading dimensions) is True, flattened: ``[m, k]``."""
        return TopKLogits(self.values[keep], self.indices[keep], self.logsumexp[keep], self.tail[keep], self.vocab_size)

    def flat(self) -> TopKLogits:
        """Every row, flattened to ``[rows, k]`` (views, no copy)."""
        k = self.k
        return TopKLogits(
            self.values.reshape(-1, k),
            self.indices.reshape(-1, k),
            self.logsumexp.reshape(-1),
            self.tail.reshape(-1),
            self.vocab_size,
        )

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def bucket_log_probs(self, temperature: float = 1.0) -> Tensor:
        """Log-probabilities over ``k + 1`` buckets (the top-k, then "everything else") at
        ``temperature``. At T = 1 they are exact. At other temperatures the unseen logits are
        taken as equal, sharing the known tail mass, which is exact again when k covers the row."""
        tail = self.tail
        rest = self.vocab_size - self.k
        if rest == 0:
            return torch.cat([(self.values / temperature).log_softmax(-1), tail.unsqueeze(-1)], dim=-1)
        # each unseen logit z_tail = logsumexp + log(tail mass / rest), on the logits' own scale
        z_tail = self.logsumexp + tail - math.log(rest)
        tail_scaled = z_tail / temperature + math.log(rest)
        scaled = torch.cat([self.values / temperature, tail_scaled.unsqueeze(-1)], dim=-1)
        return scaled.log_softmax(-1)

    def to_dense(self) -> Tensor:
        """Full-length logits whose softmax (at T = 1) has exactly the cached top-k
        probabilities and spreads the tail mass evenly over the other classes: the
        reconstruction for terms and metrics that need dense teacher logits."""
        rest = self.vocab_size - self.k
        if rest == 0:  # a permutation of the values
            return torch.empty_like(self.values, dtype=torch.float32).scatter_(-1, self.indices, self.values.float())
        fill = self.logsumexp + self.tail - math.log(rest)
        dense = fill.unsqueeze(-1).expand(*self.values.shape[:-1], self.vocab_size).clone()
        return dense.scatter(-1, self.indices, self.values.float())

    def to(self, device: torch.device | str) -> TopKLogits:
        return TopKLogits(
            self.values.to(device), self.indices.to(device), self.logsumexp.to(device), self.tail.to(device),
            self.vocab_size,
        )  # fmt: skip


@dataclass
class QuantizedValues:
    """Top-k logit values in a compact dtype; ``int8`` uses an affine per-row scale."""

    data: Tensor
    dtype: ValueDtype
    offset: Tensor | None = None
    scale: Tensor | None = None

    @classmethod
    def encode(cls, values: Tensor, dtype: ValueDtype) -> QuantizedValues:
        if dtype in ("float32", "float16", "bfloat16"):
            return cls(values.to(getattr(torch, dtype)), dtype)
        low, high = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
        scale = ((high - low) / 255.0).clamp_min(1e-8)
        codes = torch.round((values - low) / scale) - 128
        return cls(codes.clamp(-128, 127).to(torch.int8), dtype, low, scale)

    def decode(self) -> Tensor:
        if self.dtype != "int8":
            return self.data.float()
        return (self.data.float() + 128) * self.scale + self.offset

    def bytes_per_row(self) -> int:
        """Storage per row: values plus, for int8, the row's offset and scale (two float32s)."""
        k = self.data.shape[-1]
        return k * self.data.element_size() + (8 if self.dtype == "int8" else 0)


def dense_logits(logits: Tensor | TopKLogits) -> Tensor:
    """Dense teacher logits from either signal kind (see :meth:`TopKLogits.to_dense`)."""
    return logits.to_dense() if isinstance(logits, TopKLogits) else logits


def index_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that numbers ``vocab_size`` classes."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)
