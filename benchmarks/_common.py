"""Helpers shared by the benchmark scripts: statistics, step timing and result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from distill.core.distiller import Distiller
from distill.train.loop import make_optimizer


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


def topk_reconstruction(logits: torch.Tensor, ks, dtypes=("float32", "float16", "bfloat16", "int8")) -> list[dict]:
    """Bytes per row of a top-k cache against KL(full distribution ‖ the one rebuilt from the
    cache, the tail spread evenly), for each k and value dtype, at T = 1. Indices count 2 bytes
    (uint16 numbers 65,536 entries), the log-sum-exp and tail mass 4 each."""
    from distill.core.signals import QuantizedValues, TopKLogits

    vocab = logits.shape[-1]
    log_p = logits.log_softmax(-1)
    out = []
    for k in ks:
        full = TopKLogits.from_dense(logits, k)
        for dtype in dtypes:
            encoded = QuantizedValues.encode(full.values, dtype)
            stored = TopKLogits(encoded.decode(), full.indices, full.logsumexp, full.tail, vocab)
            log_q = stored.to_dense().log_softmax(-1)
            kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
            size = encoded.bytes_per_row() + k * 2 + 8
            out.append(
                {"k": k, "dtype": dtype, "bytes_per_token": size, "kl": kl, "tail_mass": float(full.tail.exp().mean())}
            )
    return out


def machine() -> dict:
    """Where the figures were measured, for the results file."""
    return {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def write_results(path: Path, result: dict, console: Console) -> None:
    """Write the results as JSON (creating the folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"[dim]wrote {path}[/]")
