"""Consistent teaching with every label: does a patient teacher on shared augmented views beat scratch?

Fashion-MNIST with all 54,000 training labels, the demo's teacher (cached after its first training)
and student. Per seed and schedule length, two runs, each with its scratch baseline:

- ``plain``: no augmentation; scratch on labels, KD textbook (the demo's 0.9·kd at T = 4 + 0.1·ce);
- ``consistent``: ``data.augment`` (default: crop 2, flip, mixup 1.0) for both students; scratch on
  the augmented images with mixed labels, KD by function matching (Beyer et al. 2022): kd alone
  at T = 1, the live teacher labelling the very view the student sees.

Reported per schedule: test accuracy (mean ± std over seeds) of the four students and the teacher,
and the gap the consistent student closes between the best scratch student and the teacher
(the issue's bar: at least 50%), with wall time per arm.

    python benchmarks/consistent.py                              # seeds 0 1 2, 5 and 20 epochs
    python benchmarks/consistent.py --seeds 0 --epochs 5         # one point (about 6 min here)
    python benchmarks/consistent.py --augment "{crop: 2, flip: true, cutmix: 1.0}"
    python benchmarks/consistent.py --views 10 --epochs 5 20 60   # the teacher cached on 10 views of each image

With ``--views N`` the teacher runs once, before everything: ``distill cache`` stores its top-10
signals on N views of every training image (views seeded apart from the students, so one cache
serves every seed and schedule; epoch e shows view e mod N), and the consistent students read them
instead of running the teacher. The build time and bytes per view are reported.

Writes JSON (default: benchmarks/results/consistent.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill.cache import CachedTeacher
from distill.pipeline.config import load_config
from distill.pipeline.experiment import cache_teacher, run_experiment

from _common import fmt, machine, summary, write_results

ARMS = {  # run -> overrides beyond the demo's
    "plain": ["data.labeled=null"],
    "consistent": ["data.labeled=null", "distill={terms: [{type: kd, weight: 1.0, temperature: 1.0}]}"],
}
ROLES = {("plain", "scratch"): "scratch", ("plain", "distilled"): "KD textbook",
         ("consistent", "scratch"): "scratch + augmentation", ("consistent", "distilled"): "KD consistent"}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--augment", default="{crop: 2, flip: true, mixup: 1.0}", help="data.augment of the arm")
    parser.add_argument("--views", type=int, default=None, help="cache the teacher on this many views of each image")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="runs to make per seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/consistent.json"))
    args = parser.parse_args()
    console = Console()
    results: dict = {"machine": machine(), "augment": args.augment, "views": args.views, "overrides": args.overrides,
                     "schedules": {}}  # fmt: skip
    with (
        resources.as_file(resources.files("distill") / "configs" / "demo.yaml") as demo,
        tempfile.TemporaryDirectory() as tmp,
    ):
        augment = args.augment
        cached: list[str] = []
        if args.views:
            augment = args.augment.rstrip().rstrip("}") + f", epochs: {args.views}, seed: 0}}"
            config = load_config(
                demo, ["data.labeled=null", f"data.augment={augment}", f"cache.path={tmp}/views", "cache.k=10",
                       *args.overrides],
            )  # fmt: skip
            console.rule(f"the teacher on {args.views} views of every training image")
            started = time.perf_counter()
            path = cache_teacher(config, console=Console(quiet=True))
            seconds = time.perf_counter() - started
            cache = CachedTeacher(path)
            views = cache.manifest["splits"]["views"]["samples"]
            view_bytes = sum(
                (path / "shards" / r["name"] / f).stat().st_size
                for r in cache.manifest["splits"]["views"]["shards"]
                for f in r["files"]
            )
            results["cache"] = {"views_per_image": args.views, "views": views, "seconds": seconds,
                                "bytes_per_view": view_bytes / views, "bytes": view_bytes}  # fmt: skip
            console.print(
                f"cache: {views:,} views in {seconds:.0f} s (with the teacher's training if it was not cached), "
                f"{view_bytes / views:.1f} bytes per view, {view_bytes / 2**20:.1f} MiB"
            )
            cached = [f"teacher={{kind: cache, path: {path}}}"]
        for epochs in args.epochs:
            scores: dict[str, list[float]] = {}
            seconds: dict[str, list[float]] = {}
            closed = []
            for seed in args.seeds:
                row: dict[str, float] = {}
                for arm in args.arms:
                    extra = [f"data.augment={augment}", *cached] if arm == "consistent" else []
                    # a cache replaces the teacher: settings of the teacher model were the cache's to use
                    own = [
                        o for o in args.overrides if not (arm == "consistent" and cached and o.startswith("teacher."))
                    ]
                    config = load_config(
                        demo,
                        [f"seed={seed}", f"train.epochs={epochs}", f"output.dir={tmp}", f"output.name={arm}{seed}-e{epochs}",
                         *ARMS[arm], *extra, *own],
                    )  # fmt: skip
                    console.rule(f"{epochs} epochs, seed {seed}, {arm}")
                    metrics = run_experiment(config, console=Console(quiet=True)).metrics
                    models = metrics["models"]
                    row["teacher"] = 100 * models["teacher"]["test_acc"]
                    for role in ("scratch", "distilled"):
                        name = ROLES[(arm, role)]
                        row[name] = 100 * models[role]["test_acc"]
                        seconds.setdefault(name, []).append(
                            sum(e["seconds"] for e in metrics["training"][role]["history"])
                        )
                    console.print("  ".join(f"{k} {v:.2f}" for k, v in row.items()))
                for name, value in row.items():
                    scores.setdefault(name, []).append(value)
                if {"scratch", "scratch + augmentation", "KD consistent"} <= set(row):
                    best_scratch = max(row["scratch"], row["scratch + augmentation"])
                    closed.append(100 * (row["KD consistent"] - best_scratch) / (row["teacher"] - best_scratch))
            results["schedules"][str(epochs)] = {
                "test_acc": {k: summary(v) for k, v in scores.items()},
                "per_seed": scores,
                "train_seconds": {k: summary(v) for k, v in seconds.items()},
                **({"gap_closed_by_consistent": summary(closed)} if closed else {}),
            }
            table = Table(title=f"Fashion-MNIST, every label, {epochs} epochs, {len(args.seeds)} seed(s)")
            for column in ("model", "test acc (%)", "train s"):
                table.add_column(column, justify="left" if column == "model" else "right")
            for name, values in scores.items():
                table.add_row(name, fmt(values, 1), fmt(seconds[name], 1) if name in seconds else "—")
            console.print(table)
            if closed:
                console.print(
                    f"gap closed by KD consistent (best scratch → teacher): {fmt(closed, 1)} %; per seed "
                    + ", ".join(f"{c:.1f}" for c in closed)
                    + f" (bar: ≥ 50; median {statistics.median(closed):.1f})"
                )
    write_results(args.out, results, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
