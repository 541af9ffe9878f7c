"""distill: knowledge distillation for PyTorch.

Train a small student to imitate a large teacher, and measure what it kept::

    from distill import Distiller, SoftTargetKD, HardLabelCE
    distiller = Distiller(student, teacher,
                          terms={"kd": SoftTargetKD(temperature=4.0), "ce": HardLabelCE()},
                          weights={"kd": 0.9, "ce": 0.1})
"""

from distill._version import __version__
from distill.core.distiller import Distiller, DistillOutput, LinearWarmup  # noqa: E402
from distill.core.errors import DistillError  # noqa: E402
from distill.core.losses import (  # noqa: E402
    TERMS,
    AttentionTransfer,
    Batch,
    DecoupledKD,
    FitNetsHint,
    HardLabelCE,
    LossTerm,
    ModelOutputs,
    ProbabilisticTransfer,
    RKDAngle,
    RKDDistance,
    SimilarityPreserving,
    SoftTargetKD,
    register_term,
    soft_target_kl,
)

__all__ = [
    "TERMS",
    "AttentionTransfer",
    "Batch",
    "DecoupledKD",
    "DistillError",
    "DistillOutput",
    "Distiller",
    "FitNetsHint",
    "HardLabelCE",
    "LinearWarmup",
    "LossTerm",
    "ModelOutputs",
    "ProbabilisticTransfer",
    "RKDAngle",
    "RKDDistance",
    "SimilarityPreserving",
    "SoftTargetKD",
    "__version__",
    "register_term",
    "soft_target_kl",
]
