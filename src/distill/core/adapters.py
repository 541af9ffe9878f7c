"""Learned adapters that map a student's feature shape onto the teacher's.

Created automatically by feature terms from example shapes, trained with the student, saved
with the run (``adapters.safetensors``) and left out of the exported student.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from distill.core.errors import DistillError


class ConvAdapter(nn.Module):
    """1×1 convolution to the teacher's channels, then resizing to the teacher's spatial size."""

    def __init__(self, in_channels: int, out_channels: int, size: Sequence[int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.size = tuple(size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if tuple(x.shape[-2:]) == self.size:
            return x
        if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


class FlatAdapter(nn.Module):
    """Flatten, project linearly, reshape to the teacher's shape (maps vectors and small maps)."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.linear = nn.Linear(math.prod(in_shape), math.prod(out_shape))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1)).view(x.shape[0], *self.out_shape)


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], where: str) -> nn.Module:
    """An adapter from ``student_shape`` to ``teacher_shape`` (both without the batch dimension).

    - equal shapes: identity
    - maps ``[C, H, W]``: 1×1 convolution plus spatial resizing
    - sequences ``[S, D]`` of equal length: linear projection of the last dimension
    - vectors, or a vector and a map: flatten and project linearly
    Anything else (e.g. sequences of different lengths) is a DistillError naming ``where``.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t:
        return nn.Identity()
    if len(s) == 3 and len(t) == 3:
        return ConvAdapter(s[0], t[0], t[1:])
    if len(s) == 2 and len(t) == 2 and s[0] == t[0]:
        return nn.Linear(s[1], t[1])
    if {len(s), len(t)} <= {1, 3}:
        return FlatAdapter(s, t)
    raise DistillError(
        f"{where}: no adapter maps the student's shape {list(s)} to the teacher's {list(t)}; tap modules whose "
        f"outputs are both feature maps [C, H, W], both vectors, or sequences of the same length"
    )
