"""Batches of model inputs: a tensor, or a mapping of tensors (a tokenizer's ``input_ids``,
``attention_mask``, ...) that a model takes as keyword arguments.

Every place that runs a model goes through :func:`call_model`, so image models (``model(x)``) and
Hugging Face models (``model(**batch)``) need no special cases anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

Inputs = Tensor | Mapping[str, Tensor]


def call_model(model: nn.Module, inputs: Inputs) -> object:
    """``model(**inputs)`` for a mapping, ``model(inputs)`` for a tensor."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def batch_len(inputs: Inputs) -> int:
    """Samples in a batch of inputs."""
    if isinstance(inputs, Mapping):
        inputs = next(iter(inputs.values()))
    return len(inputs)


def take(inputs: Inputs, index: Tensor | slice) -> Inputs:
    """The samples ``index`` (positions or a slice) of a batch of inputs."""
    if isinstance(inputs, Mapping):
        return {key: value[index] for key, value in inputs.items()}
    return inputs[index]


def to_device(inputs: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    if isinstance(inputs, Mapping):
        return {key: value.to(device, non_blocking=non_blocking) for key, value in inputs.items()}
    return inputs.to(device, non_blocking=non_blocking)
