"""Helpers shared by the benchmark scripts: statistics and step timing."""

from __future__ import annotations

import statistics
import time

from distill.distiller import Distiller
from distill.trainer import make_optimizer


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 100.0) -> str:
    """``mean ± std`` of ``values`` times ``scale`` (percentages by default)."""
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.2f} ± {std:.2f}"


def summary(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"values": values, "mean": mean, "std": std}


def step_times(setups: dict[str, Distiller], data, train_spec, steps: int = 20, repeats: int = 7) -> dict[str, float]:
    """Median milliseconds of one optimisation step (forward, backward, update) of each setup,
    on the same batches, alternating setups so that machine noise hits all alike."""
    size = train_spec.batch_size
    batches = [(data.train.x[i * size : (i + 1) * size], data.train.y[i * size : (i + 1) * size]) for i in range(steps)]
    optimizers = {}
    for name, distiller in setups.items():
        distiller.prepare(batches[0][0])
        optimizers[name] = make_optimizer(distiller.trainable_parameters(), train_spec)
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, distiller in setups.items():
            distiller.train()
            start = time.perf_counter()
            for x, y in batches:
                out = distiller(x, labels=y)
                optimizers[name].zero_grad(set_to_none=True)
                out.loss.backward()
                optimizers[name].step()
            samples[name].append((time.perf_counter() - start) * 1000 / steps)
    return {name: statistics.median(times) for name, times in samples.items()}
