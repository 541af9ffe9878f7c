"""The cost of a cached (top-k) divergence against the plain cross-entropy, forward + backward.

A student distilled from a top-k cache compares its distribution with the teacher's over the
teacher's k tokens plus one bucket for the rest. This times, on random logits, one forward and
backward pass of:

- ``cross-entropy``: ``F.cross_entropy`` (the language-modelling / hard-label loss);
- ``autograd buckets``: forward KL through plain autograd (log-softmax, gather, the tail as a
  log-sum-exp over the other tokens): what a straightforward implementation costs;
- ``distill``: :func:`distill.core.losses.buckets.bucketed_divergence` (hand-written backward).

Two shapes: a language model's batch (8 × 128 positions over SmolLM2's 49,152 tokens, k = 32) and
an image batch (128 rows over 10 classes, k = 5). The setups alternate, the median is reported.

    python benchmarks/buckets.py            # both shapes (about a minute)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from distill.core.losses.buckets import _autograd_buckets, bucketed_divergence, divergence_rows
from distill.core.signals import TopKLogits

from _common import machine, write_results

SHAPES = {
    "language model (1,024 × 49,152, k = 32)": (1024, 49152, 32, 15),
    "image (128 × 10, k = 5)": (128, 10, 5, 2000),
}


def autograd_buckets(student: torch.Tensor, teacher: TopKLogits) -> torch.Tensor:
    """Forward KL over the buckets with the student's side through plain autograd (the path
    distill itself takes for small logits)."""
    log_q = _autograd_buckets(student, teacher.indices, 1.0)
    return divergence_rows(log_q, teacher.bucket_log_probs(), "forward").mean()


def time_shape(rows: int, vocab: int, k: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    student, teacher_logits = 3 * torch.randn(rows, vocab, generator=g), 3 * torch.randn(rows, vocab, generator=g)
    teacher = TopKLogits.from_dense(teacher_logits, k)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    losses = {
        "cross-entropy": lambda s: F.cross_entropy(s, labels),
        "autograd buckets": lambda s: autograd_buckets(s, teacher),
        "distill": lambda s: bucketed_divergence(s, teacher),
    }
    seconds: dict[str, list[float]] = {name: [] for name in losses}
    for repeat in range(repeats + 1):
        for name, loss in losses.items():
            s = student.clone().requires_grad_(True)
            started = time.perf_counter()
            loss(s).backward()
            if repeat:  # the first pass warms up
                seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/buckets.json"))
    args = parser.parse_args()
    console = Console()
    results = {}
    for title, (rows, vocab, k, repeats) in SHAPES.items():
        times = time_shape(rows, vocab, k, repeats)
        table = Table(title=f"{title}, forward + backward, {torch.get_num_threads()} threads")
        for column in ("loss", "time", "÷ cross-entropy"):
            table.add_column(column, justify="left" if column == "loss" else "right")
        for name, value in times.items():
            shown = f"{value * 1e3:.1f} ms" if value > 1e-3 else f"{value * 1e6:.0f} µs"
            table.add_row(name, shown, f"{value / times['cross-entropy']:.2f}×")
        console.print(table)
        results[title] = times
    write_results(args.out, {"machine": machine(), "seconds": results}, console)


if __name__ == "__main__":
    main()
