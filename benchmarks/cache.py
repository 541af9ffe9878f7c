"""The offline teacher cache: step cost, accuracy against k, and bytes per sample / token.

Four parts, all measured in this process:

1. ``timing``: one epoch of the demo's distilled student with the live teacher, from a cache
   of every class's logit (top-10 of 10), from a top-5 cache (the sparse path with a tail
   bucket), and a plain (cross-entropy only) student epoch, on the same batches, interleaved
   in blocks so that machine noise hits all alike. The target: a cached step within 10% of a
   plain one.
2. ``accuracy``: the demo (Fashion-MNIST, 2,000 labels) distilled from caches of the
   top-k = 1, 2, 5, 10 float16 logits and from the live (dense) teacher, over seeds.
3. ``lm``: a 49,152-entry vocabulary with synthetic LM-like logits (Zipf-shaped, varying
   sharpness): bytes per token against KL(full teacher ‖ reconstruction from the cache)
   for several k and value dtypes.
4. ``batch``: the teacher pass that ``distill cache`` makes, in images per second against its
   batch size (the demo's teacher on 20,000 training images, batch sizes interleaved, median of
   3 passes), to choose ``cache.batch_size``'s default.

    python benchmarks/cache.py                     # everything, 3 seeds
    python benchmarks/cache.py --parts timing lm   # the quick parts only
    python benchmarks/cache.py --parts batch       # the cache writer's batch size (a minute)

Prints tables and writes JSON (default: benchmarks/results/cache.json).
"""

from __future__ import annotations

import argparse
import math
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

from distill.cache import CachedTeacher
from distill.core.data import iterate_batches
from distill.core.distiller import Distiller
from distill.core.losses import HardLabelCE
from distill.pipeline.config import load_config, parse_config
from distill.pipeline.experiment import (
    build_distiller,
    cache_teacher,
    default_cache_dir,
    obtain_teacher,
    run_experiment,
    seeded_model,
)
from distill.tasks.image_data import load_data
from distill.train.loop import epoch_generator, make_optimizer

from _common import fmt, summary, topk_reconstruction, write_results

KS = [1, 2, 5, 10]


def demo_config(overrides: list[str]):
    with resources.as_file(resources.files("distill") / "configs" / "demo.yaml") as demo:
        return load_config(demo, overrides)


def timing(console: Console, tmp: Path, overrides: list[str], repeats: int, block: int = 20) -> dict:
    config = demo_config([f"output.dir={tmp}", "output.name=timing", *overrides])
    data = load_data(config.data)
    student_data = data.with_label_budget(config.data.labeled, config.data.split_seed)
    teacher, _, _ = obtain_teacher(config, data, "cpu", Console(quiet=True), default_cache_dir())
    caches = {
        k: CachedTeacher(
            cache_teacher(
                demo_config([*overrides, f"cache.k={k}", f"cache.path={tmp}/timing-k{k}"]), console=Console(quiet=True)
            )
        )
        for k in (10, 5)
    }
    setups = {
        "plain student (ce)": Distiller(seeded_model(config.student, data, 0, "student"), None, {"ce": HardLabelCE()}),
        "distilled, cached top-10 (every class)": build_distiller(
            config, seeded_model(config.student, data, 0, "student"), caches[10], data
        ),
        "distilled, cached top-5 (+ tail bucket)": build_distiller(
            config, seeded_model(config.student, data, 0, "student"), caches[5], data
        ),
        "distilled, live teacher": build_distiller(
            config, seeded_model(config.student, data, 0, "student"), teacher, data
        ),
    }
    optimizers = {name: make_optimizer(d.trainable_parameters(), config.train) for name, d in setups.items()}
    seconds: dict[str, list[float]] = {name: [] for name in setups}
    steps = math.ceil(len(student_data.train) / config.train.batch_size)

    def train_on(name: str, batches: list) -> float:
        distiller, optimizer = setups[name], optimizers[name]
        distiller.train()
        start = time.perf_counter()
        for x, y, index in batches:
            out = distiller(x, labels=y, index=index)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    warm = list(iterate_batches(student_data.train, config.train.batch_size, epoch_generator(0, -1)))[:30]
    for name in setups:  # untimed warm-up: allocator, caches, page cache of the shards
        train_on(name, warm)
    names = list(setups)
    for repeat in range(repeats):
        # every setup trains on the same epoch of batches, interleaved in blocks of `block` steps in
        # a rotating order, so that the machine's drift hits all setups alike; an epoch's time is
        # the sum of its blocks
        batches = list(iterate_batches(student_data.train, config.train.batch_size, epoch_generator(0, repeat)))
        epoch = dict.fromkeys(names, 0.0)
        for b, first in enumerate(range(0, len(batches), block)):
            for name in names[b % len(names) :] + names[: b % len(names)]:
                epoch[name] += train_on(name, batches[first : first + block])
        for name in names:
            seconds[name].append(epoch[name])
    plain = statistics.median(seconds["plain student (ce)"])
    table = Table(
        title=f"one epoch of {steps} steps at batch {config.train.batch_size} (median of {repeats}; "
        f"setups interleaved every {block} steps)"
    )
    for column in ("setup", "epoch (s)", "ms / step", "vs plain", "bytes / sample"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    result = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        k = 10 if "top-10" in name else 5 if "top-5" in name else None
        size = caches[k].bytes_per_row() if k else None
        table.add_row(
            name, f"{median:.2f}", f"{1000 * median / steps:.2f}", f"{median / plain:.3f}×", f"{size:.0f}" if k else ""
        )
        result[name] = {"seconds": values, "median": median, "ratio_to_plain": median / plain, "bytes_per_sample": size}
    console.print(table)
    result["steps"] = steps
    return result


def accuracy(console: Console, tmp: Path, overrides: list[str], seeds: list[int]) -> dict:
    quiet = Console(quiet=True)
    results: dict[str, list[float]] = {"scratch": [], "dense (live teacher)": [], **{f"k={k}": [] for k in KS}}
    teacher_acc, sizes = [], {}
    cached_teacher: dict[str, list[float]] = {f"k={k}": [] for k in KS}
    for seed in seeds:
        base = [f"seed={seed}", f"output.dir={tmp}", *overrides]
        live = run_experiment(demo_config([*base, f"output.name=live{seed}"]), console=quiet).metrics["models"]
        results["scratch"].append(live["scratch"]["test_acc"])
        results["dense (live teacher)"].append(live["distilled"]["test_acc"])
        teacher_acc.append(live["teacher"]["test_acc"])
        for k in KS:
            cache_cfg = demo_config([*base, f"cache.k={k}", f"cache.path={tmp}/cache-s{seed}-k{k}"])
            path = cache_teacher(cache_cfg, console=quiet)
            sizes[k] = CachedTeacher(path).bytes_per_row()
            run = demo_config([*base, f"output.name=k{k}s{seed}", "baseline=false"])
            run = parse_config(
                {**run.model_dump(mode="json"), "teacher": {"kind": "cache", "path": str(path)}}, "benchmark"
            )
            metrics = run_experiment(run, console=quiet).metrics["models"]
            results[f"k={k}"].append(metrics["distilled"]["test_acc"])
            # the teacher's own accuracy read back from the cache: float16 rounding can flip near-ties
            cached_teacher[f"k={k}"].append(metrics["teacher"]["test_acc"])
        console.print(
            f"seed {seed}: teacher {100 * teacher_acc[-1]:.2f}  "
            + "  ".join(f"{name} {100 * values[-1]:.2f}" for name, values in results.items())
        )
    table = Table(title=f"Fashion-MNIST demo (2,000 labels), test accuracy (%), {len(seeds)} seed(s)")
    for column in ("student", "test accuracy", "cache bytes / sample", "teacher read from the cache"):
        table.add_column(column, justify="left" if column == "student" else "right")
    table.add_row("teacher (live)", fmt(teacher_acc), "", "")
    for name, values in results.items():
        k = int(name[2:]) if name.startswith("k=") else None
        table.add_row(name, fmt(values), f"{sizes[k]:.1f}" if k else "", fmt(cached_teacher[name]) if k else "")
    console.print(table)
    return {
        "teacher": summary(teacher_acc),
        **{name: summary(values) for name, values in results.items()},
        "bytes_per_sample": sizes,
        "teacher_from_cache": {name: summary(values) for name, values in cached_teacher.items()},
    }


def lm_logits(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Synthetic next-token logits with a real LM's shape: a Zipf-like ranking over a
    row-specific permutation of the vocabulary, row-varying sharpness and Gaussian noise."""
    rank_logit = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    logits = torch.empty(rows, vocab)
    for i in range(rows):
        sharpness = 1.1 + 1.4 * torch.rand((), generator=generator)
        permutation = torch.randperm(vocab, generator=generator)
        logits[i, permutation] = sharpness * rank_logit
    return logits + 0.3 * torch.randn(rows, vocab, generator=generator)


def lm(console: Console, rows: int, vocab: int = 49152) -> dict:
    generator = torch.Generator().manual_seed(0)
    logits = lm_logits(rows, vocab, generator)
    log_p = logits.log_softmax(-1)
    entropy = float(-(log_p.exp() * log_p).sum(-1).mean())
    top1 = float(log_p.max(-1).values.exp().mean())
    console.print(
        f"{vocab:,}-entry vocabulary, {rows} synthetic LM rows: mean entropy {entropy:.2f} nats, mean top-1 p {top1:.2f}"
    )
    table = Table(title="bytes per token against KL(full teacher ‖ reconstruction from the cache), T = 1")
    for column in ("k", "values", "bytes / token", "KL(teacher ‖ cache) nats/token", "of which rounding", "tail mass"):
        table.add_column(column, justify="right")
    out = topk_reconstruction(logits, (1, 8, 16, 32, 64, 128))
    exact = {}
    for row in out:
        exact.setdefault(row["k"], row["kl"])  # float32 first: the cost of top-k alone
        table.add_row(
            str(row["k"]), row["dtype"], str(row["bytes_per_token"]), f"{row['kl']:.4f}",
            f"{row['kl'] - exact[row['k']]:+.1e}", f"{row['tail_mass']:.3f}",
        )  # fmt: skip
    console.print(table)
    return {"vocab": vocab, "rows": rows, "entropy": entropy, "top1": top1, "results": out}


def batch_sizes(console: Console, overrides: list[str], sizes=(64, 128, 256, 512, 1024), images: int = 20_000) -> dict:
    """Images per second of the cache writer's teacher pass at each batch size."""
    from distill.cache.writer import _teacher_rows

    config = demo_config(overrides)
    data = load_data(config.data)
    teacher = seeded_model(config.teacher.model, data, 0, "teacher").eval()
    x = data.train.x[:images]
    rates: dict[int, list[float]] = {b: [] for b in sizes}
    for repeat in range(3):
        for b in sizes[repeat % len(sizes) :] + sizes[: repeat % len(sizes)]:  # rotating order
            started = time.perf_counter()
            for i in range(0, len(x), b):
                _teacher_rows(teacher, None, x[i : i + b], 10, torch.device("cpu"))
            rates[b].append(len(x) / (time.perf_counter() - started))
    table = Table(title=f"cache writer: teacher pass over {images:,} images ({torch.get_num_threads()} threads)")
    for column in ("batch size", "images / s (median of 3)", "min–max"):
        table.add_column(column, justify="right")
    for b, r in rates.items():
        table.add_row(str(b), f"{statistics.median(r):,.0f}", f"{min(r):,.0f}–{max(r):,.0f}")
    console.print(table)
    return {str(b): {"median": statistics.median(r), "all": r} for b, r in rates.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", nargs="+", choices=["timing", "accuracy", "lm", "batch"], default=["timing", "accuracy", "lm"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per setup")
    parser.add_argument("--lm-rows", type=int, default=512)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cache.json"))
    args = parser.parse_args()
    console = Console()
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "timing" in args.parts:
            results["timing"] = timing(console, Path(tmp), args.overrides, args.repeats)
        if "lm" in args.parts:
            results["lm"] = lm(console, args.lm_rows)
        if "batch" in args.parts:
            results["batch"] = batch_sizes(console, args.overrides)
        if "accuracy" in args.parts:
            results["accuracy"] = accuracy(console, Path(tmp), args.overrides, args.seeds)
    write_results(args.out, results, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
