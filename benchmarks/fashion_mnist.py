"""Fashion-MNIST: teacher, scratch student and distilled student over several seeds.

Runs the demo's experiment (``distill demo``'s config) once per seed and reports test
accuracy as mean ± std, plus the cost of a distillation step relative to a plain student
training step, both measured in this process on the same batches.

    python benchmarks/fashion_mnist.py                 # 3 seeds, full demo settings
    python benchmarks/fashion_mnist.py --seeds 0 --set train.epochs=1   # a quick look
    python benchmarks/fashion_mnist.py --quick         # `distill demo --quick` over 3 seeds (no step timing)

Prints a table and writes JSON (default: benchmarks/results/fashion_mnist.json).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distill.cli import DEMO_QUICK_OVERRIDES
from distill.core.distiller import Distiller
from distill.core.losses import HardLabelCE
from distill.pipeline.config import load_config
from distill.pipeline.experiment import build_distiller, default_cache_dir, obtain_teacher, run_experiment, seeded_model
from distill.tasks.image_data import load_data

from _common import fmt, step_times, summary, write_results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="the settings of `distill demo --quick`")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/fashion_mnist[_quick].json")
    args = parser.parse_args()
    args.out = args.out or Path(f"benchmarks/results/fashion_mnist{'_quick' if args.quick else ''}.json")
    overrides = (DEMO_QUICK_OVERRIDES if args.quick else []) + args.overrides
    console = Console()

    runs = []
    with (
        resources.as_file(resources.files("distill") / "configs" / "demo.yaml") as demo,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for seed in args.seeds:
            config = load_config(demo, [f"seed={seed}", f"output.dir={tmp}", f"output.name=seed{seed}", *overrides])
            console.rule(f"seed {seed}")
            runs.append(run_experiment(config, console=Console(quiet=True)).metrics)
            m = runs[-1]["models"]
            console.print(
                f"seed {seed}: teacher {100 * m['teacher']['test_acc']:.2f}  scratch {100 * m['scratch']['test_acc']:.2f}  "
                f"distilled {100 * m['distilled']['test_acc']:.2f}  ({runs[-1]['seconds']:.0f} s, teacher "
                f"{'reused' if runs[-1]['training']['teacher'] is None else 'trained'})"
            )
        if args.quick:
            timing = None
            return report(args, runs, config, timing, console)
        data = load_data(config.data)
        teacher, _, _ = obtain_teacher(config, data, "cpu", Console(quiet=True), default_cache_dir())
        student_data = data.with_label_budget(config.data.labeled, config.data.split_seed)
        setups = {
            "plain": Distiller(seeded_model(config.student, data, 0, "student"), None, {"ce": HardLabelCE()}),
            "distill": build_distiller(config, seeded_model(config.student, data, 0, "student"), teacher, data),
        }
        timing = step_times(setups, student_data, config.train)
    return report(args, runs, config, timing, console)


def report(args, runs: list[dict], config, timing: dict | None, console: Console) -> int:
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
    ahead = sum(g > 0 for g in gain)
    console.print(
        f"distilled ahead of scratch on {ahead} of {len(gain)} seeds: " + ", ".join(f"{100 * g:+.2f}" for g in gain)
    )
    ratio = timing["distill"] / timing["plain"] if timing else None
    if timing:
        console.print(
            f"step time (batch {config.train.batch_size}, CPU, {torch.get_num_threads()} threads): plain "
            f"{timing['plain']:.2f} ms, distillation {timing['distill']:.2f} ms, ratio {ratio:.2f}×"
        )

    result = {
        "benchmark": "fashion_mnist",
        "seeds": args.seeds,
        "quick": args.quick,
        "overrides": args.overrides,
        "seconds": [r["seconds"] for r in runs],
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "test_acc": {role: summary(v) for role, v in acc.items()},
        "distilled_minus_scratch": summary(gain),
        "gap_closed": summary(gap),
        "params": {role: first[role]["params"] for role in acc},
        "latency_ms": {role: first[role]["latency_ms"] for role in acc},
        "step_ms": timing,
        "distill_step_over_plain_step": ratio,
        "runs": runs,
    }
    write_results(args.out, result, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
