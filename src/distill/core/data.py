"""Data as the core sees it: splits of inputs (a tensor, or a mapping of tensors for models that take
keyword arguments), labels and masks, and mini-batches over them. Tasks read and split their own
sources into these (``distill.tasks``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from distill.core.inputs import Inputs, take
from distill.core.io import hash_tensors

UNLABELED = -1


@dataclass
class Split:
    """Inputs ``x`` (float32 images or vectors; or a mapping of tensors, e.g. token ids, that
    models take as keyword arguments) and labels ``y`` (int64; -1 = unlabeled), one per sample
    ``[N]`` or per position ``[N, S]``. ``mask`` (``[N, S]``, True = counts) marks the positions
    that count, e.g. not padding; None: all of them."""

    x: Inputs
    y: Tensor
    mask: Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labeled(self) -> int:
        """Samples with a label (a token sequence counts when any of its positions has one)."""
        return int(self.labeled_rows().sum())

    def labeled_rows(self) -> Tensor:
        """Which samples have a label: ``[n]`` booleans, for per-sample or per-position labels."""
        return (self.y >= 0).reshape(len(self.y), -1).any(1)

    def tensors(self) -> list[Tensor]:
        """Every tensor of the split, in a fixed order (inputs by key, labels, mask), for hashing."""
        inputs = [self.x[key] for key in sorted(self.x)] if isinstance(self.x, Mapping) else [self.x]
        return [*inputs, self.y] + ([] if self.mask is None else [self.mask])

    def subset(self, index: Tensor) -> Split:
        return Split(take(self.x, index), self.y[index], None if self.mask is None else self.mask[index])


@dataclass
class DataBundle:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: list[str]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    normalize: str = "auto"  # how mean and std were chosen: auto, none or fixed
    info: dict = field(default_factory=dict)  # what the task needs to know later (e.g. its tokenizer), JSON-safe

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: of the image or vector, or of the first input of a mapping (token ids)."""
        x = self.train.x
        first = x[next(iter(x))] if isinstance(x, Mapping) else x
        return tuple(first.shape[1:])

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of all three splits: a cached teacher is reused only on identical data."""
        return hash_tensors(*(t for split in (self.train, self.val, self.test) for t in split.tensors()))

    def with_label_budget(self, labeled: int | None, seed: int = 0) -> DataBundle:
        """A copy whose training split keeps labels on only ``labeled`` samples (chosen by
        ``seed``); the rest are marked unlabeled (-1). Validation and test keep their labels."""
        if labeled is None or labeled >= len(self.train):
            return self
        # a stream of its own (seed sequence [seed, 1]): reusing the run's shuffle stream
        # would put every labeled sample into the first batches of an epoch
        order = np.random.default_rng([seed, 1]).permutation(len(self.train))
        y = self.train.y.clone()
        y[torch.as_tensor(order[labeled:])] = UNLABELED
        return replace(self, train=Split(self.train.x, y))

    def labeled_only(self) -> DataBundle:
        """A copy whose training split holds only its labeled samples."""
        if self.train.labeled == len(self.train):
            return self
        return replace(self, train=self.train.subset(torch.nonzero(self.train.labeled_rows()).flatten()))

    def summary(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "train": len(self.train),
            "train_labeled": self.train.labeled,
            "val": len(self.val),
            "test": len(self.test),
            "normalisation": {"mean": self.mean, "std": self.std, "setting": self.normalize},
        }


def iterate_batches(
    split: Split, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[Inputs, Tensor, Tensor]]:
    """Mini-batches ``(x, y, index)`` of ``split``; shuffled by ``generator`` when one is given.
    ``index`` holds the samples' positions in the split, which is how cached teacher signals
    are looked up."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield take(split.x, index), split.y[index], index
