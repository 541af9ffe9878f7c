"""Feature-based distillation: FitNets hints and attention transfer.

Both compare an intermediate output of the student with one of the teacher, named by module.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.adapters import make_adapter
from distill.core.errors import DistillError
from distill.core.losses.base import Batch, ModelOutputs, TappedPairParams, TappedPairTerm, register_term


@register_term("hint")
class FitNetsHint(TappedPairTerm):
    """FitNets (Romero et al. 2015): MSE between the teacher's feature and the student's,
    mapped through a learned adapter when their shapes differ. ``stage_epochs > 0`` first trains
    the student's lower layers (up to the tap) on the hint alone, as FitNets' first stage."""

    summary = "FitNets hint: MSE(adapter(student feature), teacher feature); optional hint-only first stage"

    class Params(TappedPairParams):
        student: str = Field(description="student module to tap, e.g. features.1")
        teacher: str = Field(description="teacher module to tap, e.g. features.2")
        stage_epochs: int = Field(0, ge=0, description="epochs of hint-only training before full training")

    def __init__(self, student: str, teacher: str, stage_epochs: int = 0) -> None:
        super().__init__(student, teacher)
        self.stage_epochs = stage_epochs
        self.adapter: nn.Module | None = None

    def setup(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        if self.adapter is not None:  # built already (e.g. before a hint stage): keep training it
            return
        s, t = self.pair(student, teacher)
        where = f"hint ({self.describe_pair()})"
        self.adapter = make_adapter(s.shape[1:], t.shape[1:], where)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        if self.adapter is None:
            raise RuntimeError("the hint term has no adapter yet: call Distiller.prepare(example_inputs) first")
        s, t = self.pair(student, teacher)
        return F.mse_loss(self.adapter(s), t)


def attention_map(features: Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> Tensor:
    """Zagoruyko & Komodakis' spatial attention: mean over channels of |A|^p (resized to
    ``size`` if given), flattened and L2-normalised per sample, so it depends neither on the
    channel count nor on the scale of the features."""
    attention = features.abs().pow(p).mean(dim=1, keepdim=True)
    if size is not None and tuple(attention.shape[-2:]) != tuple(size):
        attention = F.interpolate(attention, size=size, mode="bilinear", align_corners=False)
    return F.normalize(attention.flatten(1), dim=1)


@register_term("at")
class AttentionTransfer(TappedPairTerm):
    """Attention transfer (Zagoruyko & Komodakis 2017) between two CNN feature maps."""

    summary = "attention transfer: squared distance of normalised spatial attention maps (CNN features)"

    class Params(TappedPairParams):
        student: str = Field(description="student module giving a [B, C, H, W] map")
        teacher: str = Field(description="teacher module giving a [B, C, H, W] map")
        p: float = Field(2.0, gt=0)

    def __init__(self, student: str, teacher: str, p: float = 2.0) -> None:
        super().__init__(student, teacher)
        self.p = p

    def setup(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        s, t = self.pair(student, teacher)
        if s.dim() != 4 or t.dim() != 4:
            raise DistillError(
                f"at ({self.describe_pair()}): attention transfer needs feature maps [B, C, H, W], "
                f"got {list(s.shape)} and {list(t.shape)}"
            )

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        s, t = self.pair(student, teacher)
        return (attention_map(s, self.p, tuple(t.shape[-2:])) - attention_map(t, self.p)).pow(2).mean()
