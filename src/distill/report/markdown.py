"""What a run tells the user: the comparison table (console and markdown), metrics.json and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from distill.core.io import write_text
from distill.core.memory import format_bytes

ROLES = ("teacher", "random", "scratch", "distilled")
ROLE_TITLES = {
    "teacher": "teacher",
    "random": "random-init student",
    "scratch": "scratch student",
    "distilled": "distilled student",
}


def format_percent(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{fmt}}{suffix}"


format_size = format_bytes  # sizes in B / KiB / MiB / GiB, one formatter for the whole package


def primary_metric(metrics: dict[str, Any]) -> dict[str, Any]:
    """The task's primary metric: ``name``, ``higher_is_better`` and ``percent`` (a fraction shown as
    a percentage). Runs written before tasks existed scored accuracy."""
    found = metrics.get("primary_metric") or {}
    return {"name": "accuracy", "higher_is_better": True, "percent": True} | found


def score(model: dict[str, Any]) -> float | None:
    """A model's test score on the primary metric (``test_acc`` in runs written before tasks existed)."""
    return model.get("score", model.get("test_acc"))


def val_score(trained: dict[str, Any]) -> float:
    """A training result's best validation score on the primary metric (``best_val_acc`` before tasks)."""
    value = trained.get("best_val_score")
    return trained["best_val_acc"] if value is None else value


def score_label(metrics: dict[str, Any]) -> str:
    """The primary metric's short column name: ``acc`` for accuracy, else its name."""
    name = primary_metric(metrics)["name"]
    return "acc" if name == "accuracy" else name.replace("_", " ")


def format_score(value: float | None, metrics: dict[str, Any]) -> str:
    return format_percent(value) if primary_metric(metrics)["percent"] else _num(value, ".4f")


def score_gain(better: float, worse: float, metrics: dict[str, Any]) -> float:
    """How far ``better`` is ahead of ``worse`` in the metric's direction: in points for percentages."""
    info = primary_metric(metrics)
    gain = (better - worse) * (1 if info["higher_is_better"] else -1)
    return 100 * gain if info["percent"] else gain


def gain_text(gain: float, metrics: dict[str, Any]) -> str:
    info = primary_metric(metrics)
    if info["percent"]:
        return f"{gain:.2f} points"
    return f"{gain:.4f} in {info['name'].replace('_', ' ')} ({'higher' if info['higher_is_better'] else 'lower'} is better)"


def table_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table, shared by the console and report.md."""
    batch_sizes = metrics["latency_batch_sizes"]
    embeddings = any("embedding_params" in m for m in metrics["models"].values())
    params = "params (without embeddings)" if embeddings else "params"
    header = ["model", f"test {score_label(metrics)}", "agreement", "retention", "gap closed", params, "size"]
    header += [f"ms @{b}" for b in batch_sizes] + [f"speed-up @{b}" for b in batch_sizes]
    rows = []
    for role in ROLES:
        m = metrics["models"].get(role)
        if m is None:
            continue
        row = [
            ROLE_TITLES[role],
            format_score(score(m), metrics),
            format_percent(m.get("agreement")),
            format_percent(m.get("retention")),
            format_percent(m.get("gap_closed")),
            f"{m['params']:,}" + (f" ({m['params'] - m['embedding_params']:,})" if "embedding_params" in m else ""),
            format_size(m["size_bytes"]),
        ]
        row += [_num(m["latency_ms"].get(str(b)), ".2f") for b in batch_sizes]
        row += [_num(m["speedup"].get(str(b)), ".1f", "×") for b in batch_sizes]
        rows.append(row)
    return header, rows


def console_table(metrics: dict[str, Any], title: str) -> Table:
    header, rows = table_rows(metrics)
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(metrics: dict[str, Any]) -> str:
    header, rows = table_rows(metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def latency_samples_text(metrics: dict[str, Any]) -> str:
    """How many latency samples: ``30``, or ``7 to 30`` under a time budget."""
    budget = metrics.get("latency_seconds")
    repeats = metrics["latency_repeats"]
    return f"{min(7, repeats)} to {repeats} (within {budget:g} s per batch size)" if budget else str(repeats)


def score_note(metrics: dict[str, Any]) -> str:
    info = primary_metric(metrics)
    if info["name"] == "accuracy":
        return "Accuracy is top-1 on test"
    return f"Scores are {info['name'].replace('_', ' ')} on test ({'higher' if info['higher_is_better'] else 'lower'} is better)"


def verdict(metrics: dict[str, Any]) -> str:
    """One honest sentence: did distillation beat training the student alone? (And, with a
    random-init baseline, what the teacher's weights gave the student.)"""
    text = _verdict(metrics)
    models = metrics["models"]
    if "random" in models:
        text += (
            f" From random weights, the same architecture trained on labels alone reaches "
            f"{format_score(score(models['random']), metrics)}."
        )
    return text


def _verdict(metrics: dict[str, Any]) -> str:
    models = metrics["models"]
    if "scratch" not in models and metrics.get("task") == "text_embedding":  # no labels to train a baseline on
        scores = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in sorted(models["distilled"]["metrics"].items()))
        return (
            f"An embedding student has no labels to train on alone, so there is no scratch baseline; scored against "
            f"the teacher on the test texts it reaches {scores} (the teacher's own linear probe: "
            f"{models['teacher']['metrics'].get('linear_probe', float('nan')):.4f})."
        )
    if "scratch" not in models:
        return "No scratch baseline was trained (baseline: false), so the gain from distillation is unknown."
    delta = score_gain(score(models["distilled"]), score(models["scratch"]), metrics)
    if delta > 0:
        return (
            f"Distillation helped: the distilled student beats the same student trained from scratch by "
            f"{gain_text(delta, metrics)}."
        )
    text = (
        f"Distillation did not help here: the distilled student is {gain_text(abs(delta), metrics)} "
        f"{'below' if delta < 0 else 'level with'} the same student trained from scratch."
    )
    teacher, scratch = score(models["teacher"]), score(models["scratch"])
    ahead = score_gain(teacher, scratch, metrics)
    if primary_metric(metrics)["percent"] and ahead < WEAK_TEACHER_POINTS:
        text += (
            f" The teacher is weak: at {format_score(teacher, metrics)} it is {'below' if ahead < 0 else 'barely above'} the "
            f"student trained from scratch ({format_score(scratch, metrics)}), and a student cannot learn from a teacher what "
            f"it does not know; train the teacher longer or use a larger one."
        )
    return text


ONNX_TOLERANCE = 1e-4
"""The largest output difference between onnxruntime and PyTorch that counts as the same model."""

WEAK_TEACHER_POINTS = 1.0
"""A teacher less than this many points above the scratch student has little to teach."""


def training_warnings(metrics: dict[str, Any]) -> list[str]:
    """The warnings training raised (a model at chance, a loss that did not fall), in role order."""
    training = metrics.get("training") or {}
    return [w for r in training.values() if r for w in r.get("warnings", [])]


def validation_note(data: dict[str, Any]) -> str:
    augment = (
        f" The students' training images were augmented ({data['augment']}); teacher and student saw the same views."
        if data.get("augment")
        else ""
    )
    if data.get("val", 1) == 0:
        return "No validation split (data.val_fraction: 0): each model is the one of its last epoch." + augment
    return "Best epochs chosen on validation." + augment


def speed_notes(metrics: dict[str, Any]) -> list[str]:
    """Throughput at the largest timed batch, and the distilled student's onnxruntime latency
    beside PyTorch's when the run measured it (``eval.onnx``)."""
    models, sizes = metrics["models"], metrics["latency_batch_sizes"]
    biggest = str(max(sizes))
    task, length = metrics.get("task", ""), (metrics["data"]["input_shape"] or [1])[0]
    per_sample = length if task == "causal_lm" else 1  # a language model's throughput is in tokens
    unit = (
        "tokens" if task == "causal_lm" else f"sequences of {length} tokens" if task.startswith("text") else "samples"
    )
    rates = ", ".join(
        f"{ROLE_TITLES[role].removesuffix(' student')} {1000 * int(biggest) * per_sample / m['latency_ms'][biggest]:,.0f}"
        for role in ROLES
        if (m := models.get(role)) and m["latency_ms"].get(biggest)
    )
    notes = [f"Throughput at batch {biggest}, {unit} per second: {rates}."]
    generation = metrics.get("generation")
    if generation:
        speeds = generation["tokens_per_second"]
        batches = sorted({b for v in speeds.values() for b in v}, key=int)
        text = ", ".join(
            f"{ROLE_TITLES[role].removesuffix(' student')} " + " / ".join(f"{speeds[role][b]:,.1f}" for b in batches)
            for role in ROLES
            if role in speeds
        )
        notes.append(
            f"Greedy generation of {generation['new_tokens']} new tokens, tokens per second at batch "
            f"{' / '.join(batches)}: {text}."
        )
    onnx = models.get("distilled", {}).get("onnx")
    if onnx:
        pairs = ", ".join(
            f"{onnx['onnxruntime_ms'][b]:.2f} ms at batch {b} (PyTorch {models['distilled']['latency_ms'][b]:.2f} ms)"
            for b in map(str, sizes)
        )
        off = onnx["max_abs_difference"] > ONNX_TOLERANCE
        notes.append(
            f"Under onnxruntime the distilled student takes {pairs}; its outputs differ from PyTorch's by at most "
            f"{onnx['max_abs_difference']:.1e}"
            + (
                f", more than {ONNX_TOLERANCE:g}: this ONNX model does not compute what the student does."
                if off
                else "."
            )
        )
    return notes


def remembered_note(metrics: dict[str, Any]) -> str:
    """Where the teacher's test scores come from, when not from this run's own pass."""
    if not metrics.get("teacher_predictions_remembered"):
        return ""
    return (
        " The teacher's test predictions were remembered from an earlier run with the same weights and test "
        "split, and checked again on a few of its samples."
    )


def write_markdown(path: Path, metrics: dict[str, Any], config_yaml: str) -> None:
    data = metrics["data"]
    lines = [
        f"# distill run: {metrics['name']}",
        "",
        verdict(metrics),
        "",
        markdown_table(metrics),
        "",
        f"Test split: {data['test']} samples of {data['name']}; training on {data['train']} samples "
        f"({data['train_labeled']} labeled), validation {data['val']}. {score_note(metrics)}; agreement is "
        f"top-1 agreement with the teacher; retention = student / teacher score; gap closed = "
        f"(distilled − scratch) / (teacher − scratch). Latency: median of {latency_samples_text(metrics)} timed samples of CPU "
        f"forward passes with {metrics['latency_threads']} thread(s); speed-up is relative to the teacher. "
        f"{validation_note(data)}",
        "",
        " ".join(speed_notes(metrics)),
        "",
        *[f"**Warning:** {w}\n" for w in training_warnings(metrics)],
        f"Trained on {metrics['device']} in {metrics['seconds']:.0f} s." + remembered_note(metrics),
        "",
        "![training curves](curves.png)",
        "",
        "![accuracy against size and latency](tradeoff.png)",
        "",
        *(
            [
                "## Pruning",
                "",
                f"{metrics['pruning']['summary']}.",
                "",
                "![what the pruned student kept](pruning.png)",
                "",
            ]
            if metrics.get("pruning")
            else []
        ),
        "## Config",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    write_text(path, "\n".join(lines))


def write_plots(run_dir: Path, metrics: dict[str, Any], histories: dict[str, list[dict]]) -> None:
    """curves.png (training loss and validation accuracy) and tradeoff.png, for report.md."""
    from distill.report.plots import curves_figure, save_png, tradeoff_figure

    save_png(curves_figure(histories, metrics.get("primary_metric")), run_dir / "curves.png")
    save_png(tradeoff_figure(metrics), run_dir / "tradeoff.png")


def print_summary(console: Console, metrics: dict[str, Any], run_dir: Path) -> None:
    console.print()
    console.print(console_table(metrics, f"distill: {metrics['name']} ({metrics['data']['name']}, test split)"))
    console.print(verdict(metrics))
    for note in speed_notes(metrics):
        console.print(note)
    for warning in training_warnings(metrics):
        console.print(f"[yellow]warning: {warning}[/]")
    if metrics["data"].get("val", 1) == 0:
        console.print(validation_note(metrics["data"]))
    console.print(f"[dim]run directory: {run_dir}[/]")
