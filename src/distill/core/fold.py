"""Batch norms folded into the convolutions before them, for a frozen model's forward passes.

Why: a frozen teacher in eval mode applies each batch norm as a fixed affine map, which can be
folded into the preceding convolution's weights and bias (``torch.fx``'s conv-BN fusion). Its
forward passes then skip one pass over every feature map: on this project's 2-core machine a
137k-parameter CNN teacher's pass over Fashion-MNIST took about 0.75x the time of its
channels-last pass (end to end: ``benchmarks/peers.py``), and that pass is most of a
distillation epoch. The folded model is a copy used only for the
teacher's outputs; the user's model, its weights and its latency are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.core.inputs import Inputs, call_model
from distill.core.layout import is_channels_last
from distill.core.losses.base import logits_of


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def folded_batch_norms(model: nn.Module, example_inputs: Inputs) -> nn.Module:
    """A copy of ``model`` (in eval mode, frozen) whose batch norms are folded into the
    convolutions before them, or ``model`` itself when none folds, it cannot be traced, or the
    copy's logits on ``example_inputs`` differ from the model's beyond float rounding."""
    if not _batch_norms(model) or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    was_training = model.training
    model.eval()
    try:
        folded = fuse(model)  # a deep copy, traced by torch.fx
        if is_channels_last(model):
            folded.to(memory_format=torch.channels_last)
        folded.eval().requires_grad_(False)
        with torch.inference_mode():
            expected = logits_of(call_model(model, example_inputs))
            same = torch.allclose(logits_of(call_model(folded, example_inputs)), expected, rtol=1e-4, atol=1e-5)
    except Exception:  # noqa: BLE001 - an untraceable model (control flow on values...) runs as it is
        same = False
    finally:
        model.train(was_training)
    return folded if same and _batch_norms(folded) < _batch_norms(model) else model
