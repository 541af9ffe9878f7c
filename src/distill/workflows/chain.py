"""``distill chain``: teacher → assistant(s) → student, each stage distilled from the one before.

Teacher-assistant knowledge distillation (Mirzadeh et al., 2020): when the student is far
smaller than the teacher, an intermediate model may bridge the gap. Every stage is an ordinary
experiment in its own run directory; stage k's teacher is a checkpoint teacher pointing at
stage k-1's ``student.safetensors``. The student is also distilled directly from the teacher
(``chain.direct``), from the same initial weights and for the same epochs, so the report can
say whether the chain helped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from rich.console import Console
from rich.table import Table

from distill.core.errors import DistillError
from distill.core.io import write_json, write_text
from distill.pipeline.config import ExperimentConfig, Strict, TrainSpec, config_to_dict
from distill.pipeline.experiment import RunResult, build_distiller, seeded_model
from distill.report.markdown import format_score, format_size, primary_metric, score, score_gain, score_label, val_score
from distill.tasks import get_task
from distill.tasks.models import ModelSpec
from distill.workflows.common import derive, finish_dir, prepare_dir, relocate_text, run_or_reuse, teacher_model
from distill.workflows.sizing import assistant_specs, describe


class ChainSpec(Strict):
    """The ``chain:`` section of a config."""

    assistants: int = Field(
        1, ge=1, le=8, description="how many assistants, sized automatically between teacher and student"
    )
    assistant_models: list[ModelSpec] | None = Field(
        None,
        min_length=1,
        description="the assistants' models in chain order (largest first), instead of automatic sizes",
    )
    assistant_train: TrainSpec | None = Field(
        None, description="how the assistants train; default: the config's train (the student always trains with it)"
    )
    direct: bool = Field(True, description="also distil the student directly from the teacher, for comparison")

    @model_validator(mode="after")
    def _one_count(self) -> ChainSpec:
        models = self.assistant_models
        if models is not None and "assistants" in self.model_fields_set and self.assistants != len(models):
            raise ValueError(
                f"assistants is {self.assistants} but assistant_models lists {len(models)}; give only one of them"
            )
        return self


@dataclass
class ChainResult:
    run_dir: Path
    summary: dict[str, Any]


def _entry(run: RunResult, which: str, **extra: Any) -> dict[str, Any]:
    """What the chain report needs about model ``which`` (teacher, scratch, distilled) of one run."""
    m, trained = run.metrics["models"][which], run.metrics["training"].get(which)
    return {
        "params": m["params"],
        "size_bytes": m["size_bytes"],
        "score": score(m),
        "val_score": val_score(trained) if trained else None,
        "epochs": len(trained["history"]) if trained else None,
        "seconds": trained["seconds"] if trained else None,
        "weights_sha256": m["weights_sha256"],
        **extra,
    }


def run_chain(
    config: ExperimentConfig,
    spec: ChainSpec,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    cache_dir: Path | None = None,
) -> ChainResult:
    """Distil through the assistants (and directly, with ``spec.direct``); write the chain's run directory."""
    console = console or Console()
    started = time.perf_counter()
    data = get_task(config.task).load_data(config.data)
    teacher_spec = teacher_model(config)
    if spec.assistant_models is not None:
        assistants = list(spec.assistant_models)
        for i, model in enumerate(assistants):  # builds and fits the data, before the run directory exists
            seeded_model(model, data, config.seed, f"chain.assistant_models.{i}", get_task(config.task))
    elif teacher_spec is None:
        raise DistillError(
            "chain.assistants: the teacher cache does not record the teacher's architecture, so assistants "
            "cannot be sized automatically; list them in chain.assistant_models"
        )
    else:
        assistants = assistant_specs(teacher_spec, config.student, spec.assistants, data.input_shape, data.num_classes)
    _check_stages(config, [teacher_spec, *assistants, config.student], data)
    saved = {**config_to_dict(config), "chain": spec.model_dump(mode="json")}
    final, partial = prepare_dir(config.output, saved, "chain.json", resume, overwrite, console)
    partial = partial.resolve()

    def run(name: str, **changes: Any) -> RunResult:
        console.rule(name)
        stage = derive(config, f"chain stage {name}", output={"dir": str(partial), "name": name}, **changes)
        return run_or_reuse(stage, resume=resume, console=console, cache_dir=cache_dir)

    direct = run("direct") if spec.direct else None
    models = [*assistants, config.student]
    teacher: Any = config_to_dict(config)["teacher"]
    stages: list[dict[str, Any]] = []
    for i, model in enumerate(models):
        last = i == len(models) - 1
        role = "student, via the chain" if last else f"assistant {i + 1}"
        name = f"stage{i + 1}-" + ("student" if last else f"assistant{i + 1}")
        result = run(
            name,
            teacher=teacher,
            student=model.model_dump(mode="json"),
            train=config.train if last or spec.assistant_train is None else spec.assistant_train,
            baseline=config.baseline and last and direct is None,  # the direct run has the same scratch student
        )
        if not stages:
            teacher_entry = _entry(result, "teacher", role="teacher", model=_describe(teacher_spec), dir=None)
        stages.append(
            _entry(
                result, "distilled", role=role, model=describe(model), dir=name,
                teacher=stages[-1]["role"] if stages else "teacher",
                teacher_sha256=result.metrics["models"]["teacher"]["weights_sha256"],
            )
        )  # fmt: skip
        teacher = {
            "kind": "checkpoint",
            "model": model.model_dump(mode="json"),
            "path": str(result.run_dir / "student.safetensors"),
        }
        last_run = result
    baselines = []
    if direct is not None:
        baselines.append(
            _entry(
                direct,
                "distilled",
                role="student, direct KD",
                model=describe(config.student),
                dir="direct",
                teacher="teacher",
            )
        )
    source = direct if direct is not None else last_run
    if "scratch" in source.metrics["models"]:
        baselines.append(
            _entry(
                source,
                "scratch",
                role="student, scratch",
                model=describe(config.student),
                dir=source.run_dir.name,
                teacher=None,
            )
        )
    summary = {
        "name": final.name,
        "assistants": "listed" if spec.assistant_models is not None else "automatic (geometric in parameters)",
        "teacher": teacher_entry,
        "stages": stages,
        "baselines": baselines,
        "primary_metric": primary_metric(last_run.metrics),
        "data": last_run.metrics["data"],
        "seed": config.seed,
        "seconds": time.perf_counter() - started,
    }
    summary["verdict"] = chain_verdict(summary)
    _write_chain(partial, summary, saved)
    relocate_text(partial, partial, final.resolve(), ("config.yaml", "report.md", "report.html"))
    finish_dir(partial, final)
    return ChainResult(final, summary)


def _check_stages(config: ExperimentConfig, models: list[Any], data: Any) -> None:
    """Every stage's objective fits its pair of models (feature taps exist, adapters fit), before
    anything is trained; a cached teacher (None) is checked by its own stage."""
    for i, (teacher, student) in enumerate(zip(models, models[1:], strict=False)):
        if teacher is not None:
            field = "student" if i == len(models) - 2 else f"chain assistant {i + 1}"
            pair = (
                seeded_model(student, data, config.seed, field, get_task(config.task)),
                seeded_model(teacher, data, config.seed, "teacher", get_task(config.task)),
            )
            build_distiller(config, *pair, data).remove_taps()


def _describe(spec: Any) -> str:
    return "cached teacher" if spec is None else describe(spec)


def chain_verdict(summary: dict[str, Any]) -> str:
    """One plain sentence: did the chain beat distilling the student directly?"""
    student = summary["stages"][-1]
    direct = next((b for b in summary["baselines"] if b["role"] == "student, direct KD"), None)
    hops = len(summary["stages"]) - 1
    via = f"{hops} assistant{'s' if hops > 1 else ''}"
    if direct is None:
        return (
            f"No direct distillation was run (chain.direct: false), so whether the chain via {via} helped is unknown."
        )
    test = score_gain(student["score"], direct["score"], summary)
    val = score_gain(student["val_score"], direct["val_score"], summary)
    unit = " points" if primary_metric(summary)["percent"] else ""
    numbers = f"{test:+.2f}{unit} on test, {val:+.2f} on validation, against direct distillation"
    if test > 0 and val > 0:
        text = f"The chain via {via} helped: {numbers}."
    elif test <= 0 and val <= 0:
        text = f"The chain via {via} did not help: {numbers}."
    else:
        text = f"The chain via {via} is inconclusive: {numbers} (one seed; run several to tell)."
    scratch = next((b for b in summary["baselines"] if b["role"] == "student, scratch"), None)
    if scratch is not None and all(score_gain(s["score"], scratch["score"], summary) <= 0 for s in (student, direct)):
        text += (
            f" Neither beats the same student trained from scratch ({format_score(scratch['score'], summary)} on test): "
            f"distillation did not help this student."
        )
    return text


def _rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "model",
        "architecture",
        "params",
        "size",
        "distilled from",
        "epochs",
        f"best val {score_label(summary)}",
        f"test {score_label(summary)}",
    ]
    rows = []
    for entry in [summary["teacher"], *summary["stages"], *summary["baselines"]]:
        rows.append([
            entry["role"],
            entry["model"], f"{entry['params']:,}", format_size(entry["size_bytes"]), entry.get("teacher") or "—",
            str(entry["epochs"] or "—"), format_score(entry["val_score"], summary), format_score(entry["score"], summary),
        ])  # fmt: skip
    return header, rows


def _write_chain(partial: Path, summary: dict[str, Any], saved: dict[str, Any]) -> None:
    import yaml

    from distill.report.plots import chain_figure, save_png

    write_json(partial / "chain.json", summary)
    save_png(chain_figure(summary), partial / "chain.png")
    header, rows = _rows(summary)
    data = summary["data"]
    lines = [
        f"# distill chain: {summary['name']}",
        "",
        summary["verdict"],
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"Assistant sizes: {summary['assistants']}. Each stage is distilled from the stage above it; every "
        f"stage's run directory (`stage*/`, `direct/`) holds its model, metrics and report. The student trains "
        f"the same epochs, from the same initial weights, in the chain and directly. Best epochs are chosen on "
        f"validation; test accuracy on {data['test']} samples of {data['name']} is only reported. One seed "
        f"({summary['seed']}).",
        "",
        "![accuracy along the chain](chain.png)",
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(saved, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    write_text(partial / "report.md", "\n".join(lines))


def print_chain(console: Console, result: ChainResult) -> None:
    header, rows = _rows(result.summary)
    table = Table(title=f"distill chain: {result.summary['name']} (test split)", title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 or name == "distilled from" else "right")
    for row in rows:
        table.add_row(*row)
    console.print()
    console.print(table)
    console.print(result.summary["verdict"])
    console.print(f"[dim]run directory: {result.run_dir}[/]")
