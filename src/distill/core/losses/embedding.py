"""Embedding distillation: the student's sentence (or image) embedding against the teacher's.

``embed_mse`` and ``embed_cosine`` compare ``ModelOutputs.embedding`` ``[batch, dim]``; a student
with a smaller embedding gets a learned linear projection to the teacher's size (built in
``setup``, trained with the student, never part of the exported student; ``init: pca`` starts it
from the teacher's principal directions). The relation terms
(``sp``, ``rkd_*``, ``pkt``) without taps compare embeddings too when a model has no logits.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.errors import DistillError
from distill.core.losses.base import Batch, LossTerm, ModelOutputs, TermParams, register_term


class EmbeddingParams(TermParams):
    init: Literal["random", "pca"] = Field(
        "random",
        description="the projection of a smaller student embedding: random, or pca: the teacher's top principal "
        "directions (and mean) on `calibration` training samples, so training starts from the best linear "
        "reconstruction the student's size allows",
    )
    calibration: int = Field(256, gt=1, description="training samples the PCA is computed on")


def pca_projection(teacher: Tensor, dim: int) -> nn.Linear:
    """A ``dim`` → teacher-size linear map onto the top ``dim`` principal directions of the rows
    of ``teacher``, offset by their mean: student coordinates in that basis reconstruct the
    teacher's embeddings as well as any ``dim``-dimensional linear code can."""
    mean = teacher.float().mean(0)
    _, _, directions = torch.linalg.svd(teacher.float() - mean, full_matrices=False)
    layer = nn.Linear(dim, teacher.shape[-1])
    with torch.no_grad():
        layer.weight.copy_(directions[:dim].T)
        layer.bias.copy_(mean)
    return layer


class _EmbeddingTerm(LossTerm):
    needs_outputs: ClassVar[frozenset[str]] = frozenset({"embedding"})
    Params = EmbeddingParams

    def __init__(self, init: str = "random", calibration: int = 256) -> None:
        super().__init__()
        self.init = init
        self.calibration_samples = calibration if init == "pca" else 0
        self.projection: nn.Module = nn.Identity()

    def setup(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        if teacher is None or teacher.embedding is None or student.embedding is None:
            return
        s_dim, t_dim = student.embedding.shape[-1], teacher.embedding.shape[-1]
        if s_dim == t_dim:
            return
        if self.init != "pca":
            self.projection = nn.Linear(s_dim, t_dim)
            return
        if len(teacher.embedding) < s_dim:
            raise DistillError(
                f"the {self.name} term: a PCA to {s_dim} dimensions needs at least {s_dim} calibration samples, "
                f"got {len(teacher.embedding)}; raise calibration (or give more training data)"
            )
        self.projection = pca_projection(teacher.embedding.detach(), s_dim)

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
