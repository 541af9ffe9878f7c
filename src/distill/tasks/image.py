"""Image (and feature-vector) classification: the first task."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.core.data import DataBundle, Split
from distill.core.errors import DistillError
from distill.core.evaluate import accuracy
from distill.core.layout import use_channels_last
from distill.tasks.base import Task, register_task
from distill.tasks.hf import HF_SPECS
from distill.tasks.image_data import DataSpec, load_data
from distill.tasks.models import build_model


@register_task("image_classification")
class ImageClassification(Task):
    """Fashion-MNIST, digits, ``.npz`` arrays and image folders; the built-in CNN and MLP or a
    factory; top-1 accuracy."""

    primary_metric = "accuracy"
    higher_is_better = True

    def load_data(self, spec: Any) -> DataBundle:
        if not isinstance(spec, DataSpec):
            raise DistillError(f"data.source: {spec.source} is text; set task: text_classification")
        return load_data(spec)

    def build_model(self, spec: Any, data: DataBundle, field: str, teacher: nn.Module | None = None) -> nn.Module:
        if isinstance(spec, HF_SPECS):
            raise DistillError(f"{field}.arch: {spec.arch} is a Hugging Face model; set task: text_classification")
        model = build_model(spec, data.input_shape, data.num_classes, field)
        use_channels_last(model, self.example_inputs(data))  # faster convolutions, the same numbers
        return model

    def latency_inputs(self, data: DataBundle, batch_size: int) -> Tensor:
        return torch.randn(batch_size, *data.input_shape)

    def metrics(self, logits: Tensor, split: Split, reference: Tensor | None = None) -> dict[str, float]:
        return {"accuracy": accuracy(logits, split.y)}
