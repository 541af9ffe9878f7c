"""Relation-based distillation: the student learns how the teacher relates samples of a batch.

All terms work on any embedding (logits by default, or a tapped feature), flattened per sample,
so student and teacher embeddings may have different widths: no adapter is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distill.core.losses.base import Batch, ModelOutputs, TappedPairParams, TappedPairTerm, register_term


def _normalised_distances(embeddings: Tensor) -> Tensor:
    # the exact path: the matrix-multiply shortcut leaves non-zero self-distances on the diagonal
    distances = torch.cdist(embeddings, embeddings, compute_mode="donot_use_mm_for_euclid_dist")
    positive = distances[distances > 0]
    return distances / positive.mean() if positive.numel() else distances


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance (Park et al. 2019): Huber loss between pairwise distances, each normalised
    by its mean, so the loss is invariant to a global scale of either embedding."""
    s, t = student.flatten(1).float(), teacher.flatten(1).float()
    with torch.no_grad():
        t_d = _normalised_distances(t)
    return F.smooth_l1_loss(_normalised_distances(s), t_d)


def _angles(embeddings: Tensor) -> Tensor:
    differences = F.normalize(embeddings.unsqueeze(0) - embeddings.unsqueeze(1), p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).flatten()


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle (Park et al. 2019): Huber loss between the cosines of the angles formed by
    every triplet of samples."""
    s, t = student.flatten(1).float(), teacher.flatten(1).float()
    with torch.no_grad():
        t_a = _angles(t)
    return F.smooth_l1_loss(_angles(s), t_a)


def similarity_preserving(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): squared Frobenius distance between the
    row-normalised batch similarity matrices, divided by batch²."""
    s, t = student.flatten(1).float(), teacher.flatten(1).float()
    g_s = F.normalize(s @ s.T, p=2, dim=1)
    g_t = F.normalize(t @ t.T, p=2, dim=1)
    return (g_s - g_t).pow(2).sum() / s.shape[0] ** 2


def _conditional_probabilities(embeddings: Tensor) -> Tensor:
    normalised = F.normalize(embeddings, p=2, dim=1)
    similarity = (normalised @ normalised.T + 1.0) / 2.0  # cosine similarity mapped to [0, 1]
    return similarity / similarity.sum(dim=1, keepdim=True)


def probabilistic_transfer(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """PKT (Passalis & Tefas 2018): KL divergence between the teacher's and the student's
    conditional probability distributions derived from cosine similarities."""
    s, t = student.flatten(1).float(), teacher.flatten(1).float()
    p_s = _conditional_probabilities(s)
    p_t = _conditional_probabilities(t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class _RelationTerm(TappedPairTerm):
    relation = staticmethod(rkd_distance)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        s, t = self.pair(student, teacher)
        if s.shape[0] < 2:
            return s.sum() * 0.0
        return self.relation(s, t)


class RelationParams(TappedPairParams):
    student: str | None = Field(None, description="student module to tap; null = logits")
    teacher: str | None = Field(None, description="teacher module to tap; null = logits")


@register_term("rkd_distance")
class RKDDistance(_RelationTerm):
    """RKD distance loss on embeddings (logits or tapped features)."""

    summary = "RKD distance: Huber loss between mean-normalised pairwise distances (Park et al.)"
    Params = RelationParams
    relation = staticmethod(rkd_distance)


@register_term("rkd_angle")
class RKDAngle(_RelationTerm):
    """RKD angle loss on embeddings (logits or tapped features)."""

    summary = "RKD angle: Huber loss between angles of sample triplets (Park et al.)"
    Params = RelationParams
    relation = staticmethod(rkd_angle)


@register_term("sp")
class SimilarityPreserving(_RelationTerm):
    """Similarity-preserving KD on embeddings (logits or tapped features)."""

    summary = "similarity-preserving: distance of row-normalised batch similarity matrices (Tung & Mori)"
    Params = RelationParams
    relation = staticmethod(similarity_preserving)


@register_term("pkt")
class ProbabilisticTransfer(_RelationTerm):
    """Probabilistic knowledge transfer on embeddings (logits or tapped features)."""

    summary = "PKT: KL between cosine-similarity conditional distributions (Passalis & Tefas)"
    Params = RelationParams
    relation = staticmethod(probabilistic_transfer)
