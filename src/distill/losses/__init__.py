"""Loss terms: each module registers its terms; import it here so configs can name them."""

from . import response  # noqa: F401  (registers "kd" and "ce")
from .base import TERMS, Batch, LossTerm, ModelOutputs, TermParams, build_term, masked_mean, register_term
from .response import HardLabelCE, SoftTargetKD, hard_label_ce, soft_target_kl

__all__ = [
    "TERMS",
    "Batch",
    "HardLabelCE",
    "LossTerm",
    "ModelOutputs",
    "SoftTargetKD",
    "TermParams",
    "build_term",
    "hard_label_ce",
    "masked_mean",
    "register_term",
    "soft_target_kl",
]
