"""Measurements of a trained model: accuracy, agreement, size and CPU latency."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .distiller import logits_of


@torch.inference_mode()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1024, device: torch.device | str = "cpu") -> Tensor:
    """Logits of ``model`` for all of ``x`` (in eval mode), on the CPU."""
    was_training = model.training
    model.eval()
    outputs = [logits_of(model(x[i : i + batch_size].to(device))).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outputs)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy over labeled samples (label -1 is skipped)."""
    keep = labels >= 0
    if not bool(keep.any()):
        return float("nan")
    return float((logits.argmax(-1)[keep] == labels[keep]).float().mean())


def agreement(logits_a: Tensor, logits_b: Tensor) -> float:
    """Fraction of samples on which two models predict the same top-1 class."""
    return float((logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean())


def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    predictions = logits.argmax(-1)
    return [
        float((predictions[labels == c] == c).float().mean()) if bool((labels == c).any()) else float("nan")
        for c in range(num_classes)
    ]


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    repeats: int = 30,
    threads: int | None = None,
    min_sample_ms: float = 5.0,
) -> float:
    """Median wall-clock milliseconds of one forward pass on the CPU at ``batch_size``.

    Sub-millisecond passes are too short to time one by one, so each of the ``repeats``
    samples times as many back-to-back passes as fill ``min_sample_ms`` (like ``timeit``).
    """
    model = model.to("cpu").eval()
    x = torch.randn(batch_size, *input_shape)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        warm = 0
        while warm < 3 or (time.perf_counter() - start) * 1000 < 4 * min_sample_ms:  # warm-up
            model(x)
            warm += 1
        per_pass = (time.perf_counter() - start) * 1000 / warm
        inner = max(1, math.ceil(min_sample_ms / max(per_pass, 1e-6)))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                model(x)
            times.append((time.perf_counter() - start) * 1000 / inner)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)
