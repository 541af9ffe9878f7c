"""Channels-last memory layout for convolutional models: the same numbers, in less time.

Why: PyTorch's CPU convolutions (oneDNN) run faster on NHWC ("channels-last") tensors than on
the NCHW default: on this project's 2-core machine the forward pass of a 137k-parameter CNN
teacher on Fashion-MNIST took about 0.7x the time, and a 9k-parameter CNN student's training
step about 0.65x (end to end: ``benchmarks/peers.py``).
The layout is a matter of strides: every tensor keeps its shape and meaning, and weights are
saved in the standard layout (:func:`standard_layout`), so nothing outside a run can tell.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from distill.core.inputs import Inputs, call_model
from distill.core.losses.base import logits_of


def _is_convolutional(model: nn.Module) -> bool:
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


def _first_tensor(outputs: object) -> Tensor | None:
    try:
        return logits_of(outputs)
    except Exception:  # noqa: BLE001 - an output without logits is simply not compared
        return None


def use_channels_last(model: nn.Module, example_inputs: Inputs) -> bool:
    """Put ``model``'s 4-D weights in channels-last layout when it has 2-D convolutions; return
    whether it did.

    A forward pass on ``example_inputs`` (in eval mode, no gradients) must run and give the
    same outputs afterwards, or the model goes back to the standard layout: a model that calls
    ``.view()`` on a feature map, for instance, needs contiguous NCHW tensors."""
    if not _is_convolutional(model):
        return False
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            before = _first_tensor(call_model(model, example_inputs))
    except Exception:  # noqa: BLE001 - the model fails in its own layout too: its own check reports that
        model.train(was_training)
        return False
    model.to(memory_format=torch.channels_last)  # not under inference_mode: the weights stay trainable
    try:
        with torch.inference_mode():
            after = _first_tensor(call_model(model, example_inputs))
        same = before is None or (after is not None and torch.allclose(before, after, rtol=1e-4, atol=1e-5))
    except Exception:  # noqa: BLE001 - any failure means the model needs the standard layout
        same = False
    if not same:
        model.to(memory_format=torch.contiguous_format)
    model.train(was_training)
    return same


def is_channels_last(model: nn.Module) -> bool:
    return any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())


@contextmanager
def standard_layout(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in the standard (contiguous) layout for the duration, e.g. to save its weights
    (safetensors stores contiguous tensors); its layout is restored afterwards."""
    converted = is_channels_last(model)
    if converted:
        model.to(memory_format=torch.contiguous_format)
    try:
        yield model
    finally:
        if converted:
            model.to(memory_format=torch.channels_last)
