"""``distill sweep``: distil a family of students from one teacher and show the trade-off.

Each student is an ordinary experiment in ``<run>/students/``; all share the teacher (a
trained teacher is cached once, a cached-signals teacher is read by every run). At the end
the distilled students are timed together, interleaved, so a busy moment of the machine
hits all alike, and the report marks the students on the accuracy–latency and accuracy–size
Pareto fronts: for any latency or size budget, the best student to ship is on the front.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, model_validator
from rich.console import Console
from rich.table import Table

from distill.core.errors import DistillError
from distill.core.evaluate import measure_latencies
from distill.core.io import load_weights, write_json, write_text
from distill.pipeline.config import ExperimentConfig, Strict, config_to_dict
from distill.pipeline.experiment import seeded_model
from distill.report.compare import pareto_front
from distill.report.markdown import format_score, format_size, primary_metric, score, score_gain, score_label, val_score
from distill.tasks import get_task
from distill.tasks.models import ModelSpec
from distill.workflows.common import derive, finish_dir, prepare_dir, relocate_text, run_or_reuse, teacher_model
from distill.workflows.sizing import describe, scale_width, slug

ORDER = "sorted by parameter count, smallest first (ties: fastest first)"


class SweepSpec(Strict):
    """The ``sweep:`` section of a config: the students to distil (either list, or both)."""

    students: list[ModelSpec] = Field(default_factory=list, description="student models, any arch")
    widths: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=list, description="width multipliers of the config's student (channels and hidden widths)"
    )

    @model_validator(mode="after")
    def _some(self) -> SweepSpec:
        if not self.students and not self.widths:
            raise ValueError("list students or widths (multipliers of the config's student), e.g. widths: [0.5, 1, 2]")
        return self


@dataclass
class SweepResult:
    run_dir: Path
    summary: dict[str, Any]


def sweep_students(config: ExperimentConfig, spec: SweepSpec) -> list[Any]:
    """The students of the sweep: ``students`` as listed, then the config's student at each width."""
    students = list(spec.students) + [scale_width(config.student, w, "sweep.widths") for w in spec.widths]
    seen: dict[str, int] = {}
    for i, student in enumerate(students):
        key = student.model_dump_json()
        if key in seen:
            raise DistillError(
                f"sweep: students {seen[key] + 1} and {i + 1} are the same model ({describe(student)}); "
                f"list each student once (small width multipliers can round to the same widths)"
            )
        seen[key] = i
    return students


def mark_fronts(points: list[dict[str, Any]]) -> None:
    """``front_latency`` / ``front_size``: no other student is at least as accurate and at least
    as fast (small), and strictly better in one of the two."""
    pareto_front(points, cost="latency_ms", flag="front_latency")
    pareto_front(points, cost="size_bytes", flag="front_size")


def ordered(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's order: parameter count ascending, then latency ascending."""
    return sorted(points, key=lambda p: (p["params"], p["latency_ms"]))


def budget_guide(
    points: list[dict[str, Any]], key: str, flag: str, unit: str, scoring: dict[str, Any] | None = None
) -> list[str]:
    """For a budget on ``key``: the front, cheapest first; each entry is the most accurate
    student within any budget from its own cost up to the next entry's."""
    front = sorted((p for p in points if p[flag]), key=lambda p: p[key])
    return [f"{p[key]:.3g} {unit} → {p['label']} ({format_score(p['score'], scoring or {})})" for p in front]


def run_sweep(
    config: ExperimentConfig,
    spec: SweepSpec,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    cache_dir: Path | None = None,
) -> SweepResult:
    console = console or Console()
    started = time.perf_counter()
    data = get_task(config.task).load_data(config.data)
    students = sweep_students(config, spec)
    for student in students:  # every student builds and fits the data before the run directory exists
        seeded_model(student, data, config.seed, f"sweep student {describe(student)}", get_task(config.task))
    saved = {**config_to_dict(config), "sweep": spec.model_dump(mode="json")}
    final, partial = prepare_dir(config.output, saved, "sweep.json", resume, overwrite, console)
    partial = partial.resolve()

    runs = []
    for i, student in enumerate(students):
        name = f"{i + 1:02d}-{slug(student)}"
        console.rule(f"student {i + 1}/{len(students)}: {describe(student)}")
        run_config = derive(config, "sweep", student=student, output={"dir": str(partial / "students"), "name": name})
        runs.append((student, run_or_reuse(run_config, resume=resume, console=console, cache_dir=cache_dir)))

    console.print("timing the distilled students together on the CPU ...")
    models = {}
    for student, run in runs:
        model = seeded_model(student, data, config.seed, "student", get_task(config.task))
        models[run.run_dir.name] = load_weights(model, run.run_dir / "student.safetensors")
    teacher_spec = teacher_model(config)
    if teacher_spec is not None:  # latency does not depend on the weights' values: a fresh model times the same
        models["teacher"] = seeded_model(teacher_spec, data, config.seed, "teacher.model", get_task(config.task))
    batches = [str(b) for b in config.eval.latency_batch_sizes]
    latency = {
        b: measure_latencies(
            models,
            data.input_shape,
            int(b),
            config.eval.latency_repeats,
            config.eval.latency_threads,
            max_seconds=config.eval.latency_seconds,
            inputs=get_task(config.task).latency_inputs(data, int(b)),
        )  # fmt: skip
        for b in batches
    }
    front_batch = batches[0]
    scoring = {"primary_metric": primary_metric(runs[0][1].metrics)}
    sign = 1 if scoring["primary_metric"]["higher_is_better"] else -1
    points = []
    for student, run in runs:
        m, name = run.metrics["models"], run.run_dir.name
        scratch = score(m["scratch"]) if "scratch" in m else None
        trained = run.metrics["training"]["distilled"]
        points.append({
            "label": describe(student), "dir": f"students/{name}", "params": m["distilled"]["params"],
            "size_bytes": m["distilled"]["size_bytes"], "size_kib": m["distilled"]["size_bytes"] / 1024,
            "latency_ms": latency[front_batch][name], "latency_by_batch": {b: latency[b][name] for b in batches},
            "val_score": val_score(trained), "score": score(m["distilled"]),
            "ranking": sign * score(m["distilled"]), "scratch_score": scratch,
            "over_scratch": None if scratch is None else score_gain(score(m["distilled"]), scratch, run.metrics),
        })  # fmt: skip
    mark_fronts(points)
    t = runs[0][1].metrics["models"]["teacher"]
    teacher_point = {
        "label": "cached teacher" if teacher_spec is None else describe(teacher_spec), "params": t["params"], "size_bytes": t["size_bytes"],
        "size_kib": t["size_bytes"] / 1024, "score": score(t),
        "latency_ms": latency[front_batch].get("teacher"),
        "latency_by_batch": {b: latency[b].get("teacher") for b in batches},
    }  # fmt: skip
    summary = {
        "name": final.name,
        "order": ORDER,
        **scoring,
        "front_batch": front_batch,
        "students": ordered(points),
        "teacher": teacher_point,
        "data": runs[0][1].metrics["data"],
        "seed": config.seed,
        "latency_repeats": config.eval.latency_repeats,
        "seconds": time.perf_counter() - started,
    }
    summary["verdict"] = sweep_verdict(summary)
    _write_sweep(partial, summary, saved)
    relocate_text(partial, partial, final.resolve(), ("config.yaml", "report.md", "report.html"))
    finish_dir(partial, final)
    return SweepResult(final, summary)


def sweep_verdict(summary: dict[str, Any]) -> list[str]:
    """Plain sentences: which students are on the fronts, and where distillation did not help."""
    points = summary["students"]
    lines = [
        f"On the accuracy–latency front (batch {summary['front_batch']}): "
        + ", ".join(p["label"] for p in points if p["front_latency"]) + ".",
        "On the accuracy–size front: " + ", ".join(p["label"] for p in points if p["front_size"]) + ".",
    ]  # fmt: skip
    unit = " points" if primary_metric(summary)["percent"] else ""
    compared = [p for p in points if p["over_scratch"] is not None]
    worse = [p for p in compared if p["over_scratch"] <= 0]
    if worse:
        lines.append(
            "Distillation did not help "
            + ", ".join(f"{p['label']} ({p['over_scratch']:+.2f}{unit})" for p in worse)
            + ": trained from scratch, these students are as good or better on test."
        )
    elif compared:
        gains = ", ".join(f"{p['over_scratch']:+.2f}" for p in compared)
        lines.append(f"Distillation helped every student ({gains}{unit} over scratch on test).")
    return lines


def _rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    batches = list(summary["students"][0]["latency_by_batch"])
    name = score_label(summary)
    header = ["student", "params", "size", *(f"ms @{b}" for b in batches), f"best val {name}", f"test {name}"]
    header += [f"scratch test {name}", "Δ vs scratch", "★ latency", "★ size"]
    rows = []
    for p in summary["students"]:
        gain = "—" if p["over_scratch"] is None else f"{p['over_scratch']:+.2f}"
        rows.append([
            p["label"], f"{p['params']:,}", format_size(p["size_bytes"]),
            *(f"{p['latency_by_batch'][b]:.3f}" for b in batches), format_score(p["val_score"], summary), format_score(p["score"], summary),
            format_score(p["scratch_score"], summary), gain, "★" if p["front_latency"] else "", "★" if p["front_size"] else "",
        ])  # fmt: skip
    t = summary["teacher"]
    rows.append([
        f"teacher (reference): {t['label']}", f"{t['params']:,}", format_size(t["size_bytes"]),
        *("—" if t["latency_by_batch"][b] is None else f"{t['latency_by_batch'][b]:.3f}" for b in batches),
        "—", format_score(t["score"], summary), "—", "—", "", "",
    ])  # fmt: skip
    return header, rows


def _notes(summary: dict[str, Any]) -> list[str]:
    data = summary["data"]
    return [
        f"Students {summary['order']}. ★ latency: on the accuracy–latency front, i.e. no other student is at least as "
        f"accurate and at least as fast, and strictly better in one; ★ size: the same for size on disk. Fronts use "
        f"the distilled students' test accuracy; the teacher is a reference, not a candidate.",
        f"Latency: median of {summary['latency_repeats']} CPU samples per model, all models timed together at the "
        f"end, interleaved. Test split: {data['test']} samples of {data['name']}; training on {data['train']} "
        f"samples ({data['train_labeled']} labeled). Best epochs chosen on validation. One seed ({summary['seed']}).",
    ]


def _write_sweep(partial: Path, summary: dict[str, Any], saved: dict[str, Any]) -> None:
    from distill.report.plots import png_data_uri, save_png, sweep_figure

    write_json(partial / "sweep.json", summary)

    def figure():
        return sweep_figure(
            summary["students"], summary["front_batch"], summary["teacher"], summary.get("primary_metric")
        )

    save_png(figure(), partial / "pareto.png")
    header, rows = _rows(summary)
    guide_latency = budget_guide(summary["students"], "latency_ms", "front_latency", "ms", summary)
    guide_size = budget_guide(summary["students"], "size_kib", "front_size", "KiB", summary)
    config_yaml = yaml.safe_dump(saved, sort_keys=False).rstrip()
    lines = [
        f"# distill sweep: {summary['name']}",
        "",
        *(f"- {line}" for line in summary["verdict"]),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        *_notes(summary),
        "",
        f"**Which student for a latency budget** (batch {summary['front_batch']}; from each budget up to the next): "
        + "; ".join(guide_latency),
        "",
        "**Which student for a size budget**: " + "; ".join(guide_size),
        "",
        "![accuracy against latency and size](pareto.png)",
        "",
        "## Config",
        "",
        "```yaml",
        config_yaml,
        "```",
        "",
    ]
    write_text(partial / "report.md", "\n".join(lines))
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>distill sweep: {escape(summary["name"])}</title><link rel="icon" href="data:,">
<style>body {{ font-family: system-ui, sans-serif; max-width: 1150px; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }}
table {{ border-collapse: collapse; font-size: .9rem; }} th, td {{ border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }} th {{ background: #f3f3f5; }} img {{ max-width: 100%; }}
pre {{ background: #f6f6f8; padding: .8rem; font-size: .8rem; overflow-x: auto; }} .muted {{ color: #666; font-size: .85rem; }}</style>
</head><body>
<h1>distill sweep: {escape(summary["name"])}</h1>
<ul>{"".join(f"<li>{escape(line)}</li>" for line in summary["verdict"])}</ul>
<table id="sweep"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{"".join(f'<p class="muted">{escape(note)}</p>' for note in _notes(summary))}
<p><b>Which student for a latency budget</b> (batch {escape(summary["front_batch"])}): {escape("; ".join(guide_latency))}</p>
<p><b>Which student for a size budget</b>: {escape("; ".join(guide_size))}</p>
<img src="{png_data_uri(figure())}" alt="accuracy against latency and size, fronts marked">
<h2>Config</h2><pre>{escape(config_yaml)}</pre>
</body></html>
"""
    write_text(partial / "report.html", html)


def print_sweep(console: Console, result: SweepResult) -> None:
    header, rows = _rows(result.summary)
    table = Table(title=f"distill sweep: {result.summary['name']} ({ORDER})", title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print()
    console.print(table)
    for line in result.summary["verdict"]:
        console.print(line)
    console.print(f"[dim]run directory: {result.run_dir}[/]")
