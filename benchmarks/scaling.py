"""Throughput of 1 and 2 processes, and what distillation adds on the distributed path.

The demo's setup (Fashion-MNIST, 54,000 training images, batch 128 global) trains one epoch of
three students through the project's own trainer: plain (cross-entropy only), distilled from
the live teacher and distilled from the teacher cache. It runs once as a single process
(all cores) and once as N processes launched by ``torch.distributed.run`` (DDP over gloo on
CPU, cores split evenly), and reports images per second and the cost relative to plain
training in each mode.

    python benchmarks/scaling.py                   # 1 and 2 processes, 3 timed epochs each
    python benchmarks/scaling.py --processes 1 2 4 --repeats 1

Prints a table and writes JSON (default: benchmarks/results/scaling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distill.cache import CachedTeacher
from distill.core.distiller import Distiller
from distill.core.losses import HardLabelCE
from distill.pipeline.config import load_config
from distill.pipeline.experiment import build_distiller, cache_teacher, default_cache_dir, obtain_teacher, seeded_model
from distill.tasks.image_data import load_data
from distill.train.distributed import parallel_from_environment
from distill.train.loop import pick_device, train

from _common import write_results

SETUPS = ("plain student (ce)", "distilled, live teacher", "distilled, cached teacher")


def demo_config(overrides: list[str]):
    with resources.as_file(resources.files("distill") / "configs" / "demo.yaml") as demo:
        return load_config(demo, overrides)


def worker(args) -> None:
    """One process of a run: time one-epoch trainings of each setup; process 0 writes the result."""
    config = demo_config(args.overrides)
    device = pick_device("cpu")
    parallel = parallel_from_environment(device)
    quiet = Console(quiet=True)
    data = load_data(config.data)
    student_data = data.with_label_budget(config.data.labeled, config.data.split_seed)
    teacher, _, _ = obtain_teacher(config, data, device, quiet, default_cache_dir())
    cache = CachedTeacher(args.cache)
    spec = config.train.model_copy(update={"epochs": 1})
    seconds: dict[str, list[float]] = {name: [] for name in SETUPS}
    for _ in range(args.repeats):
        for name in SETUPS:
            student = seeded_model(config.student, data, config.seed, "student")
            if name.startswith("plain"):
                distiller = Distiller(student, None, {"ce": HardLabelCE()})
            else:
                distiller = build_distiller(config, student, cache if "cached" in name else teacher, data)
            result = train(distiller, student_data, spec, seed=config.seed, device=device, parallel=parallel)
            seconds[name].append(result.history[0].seconds)
    if parallel is None or parallel.is_main:
        world = parallel.world if parallel else 1
        Path(args.out).write_text(
            json.dumps(
                {
                    "processes": world,
                    "threads": torch.get_num_threads(),
                    "samples": len(student_data.train),
                    "seconds": seconds,
                }
            )  # fmt: skip
        )
    if parallel is not None:
        parallel.finish()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per setup")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    console = Console()
    cores = os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        config = demo_config([*args.overrides, f"cache.path={tmp}/cache"])
        obtain_teacher(config, load_data(config.data), "cpu", Console(quiet=True), default_cache_dir())
        cache = cache_teacher(config, console=Console(quiet=True))
        for processes in args.processes:
            out = Path(tmp) / f"p{processes}.json"
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "--cache",
                str(cache),
                "--out",
                str(out),
            ]
            command += [f"--set={item}" for item in args.overrides] + [f"--repeats={args.repeats}"]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes))}
            if processes > 1:
                command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                           "--master-port=29617", *command[1:]]  # fmt: skip
            console.print(f"running {processes} process(es), {env['OMP_NUM_THREADS']} thread(s) each ...")
            subprocess.run(command, env=env, check=True)
            results.append(json.loads(out.read_text()))

    samples = results[0]["samples"]
    table = Table(title=f"one epoch of the demo ({samples:,} images, global batch 128), median of {args.repeats}")
    for column in ("processes × threads", "setup", "epoch (s)", "images / s", "vs 1 process", "vs plain"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    medians = {(r["processes"], name): statistics.median(r["seconds"][name]) for r in results for name in SETUPS}
    for r in results:
        for name in SETUPS:
            median = medians[(r["processes"], name)]
            table.add_row(
                f"{r['processes']} × {r['threads']}", name, f"{median:.2f}", f"{samples / median:,.0f}",
                f"{medians[(results[0]['processes'], name)] / median:.2f}×",
                f"{median / medians[(r['processes'], SETUPS[0])]:.2f}×",
            )  # fmt: skip
    console.print(table)
    console.print("epoch time includes the validation pass (6,000 images) that ends every epoch")
    write_results(args.out, {"runs": results, "cores": cores}, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
