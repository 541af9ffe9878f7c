"""One experiment end to end: teacher, scratch student, distilled student, evaluation, report.

The run is built in ``<dir>/<name>.partial`` and renamed to ``<dir>/<name>`` only when
everything is written, so a failed or interrupted run never looks complete; ``resume=True``
continues a ``.partial`` run from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from rich.console import Console
from torch import nn

from . import __version__
from .config import CheckpointTeacher, ExperimentConfig, TrainedTeacher, TrainSpec, config_to_dict
from .data import DataBundle, load_data
from .distiller import Distiller, logits_of
from .errors import DistillError
from .evaluate import accuracy, agreement, measure_latency, per_class_accuracy, predict
from .io import hash_json, load_weights, save_weights, write_json, write_text
from .losses import HardLabelCE, build_term
from .models import build_model, count_parameters
from .report import print_summary, write_markdown, write_plots
from .trainer import TrainResult, pick_device, train


def default_cache_dir() -> Path:
    """Where trained teachers are kept between runs ($DISTILL_CACHE_DIR or ~/.cache/distill)."""
    env = os.environ.get("DISTILL_CACHE_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distill"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


def check_outputs(model: nn.Module, data: DataBundle, field: str) -> None:
    """Run one tiny batch through ``model`` and check it gives one logit per class."""
    model.eval()
    try:
        with torch.inference_mode():
            logits = logits_of(model(data.train.x[:2]))
    except Exception as err:  # noqa: BLE001 - any failure here is a model/data mismatch
        raise DistillError(
            f"{field}: forward pass on inputs of shape {list(data.input_shape)} failed: {str(err).splitlines()[0]}"
        ) from None
    if logits.shape[-1] != data.num_classes:
        raise DistillError(
            f"{field}: the model outputs {logits.shape[-1]} classes but the data has {data.num_classes}; "
            f"teacher, student and data must share the class set"
        )


def seeded_model(spec, data: DataBundle, seed: int, field: str) -> nn.Module:
    """Build a model whose initial weights depend only on ``seed`` (scratch and distilled
    students therefore start from the same weights)."""
    torch.manual_seed(seed)
    model = build_model(spec, data.input_shape, data.num_classes, field)
    check_outputs(model, data, field)
    return model


def _train_phase(phase_dir: Path, distiller: Distiller, data: DataBundle, config_train, *, seed, device,
                 resume, label, console, on_epoch_end) -> TrainResult:
    """Train one model inside ``phase_dir``; a finished phase is loaded, not retrained."""
    weights, history_file = phase_dir / "model.safetensors", phase_dir / "history.json"
    if resume and weights.exists() and history_file.exists():
        load_weights(distiller.student, weights)
        saved = json.loads(history_file.read_text())
        console.print(f"[dim]{label}: already trained, reusing {weights}[/]")
        return TrainResult.from_dict(saved)
    phase_dir.mkdir(parents=True, exist_ok=True)
    result = train(distiller, data, config_train, seed=seed, device=device, checkpoint=phase_dir / "checkpoint.pt",
                   resume=resume, label=label, console=console, on_epoch_end=on_epoch_end)
    distiller.student.to("cpu")
    save_weights(distiller.student, weights)
    write_json(history_file, result.to_dict())
    (phase_dir / "checkpoint.pt").unlink(missing_ok=True)
    return result


def obtain_teacher(config: ExperimentConfig, data: DataBundle, device, console: Console, cache_dir: Path,
                   resume: bool) -> tuple[nn.Module, Path, TrainResult | None]:
    """The teacher model, the path of its weights, and its training history if distill trained it."""
    spec = config.teacher
    model = seeded_model(spec.model, data, config.seed, "teacher.model")
    if isinstance(spec, CheckpointTeacher):
        load_weights(model, spec.path, "teacher.path")
        check_outputs(model, data, "teacher.path")
        return model, spec.path, None
    assert isinstance(spec, TrainedTeacher)
    key = hash_json({"teacher": spec.model_dump(mode="json"), "seed": config.seed, "data": data.fingerprint, "format": 1})
    final = cache_dir / "teachers" / key[:20]
    if (final / "model.safetensors").exists():
        console.print(f"teacher: reusing cached teacher {final}")
        load_weights(model, final / "model.safetensors")
        saved = json.loads((final / "history.json").read_text())
        return model, final / "model.safetensors", TrainResult.from_dict(saved)
    console.print(f"teacher: training {count_parameters(model):,} parameters (cached for later runs)")
    work = final.with_name(final.name + ".partial")
    distiller = Distiller(model, None, {"ce": HardLabelCE()})
    result = _train_phase(work, distiller, data, spec.train, seed=config.seed, device=device, resume=True,
                          label="teacher", console=console, on_epoch_end=None)
    write_json(work / "meta.json", {"key": key, "teacher": spec.model_dump(mode="json"), "data": data.summary(),
                                     "seed": config.seed, "distill_version": __version__})
    if final.exists():  # a concurrent run finished first
        shutil.rmtree(work, ignore_errors=True)
    else:
        os.replace(work, final)
    return model.to("cpu"), final / "model.safetensors", result


def scratch_setup(student_data: DataBundle, config: ExperimentConfig) -> tuple[DataBundle, TrainSpec]:
    """The scratch baseline trains on the labeled samples only, for as many optimisation steps
    as the distilled student takes (more epochs when labels are scarce): a fair baseline."""
    labeled = student_data.labeled_only()
    if len(labeled.train) == len(student_data.train):
        return student_data, config.train
    steps = config.train.epochs * math.ceil(len(student_data.train) / config.train.batch_size)
    epochs = max(1, round(steps / math.ceil(len(labeled.train) / config.train.batch_size)))
    return labeled, config.train.model_copy(update={"epochs": epochs})


def build_distiller(config: ExperimentConfig, student: nn.Module, teacher: nn.Module) -> Distiller:
    terms, weights = {}, {}
    for spec in config.distill.resolved_terms():
        terms[spec.key] = build_term(spec.type, spec.params)
        weights[spec.key] = spec.weight
    return Distiller(student, teacher, terms, weights)


def _prepare_run_dir(config: ExperimentConfig, resume: bool, overwrite: bool, console: Console) -> tuple[Path, Path]:
    final = config.output.dir / (config.output.name or "run")
    partial = final.with_name(final.name + ".partial")
    saved_config = partial / "config.yaml"
    if final.exists() and not overwrite:
        raise DistillError(f"run directory {final} already exists; pass --overwrite or choose another output.name")
    if partial.exists():
        if not resume:
            raise DistillError(f"an unfinished run exists at {partial}; pass --resume to continue it or delete it")
        previous = yaml.safe_load(saved_config.read_text()) if saved_config.exists() else None
        current = config_to_dict(config)
        if previous is not None and {k: v for k, v in previous.items() if k != "output"} != {k: v for k, v in current.items() if k != "output"}:
            raise DistillError(f"--resume: the config differs from the one {partial} was started with ({saved_config}); use the same config")
        console.print(f"resuming {partial}")
    elif resume:
        console.print(f"[dim]--resume: nothing to resume at {partial}, starting a new run[/]")
    partial.mkdir(parents=True, exist_ok=True)
    write_text(saved_config, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return final, partial


def run_experiment(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    cache_dir: Path | None = None,
    on_epoch_end: Callable[[str, int], None] | None = None,
) -> RunResult:
    """Train teacher (or load it), scratch and distilled students; evaluate; write the run directory."""
    console = console or Console()
    started = time.perf_counter()
    device = pick_device(config.device)
    cache_dir = cache_dir or default_cache_dir()

    # everything that can be wrong with the input is checked before the run directory exists
    data = load_data(config.data)
    console.print(f"data: {data.name}, {len(data.train)} train ({data.train.labeled} labeled) / "
                  f"{len(data.val)} val / {len(data.test)} test, {data.num_classes} classes, input {list(data.input_shape)}")
    seeded_model(config.student, data, config.seed, "student")
    if isinstance(config.teacher, CheckpointTeacher):
        load_weights(seeded_model(config.teacher.model, data, config.seed, "teacher.model"), config.teacher.path, "teacher.path")
    terms = config.distill.resolved_terms()
    if not any(TERM.type != "ce" for TERM in terms):
        console.print("[yellow]note: the objective has no teacher term (alpha=0), so the distilled student is trained like the scratch one[/]")
    if config.data.labeled is not None and config.data.labeled < len(data.train):
        console.print(f"label budget: the students see labels on {config.data.labeled} of {len(data.train)} training samples"
                      + ("; the ce term skips the rest" if any(t.type == "ce" for t in terms) else ""))

    final, partial = _prepare_run_dir(config, resume, overwrite, console)
    hook = (lambda role: (lambda epoch: on_epoch_end(role, epoch))) if on_epoch_end else (lambda role: None)

    teacher, teacher_weights, teacher_result = obtain_teacher(config, data, device, console, cache_dir, resume)

    results: dict[str, TrainResult | None] = {"teacher": teacher_result}
    students: dict[str, nn.Module] = {}
    student_data = data.with_label_budget(config.data.labeled, config.data.split_seed)
    if config.baseline:
        scratch = seeded_model(config.student, data, config.seed, "student")
        scratch_data, scratch_train = scratch_setup(student_data, config)
        console.print(f"scratch student: {count_parameters(scratch):,} parameters, {len(scratch_data.train)} labeled samples, "
                      f"{scratch_train.epochs} epochs")
        results["scratch"] = _train_phase(partial / "scratch", Distiller(scratch, None, {"ce": HardLabelCE()}), scratch_data,
                                          scratch_train, seed=config.seed, device=device, resume=resume,
                                          label="scratch", console=console, on_epoch_end=hook("scratch"))
        students["scratch"] = scratch
    student = seeded_model(config.student, data, config.seed, "student")
    distiller = build_distiller(config, student, teacher)
    objective = " + ".join(f"{distiller.weights[k]:g}·{k}" for k in distiller.terms)
    console.print(f"distilled student: {count_parameters(student):,} parameters, loss = {objective}")
    results["distilled"] = _train_phase(partial / "distilled", distiller, student_data, config.train, seed=config.seed,
                                        device=device, resume=resume, label="distilled", console=console,
                                        on_epoch_end=hook("distilled"))
    students["distilled"] = student

    console.print("evaluating on the test split and timing CPU latency ...")
    teacher.to("cpu")
    weights_paths = {"teacher": Path(teacher_weights)}
    for role, model in students.items():
        model.to("cpu")
        weights_paths[role] = partial / ("student.safetensors" if role == "distilled" else "scratch.safetensors")
        save_weights(model, weights_paths[role])
    metrics = evaluate_models({"teacher": teacher, **students}, weights_paths, student_data, config)
    metrics.update(
        name=final.name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), distill_version=__version__,
        device=str(device), seconds=time.perf_counter() - started, objective=objective,
        training={role: (r.to_dict() if r else None) for role, r in results.items()},
    )
    write_json(partial / "metrics.json", metrics)
    histories = {role: (r.to_dict()["history"] if r else []) for role, r in results.items()}
    write_plots(partial, metrics, histories)
    write_markdown(partial / "report.md", metrics, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    for phase in ("scratch", "distilled"):
        shutil.rmtree(partial / phase, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    print_summary(console, metrics, final)
    return RunResult(final, metrics)


def evaluate_models(models: dict[str, nn.Module], weights: dict[str, Path], data: DataBundle, config: ExperimentConfig) -> dict[str, Any]:
    """Test accuracy, agreement, retention, gap closed, size and latency for each model."""
    spec = config.eval
    logits = {role: predict(model, data.test.x) for role, model in models.items()}
    out: dict[str, Any] = {}
    for role, model in models.items():
        out[role] = {
            "test_acc": accuracy(logits[role], data.test.y),
            "agreement": agreement(logits[role], logits["teacher"]),
            "params": count_parameters(model),
            "size_bytes": weights[role].stat().st_size,
            "latency_ms": {str(b): measure_latency(model, data.input_shape, b, spec.latency_repeats, threads=spec.latency_threads)
                           for b in spec.latency_batch_sizes},
            "per_class_acc": per_class_accuracy(logits[role], data.test.y, data.num_classes),
        }
    teacher = out["teacher"]
    for role, m in out.items():
        m["retention"] = m["test_acc"] / teacher["test_acc"] if teacher["test_acc"] > 0 else float("nan")
        m["speedup"] = {b: teacher["latency_ms"][b] / m["latency_ms"][b] for b in m["latency_ms"]}
        m["compression"] = teacher["params"] / m["params"]
    if "scratch" in out:
        gap = teacher["test_acc"] - out["scratch"]["test_acc"]
        out["distilled"]["gap_closed"] = (out["distilled"]["test_acc"] - out["scratch"]["test_acc"]) / gap if gap > 0 else float("nan")
    return {
        "models": out,
        "data": data.summary(),
        "class_names": data.class_names,
        "seed": config.seed,
        "latency_batch_sizes": spec.latency_batch_sizes,
        "latency_repeats": spec.latency_repeats,
        "latency_threads": spec.latency_threads or torch.get_num_threads(),
    }
