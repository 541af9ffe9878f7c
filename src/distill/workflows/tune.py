"""``distill tune``: search the distillation's own settings on the validation split.

Temperature, alpha (or the weights of an explicit terms list) and the learning rate are
searched with Optuna's TPE sampler (seeded) within a trial and/or time budget; a median
pruner stops trials whose validation score (the task's primary metric) lags after each epoch. Trials only ever train
on the training split and score on the validation split: the test split is not read. The
config's own settings are the first trial, and the same student trained from scratch is
scored the same way, so the report can say plainly when distillation did not help.

Writes ``best.yaml`` (a complete config with the best settings, runnable with ``distill
run``), ``trials.csv``, ``tune.json`` and ``report.md``.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, model_validator
from rich.console import Console
from rich.table import Table
from torch import nn

from distill.core.data import DataBundle
from distill.core.distiller import Distiller
from distill.core.errors import DistillError
from distill.core.evaluate import predict
from distill.core.io import write_json, write_text
from distill.core.losses import TERMS, HardLabelCE
from distill.core.losses.base import TeacherLogits
from distill.pipeline.config import ExperimentConfig, Strict, config_to_dict
from distill.pipeline.experiment import (
    build_distiller,
    default_cache_dir,
    hint_stages,
    obtain_teacher,
    run_hint_stage,
    scratch_setup,
    seeded_model,
)
from distill.report.markdown import format_score, primary_metric, score_gain, score_label
from distill.tasks import get_task
from distill.train.loop import EpochLog, pick_device, train
from distill.workflows.common import derive, finish_dir, prepare_dir, teacher_model


class Range(Strict):
    """A search range; ``log: true`` samples uniformly in log space."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


class SpaceSpec(Strict):
    """What is searched; ``null`` keeps a setting at the config's value."""

    temperature: Range | None = Field(default_factory=lambda: Range(low=1, high=10, log=True))
    alpha: Range | None = Field(
        default_factory=lambda: Range(low=0, high=1), description="weight of kd (Hinton form: alpha·kd + (1-alpha)·ce)"
    )
    lr_scale: Range | None = Field(
        default_factory=lambda: Range(low=0.25, high=4, log=True), description="multiplies train.lr"
    )
    weights: dict[str, Range] | None = Field(
        None,
        description="with an explicit distill.terms list: term name → weight range "
        "(default: each positive weight from ÷10 to ×10, log)",
    )


class PruneSpec(Strict):
    startup_trials: int = Field(4, ge=0, description="trials that are never pruned")
    warmup_epochs: int = Field(1, ge=0, description="epochs of each trial that are never pruned")


class TuneSpec(Strict):
    """The ``tune:`` section of a config."""

    trials: int | None = Field(20, gt=0, description="how many trials (null: until the timeout)")
    timeout: float | None = Field(None, gt=0, description="seconds; no new trial starts after it")
    epochs: int | None = Field(None, gt=0, description="epochs per trial; default: train.epochs")
    seed: int = Field(0, ge=0, description="seed of the sampler")
    space: SpaceSpec = Field(default_factory=SpaceSpec)
    prune: PruneSpec | None = Field(default_factory=PruneSpec, description="median pruning; null: never prune")

    @model_validator(mode="after")
    def _budget(self) -> TuneSpec:
        if self.trials is None and self.timeout is None:
            raise ValueError("set a budget: trials, timeout or both")
        return self


@dataclass
class TuneResult:
    run_dir: Path
    summary: dict[str, Any]


# ---------------------------------------------------------------------------- the search space


def _has_temperature(term_type: str) -> bool:
    return "temperature" in TERMS[term_type].Params.model_fields


def search_space(config: ExperimentConfig, space: SpaceSpec) -> dict[str, Range]:
    """The ranges to search, by parameter name (``temperature``, ``alpha``, ``lr_scale``,
    ``weight.<term>``); settings that do not apply to the config's objective are an error
    when the user asked for them and left out otherwise."""
    ranges: dict[str, Range] = {}
    terms = config.distill.terms
    given = space.model_fields_set
    if space.lr_scale is not None:
        ranges["lr_scale"] = space.lr_scale
    if terms is None:
        if space.weights is not None:
            raise DistillError(
                "tune.space.weights: the config's objective is alpha·kd + (1-alpha)·ce; tune alpha, or list distill.terms"
            )
        if space.temperature is not None:
            ranges["temperature"] = space.temperature
        if space.alpha is not None:
            ranges["alpha"] = space.alpha
        return ranges
    if "alpha" in given and space.alpha is not None:
        raise DistillError(
            "tune.space.alpha: the config lists distill.terms; tune their weights with tune.space.weights"
        )
    if space.temperature is not None:
        if any(_has_temperature(t.type) for t in terms):
            ranges["temperature"] = space.temperature
        elif "temperature" in given:
            raise DistillError("tune.space.temperature: none of the config's distill.terms has a temperature")
    keys = [t.key for t in terms]
    if space.weights is None:
        weights = {t.key: Range(low=t.weight / 10, high=t.weight * 10, log=True) for t in terms if t.weight > 0}
    else:
        unknown = sorted(set(space.weights) - set(keys))
        if unknown:
            raise DistillError(
                f"tune.space.weights: no term named {unknown[0]!r} in distill.terms; terms: {', '.join(keys)}"
            )
        weights = space.weights
    ranges.update({f"weight.{key}": r for key, r in weights.items()})
    return ranges


def apply_settings(config: ExperimentConfig, params: dict[str, float]) -> ExperimentConfig:
    """``config`` with sampled settings in place: the config a trial trains (and best.yaml)."""
    raw = config_to_dict(config)
    if "lr_scale" in params:
        raw["train"]["lr"] = config.train.lr * params["lr_scale"]
    if config.distill.terms is None:
        raw["distill"].update({k: params[k] for k in ("alpha", "temperature") if k in params})
    else:
        for term in raw["distill"]["terms"]:
            key = term.get("name") or term["type"]
            if f"weight.{key}" in params:
                term["weight"] = params[f"weight.{key}"]
            if "temperature" in params and _has_temperature(term["type"]):
                term["temperature"] = params["temperature"]
    return derive(config, "tuned settings", **raw)


def config_settings(config: ExperimentConfig, ranges: dict[str, Range]) -> dict[str, float] | None:
    """The config's own settings as a trial, or None if one lies outside its search range."""
    values: dict[str, float] = {"lr_scale": 1.0}
    if config.distill.terms is None:
        values.update(alpha=config.distill.alpha, temperature=config.distill.temperature)
    else:
        for term in config.distill.terms:
            values[f"weight.{term.key}"] = term.weight
            if _has_temperature(term.type) and "temperature" not in values:
                values["temperature"] = TERMS[term.type].Params(**term.params).temperature
    params = {name: values[name] for name in ranges}
    return params if all(ranges[name].contains(v) for name, v in params.items()) else None


def describe_settings(config: ExperimentConfig) -> str:
    """``T=4 alpha=0.9 lr=0.05`` or ``kd=0.5 ce=0.5 T=2 lr=0.05``."""
    if config.distill.terms is None:
        parts = [f"T={config.distill.temperature:.3g}", f"alpha={config.distill.alpha:.3g}"]
    else:
        parts = [f"{t.key}={t.weight:.3g}" for t in config.distill.terms]
        temperatures = {t.params.get("temperature") for t in config.distill.terms if _has_temperature(t.type)}
        parts += [f"T={value:.3g}" for value in temperatures if value is not None]
    return " ".join([*parts, f"lr={config.train.lr:.3g}"])


# ---------------------------------------------------------------------------- trials


def pruning_hook(trial: Any, metric: str = "accuracy") -> Callable[[EpochLog], None]:
    """Report each epoch's validation score (the task's primary metric) to Optuna and stop the
    trial if the pruner says so."""
    import optuna

    def report(log: EpochLog) -> None:
        trial.report((log.val_metrics or {}).get(metric, log.val_acc), log.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {log.epoch}")

    return report


def make_pruner(spec: PruneSpec | None) -> Any:
    """Optuna's median pruner over per-epoch validation scores (steps are epoch numbers, from 1)."""
    import optuna

    if spec is None:
        return optuna.pruners.NopPruner()
    # the earliest step Optuna prunes at is n_warmup_steps: epochs 1..warmup_epochs are safe
    return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_epochs + 1)


class _Trials:
    """Trains one student per trial (train and validation splits only) and keeps a record."""

    def __init__(self, config, ranges, epochs, data, teacher, device, console) -> None:
        self.config, self.ranges, self.epochs, self.device, self.console = config, ranges, epochs, device, console
        self.data = data
        self.student_data = data.with_label_budget(config.data.labeled, config.data.split_seed)
        self.teacher = teacher
        self.task = get_task(config.task)

    def train_student(self, config: ExperimentConfig, on_epoch_end: Callable[[EpochLog], None] | None) -> float:
        data, quiet = self.student_data, Console(quiet=True)
        options = {"seed": config.seed, "device": self.device, "console": quiet, "task": self.task}
        distiller = build_distiller(
            config,
            seeded_model(config.student, self.data, config.seed, "student", get_task(config.task)),
            self.teacher,
            data,
        )
        try:
            for name, term in hint_stages(distiller):

                def stage_phase(stage: Distiller, epochs: int):
                    spec = config.train.model_copy(update={"epochs": epochs})
                    return train(stage, data, spec, select_best=False, label="hint stage", **options)

                run_hint_stage(name, term, distiller, data, stage_phase)
            spec = config.train.model_copy(update={"epochs": self.epochs})
            return train(distiller, data, spec, label="trial", on_epoch_end=on_epoch_end, **options).best_val_score
        finally:
            distiller.remove_taps()  # a pruned trial must not leave hooks on the shared teacher

    def objective(self, trial: Any) -> float:
        params = {name: trial.suggest_float(name, r.low, r.high, log=r.log) for name, r in self.ranges.items()}
        try:
            return self.train_student(
                apply_settings(self.config, params), pruning_hook(trial, self.task.primary_metric)
            )
        except DistillError as err:  # e.g. a diverging learning rate: the trial fails, the search goes on
            trial.set_user_attr("error", str(err))
            raise

    def scratch(self, lr: float) -> float:
        """Best validation score of the student trained from scratch (labeled samples only,
        as many steps as a distilled student), at learning rate ``lr``."""
        scratch_data, passes = scratch_setup(self.student_data, self.config)
        student = seeded_model(self.config.student, self.data, self.config.seed, "student", get_task(self.config.task))
        spec = self.config.train.model_copy(update={"epochs": self.epochs, "lr": lr})
        distiller = Distiller(student, None, {"ce": HardLabelCE()})
        return train(
            distiller, scratch_data, spec, seed=self.config.seed, device=self.device, passes_per_epoch=passes,
            label="scratch", console=Console(quiet=True), task=self.task,
        ).best_val_score  # fmt: skip


def _shared_teacher(config: ExperimentConfig, teacher: Any, data: DataBundle, device: torch.device) -> Any:
    """The teacher for every trial: its logits on the training split computed once, when the
    objective reads nothing else from it; else the teacher itself."""
    probe = build_distiller(
        config, seeded_model(config.student, data, config.seed, "student", get_task(config.task)), teacher, data
    )
    probe.remove_taps()
    if not isinstance(teacher, nn.Module) or any(term.teacher_taps() for term in probe.terms.values()):
        return teacher
    return TeacherLogits(predict(teacher.to(device), data.train.x, device=device))


def run_tune(
    config: ExperimentConfig,
    spec: TuneSpec,
    *,
    overwrite: bool = False,
    console: Console | None = None,
    cache_dir: Path | None = None,
) -> TuneResult:
    import optuna

    console = console or Console()
    started = time.perf_counter()
    device = pick_device(config.device)
    ranges = search_space(config, spec.space)
    if not ranges:
        raise DistillError("tune.space: nothing to search; give at least one range")
    epochs = spec.epochs or config.train.epochs
    data = get_task(config.task).load_data(config.data)  # only its train and val splits are used below
    if len(data.val) == 0:
        raise DistillError("data.val_fraction: distill tune chooses settings on validation; set data.val_fraction > 0")
    teacher_spec = teacher_model(config)
    if teacher_spec is not None:  # the objective fits the models, before the run directory exists
        pair = (
            seeded_model(config.student, data, config.seed, "student", get_task(config.task)),
            seeded_model(teacher_spec, data, 0, "teacher", get_task(config.task)),
        )
        build_distiller(config, *pair, data).remove_taps()
    saved = {**config_to_dict(config), "tune": spec.model_dump(mode="json")}
    final, partial = prepare_dir(config.output, saved, "tune.json", False, overwrite, console, resumable=False)
    teacher, _, _ = obtain_teacher(config, data, device, console, cache_dir or default_cache_dir())
    shared = _shared_teacher(config, teacher, data, device)

    trials = _Trials(config, ranges, epochs, data, shared, device, console)
    startup = min(10, max(2, (spec.trials or 30) // 3))
    pruner = make_pruner(spec.prune)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        direction="maximize" if trials.task.higher_is_better else "minimize",
        sampler=optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup),
        pruner=pruner,
    )
    own = config_settings(config, ranges)
    if own is not None:
        study.enqueue_trial(own, user_attrs={"note": "the config's own settings"})
    budget = " and ".join(
        part
        for part in (f"{spec.trials} trials" if spec.trials else "", f"{spec.timeout:g} s" if spec.timeout else "")
        if part
    )
    console.print(f"tuning {', '.join(ranges)} on validation: {budget}, {epochs} epochs per trial")
    study.optimize(
        trials.objective,
        n_trials=spec.trials,
        timeout=spec.timeout,
        catch=(DistillError,),
        callbacks=[lambda _, trial: console.print(_trial_line(trial, config))],
    )
    records = [_record(t, config, trials.task.higher_is_better) for t in study.trials]
    complete = [r for r in records if r["state"] == "complete"]
    if not complete:
        errors = [r["error"] for r in records if r.get("error")]
        raise DistillError(
            f"tune: no trial completed ({errors[0] if errors else 'all were pruned'}); widen or move tune.space"
        )
    best_trial = study.best_trial
    best = apply_settings(config, best_trial.params)
    console.print("training the student from scratch for the baseline (validation only) ...")
    scratch = {f"{config.train.lr:.4g}": trials.scratch(config.train.lr)}
    if not math.isclose(best.train.lr, config.train.lr):
        scratch[f"{best.train.lr:.4g}"] = trials.scratch(best.train.lr)
    summary = {
        "name": final.name,
        "metric": f"best validation {trials.task.primary_metric} of the distilled student",
        "primary_metric": primary_metric_of(trials.task),
        "epochs_per_trial": epochs,
        "ranges": {name: r.model_dump() for name, r in ranges.items()},
        "best": {
            "trial": best_trial.number,
            "val_score": best_trial.value,
            "params": best_trial.params,
            "settings": describe_settings(best),
        },
        "config_settings": {
            "settings": describe_settings(config),
            "tried": own is not None,
            "val_score": records[0]["val_score"] if own is not None and records[0]["state"] == "complete" else None,
        },
        "scratch_val_score": (max if trials.task.higher_is_better else min)(scratch.values()),
        "scratch_val_score_by_lr": scratch,
        "trials": records,
        "states": {s: sum(r["state"] == s for r in records) for s in ("complete", "pruned", "failed")},
        "data": {"name": data.name, "train": len(data.train), "train_labeled": trials.student_data.train.labeled, "val": len(data.val)},
        "seed": config.seed,
        "sampler_seed": spec.seed,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    summary["verdict"] = tune_verdict(summary)
    best_raw = config_to_dict(best)
    best_raw["output"]["name"] = f"{final.name}-best"
    _write_tune(partial, summary, best_raw, config.train.epochs)
    finish_dir(partial, final)
    return TuneResult(final, summary)


def _record(trial: Any, config: ExperimentConfig, higher_is_better: bool = True) -> dict[str, Any]:
    state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(
        trial.state.name, trial.state.name.lower()
    )
    values = trial.intermediate_values
    seconds = (
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start
        else None
    )
    return {
        "trial": trial.number,
        "state": state,
        "val_score": trial.value
        if state == "complete"
        else ((max if higher_is_better else min)(values.values()) if values else None),
        "epochs": len(values),
        "params": trial.params,
        "settings": describe_settings(apply_settings(config, trial.params)) if trial.params else "",
        "seconds": seconds,
        "note": trial.user_attrs.get("note", ""),
        "error": trial.user_attrs.get("error"),
    }


def _trial_line(trial: Any, config: ExperimentConfig) -> str:
    task = get_task(config.task)
    r = _record(trial, config, task.higher_is_better)
    score = "—" if r["val_score"] is None else format_score(r["val_score"], {"primary_metric": primary_metric_of(task)})
    tail = f" ({r['error']})" if r["error"] else (f" ({r['note']})" if r["note"] else "")
    return f"trial {r['trial']}: {r['settings']} → val {score}, {r['state']} after {r['epochs']} epoch(s){tail}"


def primary_metric_of(task: Any) -> dict[str, Any]:
    return {"name": task.primary_metric, "higher_is_better": task.higher_is_better, "percent": task.primary_percent}


def validation_noise(accuracy: float, samples: int) -> float:
    """Points by which two models' validation accuracies may differ by chance alone: the
    binomial standard error of a difference of two accuracies near ``accuracy`` on ``samples``."""
    return 100 * math.sqrt(2 * accuracy * (1 - accuracy) / max(samples, 1))


def tune_verdict(summary: dict[str, Any]) -> list[str]:
    """Plain sentences: did the tuned distillation beat scratch on validation (by more than
    chance would, for accuracy: a binomial estimate), and did it beat the config's own settings?"""
    best, scratch = summary["best"], summary["scratch_val_score"]
    delta = score_gain(best["val_score"], scratch, summary)
    info = primary_metric(summary)
    unit = " points" if info["percent"] else ""
    noise = validation_noise(scratch, summary["data"]["val"]) if info["name"] == "accuracy" else 0.0
    shown = format_score(scratch, summary)
    scores = (
        f"with the best settings found ({best['settings']}) the distilled student scores "
        f"{format_score(best['val_score'], summary)}, "
    )
    lines = []
    if delta > noise:
        lines.append(
            f"Distillation helped on validation: {scores}{delta:+.2f}{unit} over the same student trained from "
            f"scratch ({shown})."
        )
    elif delta > 0:
        lines.append(
            f"Distillation did not clearly help on validation: {scores}only {delta:+.2f}{unit} over the same student "
            f"trained from scratch ({shown}), within the ±{noise:.2f}{unit} chance alone gives on "
            f"{summary['data']['val']} validation samples. Count it as no gain unless more seeds say otherwise."
        )
    else:
        lines.append(
            f"Distillation did not help on validation: {scores}{abs(delta):.2f}{unit} "
            f"{'below' if delta < 0 else 'level with'} the same student trained from scratch ({shown}). "
            f"Train this student from scratch, or try another teacher, student or budget."
        )
    own = summary["config_settings"]
    if not own["tried"]:
        lines.append(f"The config's own settings ({own['settings']}) lie outside the search ranges and were not tried.")
    elif own["val_score"] is None:
        lines.append(f"The config's own settings ({own['settings']}) did not complete their trial (trial 0).")
    elif best["trial"] == 0:
        lines.append(f"No trial beat the config's own settings ({own['settings']}).")
    else:
        lines.append(
            f"The config's own settings ({own['settings']}) scored {format_score(own['val_score'], summary)}; the tuned "
            f"ones {score_gain(best['val_score'], own['val_score'], summary):+.2f}{unit}."
        )
    return lines


def _trial_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["trial", "state", "epochs", f"best val {score_label(summary)}", "settings", "seconds", "note"]
    sign = 1 if primary_metric(summary)["higher_is_better"] else -1
    rows = []
    for r in sorted(
        summary["trials"], key=lambda r: (r["val_score"] is None, -sign * (r["val_score"] or 0), r["trial"])
    ):
        note = r["error"] or r["note"]
        if r["trial"] == summary["best"]["trial"]:
            note = "best" + (f"; {note}" if note else "")
        rows.append([
            str(r["trial"]), r["state"], str(r["epochs"]), "—" if r["val_score"] is None else format_score(r["val_score"], summary),
            r["settings"], "—" if r["seconds"] is None else f"{r['seconds']:.0f}", note,
        ])  # fmt: skip
    return header, rows


def _write_tune(partial: Path, summary: dict[str, Any], best_raw: dict[str, Any], final_epochs: int) -> None:
    best = summary["best"]
    header = (
        f"# Found by `distill tune` ({summary['name']}): trial {best['trial']}, validation "
        f"{primary_metric(summary)['name'].replace('_', ' ')} {format_score(best['val_score'], summary)} after "
        f"{summary['epochs_per_trial']} epoch(s);\n# the same student from scratch: "
        f"{format_score(summary['scratch_val_score'], summary)}. Run it with `distill run best.yaml`.\n"
    )
    write_text(partial / "best.yaml", header + yaml.safe_dump(best_raw, sort_keys=False))
    names = sorted({name for r in summary["trials"] for name in r["params"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["trial", "state", "epochs", f"val_{score_label(summary).replace(' ', '_')}", *names, "seconds", "note"]
    )
    for r in summary["trials"]:
        writer.writerow([
            r["trial"], r["state"], r["epochs"], "" if r["val_score"] is None else f"{r['val_score']:.6f}",
            *(r["params"].get(n, "") for n in names), "" if r["seconds"] is None else f"{r['seconds']:.1f}",
            r["error"] or r["note"],
        ])  # fmt: skip
    write_text(partial / "trials.csv", buffer.getvalue())
    write_json(partial / "tune.json", summary)
    table_header, rows = _trial_rows(summary)
    states = summary["states"]
    data = summary["data"]
    scratch = ", ".join(
        f"{format_score(v, summary)} at lr {lr}" for lr, v in summary["scratch_val_score_by_lr"].items()
    )
    searched = ", ".join(
        f"{name} in [{r['low']:g}, {r['high']:g}]" + (" (log)" if r["log"] else "")
        for name, r in summary["ranges"].items()
    )
    lines = [
        f"# distill tune: {summary['name']}",
        "",
        *summary["verdict"],
        "",
        f"Best settings: **{best['settings']}** (trial {best['trial']}), written to `best.yaml` with "
        f"train.epochs = {final_epochs}.",
        "",
        f"Searched: {searched}. "
        f"{len(summary['trials'])} trials: {states['complete']} complete, {states['pruned']} pruned, {states['failed']} failed. "
        f"Every trial and baseline trains {summary['epochs_per_trial']} epoch(s) on {data['train']} training samples "
        f"({data['train_labeled']} labeled) and is scored by its best validation {primary_metric(summary)['name'].replace('_', ' ')} ({data['val']} samples); the "
        f"test split is never read. Scratch baseline: {scratch} (the better one is compared). Seed {summary['seed']}, "
        f"sampler seed {summary['sampler_seed']}.",
        "",
        "| " + " | ".join(table_header) + " |",
        "|" + "---|" * len(table_header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    write_text(partial / "report.md", "\n".join(lines))


def print_tune(console: Console, result: TuneResult) -> None:
    header, rows = _trial_rows(result.summary)
    table = Table(title=f"distill tune: {result.summary['name']} (validation split, best first)", title_justify="left")
    for name in header:
        table.add_column(name, justify="left" if name in ("state", "settings", "note") else "right")
    for row in rows:
        table.add_row(*row)
    console.print()
    console.print(table)
    for line in result.summary["verdict"]:
        console.print(line)
    console.print(f"[dim]best config: {result.run_dir / 'best.yaml'}; run directory: {result.run_dir}[/]")
