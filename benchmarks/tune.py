"""Tuned distillation settings against the textbook ones (T=4, alpha=0.9) and scratch, on Fashion-MNIST.

`distill tune` searches temperature, alpha and the learning rate on the validation split of the
demo's experiment (label budget 2,000) on a 12,000-image training subset (as
benchmarks/methods.py, to keep the run near 20 minutes on 2 CPU cores), seed 0, with a small
budget: 12 trials of 3 epochs, median pruning from the first epoch. Then, for
each seed, the demo's student is trained for the demo's 5 epochs with the textbook settings and
with the tuned ones, and from scratch at both learning rates (the scratch student gets the same
steps; a tuned learning rate could help it too). Test accuracy, mean ± std.

    python benchmarks/tune.py                                   # seeds 0, 1, 2 (~20 min on 2 cores)
    python benchmarks/tune.py --set data.limit_train=null       # all 54,000 training images
    python benchmarks/tune.py --set data.labeled=null           # every label (where textbook KD does not help)
    python benchmarks/tune.py --seeds 0 --trials 3 --trial-epochs 1   # a quick look

Prints a table and writes JSON (default: benchmarks/results/tune.json).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill.pipeline.config import ExperimentConfig, load_config
from distill.pipeline.experiment import run_experiment
from distill.workflows.tune import PruneSpec, TuneSpec, apply_settings, describe_settings, run_tune

from _common import fmt, machine, summary, write_results

SUBSET = ["data.limit_train=12000"]
FAST_EVAL = ["eval.latency_batch_sizes=[1]", "eval.latency_repeats=5"]  # latency is not what this measures


def _run(config: ExperimentConfig, name: str, baseline: bool, tmp: str) -> dict:
    config = config.model_copy(deep=True)
    config.output.dir, config.output.name, config.baseline = Path(tmp), name, baseline
    return run_experiment(config, console=Console(quiet=True)).metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--trial-epochs", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune.json"))
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 140)

    rows: dict[str, list[float]] = {"scratch": [], "scratch, tuned lr": [], "KD, textbook": [], "KD, tuned": []}
    with (
        resources.as_file(resources.files("distill") / "configs" / "demo.yaml") as demo,
        tempfile.TemporaryDirectory() as tmp,
    ):
        base = load_config(demo, [f"output.dir={tmp}", *SUBSET, *FAST_EVAL, *args.overrides])
        console.rule(f"distill tune: {args.trials} trials of {args.trial_epochs} epochs, seed {base.seed}")
        # trials are only a few epochs long: a trial may be pruned from its first epoch on
        spec = TuneSpec(trials=args.trials, epochs=args.trial_epochs, seed=0, prune=PruneSpec(warmup_epochs=0))
        tuned = run_tune(base.model_copy(update={"output": base.output.model_copy(update={"name": "tune"})}), spec,
                         console=console)  # fmt: skip
        tune_summary = tuned.summary
        for line in tune_summary["verdict"]:
            console.print(line)
        best = tune_summary["best"]["params"]
        console.print(f"tuned settings: {tune_summary['best']['settings']}; textbook: {describe_settings(base)}")
        same_lr = math.isclose(best.get("lr_scale", 1.0), 1.0)
        for seed in args.seeds:
            console.rule(f"seed {seed}")
            textbook = base.model_copy(update={"seed": seed})
            metrics = _run(textbook, f"textbook-{seed}", True, tmp)
            rows["scratch"].append(metrics["models"]["scratch"]["test_acc"])
            rows["KD, textbook"].append(metrics["models"]["distilled"]["test_acc"])
            metrics = _run(apply_settings(textbook, best), f"tuned-{seed}", not same_lr, tmp)
            rows["KD, tuned"].append(metrics["models"]["distilled"]["test_acc"])
            rows["scratch, tuned lr"].append(
                metrics["models"]["scratch"]["test_acc"] if not same_lr else rows["scratch"][-1]
            )
            console.print(
                "  ".join(f"{name} {100 * values[-1]:.2f}" for name, values in rows.items()) + f"  (seed {seed})"
            )

    reference = rows["scratch"]
    data = tune_summary["data"]
    table = Table(
        title=f"Fashion-MNIST ({data['train']:,} training images, {data['train_labeled']:,} labeled), demo student, "
        f"test accuracy (%), {len(args.seeds)} seeds, mean ± std"
    )
    for column in ("student", "settings", "test acc", "Δ vs scratch", "per seed"):
        table.add_column(column, justify="left" if column in ("student", "settings") else "right")
    settings = {
        "scratch": f"lr={base.train.lr:g}",
        "scratch, tuned lr": f"lr={base.train.lr * best.get('lr_scale', 1.0):.3g}",
        "KD, textbook": describe_settings(base),
        "KD, tuned": tune_summary["best"]["settings"],
    }
    for name, values in rows.items():
        gain = [v - r for v, r in zip(values, reference, strict=True)]
        table.add_row(
            name,
            settings[name],
            fmt(values),
            "—" if name == "scratch" else fmt(gain),
            " / ".join(f"{100 * v:.2f}" for v in values),
        )
    console.print(table)
    tuned_vs_textbook = [t - b for t, b in zip(rows["KD, tuned"], rows["KD, textbook"], strict=True)]
    console.print(f"tuned − textbook KD: {fmt(tuned_vs_textbook)} points on test")
    val = tune_summary
    console.print(
        f"on validation (seed {base.seed}, {args.trial_epochs} epochs): tuned {100 * val['best']['val_score']:.2f}, "
        f"textbook {100 * (val['config_settings']['val_score'] or float('nan')):.2f}, scratch {100 * val['scratch_val_score']:.2f}; "
        f"{val['states']['complete']} trials complete, {val['states']['pruned']} pruned, {val['states']['failed']} failed; "
        f"{val['seconds']:.0f} s"
    )

    result = {
        "benchmark": "tune",
        "seeds": args.seeds,
        "trials": args.trials,
        "trial_epochs": args.trial_epochs,
        "overrides": [*SUBSET, *FAST_EVAL, *args.overrides],
        "machine": machine(),
        "tuned_settings": best,
        "test_acc": {name: summary(values) for name, values in rows.items()},
        "tuned_minus_textbook": summary(tuned_vs_textbook),
        "tune": tune_summary,
    }
    write_results(args.out, result, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
