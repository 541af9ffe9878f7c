"""Image augmentations that replay: each sample's view in an epoch depends on (seed, sample, epoch) alone.

Why: with every label, KD pays when teacher and student see *the same* strongly augmented view of
each image and the teacher's output on that view is the target ("function matching", Beyer et al.
2022). Drawing each sample's crop, flip and mixing partner from a counter-based generator (a hash
of the seed, the sample's index, the epoch and the draw) makes the view independent of the
batch the sample falls in, the batch size and the number of processes: a resumed run, a
distributed run and a store of the teacher's outputs on those views (FKD, Shen & Xing 2022) all
see the same pixels.

The views are computed on normalised images: padding is 0, the training set's mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

DRAWS = 8  # uniforms drawn per sample before any Beta draw, whatever the settings: views replay across configs


class AugmentSpec(BaseModel):
    """``data.augment``: what the students see in training (validation and test images are never augmented)."""

    model_config = ConfigDict(extra="forbid")

    crop: int = Field(
        0, ge=0, description="pad each side by this many pixels (with the mean) and crop back at a random offset"
    )
    flip: bool = Field(False, description="mirror left-right with probability 1/2")
    mixup: float = Field(
        0.0, ge=0, description="alpha of Beta(alpha, alpha): blend each image with another training image; 0 = off"
    )
    cutmix: float = Field(
        0.0, ge=0, description="alpha of Beta(alpha, alpha): paste a box of another training image; 0 = off"
    )
    epochs: int | None = Field(
        None,
        gt=0,
        description="distinct views per image: epoch e shows view e mod epochs (null: a new view every epoch); "
        "`distill cache` stores the teacher's outputs on this many views of each image",
    )
    seed: int | None = Field(
        None, ge=0, lt=2**31, description="the views' seed (null: the run's seed); fix it to share one cache of views"
    )

    @property
    def active(self) -> bool:
        return bool(self.crop or self.flip or self.mixup or self.cutmix)

    def describe(self) -> str:
        parts = [f"crop {self.crop}px" if self.crop else "", "flip" if self.flip else ""]
        parts += [f"mixup α={self.mixup:g}" if self.mixup else "", f"cutmix α={self.cutmix:g}" if self.cutmix else ""]
        parts += [f"{self.epochs} views per image" if self.epochs else ""]
        return ", ".join(p for p in parts if p) or "none"


@dataclass
class Mix:
    """How each augmented sample was mixed: its ``partner`` (index in the training split) and its
    own ``share`` of the pixels (1.0: not mixed). The hard-label target is ``share`` of the
    sample's label plus ``1 - share`` of the partner's."""

    partner: Tensor
    share: Tensor


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, element-wise on uint64 (wrapping arithmetic): a counter-based generator."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _draws(seed: int, index: Tensor, epoch: int, mixup: float, cutmix: float) -> tuple[np.ndarray, np.ndarray]:
    """``DRAWS`` uniforms in [0, 1) and one Beta share per sample, hashed from (seed, sample, epoch, draw):
    vectorised, and the same for a sample whatever else is in its batch."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.full(len(index), seed, dtype=np.uint64))
        key = _splitmix64(key ^ index.numpy().astype(np.uint64))
        key = _splitmix64(key ^ np.uint64(epoch))
        bits = _splitmix64(key[:, None] + np.arange(1, DRAWS + 2, dtype=np.uint64)[None, :])
    uniforms = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 random bits each
    shares = np.ones(len(index))
    use_cutmix = (cutmix > 0) & ((mixup == 0) | (uniforms[:, 3] < 0.5))  # both on: one of them, evenly
    for alpha, rows in ((cutmix, use_cutmix), (mixup, ~use_cutmix)):
        if alpha > 0 and rows.any():
            from scipy.special import betaincinv  # Beta(alpha, alpha) by its inverse CDF

            shares[rows] = betaincinv(alpha, alpha, uniforms[rows, DRAWS])
    return uniforms[:, :DRAWS], shares


class ImageAugment:
    """The views of training images ``[N, C, H, W]`` for ``spec``, keyed by ``seed``.

    Call it with a batch, the batch's indices in ``source`` (the training split) and the epoch; it
    returns the augmented batch and, when mixup or cutmix is on, the :class:`Mix`.
    """

    def __init__(self, spec: AugmentSpec, seed: int) -> None:
        self.spec, self.seed = spec, spec.seed if spec.seed is not None else seed

    def view(self, epoch: int) -> int:
        """Which of an image's views epoch ``epoch`` shows (``spec.epochs`` of them, or one per epoch)."""
        return epoch % self.spec.epochs if self.spec.epochs else epoch

    def view_rows(self, index: Tensor, epoch: int, samples: int) -> Tensor:
        """Rows of a cache of views (view-major: ``view * samples + image``) for images ``index``."""
        return index + self.view(epoch) * samples

    def __call__(self, x: Tensor, index: Tensor, epoch: int, source: Tensor) -> tuple[Tensor, Mix | None]:
        if x.dim() != 4:
            raise ValueError(f"data.augment: works on images [batch, channels, height, width], got {list(x.shape)}")
        spec, epoch = self.spec, self.view(epoch)
        uniforms, shares = _draws(self.seed, index, epoch, spec.mixup, spec.cutmix)
        views = self._geometric(x, uniforms)
        if not (spec.mixup or spec.cutmix):
            return views, None
        partner = torch.as_tensor(np.minimum((uniforms[:, 4] * len(source)).astype(np.int64), len(source) - 1))
        partner_uniforms, _ = _draws(self.seed, partner, epoch, 0.0, 0.0)
        others = self._geometric(source[partner].to(x.dtype), partner_uniforms)
        use_cutmix = (spec.cutmix > 0) & ((spec.mixup == 0) | (uniforms[:, 3] < 0.5))
        share = torch.as_tensor(shares, dtype=torch.float32)
        mixed = views.clone()
        blend = torch.as_tensor(~use_cutmix)
        if bool(blend.any()):
            s = share[blend].to(x.dtype).view(-1, 1, 1, 1)
            mixed[blend] = s * views[blend] + (1 - s) * others[blend]
        if use_cutmix.any():  # a box of the partner, its area 1 - share (clipped at the borders)
            height, width = x.shape[-2:]
            side = np.sqrt(1.0 - shares)
            cy, cx = (uniforms[:, 5] * height).astype(np.int64), (uniforms[:, 6] * width).astype(np.int64)
            h, w = np.rint(height * side).astype(np.int64), np.rint(width * side).astype(np.int64)
            top, bottom = np.maximum(cy - h // 2, 0), np.minimum(cy + h - h // 2, height)
            left, right = np.maximum(cx - w // 2, 0), np.minimum(cx + w - w // 2, width)
            bounds = [torch.as_tensor(b)[:, None] for b in (top, bottom, left, right)]
            inside_rows = (torch.arange(height) >= bounds[0]) & (torch.arange(height) < bounds[1])  # [n, H]
            inside_cols = (torch.arange(width) >= bounds[2]) & (torch.arange(width) < bounds[3])  # [n, W]
            box = (inside_rows[:, :, None] & inside_cols[:, None, :]) & torch.as_tensor(use_cutmix)[:, None, None]
            mixed = torch.where(box[:, None], others, mixed)
            area = torch.as_tensor((bottom - top) * (right - left) / (height * width), dtype=torch.float32)
            share = torch.where(torch.as_tensor(use_cutmix), 1.0 - area, share)
        return mixed, Mix(partner=partner, share=share)

    def _geometric(self, x: Tensor, uniforms: np.ndarray) -> Tensor:
        """Random crop after padding (draws 0 and 1) and left-right flip (draw 2)."""
        pad = self.spec.crop
        if pad:
            n, _, height, width = x.shape
            padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            top = torch.as_tensor((uniforms[:, 0] * (2 * pad + 1)).astype(np.int64).clip(0, 2 * pad))
            left = torch.as_tensor((uniforms[:, 1] * (2 * pad + 1)).astype(np.int64).clip(0, 2 * pad))
            rows = top[:, None, None] + torch.arange(height)[None, :, None]  # [n, H, 1]
            cols = left[:, None, None] + torch.arange(width)[None, None, :]  # [n, 1, W]
            flat = (rows * (width + 2 * pad) + cols).view(n, 1, height * width).expand(n, x.shape[1], -1)
            x = padded.flatten(2).gather(2, flat).view(n, -1, height, width)  # each image's own window
        if self.spec.flip:
            flip = torch.as_tensor(uniforms[:, 2] < 0.5)
            if bool(flip.any()):
                x = x.clone()
                x[flip] = x[flip].flip(-1)
        return x.contiguous()
