"""Teacher-assistant chains across a large capacity gap on Fashion-MNIST.

The demo's teacher (CNN, 110,698 parameters) is distilled into a CNN student 65.7× smaller
(channels [4, 8], hidden 16: 1,686 parameters) three ways: directly, through one assistant and
through two (sized automatically: parameter counts geometrically spaced between teacher and
student). Every arm gives the final student the same training (the demo's 5 epochs, same
initial weights and data order); assistants train 5 epochs each on top of that. Settings
follow the demo (label budget 2,000) on a 12,000-image training subset (as benchmarks/methods.py)
to keep the run near half an hour on 2 CPU cores. Test accuracy, mean ± std over the seeds.

    python benchmarks/capacity.py                          # seeds 0, 1, 2 (~30 min on 2 cores)
    python benchmarks/capacity.py --set data.limit_train=null   # all 54,000 training images (~3 h)
    python benchmarks/capacity.py --seeds 0 --set train.epochs=1   # a quick look

Prints a table and writes JSON (default: benchmarks/results/capacity.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill.pipeline.config import load_config
from distill.workflows.chain import ChainSpec, run_chain

from _common import fmt, machine, summary, write_results

SUBSET = ["data.limit_train=12000"]
STUDENT = ["student.arch=cnn", "student.channels=[4,8]", "student.hidden=16", "student.pool=3"]
FAST_EVAL = ["eval.latency_batch_sizes=[1]", "eval.latency_repeats=5"]  # latency is not what this measures
ARMS = ("scratch", "direct KD", "1 assistant", "2 assistants")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/capacity.json"))
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 140)

    test: dict[str, list[float]] = {arm: [] for arm in ARMS}
    val: dict[str, list[float]] = {arm: [] for arm in ARMS}
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    chains: list[dict] = []
    with (
        resources.as_file(resources.files("distill") / "configs" / "demo.yaml") as demo,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for seed in args.seeds:
            for count in (1, 2):
                config = load_config(
                    demo,
                    [
                        f"seed={seed}",
                        f"output.dir={tmp}",
                        f"output.name=seed{seed}-{count}",
                        *SUBSET,
                        *STUDENT,
                        *FAST_EVAL,
                    ]
                    + (["baseline=false"] if count > 1 else [])  # the first chain's direct run has the scratch student
                    + args.overrides,
                )
                console.rule(f"seed {seed}: chain with {count} assistant(s)" + (" and direct KD" if count == 1 else ""))
                started = time.perf_counter()
                result = run_chain(config, ChainSpec(assistants=count, direct=count == 1), console=Console(quiet=True))
                s = result.summary
                chains.append({"seed": seed, "assistants": count, "summary": s})
                arm = f"{count} assistant{'s' if count > 1 else ''}"
                student = s["stages"][-1]
                test[arm].append(student["score"])
                val[arm].append(student["val_score"])
                seconds[arm].append(sum(stage["seconds"] for stage in s["stages"]))
                for entry in s["baselines"]:
                    name = "direct KD" if entry["role"] == "student, direct KD" else "scratch"
                    test[name].append(entry["score"])
                    val[name].append(entry["val_score"])
                    seconds[name].append(entry["seconds"])
                sizes = " → ".join(f"{e['model']} ({e['params']:,})" for e in [s["teacher"], *s["stages"]])
                console.print(f"{sizes}: {time.perf_counter() - started:.0f} s")
                for e in [*s["stages"], *s["baselines"]]:
                    console.print(f"  {e['role']:<24} val {100 * e['val_score']:.2f}  test {100 * e['score']:.2f}")

    first = {c["assistants"]: c["summary"] for c in chains if c["seed"] == args.seeds[0]}
    assistants = {
        "direct KD": "—",
        "scratch": "—",
        "1 assistant": ", ".join(f"{e['params']:,}" for e in first[1]["stages"][:-1]),
        "2 assistants": ", ".join(f"{e['params']:,}" for e in first[2]["stages"][:-1]),
    }
    student = first[1]["stages"][-1]
    teacher = first[1]["teacher"]
    table = Table(
        title=f"Fashion-MNIST ({first[1]['data']['train']:,} training images, {first[1]['data']['train_labeled']:,} "
        f"labeled), teacher {teacher['params']:,} → student {student['params']:,} parameters "
        f"({teacher['params'] / student['params']:.1f}× smaller), {len(args.seeds)} seeds, mean ± std"
    )
    for column in ("arm", "assistant params", "student val acc", "student test acc", "Δ test vs direct", "train s"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    gains = {}
    for arm in ARMS:
        gains[arm] = [a - d for a, d in zip(test[arm], test["direct KD"], strict=True)]
        table.add_row(
            arm,
            assistants[arm],
            fmt(val[arm]),
            fmt(test[arm]),
            "—" if arm == "direct KD" else fmt(gains[arm]),
            f"{sum(seconds[arm]) / len(seconds[arm]):.0f}",
        )
    console.print(table)
    for arm in ARMS:
        console.print(f"{arm:<13} per seed (test): " + " / ".join(f"{100 * v:.2f}" for v in test[arm]))
    wins = {arm: sum(g > 0 for g in gains[arm]) for arm in ("1 assistant", "2 assistants")}
    console.print(
        "chain vs direct KD, seeds won on test: "
        + ", ".join(f"{arm} {wins[arm]}/{len(args.seeds)}" for arm in wins)
        + "; train s = seconds of training for the arm's distillations (all stages), scratch its own"
    )

    result = {
        "benchmark": "capacity",
        "seeds": args.seeds,
        "overrides": [*SUBSET, *STUDENT, *FAST_EVAL, *args.overrides],
        "machine": machine(),
        "test_acc": {arm: summary(v) for arm, v in test.items()},
        "val_acc": {arm: summary(v) for arm, v in val.items()},
        "minus_direct": {arm: summary(v) for arm, v in gains.items() if arm != "direct KD"},
        "train_seconds": {arm: summary(v) for arm, v in seconds.items()},
        "chains": chains,
    }
    write_results(args.out, result, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
