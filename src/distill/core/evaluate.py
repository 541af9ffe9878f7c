"""Measurements of a trained model: accuracy, agreement, size and CPU latency."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.core.inputs import Inputs, batch_len, call_model, take, to_device
from distill.core.losses.base import logits_of


def predict_batch_size(device: torch.device | str) -> int:
    """128 on a CPU, where it ran twice as fast per image as 1024 (benchmarks/cache.py --parts
    batch: small batches stay in the CPU's caches); 1024 on an accelerator."""
    return 128 if torch.device(device).type == "cpu" else 1024


@torch.inference_mode()
def predict(
    model: nn.Module,
    x: Inputs,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    order: Tensor | None = None,
    output=logits_of,
) -> Tensor:
    """Logits of ``model`` for all of ``x`` (in eval mode), on the CPU, in the order of ``x``.

    ``order`` (a permutation) is the order the samples are batched in: texts sorted by length
    share batches with texts of their length, so little of each batch is padding. ``output``
    picks the tensor to keep from the model's outputs (the logits by default)."""
    batch_size = batch_size or predict_batch_size(device)
    was_training = model.training
    model.eval()
    n = batch_len(x)
    index = torch.arange(n) if order is None else order
    outputs = [
        output(call_model(model, to_device(take(x, index[i : i + batch_size]), device))).float().cpu()
        for i in range(0, n, batch_size)
    ]
    model.train(was_training)
    if not outputs:
        return torch.zeros(0)
    ordered = torch.cat(outputs)
    return ordered if order is None else ordered[torch.argsort(order)]


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


def per_class_agreement(logits: Tensor, teacher_logits: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    """Top-1 agreement with the teacher among test samples of each true class."""
    same = logits.argmax(-1) == teacher_logits.argmax(-1)
    return [
        float(same[labels == c].float().mean()) if bool((labels == c).any()) else float("nan")
        for c in range(num_classes)
    ]


def calibration(logits: Tensor, labels: Tensor, bins: int = 15) -> dict:
    """Expected calibration error (equal-width confidence bins, weighted by count) and the
    per-bin confidence and accuracy behind a reliability diagram."""
    keep = labels >= 0
    probabilities = logits[keep].float().softmax(-1)
    confidence, prediction = probabilities.max(-1)
    correct = (prediction == labels[keep]).float()
    edges = torch.linspace(0, 1, bins + 1)
    table, ece = [], 0.0
    for lower, upper in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        inside = (confidence > lower) & (confidence <= upper)
        count = int(inside.sum())
        conf = float(confidence[inside].mean()) if count else float("nan")
        acc = float(correct[inside].mean()) if count else float("nan")
        if count:
            ece += count / len(confidence) * abs(acc - conf)
        table.append({"lower": lower, "upper": upper, "count": count, "confidence": conf, "accuracy": acc})
    return {"ece": ece, "bins": table}


MIN_ROUNDS = 7  # timed samples per model at least, whatever the time budget
WARM_UP_PASSES, WARM_UP_MS = 2, 10.0  # untimed passes first: the first allocates; a few ms wake the CPU up


@torch.inference_mode()
def measure_latencies(
    models: dict[str, nn.Module],
    input_shape: Sequence[int],
    batch_size: int,
    repeats: int = 30,
    threads: int | None = None,
    min_sample_ms: float = 2.0,
    max_seconds: float | None = None,
    inputs: Inputs | None = None,
) -> dict[str, float]:
    """Median wall-clock milliseconds of one CPU forward pass of each model at ``batch_size``.

    Sub-millisecond passes are too short to time one by one, so each timed sample runs as many
    back-to-back passes as fill ``min_sample_ms`` (like ``timeit``). The models' samples are
    interleaved, so a slow moment of the machine hits all of them alike. With ``max_seconds``,
    fewer than ``repeats`` rounds are timed (never fewer than :data:`MIN_ROUNDS`) when all of
    them would take longer: a big teacher at a big batch need not cost seconds of every run.
    """
    x = inputs if inputs is not None else torch.randn(batch_size, *input_shape)  # a task's own inputs, if given
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        inner, round_ms = {}, 0.0
        for name, model in models.items():
            model.to("cpu").eval()
            start, warm = time.perf_counter(), 0
            while warm < WARM_UP_PASSES or (time.perf_counter() - start) * 1000 < WARM_UP_MS:
                call_model(model, x)
                warm += 1
            per_pass = (time.perf_counter() - start) * 1000 / warm
            inner[name] = max(1, math.ceil(min_sample_ms / max(per_pass, 1e-6)))
            round_ms += inner[name] * per_pass
        if max_seconds is not None:
            repeats = min(repeats, max(MIN_ROUNDS, int(max_seconds * 1000 / max(round_ms, 1e-6))))
        samples: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(inner[name]):
                    call_model(model, x)
                samples[name].append((time.perf_counter() - start) * 1000 / inner[name])
    finally:
        torch.set_num_threads(previous)
    return {name: statistics.median(times) for name, times in samples.items()}
