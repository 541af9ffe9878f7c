"""What a remembered teacher saves: its whole test pass against the 32 probe samples that check it.

Why: `distill run` keeps a teacher's test predictions between runs (``distill.pipeline.predictions``)
and, on the next run with the same weights and test split, predicts only the probe samples to
check them. This times both for the demos' teachers, which are trained (or read from distill's
teacher cache) first: the image demo's CNN on Fashion-MNIST's 10,000 test images and, when the
``text`` extra is installed, the text demo's fine-tuned MiniLM on BBC News' 445 test articles.

    python benchmarks/remembered.py                # both demos (the text teacher: ~3 min to train once)
    python benchmarks/remembered.py --demos image

Prints a table and writes JSON (default: benchmarks/results/remembered.json).
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distill.core.fold import folded_batch_norms
from distill.core.io import default_cache_dir
from distill.pipeline.config import load_config
from distill.pipeline.experiment import obtain_teacher
from distill.pipeline.predictions import probe_index
from distill.tasks import get_task

from _common import machine, write_results

DEMOS = {"image": "demo.yaml", "text": "demo_text.yaml"}


def seconds(task, model, split, repeats: int) -> float:
    """Median wall-clock seconds of the task's predictions of ``model`` on ``split``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        task.predict(model, split.x, labels=split.y)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demos", nargs="+", choices=list(DEMOS), default=list(DEMOS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/remembered.json"))
    args = parser.parse_args()
    console = Console()
    table = Table(title=f"The teacher's test predictions, {torch.get_num_threads()} CPU threads (median seconds)")
    for column in ("demo", "test samples", "whole pass (s)", "32 probes (s)", "saved (s)"):
        table.add_column(column, justify="left" if column == "demo" else "right")
    results: dict = {"machine": machine(), "demos": {}}
    for demo in args.demos:
        if demo == "text" and find_spec("transformers") is None:
            console.print("[yellow]skipping the text demo[/]: install the text extra (make setup)")
            continue
        with resources.as_file(resources.files("distill") / "configs" / DEMOS[demo]) as path:
            config = load_config(path, [])
        task = get_task(config.task)
        data = task.load_data(config.data)
        teacher, _, _ = obtain_teacher(config, data, torch.device("cpu"), console, default_cache_dir())
        teacher = folded_batch_norms(teacher, task.example_inputs(data))  # as the run's evaluation predicts
        test = data.test
        probes = test.subset(probe_index(len(test)))
        whole, probed = (seconds(task, teacher, split, args.repeats) for split in (test, probes))
        results["demos"][demo] = {"test_samples": len(test), "whole_seconds": whole, "probe_seconds": probed}
        table.add_row(demo, f"{len(test):,}", f"{whole:.2f}", f"{probed:.2f}", f"{whole - probed:.2f}")
    console.print(table)
    write_results(args.out, results, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
