"""Embedding distillation: the student's sentence (or image) embedding against the teacher's.

``embed_mse`` and ``embed_cosine`` compare ``ModelOutputs.embedding`` ``[batch, dim]``; a student
with a smaller embedding gets a learned linear projection to the teacher's size (built in
``setup``, trained with the student, never part of the exported student). The relation terms
(``sp``, ``rkd_*``, ``pkt``) without taps compare embeddings too when a model has no logits.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from distill.core.errors import DistillError
from distill.core.losses.base import Batch, LossTerm, ModelOutputs, register_term


class _EmbeddingTerm(LossTerm):
    needs_outputs: ClassVar[frozenset[str]] = frozenset({"embedding"})

    def __init__(self) -> None:
        super().__init__()
        self.projection: nn.Module = nn.Identity()

    def setup(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        if teacher is None or teacher.embedding is None or student.embedding is None:
            return
        s_dim, t_dim = student.embedding.shape[-1], teacher.embedding.shape[-1]
        if s_dim != t_dim:
            self.projection = nn.Linear(s_dim, t_dim)

    def pair(self, student: ModelOutputs, teacher: ModelOutputs | None) -> tuple[Tensor, Tensor]:
        if teacher is None or teacher.embedding is None or student.embedding is None:
            raise DistillError(f"the {self.name} term needs the student's and the teacher's embeddings")
        return self.projection(student.embedding.float()), teacher.embedding.detach().float()


@register_term("embed_mse")
class EmbeddingMSE(_EmbeddingTerm):
    """Mean squared difference between embeddings (per sample, averaged over dimensions)."""

    summary = "MSE between student and teacher embeddings (learned projection if sizes differ)"

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        s, t = self.pair(student, teacher)
        return (s - t).pow(2).mean(-1).mean()


@register_term("embed_cosine")
class EmbeddingCosine(_EmbeddingTerm):
    """1 − cosine between embeddings: only their directions matter, as for cosine similarity search."""

    summary = "1 - cosine between student and teacher embeddings (learned projection if sizes differ)"

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        s, t = self.pair(student, teacher)
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
