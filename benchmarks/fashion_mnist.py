"""Fashion-MNIST: teacher, scratch student and distilled student over several seeds.

Runs the demo's experiment (``distill demo``'s config) once per seed and reports test
accuracy as mean ± std, plus the cost of a distillation step relative to a plain student
training step, both measured in this process on the same batches.

    python benchmarks/fashion_mnist.py                 # 3 seeds, full demo settings
    python benchmarks/fashion_mnist.py --seeds 0 --set train.epochs=1   # a quick look

Prints a table and writes JSON (default: benchmarks/results/fashion_mnist.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distill.config import load_config
from distill.data import load_data
from distill.distiller import Distiller
from distill.experiment import build_distiller, default_cache_dir, obtain_teacher, run_experiment, seeded_model
from distill.losses import HardLabelCE
from distill.trainer import make_optimizer


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 100.0) -> str:
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.2f} ± {std:.2f}"


def step_times(config, data, teacher, steps: int, repeats: int) -> dict[str, float]:
    """Median ms of one optimisation step: plain student (ce) vs distillation (the config's terms)."""
    batch_size = config.train.batch_size
    batches = [
        (data.train.x[i * batch_size : (i + 1) * batch_size], data.train.y[i * batch_size : (i + 1) * batch_size])
        for i in range(steps)
    ]
    setups = {
        "plain": Distiller(seeded_model(config.student, data, 0, "student"), None, {"ce": HardLabelCE()}),
        "distill": build_distiller(config, seeded_model(config.student, data, 0, "student"), teacher),
    }
    optimizers = {name: make_optimizer(d.trainable_parameters(), config.train) for name, d in setups.items()}
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):  # alternate so that machine noise hits both alike
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fashion_mnist.json"))
    args = parser.parse_args()
    console = Console()

    runs = []
    with (
        resources.as_file(resources.files("distill") / "configs" / "demo.yaml") as demo,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for seed in args.seeds:
            config = load_config(
                demo, [f"seed={seed}", f"output.dir={tmp}", f"output.name=seed{seed}", *args.overrides]
            )
            console.rule(f"seed {seed}")
            runs.append(run_experiment(config, console=Console(quiet=True)).metrics)
            m = runs[-1]["models"]
            console.print(
                f"seed {seed}: teacher {100 * m['teacher']['test_acc']:.2f}  scratch {100 * m['scratch']['test_acc']:.2f}  "
                f"distilled {100 * m['distilled']['test_acc']:.2f}"
            )
        data = load_data(config.data)
        teacher, _, _ = obtain_teacher(config, data, "cpu", Console(quiet=True), default_cache_dir())
        timing = step_times(config, data, teacher.to("cpu"), steps=20, repeats=7)

    acc = {role: [r["models"][role]["test_acc"] for r in runs] for role in ("teacher", "scratch", "distilled")}
    gap = [r["models"]["distilled"]["gap_closed"] for r in runs]
    gain = [d - s for d, s in zip(acc["distilled"], acc["scratch"], strict=True)]
    first = runs[0]["models"]
    table = Table(title=f"Fashion-MNIST test accuracy (%), {len(runs)} seeds, mean ± std")
    for column in ("model", "test acc", "params", "ms @1", "ms @256"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for role in ("teacher", "scratch", "distilled"):
        lat = [r["models"][role]["latency_ms"] for r in runs]
        table.add_row(
            role,
            fmt(acc[role]),
            f"{first[role]['params']:,}",
            f"{statistics.median(ms['1'] for ms in lat):.2f}",
            f"{statistics.median(ms['256'] for ms in lat):.2f}",
        )
    console.print(table)
    console.print(f"distilled − scratch: {fmt(gain)} points; gap closed {fmt(gap)} %")
    ratio = timing["distill"] / timing["plain"]
    console.print(
        f"step time (batch {config.train.batch_size}, CPU, {torch.get_num_threads()} threads): plain {timing['plain']:.2f} ms, "
        f"distillation {timing['distill']:.2f} ms, ratio {ratio:.2f}×"
    )

    result = {
        "benchmark": "fashion_mnist",
        "seeds": args.seeds,
        "overrides": args.overrides,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "test_acc": {role: {"values": v, "mean": mean_std(v)[0], "std": mean_std(v)[1]} for role, v in acc.items()},
        "distilled_minus_scratch": {"values": gain, "mean": mean_std(gain)[0], "std": mean_std(gain)[1]},
        "gap_closed": {"values": gap, "mean": mean_std(gap)[0], "std": mean_std(gap)[1]},
        "params": {role: first[role]["params"] for role in acc},
        "latency_ms": {role: first[role]["latency_ms"] for role in acc},
        "step_ms": timing,
        "distill_step_over_plain_step": ratio,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"[dim]wrote {args.out}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
