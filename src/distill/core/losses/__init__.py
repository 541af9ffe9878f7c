"""Loss terms. Each module registers its terms; importing them here makes them available
to configs by name (``distill methods`` lists them)."""

from distill.core.losses import (  # noqa: F401  (registration)
    decoupled,
    divergence,
    embedding,
    features,
    relations,
    response,
    transformer,
)
from distill.core.losses.base import (
    TERMS,
    Batch,
    LossTerm,
    ModelOutputs,
    TappedPairParams,
    TappedPairTerm,
    TermParams,
    build_term,
    masked_mean,
    register_term,
)
from distill.core.losses.decoupled import DecoupledKD, decoupled_kd
from distill.core.losses.divergence import ForwardKL, GeneralisedJSD, ReverseKL, TotalVariation, token_divergence
from distill.core.losses.embedding import EmbeddingCosine, EmbeddingMSE
from distill.core.losses.features import AttentionTransfer, FitNetsHint, attention_map
from distill.core.losses.relations import (
    ProbabilisticTransfer,
    RKDAngle,
    RKDDistance,
    SimilarityPreserving,
    probabilistic_transfer,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)
from distill.core.losses.response import HardLabelCE, SoftTargetKD, hard_label_ce, soft_target_kl
from distill.core.losses.transformer import (
    DistilBERTCosine,
    MiniLMAttention,
    MiniLMRelation,
    TinyBERTAttention,
    TinyBERTEmbedding,
    TinyBERTHidden,
)

__all__ = [
    "TERMS",
    "AttentionTransfer",
    "Batch",
    "DecoupledKD",
    "DistilBERTCosine",
    "EmbeddingCosine",
    "EmbeddingMSE",
    "FitNetsHint",
    "ForwardKL",
    "GeneralisedJSD",
    "HardLabelCE",
    "LossTerm",
    "MiniLMAttention",
    "MiniLMRelation",
    "ModelOutputs",
    "ProbabilisticTransfer",
    "RKDAngle",
    "RKDDistance",
    "ReverseKL",
    "SimilarityPreserving",
    "SoftTargetKD",
    "TappedPairParams",
    "TappedPairTerm",
    "TermParams",
    "TinyBERTAttention",
    "TinyBERTEmbedding",
    "TinyBERTHidden",
    "TotalVariation",
    "attention_map",
    "build_term",
    "decoupled_kd",
    "hard_label_ce",
    "masked_mean",
    "probabilistic_transfer",
    "token_divergence",
    "register_term",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
    "soft_target_kl",
]
